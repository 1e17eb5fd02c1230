"""Checkpoints completed by our own marker: save, find the newest complete one, load, keep the last N.

Layout under a run's checkpoint root:

    step_00000040/
      state/            DeepSpeed engine state (module, optimizer, scheduler; one shard per rank)
      rank0.pt ...      per-rank extras: RNG states, data position
      COMPLETE.json     written by rank 0 LAST, after every rank finished writing (barrier)

A directory without `COMPLETE.json` (a crash mid-save) is never picked by `find_latest`; DeepSpeed's
own `latest` file is not written or used. `keep_last` deletes only complete checkpoints older than
the newest `keep_last` complete ones, and only after the new one is complete.

Works wherever a DeepSpeed engine lives (Ray Train worker, plain Ray actor, single process): every
rank calls `save(...)` / `load(...)` together.

    path = save(engine, root, step=40, meta={"consumed": 640}, rank_state={"rng": rng_state()}, keep_last=2)
    latest = find_latest(root)            # Path or None
    meta, rank_state = load(engine, latest)
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmray.config import check
from llmray.errors import UserError

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class CheckpointConfig:
    """The `checkpoint` section of every training stage and of RL: one meaning everywhere."""

    every_n_steps: int = 50
    """Optimizer steps between checkpoints (one is always written at the end)."""
    keep_last: int = 2
    """Complete checkpoints kept; an older one is deleted only after a newer one is complete."""
    resume: str = "auto"
    """auto = newest complete checkpoint of the run if any; never = start fresh; or a checkpoint path."""

    def __post_init__(self) -> None:
        check(self.every_n_steps >= 1, "checkpoint.every_n_steps", "must be >= 1")
        check(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        check(isinstance(self.resume, str) and self.resume != "", "checkpoint.resume",
              f"must be auto, never or a checkpoint path, got {self.resume!r}")


def resume_point(resume: str, root: str | Path) -> Path | None:
    """The checkpoint a run starts from: `checkpoint.resume` resolved against the run's checkpoint root.
    An explicit path must exist and be complete (UserError naming the key otherwise)."""
    if resume == "never":
        return None
    if resume == "auto":
        return find_latest(root)
    path = Path(resume)
    if not path.exists():
        raise UserError(f"checkpoint.resume: {path} does not exist")
    if not is_complete(path):
        raise UserError(f"checkpoint.resume: {path} is incomplete (no {MARKER}; cut off mid-save)")
    return path


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def is_complete(path: str | Path) -> bool:
    p = Path(path) / MARKER
    if not p.is_file():
        return False
    try:
        json.loads(p.read_text())
        return True
    except (OSError, ValueError):
        return False


def list_complete(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `root`, oldest first."""
    r = Path(root)
    if not r.is_dir():
        return []
    out = []
    for d in r.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and is_complete(d):
            out.append((int(m.group(1)), d))
    return sorted(out)


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None. Incomplete directories are skipped."""
    done = list_complete(root)
    return done[-1][1] if done else None


def read_meta(path: str | Path) -> dict[str, Any]:
    p = Path(path) / MARKER
    if not p.is_file():
        raise UserError(f"checkpoint {path} is incomplete (no {MARKER}): it was cut off mid-save")
    return json.loads(p.read_text())


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save(
    engine,
    root: str | Path,
    step: int,
    meta: dict[str, Any] | None = None,
    rank_state: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint `step` (collective: all ranks call it) and mark it complete; apply retention.

    `meta` (JSON-safe, from rank 0) goes into COMPLETE.json; `rank_state` (picklable, per rank: RNG,
    data position) into rank<r>.pt.
    """
    import torch

    rank, world = _rank_world()
    path = step_dir(root, step)
    if rank == 0:
        if path.exists():  # leftovers of a save cut off at this step, or a rerun: start clean
            shutil.rmtree(path)
        path.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(path), tag="state", save_latest=False)
    torch.save(rank_state or {}, path / f"rank{rank}.pt")
    _barrier()  # every rank's shard is on disk before the marker exists
    if rank == 0:
        body = {"step": step, "world_size": world, **(meta or {})}
        tmp = path / f".{MARKER}.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(body, indent=2, default=str))
        os.replace(tmp, path / MARKER)
        if keep_last:
            retain(root, keep_last)
    _barrier()
    return path


def retain(root: str | Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last` complete ones; return what was deleted."""
    done = list_complete(root)
    doomed = [p for _, p in done[:-keep_last]] if keep_last >= 1 else []
    for p in doomed:
        # Unmark first: a crash half-way through the delete leaves an ignored directory, not a broken "complete" one.
        (p / MARKER).unlink(missing_ok=True)
        shutil.rmtree(p, ignore_errors=True)
    return doomed


_STATIC = ("weight_decay", "betas", "eps")
"""Optimizer-group settings that come from the config, never from training."""


def _base_optimizer(engine):
    opt = getattr(engine, "optimizer", None)
    return getattr(opt, "optimizer", opt)


def _static_hyperparams(engine) -> list[dict[str, Any]]:
    opt = _base_optimizer(engine)
    if opt is None:
        return []
    return [{k: g[k] for k in _STATIC if k in g} for g in opt.param_groups]


def _restore_static_hyperparams(engine, fixed: list[dict[str, Any]]) -> None:
    """Put the config's per-group settings back after a universal load. DeepSpeed 0.19's ZeRO-3
    universal loader gave every group the first group's settings, so the no-decay group (norms)
    got weight decay; the losses then drifted ~1e-3 from the uninterrupted run within 3 steps."""
    opt = _base_optimizer(engine)
    for group, want in zip(opt.param_groups, fixed):
        changed = {k: (group.get(k), v) for k, v in want.items() if group.get(k) != v}
        if changed:
            log.info("universal load changed optimizer group settings %s; restored from the config", changed)
        group.update(want)


def load(engine, path: str | Path, expect: dict[str, Any] | None = None,
         elastic: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a complete checkpoint into `engine` (collective). Returns (meta, this rank's rank_state).

    `expect` holds meta keys that must match (e.g. the model shape); a mismatch is a UserError naming
    the key, raised before DeepSpeed touches the engine. A checkpoint of another worker count is
    refused unless `elastic`: then ZeRO-1/2/3 state is read from its universal form (converted by
    `elastic.prepare`, the engine built with `load_universal`) and the per-rank extras are not
    restored (they belonged to other ranks).
    """
    import torch

    from llmray.train import elastic as el

    meta = read_meta(path)
    rank, world = _rank_world()
    for key, want in (expect or {}).items():
        if key in meta and meta[key] != want:
            raise UserError(f"checkpoint {path}: {key} is {meta[key]!r} but this run has {want!r}; "
                            "resume from a checkpoint of the same model or start a new run")
    same_world = meta.get("world_size", world) == world
    if not same_world and not elastic:
        raise UserError(f"checkpoint {path} was written by {meta['world_size']} workers but this run has {world}; "
                        "set scaling.num_workers to match")
    universal = el.needs_universal(meta, world)
    src = el.universal_dir(path) if universal else Path(path)
    fixed = _static_hyperparams(engine) if universal else []
    load_path, _ = engine.load_checkpoint(str(src), tag="state", load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if fixed:
        _restore_static_hyperparams(engine, fixed)
    if load_path is None:
        raise UserError(f"checkpoint {path}: DeepSpeed found no engine state under {src}/state")
    f = Path(path) / f"rank{rank}.pt"
    rank_state = torch.load(f, weights_only=False) if same_world and f.is_file() else {}
    return meta, rank_state
