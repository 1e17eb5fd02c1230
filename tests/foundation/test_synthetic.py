"""Synthetic corpus: deterministic, labels match what was injected, tasks verifiable."""

import json
import random
from collections import Counter

import pytest

from llmray.data import synthetic, tasks


def test_deterministic(tmp_path):
    cfg = synthetic.CorpusConfig(num_documents=300, num_sft=20, num_preference=20, num_prompts=20, num_eval=20)
    a = synthetic.write_corpus(cfg, tmp_path / "a")
    b = synthetic.write_corpus(cfg, tmp_path / "b")
    assert a == b
    for sub in ("docs", "labels", "sft", "preference", "prompts", "eval"):
        fa = sorted((tmp_path / "a" / sub).iterdir())
        fb = sorted((tmp_path / "b" / sub).iterdir())
        assert [f.read_bytes() for f in fa] == [f.read_bytes() for f in fb], sub


def test_labels_match_injected_defects():
    cfg = synthetic.CorpusConfig(num_documents=3000)
    docs, labels = zip(*synthetic.generate_documents(cfg))
    by_id = {d["id"]: d["text"] for d in docs}
    counts = Counter(label["defect"] for label in labels)
    for defect in synthetic.DEFECTS:
        assert counts[defect] > 20, defect
    for d, label in zip(docs, labels):
        if label["defect"] == "exact_dup":
            assert " ".join(d["text"].split()) == " ".join(by_id[label["cluster"]].split())
            assert label["cluster"] < d["id"]
        elif label["defect"] == "near_dup":
            sim = synthetic.jaccard(d["text"], by_id[label["cluster"]])
            assert sim == pytest.approx(label["jaccard"], abs=1e-3) and 0.6 < sim < 1.0
        elif label["defect"] == "pii":
            assert "@example.com" in d["text"] and "+1 555-" in d["text"]
        elif label["defect"] is None:
            assert label["cluster"] == d["id"] and len(d["text"].split()) >= 50


def test_parquet_shards_stream(tmp_path):
    import pyarrow.parquet as pq

    cfg = synthetic.CorpusConfig(num_documents=250, docs_per_shard=100, format="parquet",
                                 num_sft=1, num_preference=1, num_prompts=1, num_eval=1)
    counts = synthetic.write_corpus(cfg, tmp_path)
    shards = sorted((tmp_path / "docs").glob("*.parquet"))
    assert counts["doc_shards"] == 3 and [pq.read_metadata(s).num_rows for s in shards] == [100, 100, 50]
    assert len(synthetic.read_labels(tmp_path)) == 250


def test_task_records_are_verifiable(tmp_path):
    cfg = synthetic.CorpusConfig(num_documents=10, num_sft=50, num_preference=50, num_prompts=50, num_eval=50)
    synthetic.write_corpus(cfg, tmp_path)
    for line in (tmp_path / "sft" / "part-00000.jsonl").open():
        rec = json.loads(line)
        assert tasks.is_correct(rec["answer"], rec["messages"][-1]["content"])
    for line in (tmp_path / "preference" / "part-00000.jsonl").open():
        rec = json.loads(line)
        assert tasks.reward(rec["answer"], rec["chosen"]) == 1.0
        assert tasks.reward(rec["answer"], rec["rejected"]) == 0.1


def test_task_math():
    rng = random.Random(0)
    t = tasks.make_task(rng, "add")
    assert int(t.answer) == t.meta["a"] + t.meta["b"]
    assert tasks.reward(t.answer, f"The answer is {t.answer}.") == 1.0
    assert tasks.reward(t.answer, "I think 5") == 0.0
    assert tasks.extract_answer("blah The answer is -3.") == "-3"


def test_demo_prompts_spread_over_task_kinds():
    from llmray.data.tasks import spread_over_kinds

    recs = [{"kind": k, "i": i} for i, k in enumerate(["add", "add", "sub", "add", "max", "sub", "repeat", "odd"])]
    got = spread_over_kinds(recs, 4)
    assert [r["kind"] for r in got] == ["add", "sub", "max", "repeat"] and [r["i"] for r in got] == [0, 2, 4, 6]
    assert [r["i"] for r in spread_over_kinds(recs, 7)] == [0, 2, 4, 6, 7, 1, 5]
    assert len(spread_over_kinds(recs, 20)) == len(recs) and spread_over_kinds([], 4) == []
