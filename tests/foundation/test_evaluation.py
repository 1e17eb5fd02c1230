"""Sampled task accuracy (mean@k, pass@k) of a saved model: shapes, bounds, and the greedy limit."""

from __future__ import annotations

import pytest


def _records(n: int) -> list[dict]:
    import random

    from llmray.data import tasks

    rng = random.Random(7)
    return [tasks.prompt_record(tasks.make_task(rng)) for _ in range(n)]


def test_sampled_accuracy_counts_k_samples_per_prompt(tiny_model_dir):
    from llmray import evaluation

    loaded = evaluation.load(tiny_model_dir)
    recs = _records(5)
    out = evaluation.sampled_accuracy(loaded, recs, k=3, max_new_tokens=4, batch_size=2)
    assert out["n"] == 5 and out["k"] == 3 and len(out["per_prompt"]) == 5
    # Each prompt's score is a count of correct samples out of k.
    assert all(round(p * 3) == pytest.approx(p * 3) for p in out["per_prompt"])
    assert 0.0 <= out["mean_at_k"] <= out["pass_at_k"] <= 1.0
    # An answer no response can state scores zero everywhere.
    impossible = [{**r, "answer": "not-a-possible-answer"} for r in recs]
    none = evaluation.sampled_accuracy(loaded, impossible, k=3, max_new_tokens=4)
    assert none["mean_at_k"] == 0.0 and none["pass_at_k"] == 0.0


def test_sampled_accuracy_at_low_temperature_is_greedy(tiny_model_dir, monkeypatch):
    """Near temperature 0 every sample is the greedy response. An untrained model states no
    `The answer is X`, so the answer extractor is swapped for the whole response: gold = the greedy
    response for even records, a sentinel for odd ones -> mean@k = pass@k = 1/2 exactly."""
    from llmray import evaluation
    from llmray.data import tasks

    monkeypatch.setattr(tasks, "extract_answer", lambda response: response.strip())
    loaded = evaluation.load(tiny_model_dir)
    recs = _records(6)
    greedy = evaluation.generate_greedy(loaded, [r["prompt"] for r in recs], max_new_tokens=6)
    gold = [dict(r, answer=g.strip() if i % 2 == 0 else f"sentinel-{i}") for i, (r, g) in enumerate(zip(recs, greedy))]
    out = evaluation.sampled_accuracy(loaded, gold, k=2, temperature=1e-4, max_new_tokens=6)
    assert out["per_prompt"] == [1.0, 0.0] * 3
    assert out["mean_at_k"] == pytest.approx(0.5) and out["pass_at_k"] == pytest.approx(0.5)
    # At temperature 1 the same untrained model rarely repeats its greedy response.
    hot = evaluation.sampled_accuracy(loaded, gold, k=2, temperature=1.0, max_new_tokens=6)
    assert hot["mean_at_k"] < 0.5
