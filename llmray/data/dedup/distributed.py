"""Run the duplicate graph (`graph.py`) as Ray tasks over staged Parquet files: key shuffle,
bucket reduce, candidate verification (`verify.py`, two hops), min-label propagation rounds;
write the removed ids per partition."""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)


def _returns(refs, n: int) -> list:
    return [refs] if n == 1 else list(refs)


def _map_keys(path: str, p: int, use_exact: bool, use_near: bool, verify: bool):
    """Key rows of one staged file split by key partition, then (with `verify`) its signatures
    split by node partition."""
    import numpy as np
    import pyarrow.parquet as pq

    from llmray.data.dedup import graph
    from llmray.data.dedup import verify as vf

    cols = ["id"] + (["_exact"] if use_exact else []) + (["_bands"] if use_near else []) + (["_sig"] if verify else [])
    t = pq.read_table(path, columns=cols)
    ids = t.column("id").to_pylist()
    exact = t.column("_exact").to_numpy() if use_exact else None
    bands = None
    if use_near and t.num_rows:
        flat = t.column("_bands").combine_chunks()
        width = flat.type.list_size
        bands = np.asarray(flat.flatten().to_numpy(zero_copy_only=False), dtype=np.uint64).reshape(-1, width)
    parts = graph.partition_keys(graph.key_rows(ids, exact, bands), p)
    if verify:
        sigs = vf.sig_table(ids, vf.sig_matrix(t.column("_sig")))
        parts += graph.split(sigs, graph.node_partition(ids, p), p)
    return parts[0] if len(parts) == 1 else tuple(parts)


def _reduce_buckets(p: int, verify: bool, all_pairs_max: int, *parts):
    """Candidate edges of this key partition; routed for verification (by `node`) or, without it,
    both directions to the component partitions."""
    import pyarrow as pa

    from llmray.data.dedup import graph

    edges, stats = graph.bucket_edges(pa.concat_tables(parts) if parts else pa.table({}),
                                      all_pairs_max if verify else 0)
    stats["edges"] = edges.num_rows
    if verify:
        return (stats, *graph.split(edges, graph.node_partition(edges.column("node").to_pylist(), p), p))
    return (stats, *graph.route_edges(edges, p))


def _verify_first(p: int, n_edge_parts: int, *parts):
    """Hop 1: attach the signature of each near edge's `node` (it lives here); route by `nbr`."""
    import pyarrow as pa

    from llmray.data.dedup import graph
    from llmray.data.dedup import verify as vf

    edges = vf.dedupe_edges(pa.concat_tables(parts[:n_edge_parts]))
    sigs = pa.concat_tables(parts[n_edge_parts:])
    exact = edges.filter(edges["exact"])
    pending = vf.attach_first(edges, sigs)
    return (exact, *graph.split(pending, graph.node_partition(pending.column("nbr").to_pylist(), p), p))


def _verify_second(p: int, threshold: float, exact, n_pending: int, *parts):
    """Hop 2: compare with the signature of `nbr` (it lives here); route kept edges to components."""
    import pyarrow as pa

    from llmray.data.dedup import graph
    from llmray.data.dedup import verify as vf

    sigs = pa.concat_tables(parts[n_pending:])
    kept, rejected = vf.decide(pa.concat_tables(parts[:n_pending]), sigs, threshold)
    edges = pa.concat_tables([exact.cast(kept.schema), kept])
    return ({"verified": kept.num_rows, "rejected": rejected}, *graph.route_edges(edges, p))


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


def _candidates(staged: list[str], p: int, use_exact: bool, use_near: bool, verify: bool, all_pairs_max: int,
                threshold: float, opts: dict) -> tuple[list, list[dict], dict]:
    """Edge parts routed to the P component partitions (verified when `verify`), bucket stats,
    verification stats."""
    import ray

    n_out = p * (2 if verify else 1)
    mapped = [_returns(ray.remote(_map_keys).options(num_returns=n_out, **opts).remote(
        f, p, use_exact, use_near, verify), n_out) for f in staged]
    reduce_task = ray.remote(_reduce_buckets).options(num_returns=p + 1, **opts)
    reduced = [reduce_task.remote(p, verify, all_pairs_max, *[m[q] for m in mapped]) for q in range(p)]
    bucket_stats = ray.get([r[0] for r in reduced])
    if not verify:
        return [r[1:] for r in reduced], bucket_stats, {}
    sigs = [[m[p + q] for m in mapped] for q in range(p)]
    first = ray.remote(_verify_first).options(num_returns=p + 1, **opts)
    hop1 = [first.remote(p, len(reduced), *[r[1 + q] for r in reduced], *sigs[q]) for q in range(p)]
    second = ray.remote(_verify_second).options(num_returns=p + 1, **opts)
    hop2 = [second.remote(p, threshold, hop1[q][0], len(hop1), *[h[1 + q] for h in hop1], *sigs[q])
            for q in range(p)]
    vstats = ray.get([h[0] for h in hop2])
    counts = {"verified_edges": sum(v["verified"] for v in vstats),
              "rejected_edges": sum(v["rejected"] for v in vstats)}
    return [h[1:] for h in hop2], bucket_stats, counts


def find_duplicates(staged: list[str], out_dir: Path, p: int, use_exact: bool, use_near: bool,
                    num_cpus: float = 1.0, max_rounds: int = 50, verify: bool = False, threshold: float = 0.5,
                    all_pairs_max: int = 64) -> dict:
    """Write `out_dir/part-q.parquet` (id, cluster, reason) for every duplicate to remove; return stats."""
    import ray

    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    opts = {"num_cpus": num_cpus, "max_retries": 3}
    routed, bucket_stats, vstats = _candidates(staged, p, use_exact, use_near, verify and use_near, all_pairs_max,
                                               threshold, opts)
    t_buckets = time.monotonic() - t0

    init = ray.remote(_cc_init).options(num_returns=p + 3, **opts)
    state = [init.remote(p, *[r[q] for r in routed]) for q in range(p)]
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
        **vstats,
        "label_rounds": rounds,
        "bucket_seconds": round(t_buckets, 3),
        "seconds": round(time.monotonic() - t0, 3),
    }
