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


def rank_ids(ids: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """(rank of each id, the sorted distinct ids): ranks compare like the strings (code point order),
    so the numpy code below can take minima and sort on integers and map back with `take`."""
    enc = pc.dictionary_encode(ids)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks() if enc.num_chunks != 1 else enc.chunk(0)
    order = pc.sort_indices(enc.dictionary).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    return rank[enc.indices.to_numpy(zero_copy_only=False)], enc.dictionary.take(pa.array(order))


def unique_pairs(node: np.ndarray, nbr: np.ndarray, exact: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per (node, nbr) rank pair, sorted; exact if any of its rows was exact."""
    if len(node) == 0:
        return node, nbr, exact
    order = np.lexsort((~exact, nbr, node))  # within a pair, an exact row first
    node, nbr, exact = node[order], nbr[order], exact[order]
    first = np.ones(len(node), dtype=bool)
    first[1:] = (node[1:] != node[:-1]) | (nbr[1:] != nbr[:-1])
    return node[first], nbr[first], exact[first]


def bucket_edges(rows: pa.Table, all_pairs_max: int = 0) -> tuple[pa.Table, dict]:
    """Star edges (smallest id -> member) of every bucket holding more than one id. Buckets of at
    most `all_pairs_max` ids give every pair instead: when candidate pairs are verified, a star
    through a false positive would lose the true pairs among the other members.

    Runs on integer ranks of the ids (`rank_ids`): one lexsort by (kind, key, rank) finds the
    buckets, their sizes and smallest members."""
    if rows.num_rows == 0:
        return _EDGE_SCHEMA.empty_table(), {"buckets": 0, "max_bucket": 0}
    rank, names = rank_ids(rows.column("id"))
    kind = rows.column("kind").to_numpy()
    key = rows.column("key").to_numpy()
    order = np.lexsort((rank, key, kind))
    kind, key, rank = kind[order], key[order], rank[order]
    new_bucket = np.ones(len(rank), dtype=bool)
    new_bucket[1:] = (kind[1:] != kind[:-1]) | (key[1:] != key[:-1])
    keep = new_bucket.copy()
    keep[1:] |= rank[1:] != rank[:-1]  # one row per (bucket, id)
    kind, rank, new_bucket = kind[keep], rank[keep], new_bucket[keep]
    begin = np.nonzero(new_bucket)[0]
    size = np.diff(np.append(begin, len(rank)))
    multi = size > 1
    stats = {"buckets": int(multi.sum()), "max_bucket": int(size.max())}
    if not multi.any():
        return _EDGE_SCHEMA.empty_table(), stats
    begin, size = begin[multi], size[multi]
    is_exact = kind[begin] == EXACT
    small = size <= all_pairs_max
    # Stars: the first (smallest) member of each large bucket -> every other member.
    sb, ss = begin[~small], size[~small]
    members = np.repeat(sb, ss - 1) + _ragged_arange(ss - 1) + 1
    node = [np.repeat(rank[sb], ss - 1)]
    nbr = [rank[members]]
    exact = [np.repeat(is_exact[~small], ss - 1)]
    if all_pairs_max > 1 and small.any():
        # All pairs: member i of a bucket -> each later member (ranks ascend within a bucket).
        pb, ps = begin[small], size[small]
        pos = np.repeat(pb, ps) + _ragged_arange(ps)  # every member row
        later = np.repeat(pb + ps, ps) - pos - 1  # members after it in its bucket
        src = np.repeat(pos, later)
        node.append(rank[src])
        nbr.append(rank[src + 1 + _ragged_arange(later)])
        exact.append(np.repeat(np.repeat(is_exact[small], ps), later))
    n, m, e = unique_pairs(np.concatenate(node), np.concatenate(nbr), np.concatenate(exact))
    return pa.table({"node": names.take(pa.array(n)), "nbr": names.take(pa.array(m)), "exact": pa.array(e)},
                    schema=_EDGE_SCHEMA), stats


def _ragged_arange(lens: np.ndarray) -> np.ndarray:
    """[0..l0-1, 0..l1-1, ...] for lengths `lens`."""
    lens = np.asarray(lens, dtype=np.int64)
    return np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)


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
