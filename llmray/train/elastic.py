"""Resume at another worker count: keep the global batch, re-cut ZeRO shards via DeepSpeed's universal checkpoint.

A checkpoint records the worker count and global batch that wrote it (COMPLETE.json). Resuming
with a different count:
- the global batch is kept: `grad_accum_steps` becomes saved_global / (micro_batch x workers)
  (`elastic_accum`), so step k still trains on the same rows (llmray/train/shards.py);
- ZeRO-1/2/3 optimizer and parameter shards are re-cut by DeepSpeed's universal checkpoint: rank 0
  converts `step_N/state` once into `step_N/universal/state` (`ds_to_universal`, cached there: a
  second resume reuses it; retention deletes it with its checkpoint) and the engine is built with
  `checkpoint.load_universal`; ZeRO-0 state is not sharded and loads as saved.

    accum = elastic_accum(saved_global=16, micro=4, world=2, key="deepspeed.grad_accum_steps")  # 2
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

from llmray.errors import UserError

log = logging.getLogger(__name__)

UNIVERSAL = "universal"
"""Folder inside a checkpoint that holds its universal conversion."""
_DONE = "CONVERTED"


def elastic_accum(saved_global: int, micro: int, world: int) -> int:
    """Gradient-accumulation steps that keep `saved_global` rows per step with `world` workers of
    `micro` rows; UserError naming the keys when no whole number does."""
    per = micro * world
    if saved_global % per:
        raise UserError(f"checkpoint global batch {saved_global} is not a multiple of deepspeed.micro_batch_size x "
                        f"scaling.num_workers = {micro} x {world}; pick a micro_batch_size or worker count that "
                        "divides it, or start a new run")
    return saved_global // per


def needs_universal(meta: dict[str, Any], world: int) -> bool:
    """True when the checkpoint's ZeRO shards must be re-cut for `world` workers (ZeRO >= 1, count changed)."""
    return int(meta.get("world_size", world)) != world and int(meta.get("zero_stage", 1)) >= 1


def universal_dir(path: str | Path) -> Path:
    return Path(path) / UNIVERSAL


def convert(path: str | Path) -> Path:
    """`path/state` (DeepSpeed ZeRO shards) -> `path/universal/state`, once; returns `path/universal`.
    Idempotent: a finished conversion (marker file) is reused, a half-written one redone."""
    import shutil

    out = universal_dir(path)
    if (out / _DONE).is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    from deepspeed.checkpoint.ds_to_universal import main

    # One worker: DeepSpeed then converts in this process. More would fork a process pool out of a
    # Ray Train worker that holds a process group and its threads.
    args = _Args(input_folder=str(Path(path) / "state"), output_folder=str(out / "state"),
                 num_extract_workers=1, num_merge_workers=1)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # its progress lines; kept in the log at debug level
        main(args)
    log.debug("ds_to_universal %s:\n%s", path, buf.getvalue())
    (out / _DONE).write_text("ok\n")
    return out


class _Args:
    """The argparse namespace ds_to_universal.main expects."""

    def __init__(self, **kw: Any):
        self.keep_temp_folder = False
        self.strict = True
        # Our engines do not record universal_checkpoint_info (no tensor/pipeline parallel layout);
        # DeepSpeed injects the plain data-parallel one.
        self.inject_missing_state = True
        self.__dict__.update(kw)


def prepare(path: str | Path, meta: dict[str, Any], rank: int, world: int) -> bool:
    """Collective: rank 0 converts `path` for `world` workers if needed, the others wait.
    Returns whether the engine must load the universal form."""
    if not needs_universal(meta, world):
        return False
    if rank == 0:
        print(f"[llmray] checkpoint {path} was written by {meta['world_size']} workers, this run has {world}: "
              f"loading its universal form ({universal_dir(path)})", flush=True)
        convert(path)
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return True
