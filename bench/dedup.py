"""Dedup benchmark: llmray (Ray, 2 CPUs) vs a single-process datasketch loop vs DataTrove.

All three read the same JSONL corpus, use the shingles, permutations and bands of llmray's
default `dedup` config (word 2-grams of lower-cased whitespace words, 128 permutations in
42 bands x 3 rows) and keep one document per duplicate cluster; llmray also verifies every
candidate pair against `dedup.threshold` (the loop and DataTrove take LSH candidates as they are).
Cleaning is off in llmray so only dedup is compared. Corpora: the generated synthetic corpus at
each `--sizes` (known exact and near duplicates, no junk), and the labelled real-text set of
bench/realtext.py (scored by edit rate).
DataTrove runs in its own venv (.venv-bench-datatrove, created here if missing) with
LocalPipelineExecutor(workers=2) and a whitespace word tokenizer (its default English tokenizer
needs spaCy; whitespace splitting is also what the others use). Each contender runs in its own
process; peak memory is the peak summed RSS of that process tree, sampled every 0.2 s.

    python bench/dedup.py                     # real-text set, then 50k and 200k documents
    python bench/dedup.py --sizes 20000 --skip-datatrove --no-real
Results: bench/results/dedup.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from llmray.data.config import DedupConfig  # noqa: E402 - after the path fix, for DataTrove's venv

_D = DedupConfig()
SHINGLE, NGRAM, NUM_PERM, BANDS, ROWS = _D.shingle, _D.ngram, _D.num_perm, _D.bands, _D.rows
BENCH_VENV = ROOT / ".venv-bench-datatrove"


# ----------------------------------------------------------------------------- contenders
def run_ours(corpus: Path, work: Path) -> dict:
    import pyarrow.parquet as pq

    from llmray.cluster import RayConfig, init_ray
    from llmray.config import build
    from llmray.data.config import CleanDedupConfig
    from llmray.stages.clean_dedup import run

    for attempt in range(5):  # an overloaded machine can miss Ray's fixed 30 s raylet start window
        try:
            init_ray(RayConfig(num_cpus=2))
            break
        except Exception:  # noqa: BLE001
            import ray

            ray.shutdown()
            if attempt == 4:
                raise
    out = work / "ours"
    cfg = build(CleanDedupConfig, {
        "input": str(corpus / "docs"), "output": str(out), "force": True, "keep_work": True,
        "clean": {"enabled": False}, "read": {"chunk_rows": 5000},
        "dedup": {"shingle": SHINGLE, "ngram": NGRAM, "num_perm": NUM_PERM, "bands": BANDS, "rows": ROWS,
                  "num_partitions": 2},
    })
    t = time.perf_counter()
    run(cfg)
    seconds = time.perf_counter() - t
    removed = pq.read_table(work / ".ours.work" / "removed", columns=["id"]).column("id").to_pylist()
    report = json.loads((out / "report.json").read_text())
    return {"seconds": seconds, "removed": removed, "phases": report["wall_seconds"],
            "sign_task_peak_rss_mb": report.get("sign_task_peak_rss_mb")}


def _shingles(text: str) -> list[bytes]:
    if SHINGLE == "char":
        s = " ".join(text.lower().split())
        return [s[i : i + NGRAM].encode() for i in range(max(1, len(s) - NGRAM + 1))]
    w = text.lower().split()
    return [" ".join(w[i : i + NGRAM]).encode() for i in range(max(1, len(w) - NGRAM + 1))]


def run_loop(corpus: Path, work: Path) -> dict:
    from datasketch import MinHash, MinHashLSH

    t = time.perf_counter()
    ids = []
    lsh = MinHashLSH(num_perm=NUM_PERM, params=(BANDS, ROWS))
    parent: dict[int, int] = {}

    def find(x):
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    n = 0
    for f in sorted((corpus / "docs").glob("*.jsonl")):
        rows = [json.loads(line) for line in f.open()]
        batch = []
        for r in rows:
            batch.append(_shingles(r["text"]))
            ids.append(r["id"])
        for m in MinHash.bulk(batch, num_perm=NUM_PERM):
            for other in lsh.query(m):
                a, b = find(n), find(other)
                if a != b:
                    parent[max(a, b)] = min(a, b)  # ids are in increasing order: smaller index = smaller id
            lsh.insert(n, m)
            n += 1
    removed = [ids[i] for i in range(n) if find(i) != i]
    return {"seconds": time.perf_counter() - t, "removed": removed}


def run_datatrove(corpus: Path, work: Path) -> dict:
    import datatrove.pipeline.dedup.minhash as dtm
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    class Split:  # whitespace words (or characters), like the other two contenders
        def word_tokenize(self, text):
            return list(" ".join(text.split())) if SHINGLE == "char" else text.split()

    dtm.load_word_tokenizer = lambda language: Split()
    files = len(list((corpus / "docs").glob("*.jsonl")))
    cfg = MinhashConfig(n_grams=NGRAM, num_buckets=BANDS, hashes_per_bucket=ROWS,
                        hash_config=HashConfig(precision=32, hash_fc="xxhash"))
    base = work / "datatrove"
    reader = lambda: JsonlReader(str(corpus / "docs"), text_key="text", id_key="id")  # noqa: E731
    common = {"workers": 2, "start_method": "fork", "skip_completed": False}
    t = time.perf_counter()
    LocalPipelineExecutor([reader(), MinhashDedupSignature(str(base / "sigs"), config=cfg)], tasks=files,
                          logging_dir=str(base / "logs/1"), **common).run()
    LocalPipelineExecutor([MinhashDedupBuckets(str(base / "sigs"), str(base / "buckets"), config=cfg)], tasks=BANDS,
                          logging_dir=str(base / "logs/2"), **common).run()
    LocalPipelineExecutor([MinhashDedupCluster(str(base / "buckets"), str(base / "remove"), config=cfg)], tasks=1,
                          logging_dir=str(base / "logs/3"), **common).run()
    LocalPipelineExecutor([reader(), MinhashDedupFilter(str(base / "remove"),
                                                        exclusion_writer=JsonlWriter(str(base / "removed"),
                                                                                     compression=None)),
                           JsonlWriter(str(base / "kept"), compression=None)], tasks=files,
                          logging_dir=str(base / "logs/4"), **common).run()
    seconds = time.perf_counter() - t
    removed = [json.loads(line)["id"] for f in sorted((base / "removed").glob("*.jsonl")) for line in f.open()]
    return {"seconds": seconds, "removed": removed}


# ----------------------------------------------------------------------------- harness
def _peak_tree_rss(proc, stop: threading.Event, out: dict) -> None:
    import psutil

    peak = 0
    try:
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            total = 0
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total)
            time.sleep(0.2)
    except psutil.Error:
        pass
    out["peak_mb"] = round(peak / 2**20, 1)


def contender(name: str, corpus: Path, work: Path) -> dict:
    python = str(BENCH_VENV / "bin" / "python") if name == "datatrove" else sys.executable
    result_file = work / f"{name}.json"
    result_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([python, __file__, "--worker", name, "--corpus", str(corpus), "--work", str(work)],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(work / f"{name}.log", "w"))
    stop, mem = threading.Event(), {}
    th = threading.Thread(target=_peak_tree_rss, args=(proc, stop, mem), daemon=True)
    th.start()
    rc = proc.wait()
    stop.set()
    th.join()
    if rc != 0 or not result_file.is_file():
        tail = (work / f"{name}.log").read_text()[-1500:]
        raise RuntimeError(f"{name} failed (exit {rc}):\n{tail}")
    res = json.loads(result_file.read_text())
    res["peak_mb"] = mem.get("peak_mb")
    return res


def quality(removed: list[str], labels: dict) -> dict:
    dups = {i for i, lab in labels.items() if lab["drop"] == "dedup"}
    rem = set(removed)
    tp = len(rem & dups)
    p = tp / len(rem) if rem else 0.0
    r = tp / len(dups) if dups else 1.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / (p + r) if p + r else 0, 4),
            "removed": len(rem), "true_duplicates": len(dups)}


def ensure_corpus(n: int, workdir: Path) -> Path:
    from llmray.data import synthetic
    from llmray.stages import corpus as corpus_stage

    out = workdir / f"corpus-{n}"
    if not (out / "manifest.json").is_file():
        print(f"generating {n} documents into {out} ...", flush=True)
        corpus_stage.run(synthetic.CorpusConfig(output=str(out), num_documents=n, docs_per_shard=5000, junk_rate=0.0,
                                             exact_dup_rate=0.05, near_dup_rate=0.05, num_sft=1, num_preference=1,
                                             num_prompts=1, num_eval=1))
    return out


def ensure_bench_venv() -> bool:
    if (BENCH_VENV / "bin" / "python").is_file():
        return True
    print("creating .venv-bench-datatrove (datatrove and the extras its MinHash steps import) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    r = subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", "--quiet", "datatrove", "xxhash<4", "regex",
                        "psutil", "tokenizers", "orjson"])
    return r.returncode == 0


def run_real(real: Path, workdir: Path, names: list[str]) -> list[dict]:
    """Every contender on the labelled real-text set; P/R/F1 overall and recall by edit rate."""
    sys.path.insert(0, str(ROOT / "bench"))
    import realtext

    counts = realtext.build(real)
    labels = json.loads((real / "labels.json").read_text())
    print(f"real-text set {real}: {counts}", flush=True)
    work = workdir / "run-real"
    work.mkdir(exist_ok=True)
    rows = []
    for name in names:
        print(f"[real] running {name} ...", flush=True)
        try:
            res = contender(name, real, work)
        except RuntimeError as e:
            print(str(e), flush=True)
            continue
        rows.append({"contender": name, "seconds": round(res["seconds"], 2), **realtext.score(res["removed"], labels)})
    rates = [k for k in rows[0] if k.startswith("recall@")] if rows else []
    print(f"\n{'contender':<10} {'removed':>8} {'FP':>5} {'P':>7} {'R':>7} {'F1':>7} "
          + " ".join(f"{'R@' + k.split('@')[1]:>7}" for k in rates))
    for r in rows:
        print(f"{r['contender']:<10} {r['removed']:>8} {r['false_positives']:>5} {r['precision']:>7.3f} "
              f"{r['recall']:>7.3f} {r['f1']:>7.3f} " + " ".join(f"{r[k]:>7.3f}" for k in rates))
    print(flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[50_000, 200_000])
    ap.add_argument("--workdir", default="/tmp/llmray-bench-dedup")
    ap.add_argument("--skip-datatrove", action="store_true")
    ap.add_argument("--real", default="/tmp/llmray-realtext", help="where bench/realtext.py builds its set")
    ap.add_argument("--no-real", action="store_true", help="skip the labelled real-text set")
    ap.add_argument("--contenders", nargs="+", default=["ours", "loop", "datatrove"])
    ap.add_argument("--parallel", action="store_true",
                    help="run every (size, contender) at once: only for a machine so oversubscribed by other "
                         "work that sequential runs cannot finish; each still asks for its own 2 CPUs")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:  # inside one contender's process
        fn = {"ours": run_ours, "loop": run_loop, "datatrove": run_datatrove}[args.worker]
        res = fn(Path(args.corpus), Path(args.work))
        (Path(args.work) / f"{args.worker}.json").write_text(json.dumps(res))
        return

    from llmray.data.synthetic import read_labels

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    names = [c for c in args.contenders if c != "datatrove"]
    if "datatrove" in args.contenders and not args.skip_datatrove and ensure_bench_venv():
        names.append("datatrove")
    real_rows = [] if args.no_real else run_real(Path(args.real), workdir, names)
    results = []
    jobs = []
    for n in args.sizes:
        corpus = ensure_corpus(n, workdir)
        work = workdir / f"run-{n}"
        work.mkdir(exist_ok=True)
        jobs += [(n, name, corpus, work) for name in names]
    labels_by_size: dict = {}

    def one(job):
        n, name, corpus, work = job
        print(f"[{n}] running {name} ...", flush=True)
        try:
            res = contender(name, corpus, work)
        except RuntimeError as e:
            print(str(e), flush=True)
            return
        if n not in labels_by_size:
            labels_by_size[n] = read_labels(corpus)
        row = {"docs": n, "contender": name, "seconds": round(res["seconds"], 2),
               "docs_per_s": round(n / res["seconds"], 1), "peak_mb": res["peak_mb"],
               **quality(res["removed"], labels_by_size[n])}
        for k in ("phases", "sign_task_peak_rss_mb"):
            if k in res:
                row[k] = res[k]
        results.append(row)
        print(f"    {row}", flush=True)

    if args.parallel:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(jobs)) as pool:
            list(pool.map(one, jobs))
    else:
        for job in jobs:
            one(job)
    results.sort(key=lambda r: (r["docs"], names.index(r["contender"])))

    print()
    print(f"{'docs':>8} {'contender':<10} {'seconds':>9} {'docs/s':>9} {'peak MB':>9} {'P':>7} {'R':>7} {'F1':>7}")
    for r in results:
        print(f"{r['docs']:>8} {r['contender']:<10} {r['seconds']:>9.1f} {r['docs_per_s']:>9.0f} "
              f"{r['peak_mb'] or 0:>9.0f} {r['precision']:>7.3f} {r['recall']:>7.3f} {r['f1']:>7.3f}")
    print()
    ratios = []
    for n in args.sizes:
        by = {r["contender"]: r for r in results if r["docs"] == n}
        if "ours" not in by:
            continue
        for other in ("loop", "datatrove"):
            if other in by:
                ratio = by["ours"]["docs_per_s"] / by[other]["docs_per_s"]
                ratios.append({"docs": n, "vs": other, "speedup": round(ratio, 2)})
                print(f"{n:>8} docs: llmray / {other:<9} = {ratio:5.2f}x "
                      f"(target {'2.0' if other == 'loop' else '1.5'}x)")
        if "sign_task_peak_rss_mb" in by["ours"]:
            print(f"{n:>8} docs: llmray streaming (sign) task peak RSS = {by['ours']['sign_task_peak_rss_mb']} MB; "
                  f"phases {by['ours'].get('phases')}")
    out = ROOT / "bench" / "results" / "dedup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": {"shingle": SHINGLE, "ngram": NGRAM, "num_perm": NUM_PERM, "bands": BANDS,
                                          "rows": ROWS, "threshold": _D.threshold},
                               "real_text": real_rows, "results": results, "ratios": ratios}, indent=2))
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
