"""Candidate verification: the decision, the two-hop join, the rejected-star-centre case, and the
stage on hand-made real sentences with planted 20%-edit variants."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmray.data.dedup import graph
from llmray.data.dedup import minhash as mh
from llmray.data.dedup import verify as vf
from .conftest import clean_cfg

# Real English sentences (public-domain texts) and edited copies of some of them.
REAL = [
    "Four score and seven years ago our fathers brought forth on this continent a new nation, conceived in "
    "Liberty, and dedicated to the proposition that all men are created equal.",
    "Now we are engaged in a great civil war, testing whether that nation, or any nation so conceived and so "
    "dedicated, can long endure. We are met on a great battle-field of that war.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, and "
    "nothing particular to interest me on shore, I thought I would sail about a little and see the watery part "
    "of the world.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity.",
    "Happy families are all alike; every unhappy family is unhappy in its own way. Everything was in confusion "
    "in the Oblonskys' house.",
    "We hold these truths to be self-evident, that all men are created equal, that they are endowed by their "
    "Creator with certain unalienable Rights, that among these are Life, Liberty and the pursuit of Happiness.",
    "The sun shone, having no alternative, on the nothing new. Murphy sat out of it, as though he were free, in "
    "a mews in West Brompton.",
]


def _sigs(texts, num_perm=128):
    sh, st = mh.shingle_hashes(texts, 2)
    a, b = mh.permutations(num_perm)
    return mh.signatures(sh, st, a, b)


def _edit(text: str, rate: float, seed: int) -> str:
    rng = np.random.default_rng(seed)
    w = text.split()
    for pos in sorted(rng.choice(len(w), max(1, round(rate * len(w))), replace=False), reverse=True):
        w[pos] = "zzz" + w[pos]  # a substitution by a word no document holds
    return " ".join(w)


def test_keep_is_estimated_jaccard_at_threshold():
    a = np.zeros((3, 10), np.uint32)
    b = a.copy()
    b[1, :5] = 1  # 5 of 10 equal -> 0.5
    b[2, :7] = 1  # 3 of 10 -> 0.3
    assert vf.keep(a, b, 0.5).tolist() == [True, True, False]


def test_signature_estimate_of_real_edits_is_near_exact_jaccard():
    base = REAL[6]
    for rate in (0.05, 0.1, 0.2):
        near = _edit(base, rate, 1)
        sa, sb = (set(mh.shingle_hashes([t], 2)[0].tolist()) for t in (base, near))
        exact = len(sa & sb) / len(sa | sb)
        est = mh.estimated_jaccard(*_sigs([base, near]))
        assert abs(est - exact) < 0.12, (rate, est, exact)


def _verify(edges: pa.Table, sigs: pa.Table, threshold: float) -> set[tuple[str, str]]:
    pending = vf.attach_first(vf.dedupe_edges(edges), sigs)
    kept, _ = vf.decide(pending, sigs, threshold)
    return set(zip(kept["node"].to_pylist(), kept["nbr"].to_pylist()))


def test_rejected_star_centre_loses_no_true_pair():
    # One bucket: "a" (unrelated, smallest id, the star centre) and "b", "c" (near duplicates).
    texts = {"a": REAL[2], "b": REAL[0], "c": _edit(REAL[0], 0.1, 2)}
    sigs = vf.sig_table(list(texts), _sigs(list(texts.values())))
    rows = pa.table({"kind": pa.array([1, 1, 1], pa.int8()), "key": pa.array([9, 9, 9], pa.uint64()),
                     "id": ["a", "b", "c"]})
    star, _ = graph.bucket_edges(rows, all_pairs_max=0)
    assert _verify(star, sigs, 0.4) == set()  # the star through "a" would lose b-c ...
    pairs, _ = graph.bucket_edges(rows, all_pairs_max=8)
    assert _verify(pairs, sigs, 0.4) == {("b", "c")}  # ... every pair keeps it


def test_exact_edges_pass_and_missing_signature_fails_loudly():
    sigs = vf.sig_table(["a"], _sigs([REAL[0]]))
    edges = pa.table({"node": ["a", "a"], "nbr": ["b", "c"], "exact": [True, False]})
    with pytest.raises(ValueError, match="no signature"):
        _verify(edges, vf.sig_table(["z"], _sigs([REAL[1]])), 0.4)
    assert vf.attach_first(edges, sigs).num_rows == 1


def test_stage_finds_real_text_variants_and_removes_nothing_else(ray_cluster, tmp_path):
    from llmray.stages.clean_dedup import run

    docs = [{"id": f"a{i}", "text": t} for i, t in enumerate(REAL)]
    planted = {"b0": _edit(REAL[0], 0.2, 3), "b1": _edit(REAL[3], 0.1, 4), "b2": REAL[4].upper(),
               "b3": _edit(REAL[5], 0.05, 5)}
    docs += [{"id": k, "text": v} for k, v in planted.items()]
    (tmp_path / "in").mkdir()
    for f in range(2):
        with open(tmp_path / "in" / f"part-{f}.jsonl", "w") as fh:
            fh.writelines(json.dumps(d) + "\n" for d in docs[f::2])
    out = tmp_path / "out"
    run(clean_cfg(tmp_path / "in", out, **{"clean.enabled": False}))
    kept = set(pq.read_table(out / "docs").column("id").to_pylist())
    assert kept == {d["id"] for d in docs} - set(planted)
    report = json.loads((out / "report.json").read_text())["dedup"]
    assert report["removed_by_reason"] == {"exact_dup": 1, "near_dup": 3}
    assert report["verified_edges"] == 3 and report["candidate_edges"] >= 3
