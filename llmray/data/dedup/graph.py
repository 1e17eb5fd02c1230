"""Duplicate graph on Ray: hash-partitioned LSH/exact buckets -> edges -> connected components.

No process holds every key or signature: map tasks split (kind, key, id) rows by `key % P`;
each of P reduce tasks finds its buckets with more than one document and emits star edges
(smallest id -> each other member), routed to P node partitions by a hash of the node id.
Components come from min-label propagation: each round, partition q sends the label of each
changed node to its neighbours' partitions and keeps the smallest label it receives, until no
label changes. The survivor of a component is its smallest id, so the result does not depend on
P, on task order or on how the input was split.
"""

from __future__ import annotations

import zlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

EXACT, NEAR = 0, 1
_EDGE_SCHEMA = pa.schema([("node", pa.string()), ("nbr", pa.string()), ("exact", pa.bool_())])
_LABEL_SCHEMA = pa.schema([("node", pa.string()), ("label", pa.string())])


def node_partition(ids: list[str], p: int) -> np.ndarray:
    """Partition of each id: crc32 (stable across processes, unlike `hash`) mod p."""
    return np.fromiter((zlib.crc32(i.encode("utf-8")) % p for i in ids), dtype=np.int64, count=len(ids))


def split(table: pa.Table, part: np.ndarray, p: int) -> list[pa.Table]:
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(p + 1))
    sorted_t = table.take(pa.array(order))
    return [sorted_t.slice(int(bounds[i]), int(bounds[i + 1] - bounds[i])) for i in range(p)]


def key_rows(ids: list[str], exact: np.ndarray | None, bands: np.ndarray | None) -> pa.Table:
    """(kind, key, id) rows: one exact key and `bands` band keys per document."""
    n = len(ids)
    kinds, keys, idcol = [], [], []
    if exact is not None:
        kinds.append(np.full(n, EXACT, dtype=np.int8))
        keys.append(exact.astype(np.uint64))
        idcol.append(np.arange(n))
    if bands is not None and bands.size:
        b = bands.shape[1]
        kinds.append(np.full(n * b, NEAR, dtype=np.int8))
        keys.append(bands.reshape(-1).astype(np.uint64))
        idcol.append(np.repeat(np.arange(n), b))
    if not keys:
        return pa.table({"kind": pa.array([], pa.int8()), "key": pa.array([], pa.uint64()),
                         "id": pa.array([], pa.string())})
    take = np.concatenate(idcol)
    return pa.table({"kind": np.concatenate(kinds), "key": np.concatenate(keys),
                     "id": pa.array(ids, pa.string()).take(pa.array(take))})


def partition_keys(rows: pa.Table, p: int) -> list[pa.Table]:
    part = (rows.column("key").to_numpy() % np.uint64(p)).astype(np.int64)
    return split(rows, part, p)


def bucket_edges(rows: pa.Table, all_pairs_max: int = 0) -> tuple[pa.Table, dict]:
    """Star edges (smallest id -> member) of every bucket holding more than one id. Buckets of at
    most `all_pairs_max` ids give every pair instead: when candidate pairs are verified, a star
    through a false positive would lose the true pairs among the other members."""
    if rows.num_rows == 0:
        return _EDGE_SCHEMA.empty_table(), {"buckets": 0, "max_bucket": 0}
    agg = rows.group_by(["kind", "key"]).aggregate([("id", "min"), ("id", "count_distinct")])
    agg = agg.filter(pc.greater(agg["id_count_distinct"], 1))
    stats = {"buckets": agg.num_rows, "max_bucket": int(pc.max(agg["id_count_distinct"]).as_py() or 0)}
    if agg.num_rows == 0:
        return _EDGE_SCHEMA.empty_table(), stats
    members = rows.join(agg.select(["kind", "key", "id_min", "id_count_distinct"]), keys=["kind", "key"],
                        join_type="inner")
    small = pc.less_equal(members["id_count_distinct"], all_pairs_max)
    star = members.filter(pc.and_(pc.invert(small), pc.not_equal(members["id"], members["id_min"])))
    edges = pa.table({"node": star["id_min"], "nbr": star["id"], "exact": pc.equal(star["kind"], EXACT)})
    if all_pairs_max > 1:
        m = members.filter(small).select(["kind", "key", "id"])
        pairs = m.join(m, keys=["kind", "key"], join_type="inner", left_suffix="_a", right_suffix="_b")
        pairs = pairs.filter(pc.less(pairs["id_a"], pairs["id_b"]))
        edges = pa.concat_tables([edges, pa.table({"node": pairs["id_a"], "nbr": pairs["id_b"],
                                                   "exact": pc.equal(pairs["kind"], EXACT)})])
    # One edge per pair; exact if any bucket joining them was an exact bucket.
    edges = edges.group_by(["node", "nbr"]).aggregate([("exact", "any")]).rename_columns(["node", "nbr", "exact"])
    return edges.select(["node", "nbr", "exact"]).cast(_EDGE_SCHEMA), stats


def route_edges(edges: pa.Table, p: int) -> list[pa.Table]:
    """Both directions of each edge, split by the partition of the first endpoint."""
    both = pa.concat_tables([
        edges,
        pa.table({"node": edges["nbr"], "nbr": edges["node"], "exact": edges["exact"]}, schema=_EDGE_SCHEMA),
    ])
    return split(both, node_partition(both.column("node").to_pylist(), p), p)


def propose(adj: pa.Table, labels: pa.Table, changed: pa.Table | None, p: int) -> list[pa.Table]:
    """Messages (node=neighbour, label) for the neighbours of nodes whose label changed."""
    src = labels if changed is None else changed
    msgs = adj.join(src, keys="node", join_type="inner")
    out = pa.table({"node": msgs["nbr"], "label": msgs["label"]}, schema=_LABEL_SCHEMA)
    return split(out, node_partition(out.column("node").to_pylist(), p), p)


def init_labels(adj: pa.Table) -> pa.Table:
    """Label = the smallest of the node and its neighbours."""
    if adj.num_rows == 0:
        return _LABEL_SCHEMA.empty_table()
    g = adj.group_by("node").aggregate([("nbr", "min")])
    lab = pc.if_else(pc.less(g["nbr_min"], g["node"]), g["nbr_min"], g["node"])
    return pa.table({"node": g["node"], "label": lab}, schema=_LABEL_SCHEMA)


def apply_messages(labels: pa.Table, msgs: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(new labels, the rows whose label went down)."""
    if msgs.num_rows == 0 or labels.num_rows == 0:
        return labels, _LABEL_SCHEMA.empty_table()
    best = msgs.group_by("node").aggregate([("label", "min")])
    j = labels.join(best, keys="node", join_type="left outer")
    lower = pc.fill_null(pc.less(j["label_min"], j["label"]), False)
    new = pa.table({"node": j["node"], "label": pc.if_else(lower, j["label_min"], j["label"])}, schema=_LABEL_SCHEMA)
    return new, new.filter(lower)


def removals(adj: pa.Table, labels: pa.Table) -> pa.Table:
    """(id, cluster, reason) of every node that is not its component's smallest id. The reason is
    `exact_dup` when the node has an exact-duplicate neighbour with a smaller id."""
    removed = labels.filter(pc.not_equal(labels["label"], labels["node"]))
    exact_adj = adj.filter(pc.and_(adj["exact"], pc.less(adj["nbr"], adj["node"])))
    exact_nodes = pc.unique(exact_adj["node"])
    is_exact = pc.is_in(removed["node"], value_set=exact_nodes)
    reason = pc.if_else(is_exact, "exact_dup", "near_dup")
    return pa.table({"id": removed["node"], "cluster": removed["label"], "reason": reason})


def cluster_sizes(labels: pa.Table) -> Counter:
    """label -> number of members in this partition (sum over partitions for the full size)."""
    if labels.num_rows == 0:
        return Counter()
    g = labels.group_by("label").aggregate([("node", "count")])
    return Counter(dict(zip(g["label"].to_pylist(), g["node_count"].to_pylist())))


def components_local(edges: list[tuple[str, str]]) -> dict[str, str]:
    """Reference union-find (single process, for tests): node -> smallest id of its component."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            parent[hi] = lo
    return {x: find(x) for x in list(parent)}
