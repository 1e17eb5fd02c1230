"""RL monitors against hand-computed figures: length drift, reward gain per KL, the reward-hacking warning."""

import pytest

from llmray.rl.monitors import Monitors


def _m(reward: float, length: float, kl: float = 0.5) -> dict:
    return {"rollout/reward_mean": reward, "rollout/response_length": length, "kl/seq_mean": kl}


def test_length_drift_and_reward_gain_against_the_first_three_steps():
    mon = Monitors()
    for step, (r, n) in enumerate([(0.2, 10), (0.3, 12), (0.4, 14)], start=1):
        mon.on_step(step, _m(r, n))
    out = mon.on_step(4, _m(0.6, 18, kl=2.0))
    assert out["monitor/length_drift"] == pytest.approx(18 / 12)
    assert out["monitor/reward_gain"] == pytest.approx(0.6 - 0.3)
    assert out["monitor/reward_gain_per_kl"] == pytest.approx(0.3 / 2.0)


def test_warns_when_reward_rises_while_held_out_accuracy_falls():
    mon = Monitors()
    assert mon.on_eval(0, 0.30) is None
    for step, r in enumerate([0.20, 0.22, 0.21, 0.24], start=1):
        mon.on_step(step, _m(r, 10))
    assert mon.on_eval(4, 0.31) is None  # accuracy did not fall
    for step, r in enumerate([0.40, 0.45, 0.50, 0.55], start=5):
        mon.on_step(step, _m(r, 10))
    msg = mon.on_eval(8, 0.22)
    # reward: steps 1-4 mean 0.2175 -> steps 5-8 mean 0.475; accuracy 0.31 -> 0.22
    assert msg is not None and "0.217 -> 0.475" in msg and "0.310 -> 0.220" in msg
    assert mon.warnings == [msg]


def test_no_warning_when_both_rise_or_both_fall():
    mon = Monitors()
    mon.on_eval(0, 0.3)
    for step in range(1, 5):
        mon.on_step(step, _m(0.1 * step, 10))
    assert mon.on_eval(4, 0.4) is None
    for step in range(5, 9):
        mon.on_step(step, _m(0.1, 10))
    assert mon.on_eval(8, 0.2) is None  # reward fell too: a worse policy, not hacking
