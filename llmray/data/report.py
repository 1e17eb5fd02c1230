"""The clean-dedup report: counts per step and drop reason, duplicates, throughput; JSON + a table."""

from __future__ import annotations

from collections import Counter

from llmray.config import to_dict


def build_report(cfg, files: list[str], counts: Counter, secs: Counter, errors: list[dict], dedup: dict,
                 docs_out: int, wall: dict) -> dict:
    steps: dict[str, dict] = {}
    dropped: Counter = Counter()
    for key, v in sorted(counts.items()):
        name, _, what = key.partition("/")
        steps.setdefault(name, {})[what] = v
        if what.startswith("dropped/"):
            dropped[f"{name}:{what.split('/', 1)[1]}"] += v
    for reason, v in dedup.get("removed_by_reason", {}).items():
        dropped[f"dedup:{reason}"] += v
    docs_in = counts.get("read/out", 0)
    clean_out = counts.get("clean/out", 0)
    rate = lambda n, s: round(n / s, 1) if s > 0 else None  # noqa: E731
    return {
        "input": cfg.input,
        "files": len(files),
        "documents_in": docs_in,
        "documents_after_cleaning": clean_out,
        "documents_out": docs_out,
        "steps": steps,
        "dropped_by_reason": dict(sorted(dropped.items())),
        "dedup": dedup,
        "errors": errors[:200],
        "error_count": len(errors),
        "throughput": {
            "pipeline_docs_per_s": rate(docs_in, wall["total"]),
            "sign_phase_docs_per_s": rate(docs_in, wall["sign"]),
            "graph_phase_docs_per_s": rate(clean_out, wall["graph"]),
            "write_phase_docs_per_s": rate(clean_out, wall["write"]),
            # Per task-second: the cost of each stage on one CPU, independent of parallelism.
            "read_docs_per_task_s": rate(docs_in, secs.get("read", 0)),
            "clean_docs_per_task_s": rate(docs_in, secs.get("clean", 0)),
            "minhash_docs_per_task_s": rate(clean_out, secs.get("minhash", 0)),
        },
        "wall_seconds": {k: round(v, 3) for k, v in wall.items()},
        "config": to_dict(cfg),
    }


def format_table(r: dict) -> str:
    lines = [f"clean-dedup: {r['documents_in']} documents in, {r['documents_out']} out "
             f"({r['files']} files, {r['error_count']} bad records, {r['wall_seconds']['total']:.1f}s)"]
    lines.append(f"{'step':<20}{'in':>10}{'changed':>10}{'dropped':>10}  reasons")
    for name, s in r["steps"].items():
        if name in ("read", "clean"):
            continue
        reasons = {k.split("/", 1)[1]: v for k, v in s.items() if k.startswith("dropped/")}
        extra = {k: v for k, v in s.items() if k not in ("in", "changed") and not k.startswith("dropped/")}
        why = ", ".join(f"{k}={v}" for k, v in {**reasons, **extra}.items())
        lines.append(f"{name:<20}{s.get('in', 0):>10}{s.get('changed', 0):>10}{sum(reasons.values()):>10}  {why}")
    d = r["dedup"]
    by = d.get("removed_by_reason", {})
    lines.append(f"{'dedup':<20}{r['documents_after_cleaning']:>10}{'':>10}{d.get('removed', 0):>10}  "
                 + ", ".join(f"{k}={v}" for k, v in by.items())
                 + (f"; {d.get('clusters', 0)} clusters, sizes {d.get('cluster_size_histogram', {})}"
                    if d.get("clusters") else ""))
    t = r["throughput"]
    lines.append("docs/s: " + ", ".join(f"{k}={v}" for k, v in t.items() if v is not None))
    for e in r["errors"][:5]:
        lines.append(f"bad input: {e['file']} {e['where']}: {e['error']}")
    return "\n".join(lines)
