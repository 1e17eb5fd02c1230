"""Candidate verification: an LSH candidate pair becomes an edge only if the Jaccard estimate from
the two full MinHash signatures reaches the threshold. Pure pyarrow/numpy; `distributed.py` runs it.

Two hops, so no process holds every signature: edges are routed to the node partition of their
first endpoint, get its signature there (`attach_first`), are routed to the partition of the second
endpoint, get its signature and are decided there (`decide`). Exact-hash edges pass unchecked.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

def sig_table(ids: list[str] | pa.Array, sigs: np.ndarray) -> pa.Table:
    """(id, sig: fixed_size_list<uint32>[num_perm]) rows."""
    n, k = sigs.shape
    flat = pa.array(np.ascontiguousarray(sigs, dtype=np.uint32).reshape(-1), pa.uint32())
    return pa.table({"id": pa.array(ids, pa.string()), "sig": pa.FixedSizeListArray.from_arrays(flat, k)})


def sig_matrix(col) -> np.ndarray:
    """(n, num_perm) uint32 from a fixed_size_list column."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    k = arr.type.list_size
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.uint32).reshape(-1, k)


def _lookup(keys: pa.ChunkedArray | pa.Array, sigs: pa.Table) -> np.ndarray:
    """(len(keys), num_perm) signatures of `keys` (a numpy gather, not an Arrow list take)."""
    idx = pc.index_in(keys, value_set=sigs.column("id").combine_chunks())
    if idx.null_count:
        raise ValueError(f"{idx.null_count} candidate ids have no signature in their partition")
    if isinstance(idx, pa.ChunkedArray):
        idx = idx.combine_chunks()
    return sig_matrix(sigs.column("sig"))[idx.to_numpy(zero_copy_only=False)]


def dedupe_edges(edges: pa.Table) -> pa.Table:
    """One row per (node, nbr); exact if any bucket joining them was an exact bucket."""
    from llmray.data.dedup import graph

    n = edges.num_rows
    if n == 0:
        return edges.select(["node", "nbr", "exact"])
    ends = pa.chunked_array(edges["node"].chunks + edges["nbr"].chunks, pa.string())
    rank, names = graph.rank_ids(ends)
    exact = edges["exact"].to_numpy().astype(bool)
    node, nbr, ex = graph.unique_pairs(rank[:n], rank[n:], exact)
    return pa.table({"node": names.take(pa.array(node)), "nbr": names.take(pa.array(nbr)), "exact": pa.array(ex)})


def attach_first(edges: pa.Table, sigs: pa.Table) -> pa.Table:
    """Near edges whose `node` lives in this partition, with that node's signature as `sig_a`."""
    near = edges.filter(pc.invert(edges["exact"]))
    if near.num_rows == 0:
        return pa.table({"node": pa.array([], pa.string()), "nbr": pa.array([], pa.string()),
                         "sig_a": sigs.column("sig").combine_chunks().slice(0, 0)})
    sig_a = _lookup(near["node"], sigs)
    flat = pa.array(sig_a.reshape(-1), pa.uint32())
    return pa.table({"node": near["node"], "nbr": near["nbr"],
                     "sig_a": pa.FixedSizeListArray.from_arrays(flat, sig_a.shape[1])})


def keep(sig_a: np.ndarray, sig_b: np.ndarray, threshold: float) -> np.ndarray:
    """Verification decision per row: estimated Jaccard >= threshold."""
    return (sig_a == sig_b).mean(axis=1) >= threshold


def decide(pending: pa.Table, sigs: pa.Table, threshold: float) -> tuple[pa.Table, int]:
    """Verified edges (node, nbr, exact=False) among `pending` whose `nbr` lives here, and how many
    were rejected."""
    if pending.num_rows == 0:
        return pa.table({"node": pa.array([], pa.string()), "nbr": pa.array([], pa.string()),
                         "exact": pa.array([], pa.bool_())}), 0
    ok = keep(sig_matrix(pending["sig_a"]), _lookup(pending["nbr"], sigs), threshold)
    kept = pending.filter(pa.array(ok))
    return (pa.table({"node": kept["node"], "nbr": kept["nbr"], "exact": pa.array(np.zeros(kept.num_rows, bool))}),
            int(pending.num_rows - kept.num_rows))
