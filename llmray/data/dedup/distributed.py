"""Run the duplicate graph (`graph.py`) as Ray tasks over staged Parquet files: key shuffle,
bucket reduce, min-label propagation rounds; write the removed ids per partition."""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)


def _returns(refs, n: int) -> list:
    return [refs] if n == 1 else list(refs)


def _map_keys(path: str, p: int, use_exact: bool, use_near: bool):
    import numpy as np
    import pyarrow.parquet as pq

    from llmray.data.dedup import graph

    cols = ["id"] + (["_exact"] if use_exact else []) + (["_bands"] if use_near else [])
    t = pq.read_table(path, columns=cols)
    exact = t.column("_exact").to_numpy() if use_exact else None
    bands = None
    if use_near and t.num_rows:
        flat = t.column("_bands").combine_chunks()
        width = flat.type.list_size
        bands = np.asarray(flat.flatten().to_numpy(zero_copy_only=False), dtype=np.uint64).reshape(-1, width)
    parts = graph.partition_keys(graph.key_rows(t.column("id").to_pylist(), exact, bands), p)
    return parts[0] if p == 1 else tuple(parts)


def _reduce_buckets(p: int, *parts):
    import pyarrow as pa

    from llmray.data.dedup import graph

    edges, stats = graph.bucket_edges(pa.concat_tables(parts) if parts else pa.table({}))
    stats["edges"] = edges.num_rows
    return (stats, *graph.route_edges(edges, p))


def _cc_init(p: int, *edge_parts):
    import pyarrow as pa

    from llmray.data.dedup import graph

    adj = pa.concat_tables(edge_parts)
    labels = graph.init_labels(adj)
    return (adj, labels, labels.num_rows, *graph.propose(adj, labels, None, p))


def _cc_round(p: int, adj, labels, *msgs):
    import pyarrow as pa

    from llmray.data.dedup import graph

    new, changed = graph.apply_messages(labels, pa.concat_tables(msgs))
    return (new, changed.num_rows, *graph.propose(adj, new, changed, p))


def _cc_finish(adj, labels, out_path: str):
    import pyarrow.parquet as pq

    from llmray.data.dedup import graph

    removed = graph.removals(adj, labels)
    pq.write_table(removed, out_path)
    return removed.num_rows, Counter(removed.column("reason").to_pylist()), graph.cluster_sizes(labels)


def find_duplicates(staged: list[str], out_dir: Path, p: int, use_exact: bool, use_near: bool,
                    num_cpus: float = 1.0, max_rounds: int = 50) -> dict:
    """Write `out_dir/part-q.parquet` (id, cluster, reason) for every duplicate to remove; return stats."""
    import ray

    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    opts = {"num_cpus": num_cpus, "max_retries": 3}
    map_task = ray.remote(_map_keys).options(num_returns=p, **opts)
    mapped = [_returns(map_task.remote(f, p, use_exact, use_near), p) for f in staged]
    reduce_task = ray.remote(_reduce_buckets).options(num_returns=p + 1, **opts)
    reduced = [reduce_task.remote(p, *[m[q] for m in mapped]) for q in range(p)]
    bucket_stats = ray.get([r[0] for r in reduced])
    t_buckets = time.monotonic() - t0

    init = ray.remote(_cc_init).options(num_returns=p + 3, **opts)
    state = [init.remote(p, *[r[1 + q] for r in reduced]) for q in range(p)]
    adj = [s[0] for s in state]
    labels = [s[1] for s in state]
    msgs = [s[3:] for s in state]
    step = ray.remote(_cc_round).options(num_returns=p + 2, **opts)
    rounds = 0
    while True:
        rounds += 1
        res = [step.remote(p, adj[q], labels[q], *[m[q] for m in msgs]) for q in range(p)]
        labels = [r[0] for r in res]
        msgs = [r[2:] for r in res]
        changed = sum(ray.get([r[1] for r in res]))
        log.info("dedup: components round %d, %d labels lowered", rounds, changed)
        if changed == 0 or rounds >= max_rounds:
            break
    finish = ray.remote(_cc_finish).options(num_returns=1, **opts)
    done = ray.get([finish.remote(adj[q], labels[q], str(out_dir / f"part-{q:05d}.parquet")) for q in range(p)])
    reasons: Counter = Counter()
    sizes: Counter = Counter()
    for _n, r, s in done:
        reasons.update(r)
        sizes.update(s)
    hist = Counter(sizes.values())
    return {
        "removed": sum(d[0] for d in done),
        "removed_by_reason": dict(reasons),
        "clusters": len(sizes),
        "cluster_size_histogram": {str(k): v for k, v in sorted(hist.items())},
        "largest_clusters": [{"survivor": k, "size": v}
                             for k, v in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:5]],
        "buckets_with_duplicates": sum(s["buckets"] for s in bucket_stats),
        "max_bucket_size": max((s["max_bucket"] for s in bucket_stats), default=0),
        "candidate_edges": sum(s["edges"] for s in bucket_stats),
        "label_rounds": rounds,
        "bucket_seconds": round(t_buckets, 3),
        "seconds": round(time.monotonic() - t0, 3),
    }
