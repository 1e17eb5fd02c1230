"""MinHash signatures equal datasketch's; band keys; the duplicate graph's pure functions."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pyarrow as pa
import pytest

from llmray.data import synthetic
from llmray.data.dedup import graph
from llmray.data.dedup import minhash as mh


def _datasketch(text: str, num_perm: int, seed: int, n: int = 5):
    from datasketch import MinHash

    w = mh.words(text)
    shingles = [" ".join(w[i : i + n]).encode() for i in range(max(1, len(w) - n + 1))] if w else []
    m = MinHash(num_perm=num_perm, seed=seed, hashfunc=mh.shingle_hash_of_bytes)
    m.update_batch(shingles)
    return m.hashvalues


def test_signatures_bit_identical_to_datasketch():
    rng = random.Random(0)
    texts = [synthetic.document(rng) for _ in range(20)] + ["", "one", "a b c d", "A b C d e", "x " * 7]
    sh, starts = mh.shingle_hashes(texts, 5)
    a, b = mh.permutations(64, seed=7)
    sig = mh.signatures(sh, starts, a, b)
    for i, t in enumerate(texts):
        np.testing.assert_array_equal(sig[i], _datasketch(t, 64, 7), err_msg=f"doc {i}")


def test_signature_slicing_does_not_change_values(monkeypatch):
    rng = random.Random(1)
    texts = [synthetic.document(rng) for _ in range(30)]
    texts[3:3] = ["", "", "tiny"]  # empty and short documents between long ones
    texts.append("")
    sh, starts = mh.shingle_hashes(texts, 5)
    a, b = mh.permutations(32)
    full = mh.signatures(sh, starts, a, b)
    # 500 elements / 32 perms = 15 shingles a slice: most documents are cut across slices.
    monkeypatch.setattr(mh, "_SLICE_ELEMENTS", 500)
    sliced = mh.signatures(sh, starts, a, b)
    np.testing.assert_array_equal(sliced, full)
    for i in (0, 3, 4, 5, 6, len(texts) - 1):
        np.testing.assert_array_equal(sliced[i], _datasketch(texts[i], 32, 1), err_msg=f"doc {i}")
    assert (sliced[3] == 0xFFFFFFFF).all() and (sliced[-1] == 0xFFFFFFFF).all()


def test_exact_hash_of_words_equals_exact_hash():
    for t in ["Hello  World\n", "", "  a\tb  "]:
        assert mh.exact_hash_of_words(mh.words(t)) == mh.exact_hash(t)
    assert mh.exact_hash("") == int.from_bytes(hashlib.blake2b(b"", digest_size=8).digest(), "little")


def test_shingles_never_straddle_documents():
    sh, starts = mh.shingle_hashes(["a b c d e f", "g h i j k"], 5)
    assert list(starts) == [0, 2, 3]
    assert sh[2] == mh.shingle_hash_py(["g", "h", "i", "j", "k"])
    assert sh[0] == mh.shingle_hash_py(["a", "b", "c", "d", "e"])


def test_estimated_jaccard_tracks_true_jaccard():
    rng = random.Random(2)
    a, b = mh.permutations(256)
    errs = []
    for _ in range(10):
        base = synthetic.document(rng)
        near, true_j = synthetic.near_duplicate(base, 0.8, rng)
        sh, st = mh.shingle_hashes([base, near], 5)
        sig = mh.signatures(sh, st, a, b)
        errs.append(abs(mh.estimated_jaccard(sig[0], sig[1]) - true_j))
    assert np.mean(errs) < 0.05


def test_band_keys_match_iff_band_rows_match():
    sig = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [9, 9, 3, 4]], dtype=np.uint32)
    k = mh.band_keys(sig, bands=2, rows=2)
    assert k[0, 0] == k[1, 0] and k[0, 1] != k[1, 1]
    assert k[0, 1] == k[2, 1] and k[0, 0] != k[2, 0]
    same_rows_other_band = mh.band_keys(np.array([[5, 5, 5, 5]], dtype=np.uint32), 2, 2)
    assert same_rows_other_band[0, 0] != same_rows_other_band[0, 1]


def test_exact_hash_ignores_case_and_whitespace():
    assert mh.exact_hash("Hello  world\n") == mh.exact_hash("hello world")
    assert mh.exact_hash("hello world") != mh.exact_hash("hello word")


def test_optimal_bands_from_threshold():
    b, r = mh.optimal_bands(0.7, 128)
    assert b * r <= 128 and b > 1 and r > 1


def _propagate(edges: list[tuple[str, str]], p: int) -> dict[str, str]:
    """Run the partitioned label propagation in-process (the same functions the Ray tasks run)."""
    t = pa.table({"node": [a for a, _ in edges], "nbr": [b for _, b in edges], "exact": [False] * len(edges)},
                 schema=graph._EDGE_SCHEMA)
    routed = graph.route_edges(t, p)
    adj = routed
    labels = [graph.init_labels(a) for a in adj]
    msgs = [graph.propose(adj[q], labels[q], None, p) for q in range(p)]
    for _ in range(50):
        res = [graph.apply_messages(labels[q], pa.concat_tables([m[q] for m in msgs])) for q in range(p)]
        labels = [r[0] for r in res]
        if sum(r[1].num_rows for r in res) == 0:
            break
        msgs = [graph.propose(adj[q], labels[q], res[q][1], p) for q in range(p)]
    out = {}
    for lab in labels:
        out.update(dict(zip(lab["node"].to_pylist(), lab["label"].to_pylist())))
    return out


@pytest.mark.parametrize("p", [1, 2, 5])
def test_label_propagation_equals_union_find(p):
    rng = random.Random(p)
    nodes = [f"d{i:04d}" for i in range(300)]
    edges = [(rng.choice(nodes), rng.choice(nodes)) for _ in range(200)]
    edges += [(f"d{i:04d}", f"d{i + 1:04d}") for i in range(100, 140)]  # a long chain: many rounds
    edges = [(a, b) for a, b in edges if a != b]
    assert _propagate(edges, p) == graph.components_local(edges)


def test_bucket_edges_stars_and_exact_reason():
    rows = pa.table({
        "kind": pa.array([0, 0, 1, 1, 1, 1], pa.int8()),
        "key": pa.array([7, 7, 9, 9, 9, 4], pa.uint64()),
        "id": ["b", "a", "c", "a", "b", "z"],
    })
    edges, stats = graph.bucket_edges(rows)
    got = {(n, m, e) for n, m, e in zip(*(edges[c].to_pylist() for c in ("node", "nbr", "exact")))}
    assert got == {("a", "b", True), ("a", "c", False)}
    assert stats == {"buckets": 2, "max_bucket": 3}
    adj = pa.concat_tables(graph.route_edges(edges, 1))
    labels = graph.init_labels(adj)
    rem = graph.removals(adj, labels)
    assert dict(zip(rem["id"].to_pylist(), rem["reason"].to_pylist())) == {"b": "exact_dup", "c": "near_dup"}


def test_bucket_edges_all_pairs_for_verification():
    rows = pa.table({"kind": pa.array([1, 1, 1], pa.int8()), "key": pa.array([5, 5, 5], pa.uint64()),
                     "id": ["c", "a", "b"]})
    edges, _ = graph.bucket_edges(rows, all_pairs_max=8)
    assert sorted(zip(edges["node"].to_pylist(), edges["nbr"].to_pylist())) == [("a", "b"), ("a", "c"), ("b", "c")]


def test_char_shingles_bit_identical_to_datasketch():
    from datasketch import MinHash

    texts = ["The quick  brown fox\njumps over the lazy dog.", "Naïve café", "abc", "", "Hello, World"]
    sh, starts = mh.shingle_hashes(texts, 5, "char")
    a, b = mh.permutations(32, seed=3)
    sig = mh.signatures(sh, starts, a, b)
    for i, t in enumerate(texts):
        s = mh.normalise(t)
        m = MinHash(num_perm=32, seed=3, hashfunc=mh.char_shingle_hash_of_bytes)
        m.update_batch([s[j : j + 5].encode() for j in range(max(1, len(s) - 4))] if s else [])
        np.testing.assert_array_equal(sig[i], m.hashvalues, err_msg=f"doc {i}")
    # "the quick brown ..." normalised: 44 characters -> 40 five-character shingles.
    assert starts[1] - starts[0] == len(mh.normalise(texts[0])) - 4 == 40
    assert starts[3] - starts[2] == 1 and starts[4] == starts[3]


def test_word_bigrams_of_normalised_text():
    sh, starts = mh.shingle_hashes(["A  b C", "x"], 2)
    assert list(starts) == [0, 2, 3]
    assert sh[0] == mh.shingle_hash_py(["a", "b"]) and sh[1] == mh.shingle_hash_py(["b", "c"])
    assert sh[2] == mh.shingle_hash_py(["x"])


@pytest.mark.parametrize("all_pairs_max", [0, 3])
def test_bucket_edges_equal_a_python_reference(all_pairs_max):
    """Random buckets of 1-6 ids (some listed twice, some in an exact and a near bucket at once)."""
    rng = random.Random(all_pairs_max)
    rows = []
    for key in range(200):
        kind = rng.choice([graph.EXACT, graph.NEAR])
        members = rng.sample([f"id{i:03d}" for i in range(60)], rng.randint(1, 6))
        rows += [(kind, key % 50, m) for m in members + members[:1]]  # keys shared across kinds
    want: dict[tuple[str, str], bool] = {}
    buckets: dict[tuple[int, int], set[str]] = {}
    for kind, key, m in rows:
        buckets.setdefault((kind, key), set()).add(m)
    for (kind, _key), ms in buckets.items():
        s = sorted(ms)
        pairs = ([(a, b) for i, a in enumerate(s) for b in s[i + 1:]] if len(s) <= all_pairs_max
                 else [(s[0], b) for b in s[1:]])
        for p in pairs:
            want[p] = want.get(p, False) or kind == graph.EXACT
    table = pa.table({"kind": pa.array([r[0] for r in rows], pa.int8()), "key": pa.array([r[1] for r in rows],
                      pa.uint64()), "id": [r[2] for r in rows]})
    edges, stats = graph.bucket_edges(table, all_pairs_max)
    got = dict(zip(zip(edges["node"].to_pylist(), edges["nbr"].to_pylist()), edges["exact"].to_pylist()))
    assert got == want and len(want) > 100
    assert stats == {"buckets": sum(len(v) > 1 for v in buckets.values()),
                     "max_bucket": max(len(v) for v in buckets.values())}


def test_rank_ids_sort_like_python_strings_across_chunks():
    ids = pa.chunked_array([["b", "é", "Z"], [], ["b", "a10", "a9", "zz"]])
    rank, names = graph.rank_ids(ids)
    assert names.to_pylist() == sorted(set(ids.to_pylist())) == ["Z", "a10", "a9", "b", "zz", "é"]
    assert names.take(pa.array(rank)).to_pylist() == ids.to_pylist()
