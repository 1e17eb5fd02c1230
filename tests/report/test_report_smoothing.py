"""The curve smoother (centered moving average) and its window choice: pure functions, exact numbers."""

from __future__ import annotations

import pytest

from llmray.report.metrics import rolling_mean, smoothing_half_width


def test_rolling_mean_is_centered_and_shrinks_at_the_ends():
    # h=1: [1], mean(1,4,7)=4, mean(4,7,10)=7... ends raw; h=2 in the middle: mean(1,4,7,10,13)=7
    assert rolling_mean([1.0, 4.0, 7.0, 10.0, 13.0], 1) == pytest.approx([1.0, 4.0, 7.0, 10.0, 13.0])
    assert rolling_mean([0.0, 6.0, 0.0, 6.0, 0.0], 1) == pytest.approx([0.0, 2.0, 4.0, 2.0, 0.0])
    assert rolling_mean([0.0, 6.0, 0.0, 6.0, 0.0], 2) == pytest.approx([0.0, 2.0, 2.4, 2.0, 0.0])
    assert rolling_mean([3.0, -1.0], 0) == [3.0, -1.0]
    assert rolling_mean([], 5) == []


def test_rolling_mean_damps_noise_without_lagging_a_trend():
    noisy = [10.0 - 0.05 * i + (1.0 if i % 2 else -1.0) for i in range(200)]
    smooth = rolling_mean(noisy, 5)
    # Inside: the mean of 11 points, six of one sign and five of the other: the trend +- 1/11.
    for i in range(5, 195):
        assert abs(smooth[i] - (10.0 - 0.05 * i)) <= 1 / 11 + 1e-9
    assert (smooth[0], smooth[-1]) == pytest.approx((noisy[0], noisy[-1]))


def test_rolling_mean_rejects_a_negative_window():
    with pytest.raises(ValueError, match="half_width"):
        rolling_mean([1.0, 2.0], -1)


def test_smoothing_window_grows_with_the_curve():
    assert smoothing_half_width(8) == 0  # 8 RL steps: drawn as they are
    assert smoothing_half_width(30) == 2  # a window of 5
    assert smoothing_half_width(96) == 5  # 11
    assert smoothing_half_width(300) == 15
    assert smoothing_half_width(100_000) == 25  # capped
