"""Multi-source mixing: quota arithmetic, seeded order, and `pack` with a `mix` section (token shares
within 1% of the weights per phase, byte-identical shards for the same seed)."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest

from llmray import artifacts
from llmray.config import ConfigError, build
from llmray.data import synthetic
from llmray.data.mix import MixConfig, fill, interleave, layout, plan, quotas, shard_pieces
from llmray.data.pack import PackConfig


def test_quotas_sum_to_budget_by_largest_remainder():
    assert quotas(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    q = quotas(1_000_003, {"web": 0.7, "code": 0.2, "books": 0.1})
    assert sum(q.values()) == 1_000_003 and abs(q["web"] - 700_002) <= 1


def test_fill_takes_exact_quota_and_cycles_epochs_in_seeded_order():
    lengths = np.array([5, 7, 3])
    cur: dict = {}
    pieces = fill(lengths, 40, seed=1, source="s", cursor=cur)
    assert sum(t for _, t in pieces) == 40 and cur["epoch"] == 2  # 15 tokens per epoch
    assert sorted(d for d, _ in pieces[:3]) == [0, 1, 2]  # each epoch is a permutation
    assert pieces == fill(lengths, 40, seed=1, source="s", cursor={})


def test_interleave_spreads_each_source_over_the_phase():
    order = interleave({"a": [(i, 10) for i in range(70)], "b": [(i, 10) for i in range(30)]})
    first_half = [s for s, _, _ in order[:50]]
    assert abs(first_half.count("a") - 35) <= 1


def test_plan_phases_in_order_with_anneal_last():
    cfg = build(MixConfig, {"sources": [{"name": "web", "input": "x"}, {"name": "hq", "input": "y"}],
                            "phases": [{"tokens": 1000, "weights": {"web": 0.8, "hq": 0.2}},
                                       {"tokens": 200, "weights": {"hq": 1.0}}]})
    p = plan(cfg, {"web": np.full(50, 9), "hq": np.full(10, 11)})
    assert sum(t for s, _, t in p[0] if s == "web") == 800 and {s for s, _, _ in p[1]} == {"hq"}


def test_shard_pieces_cut_the_planned_stream_exactly():
    """Each shard task gets (source, file, document, first token, tokens) rows; over all shards they
    are the planned stream's tokens up to the last full row, in order, each from the right file."""
    cfg = build(MixConfig, {"sources": [{"name": "a", "input": "x"}, {"name": "b", "input": "y"}],
                            "phases": [{"tokens": 997, "weights": {"a": 0.6, "b": 0.4}},
                                       {"tokens": 300, "weights": {"b": 1.0}}]})
    rng = np.random.default_rng(0)
    files = {"a": [rng.integers(1, 40, 7), rng.integers(1, 40, 5)], "b": [rng.integers(1, 30, 9)]}
    lengths = {k: np.concatenate(v) for k, v in files.items()}
    first = {k: np.concatenate([[0], np.cumsum([len(f) for f in v])]) for k, v in files.items()}
    order = plan(cfg, lengths)
    # Tokens as (source, document in source, position) triples, the stream the old driver built.
    stream = [(s, d, j) for ph in order for s, d, t in ph for j in range(t)]
    lay = layout(order, ["a", "b"], first)
    used = len(stream) // 64 * 64
    got = []
    for lo in range(0, used, 3 * 64):
        for s, f, d, a, n in shard_pieces(lay, lo, min(lo + 3 * 64, used)):
            name = "ab"[s]
            got += [(name, int(first[name][f] + d), int(a + j)) for j in range(n)]
    assert got == stream[:used] and len(stream) == 1297


def test_bad_mix_config_names_the_key():
    with pytest.raises(ConfigError, match=r"pack.mix.phases\[0\].weights"):
        build(MixConfig, {"sources": [{"name": "a", "input": "x"}], "phases": [{"weights": {"b": 1.0}}]})
    with pytest.raises(ConfigError, match=r"pack.mix.phases\[1\].tokens"):
        build(MixConfig, {"sources": [{"name": "a", "input": "x"}],
                          "phases": [{"weights": {"a": 1}}, {"weights": {"a": 1}}]})


def _source(path, n, seed):
    rng = random.Random(seed)
    path.mkdir()
    with open(path / "part-0.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"{seed}-{i}", "text": synthetic.document(rng)}) + "\n")
    return str(path)


def _digest(out) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted((out / "shards").glob("*.parquet")))).hexdigest()


def test_pack_mix_shares_and_byte_identical_shards(ray_cluster, tokenizer_dir, tmp_path):
    from llmray.stages.pack import run

    src = {"web": _source(tmp_path / "web", 120, 1), "code": _source(tmp_path / "code", 40, 2),
           "hq": _source(tmp_path / "hq", 20, 3)}
    mix = {"seed": 7, "sequences_per_shard": 64, "sources": [{"name": k, "input": v} for k, v in src.items()],
           "phases": [{"tokens": 60_000, "weights": {"web": 0.7, "code": 0.3}},  # code is up-sampled
                      {"tokens": 8_000, "weights": {"hq": 0.75, "web": 0.25}}]}  # final anneal
    cfg = lambda out, seed=7: build(PackConfig, {"tokenizer": str(tokenizer_dir), "output": str(out),  # noqa: E731
                                                 "seq_len": 128, "mix": {**mix, "seed": seed}})
    run(cfg(tmp_path / "m1"))
    m = artifacts.require(tmp_path / "m1", "dataset").metrics
    phases = m["tokens_by_phase_source"]
    for ph, spec in zip(phases, mix["phases"]):
        total = sum(ph.values())
        for name, w in spec["weights"].items():
            assert abs(ph[name] / total - w) < 0.01, (name, ph)
    assert abs(m["share_by_source"]["web"] - (0.7 * 60_000 + 0.25 * 8_000) / 68_000) < 0.01
    assert m["num_tokens"] == sum(m["tokens_by_source"].values()) == m["num_sequences"] * 128
    assert m["dropped_tokens"] < 128 and len(m["shards"]) == -(-m["num_sequences"] // 64)
    run(cfg(tmp_path / "m2"))
    run(cfg(tmp_path / "m3", seed=8))
    assert _digest(tmp_path / "m1") == _digest(tmp_path / "m2") != _digest(tmp_path / "m3")
