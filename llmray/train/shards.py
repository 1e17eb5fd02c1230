"""Which training rows each worker reads: a fixed global order, cut by rank, independent of the worker count.

The training rows carry a `row_id` (their index in the dataset's order). Step k trains on rows
[k*G, (k+1)*G) of each epoch, G = micro_batch x grad_accum x workers (the global batch); inside
that, micro-chunk c = rows [c*m*W, (c+1)*m*W) is cut by rank, rank r taking m rows
(m = micro_batch, W = workers): row i belongs to rank (i // m) % W. An epoch is the first
(rows // G) * G rows, so it is whole steps. With the global batch held fixed, step k therefore
trains on the same rows at any worker count (2 workers x accum 1 = 1 worker x accum 2).

Each worker gets its own Ray Data stream holding only its rows (`RankShards`, a Ray Train
`DataConfig`); a parquet dataset is read as row groups with their ids (`indexed_parquet`) and the
other ranks' rows are dropped inside the read task, so they never reach the object store or the
worker. (Ray's own `streaming_split` was not used: its splitter hands whole blocks to the least-fed
split and documents no ordering guarantee, so a rank's rows would depend on block sizes and the
worker count.)

    keep = rank_mask(row_ids, rank=1, world=2, micro=4, limit=epoch_rows(256, 8))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import ray.data

ROW_ID = "row_id"
"""Column with each row's index in the dataset's order; the loop drops it before the model sees a batch."""


def epoch_rows(num_rows: int, global_batch: int) -> int:
    """Rows trained per epoch: whole global batches only (the tail of fewer than one step is left out)."""
    return (num_rows // global_batch) * global_batch


def rank_of(row_id: int, micro: int, world: int) -> int:
    """The rank that trains on row `row_id`."""
    return (row_id // micro) % world


def rank_mask(row_ids: "np.ndarray", rank: int, world: int, micro: int, limit: int) -> "np.ndarray":
    """Boolean mask of the rows (by id) that `rank` trains on, ids below `limit` (the epoch) only."""
    import numpy as np

    ids = np.asarray(row_ids, dtype=np.int64)
    return ((ids // micro) % world == rank) & (ids < limit)


def with_row_ids(table, start: int = 0):
    """`table` (pyarrow) with a `row_id` column counting from `start`."""
    import pyarrow as pa

    return table.append_column(ROW_ID, pa.array(range(start, start + table.num_rows), type=pa.int64()))


class _KeepRank:
    """map_batches function: the rows of one rank (batch_format pyarrow)."""

    def __init__(self, rank: int, world: int, micro: int, limit: int):
        self.rank, self.world, self.micro, self.limit = rank, world, micro, limit

    def __call__(self, table):
        mask = rank_mask(table.column(ROW_ID).to_numpy(), self.rank, self.world, self.micro, self.limit)
        return table.filter(mask)


def _read_row_group(batch: dict[str, Any], columns: list[str]):
    """map_batches function: read the row groups named in `batch` (path, group, start) with their ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = []
    for path, group, start in zip(batch["path"], batch["group"], batch["start"]):
        table = pq.ParquetFile(str(path)).read_row_group(int(group), columns=columns)
        parts.append(with_row_ids(table, int(start)))
    return pa.concat_tables(parts)


def indexed_parquet(paths: list[str], columns: list[str]) -> "ray.data.Dataset":
    """The rows of `paths` (in that order, then row-group order) with a `row_id` column, one read task
    per row group. The row counts come from the files' footers, so each group's first id is known
    before anything is read."""
    import pyarrow.parquet as pq
    import ray.data

    groups, start = [], 0
    for p in paths:
        meta = pq.ParquetFile(p).metadata
        for g in range(meta.num_row_groups):
            groups.append({"path": p, "group": g, "start": start})
            start += meta.row_group(g).num_rows
    ds = ray.data.from_items(groups, override_num_blocks=max(1, len(groups)))
    return ds.map_batches(_read_row_group, batch_size=1, batch_format="numpy", fn_kwargs={"columns": columns})


def in_memory(table) -> "ray.data.Dataset":
    """A small pyarrow table (already tokenized SFT / preference rows) with row ids, as one block."""
    import ray.data

    return ray.data.from_arrow(with_row_ids(table))


def rank_shards_config(micro: int, global_batch_rows: int | None = None, num_rows: int = 0):
    """A Ray Train DataConfig that gives each worker only its rows of the "train" dataset, in order.

    `global_batch_rows`: rows per optimizer step (G); the epoch is `epoch_rows(num_rows, G)`."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    class RankShards(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out = [{} for _ in range(world_size)]
            limit = epoch_rows(num_rows, global_batch_rows) if global_batch_rows else num_rows
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for rank in range(world_size):
                    mine = ds.map_batches(_KeepRank(rank, world_size, micro, limit), batch_size=None,
                                          batch_format="pyarrow", zero_copy_batch=True)
                    out[rank][name] = mine.iterator()
            return out

    return RankShards(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True))
