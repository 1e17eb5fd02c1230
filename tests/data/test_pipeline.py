"""clean-dedup end to end on a real local Ray cluster: quality against labels, determinism,
bad input, atomic publish and resume after the job is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmray import artifacts
from llmray.data import synthetic
from llmray.errors import UserError
from .conftest import clean_cfg

ROOT = Path(__file__).resolve().parents[2]


def read_docs(path: Path) -> pa.Table:
    files = sorted((path / "docs").glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def test_dedup_precision_recall_and_cleaning(clean_reference, data_corpus):
    out, result = clean_reference
    labels = synthetic.read_labels(data_corpus)
    kept = set(read_docs(out).column("id").to_pylist())
    report = json.loads((out / "report.json").read_text())
    junk = {i for i, lab in labels.items() if lab["drop"] == "clean"}
    dups = {i for i, lab in labels.items() if lab["drop"] == "dedup"}
    assert not junk & kept
    removed_by_dedup = (set(labels) - junk) - kept
    tp = len(removed_by_dedup & dups)
    precision, recall = tp / max(1, len(removed_by_dedup)), tp / len(dups)
    assert len(dups) > 100
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    by = report["dedup"]["removed_by_reason"]
    assert by["exact_dup"] > 30 and by["near_dup"] > 30
    assert report["documents_in"] == 1600 and report["documents_out"] == len(kept) == result["documents_out"]
    assert report["steps"]["pii"]["emails"] > 0 and report["dropped_by_reason"]["c4:lorem_ipsum"] > 0
    assert report["dedup"]["clusters"] > 0 and report["throughput"]["pipeline_docs_per_s"] > 0
    assert artifacts.require(out, "dataset").metrics["documents_out"] == len(kept)
    # Survivor of every duplicate cluster is its smallest id: originals are kept.
    for i in dups & set(labels):
        if labels[i]["cluster"] not in junk:
            assert labels[i]["cluster"] in kept
    assert not (out.parent / f".{out.name}.work").exists()


def test_identical_output_at_parallelism_1(clean_reference, data_corpus, tmp_path):
    from llmray.stages.clean_dedup import run

    ref, _ = clean_reference
    out = tmp_path / "clean_p1"
    run(clean_cfg(data_corpus / "docs", out, max_tasks_in_flight=1, **{"dedup.num_partitions": 1}))
    a, b = sorted((ref / "docs").glob("*.parquet")), sorted((out / "docs").glob("*.parquet"))
    assert [f.name for f in a] == [f.name for f in b]
    for fa, fb in zip(a, b):
        assert pq.read_table(fa).equals(pq.read_table(fb)), fa.name


def _good_rows(n, start=0):
    import random

    rng = random.Random(start)
    return [{"id": f"g{start + i:05d}", "text": synthetic.document(rng)} for i in range(n)]


def test_bad_records_are_skipped_named_and_budgeted(ray_cluster, tmp_path):
    from llmray.stages.clean_dedup import run

    src = tmp_path / "in"
    src.mkdir()
    lines = [json.dumps(r) for r in _good_rows(30)]
    lines.insert(3, "{not json")
    lines.insert(10, json.dumps({"id": "x", "body": "no text field"}))
    (src / "a.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.Table.from_pylist(_good_rows(20, 100)), src / "b.parquet")
    good = src / "c.parquet"
    pq.write_table(pa.Table.from_pylist(_good_rows(20, 200)), good)
    (src / "d.parquet").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # truncated

    out = tmp_path / "clean"
    run(clean_cfg(src, out, **{"read.max_errors": 5}))
    report = json.loads((out / "report.json").read_text())
    where = {(Path(e["file"]).name, e["where"]) for e in report["errors"]}
    assert ("a.jsonl", "line 4") in where and ("a.jsonl", "line 11") in where
    assert any(f == "d.parquet" and "corrupt" in e["error"] for e in report["errors"] for f in [Path(e["file"]).name])
    assert report["error_count"] == 3 and report["documents_in"] == 70
    assert read_docs(out).num_rows == 70

    over = tmp_path / "clean_over"
    with pytest.raises(UserError, match=r"3 bad input records exceed read.max_errors=2.*line 4"):
        run(clean_cfg(src, over, **{"read.max_errors": 2}))
    assert not over.exists() and not artifacts.is_complete(over)


def test_clear_errors_before_work(tmp_path):
    from llmray.stages.clean_dedup import run

    with pytest.raises(UserError, match="input not found"):
        run(clean_cfg(tmp_path / "nope", tmp_path / "o1"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .jsonl"):
        run(clean_cfg(tmp_path / "empty", tmp_path / "o2"))
    (tmp_path / "nocol.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UserError, match="no row has a 'text' field"):
        run(clean_cfg(tmp_path / "nocol.jsonl", tmp_path / "o3"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(UserError, match="no text column 'text'"):
        run(clean_cfg(tmp_path / "nocol.parquet", tmp_path / "o4"))
    for o in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / o).exists()


def test_empty_documents_input_fails(ray_cluster, tmp_path):
    from llmray.stages.clean_dedup import run

    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="holds no documents"):
        run(clean_cfg(tmp_path / "blank.jsonl", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_killed_job_resumes_without_duplicate_or_missing_rows(ray_cluster, data_corpus, clean_reference, tmp_path):
    """Kill the job (SIGKILL, whole process group) mid-run, re-run: identical output, and the
    input files staged before the kill are not redone."""
    import ray

    from llmray.stages.clean_dedup import run

    ref, _ = clean_reference
    src = tmp_path / "many"
    src.mkdir()
    # 32 small files so the kill lands while files are still being staged.
    rows = [json.loads(line) for f in sorted((data_corpus / "docs").glob("*.jsonl")) for line in f.open()]
    for k in range(32):
        with (src / f"part-{k:03d}.jsonl").open("w") as f:
            for r in rows[k * 50 : (k + 1) * 50]:
                f.write(json.dumps(r) + "\n")
    out = tmp_path / "clean"
    stage = tmp_path / ".clean.work" / "staged"
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "jobs" / "clean_dedup.py"), f"input={src}", f"output={out}",
           "max_tasks_in_flight=1", "read.chunk_rows=500", "dedup.num_partitions=2"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    try:
        while len(list(stage.glob("part-*.json"))) < 3:
            assert proc.poll() is None, "job ended before it could be killed"
            assert time.monotonic() < deadline, "job staged nothing in 180 s"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in stage.glob("part-*.json")}
    assert 3 <= len(before) < 32 and not out.exists()

    run(clean_cfg(src, out, keep_work=True, **{"dedup.num_partitions": 2}))
    after = {p.name: p.stat().st_mtime_ns for p in stage.glob("part-*.json")}
    assert all(after[n] == t for n, t in before.items()), "staged parts were redone"
    got = read_docs(out)
    want = read_docs(ref)
    assert got.num_rows == want.num_rows == len(set(got.column("id").to_pylist()))
    assert sorted(got.column("id").to_pylist()) == sorted(want.column("id").to_pylist())
    assert not any(p.name.startswith(".clean.tmp") for p in tmp_path.iterdir())
