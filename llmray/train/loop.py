"""The per-worker training loop run by Ray Train: engine, exact data position, checkpoints, metrics, export.

One loop serves every trainer; what differs (model, loss, export) is a `TrainTask`. Each worker reads
only its own rows: `ray.train.get_dataset_shard("train")` is this rank's Ray Data stream
(llmray/train/shards.py: `RankShards` filters the ordered, row-id'd dataset by rank inside the read
tasks), in the dataset's order (`preserve_order`), one micro-batch per `micro_batch_size` rows.
Row i belongs to rank (i // micro) % workers, so global micro-chunk c is rows [c*m*W, (c+1)*m*W)
and step k is the same global batch at any worker count when the global batch is kept. The data
position is one integer, rows consumed, saved in each checkpoint; a resumed run skips exactly that
many (its own share of them). Ray's `streaming_split` was not used: its splitter gives whole blocks
to whichever split has had the fewest rows and documents no ordering guarantee, even with
`preserve_order` and `equal=True`, so a rank's rows would depend on block sizes and on the worker
count; exact and elastic resume need a fixed assignment by row id.

A checkpoint written by another worker count resumes too (llmray/train/elastic.py): the driver keeps
the global batch (grad_accum_steps), rank 0 converts ZeRO shards to DeepSpeed's universal checkpoint
(cached in the checkpoint), and the engine loads that.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmray.device import to_device
from llmray.train import checkpoint as ckpt
from llmray.train import elastic, shards, shm_comm
from llmray.train.deepspeed_config import DeepSpeedConfig, OptimizerConfig

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger(__name__)


PHASES = ("data", "forward", "backward", "optimizer")
"""Parts of a training step timed on each rank and logged as `time/<phase>_s` (rank 0's)."""


class TrainTask:
    """What a trainer trains: model, loss on a micro-batch, optional held-out eval, export."""

    def build_model(self) -> "torch.nn.Module":
        raise NotImplementedError

    def loss(self, engine, batch: dict[str, "torch.Tensor"]) -> tuple["torch.Tensor", dict[str, float], int]:
        """(mean loss to backprop, metric SUMS over the micro-batch incl. "count", tokens processed)."""
        raise NotImplementedError

    def evaluate(self, engine, rows: dict[str, "np.ndarray"]) -> dict[str, float]:
        """Metric sums on this rank's slice of held-out rows (all-reduced by the loop)."""
        return {}

    def export(self, state_dict: dict[str, "torch.Tensor"], out_dir: Path) -> None:
        raise NotImplementedError


@dataclass
class LoopSpec:
    """Everything the workers need (pickled once into train_loop_config)."""

    task: TrainTask
    ds: DeepSpeedConfig
    opt: OptimizerConfig
    max_steps: int
    run_dir: str
    num_rows: int
    """Rows of the training stream per epoch."""
    every_n_steps: int = 50
    keep_last: int = 2
    resume: str = "auto"
    """auto (newest complete checkpoint of run_dir, if any), never, or a checkpoint path."""
    seed: int = 0
    log_every: int = 1
    flops_per_token: float = 0.0
    """6·N for a causal LM (forward + backward); 0 disables FLOPs / MFU."""
    peak_flops_per_worker: float = 1e12
    expect_meta: dict[str, Any] = field(default_factory=dict)
    eval_rows: dict[str, Any] | None = None
    tensorboard: bool = True
    record_rows: bool = False
    """Append the row ids each rank trained on to run_dir/rows/rank<r>.jsonl (one line per micro-batch)."""


def _to_tensor(col: "np.ndarray") -> "torch.Tensor":
    import numpy as np
    import torch

    if col.dtype == object:
        col = np.stack([np.asarray(x) for x in col])
    t = torch.from_numpy(np.ascontiguousarray(col))
    return t.long() if t.dtype in (torch.int32, torch.int16, torch.int8, torch.uint8) else t


def to_batch(rows: dict[str, "np.ndarray"], device: "torch.device | str | None" = None) -> dict[str, "torch.Tensor"]:
    """Columns as tensors, on `device` when given (the engine's: `engine.device`, see llmray.device)."""
    batch = {k: _to_tensor(v) for k, v in rows.items()}
    return batch if device is None else to_device(batch, device)


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**3


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _allreduce(values: list[float], op: str = "sum") -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point (`TorchTrainer(train_loop_per_worker=train_loop)`)."""
    import ray
    import ray.train
    import torch

    from llmray.report.metrics import MetricsLogger
    from llmray.train.engine import build_deepspeed_engine, gather_full_state_dict, optimizer_step, setup_env

    spec: LoopSpec = config["spec"]
    setup_env()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir = Path(spec.run_dir)
    (run_dir / "pids").mkdir(parents=True, exist_ok=True)
    (run_dir / "pids" / f"rank{rank}.pid").write_text(str(os.getpid()))
    (run_dir / "pids" / f"rank{rank}.node").write_text(ray.get_runtime_context().get_node_id())
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    baseline_gb = rss_gb()

    ckpt.set_rng_state(_seeded_rng(spec.seed + rank))
    root = run_dir / "checkpoints"
    start = ckpt.resume_point(spec.resume, root)
    universal = start is not None and elastic.prepare(start, ckpt.read_meta(start), rank, world)
    model = spec.task.build_model()
    engine = build_deepspeed_engine(model, spec.ds, spec.opt, total_steps=spec.max_steps, load_universal=universal)
    step, consumed = 0, 0
    if start is not None:
        meta, rank_state = ckpt.load(engine, start, spec.expect_meta, elastic=True)
        step, consumed = int(meta["step"]), consumed_rows(meta, spec.ds.micro_batch_size)
        if "rng" in rank_state:
            ckpt.set_rng_state(rank_state["rng"])
        if rank == 0:
            print(f"[llmray] resumed from {start} at step {step} ({consumed} rows consumed)", flush=True)

    logger = None
    if rank == 0:
        logger = MetricsLogger(run_dir / "metrics.jsonl", run_dir / "tensorboard" if spec.tensorboard else None)
    micro, accum = spec.ds.micro_batch_size, spec.ds.grad_accum_steps
    chunk = micro * world  # rows of one global micro-chunk; this rank trains on `micro` of them
    rows_per_epoch = shards.epoch_rows(spec.num_rows, spec.ds.global_batch(world))
    if rows_per_epoch < 1:
        raise RuntimeError(f"dataset has {spec.num_rows} rows, fewer than one global batch of "
                           f"{spec.ds.global_batch(world)}")
    shard = ray.train.get_dataset_shard("train")
    record = None
    if spec.record_rows:
        (run_dir / "rows").mkdir(exist_ok=True)
        record = open(run_dir / "rows" / f"rank{rank}.jsonl", "a")

    last_saved = step if start is not None else -1
    acc: dict[str, float] = {}
    tokens = 0
    checksum = 0
    micro_i = 0
    # Where this rank's step time goes: waiting for data, forward, backward (with ZeRO-1/2's gradient
    # reduction), optimizer (with ZeRO's parameter all-gather); the rest is metrics and checkpoints.
    phase = dict.fromkeys(PHASES, 0.0)
    t_step = t_mark = time.perf_counter()
    engine.train()
    while step < spec.max_steps:
        skip = (consumed % rows_per_epoch) // chunk
        for ci, rows in enumerate(shard.iter_batches(batch_size=micro, batch_format="numpy", drop_last=True,
                                                       prefetch_batches=2)):
            if ci < skip:
                t_mark = time.perf_counter()
                continue  # already trained on before the resume: read past, do not train
            t0 = time.perf_counter()
            ids = rows.pop(shards.ROW_ID)
            if record is not None:
                record.write(json.dumps({"step": step + 1, "world": world, "row_ids": ids.tolist()}) + "\n")
            local = to_batch(rows, engine.device)
            if "input_ids" in local:
                checksum += int(local["input_ids"].sum())
            loss, sums, ntok = spec.task.loss(engine, local)
            t1 = time.perf_counter()
            engine.backward(loss)
            t2 = time.perf_counter()
            gn = optimizer_step(engine)
            t3 = time.perf_counter()
            for name, dt_phase in zip(PHASES, (t0 - t_mark, t1 - t0, t2 - t1, t3 - t2)):
                phase[name] += dt_phase
            t_mark = t3
            consumed += chunk
            micro_i += 1
            tokens += ntok
            for k, v in sums.items():
                acc[k] = acc.get(k, 0.0) + float(v)
            if micro_i % accum:
                continue
            step += 1
            dt = time.perf_counter() - t_step
            keys = sorted(acc)
            red = _allreduce([acc[k] for k in keys] + [tokens, checksum])
            peak = _allreduce([peak_rss_gb()], "max")[0]
            tot = dict(zip(keys, red[: len(keys)]))
            g_tokens = red[len(keys)]
            count = max(tot.pop("count", 1.0), 1.0)
            row = {f"train/{k}": v / count for k, v in tot.items()}
            row.update({
                "lr": float(engine.get_lr()[0]),
                "grad_norm": float(gn) if gn is not None else float("nan"),
                "tokens_per_s": g_tokens / dt,
                "step_time_s": dt,
                "tokens": g_tokens,
                "epoch": (consumed - 1) // rows_per_epoch,
                "batch_checksum": red[len(keys) + 1],
                "memory/peak_rss_gb": peak,
                "memory/rss_gb_rank0": rss_gb(),
                "memory/baseline_gb": baseline_gb,
                **{f"time/{name}_s": v for name, v in phase.items()},
            })
            if spec.flops_per_token:
                flops = spec.flops_per_token * g_tokens
                row["flops"] = flops
                row["mfu"] = flops / dt / (spec.peak_flops_per_worker * world)
            if logger is not None:
                logger.log(step, row)
                if step % spec.log_every == 0 or step == spec.max_steps:
                    print(f"[llmray] step {step}/{spec.max_steps} loss {row.get('train/loss', float('nan')):.4f} "
                          f"lr {row['lr']:.2e} gnorm {row['grad_norm']:.3f} {row['tokens_per_s']:.0f} tok/s",
                          flush=True)
            acc, tokens, checksum = {}, 0, 0
            phase = dict.fromkeys(PHASES, 0.0)
            if step % spec.every_n_steps == 0 or step == spec.max_steps:
                _save(engine, root, step, consumed, spec, row)
                last_saved = step
            t_step = t_mark = time.perf_counter()
            if step >= spec.max_steps:
                break
    if last_saved != step:
        _save(engine, root, step, consumed, spec, {})
    if record is not None:
        record.close()

    result: dict[str, Any] = {"step": step, "consumed_rows": consumed,
                              "collectives": "shm" if shm_comm.active() else torch.distributed.get_backend()}
    if spec.eval_rows:
        engine.eval()
        ev = _evaluate(engine, spec, rank, world)
        result.update(ev)
        if logger is not None:
            logger.log(step, ev)
    state = gather_full_state_dict(engine, dtype=torch.float32, rank0_only=True)  # bucket by bucket at ZeRO-3
    if rank == 0:
        out = run_dir / "export"
        spec.task.export(state, out)
        # Where each rank ran (Ray node ids by rank), from the files every rank wrote at start.
        result["worker_nodes"] = [(run_dir / "pids" / f"rank{r}.node").read_text() for r in range(world)]
        (run_dir / "result.json").write_text(json.dumps(result, indent=2))
        logger.close()
    ray.train.report({"done": 1, **{k: v for k, v in result.items() if isinstance(v, (int, float))}})


def consumed_rows(meta: dict[str, Any], micro: int) -> int:
    """Rows consumed at a checkpoint; one written before rows were counted has micro-chunks instead."""
    if "consumed_rows" in meta:
        return int(meta["consumed_rows"])
    return int(meta.get("consumed_chunks", 0)) * micro * int(meta.get("world_size", 1))


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def _seeded_rng(seed: int) -> dict[str, Any]:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return ckpt.rng_state()


def _save(engine, root: Path, step: int, consumed: int, spec: LoopSpec, row: dict[str, Any]) -> None:
    import ray.train
    from ray.train import Checkpoint
    from ray.train.v2.api.report_config import CheckpointUploadMode

    meta = {"consumed_rows": consumed, "global_batch": spec.ds.global_batch(_world()),
            "zero_stage": spec.ds.zero_stage, **spec.expect_meta}
    path = ckpt.save(engine, root, step, meta, {"rng": ckpt.rng_state()}, keep_last=spec.keep_last)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    metrics = {"step": step, **{k: v for k, v in row.items() if isinstance(v, (int, float))}}
    # The checkpoint already sits in the run's storage: register it with Ray without copying.
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(path)) if rank == 0 else None,
                     checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def _evaluate(engine, spec: LoopSpec, rank: int, world: int) -> dict[str, float]:
    import torch

    rows = spec.eval_rows or {}
    # The driver cuts eval rows to a multiple of the worker count, so every rank runs the same number
    # of forward passes (each one is a collective at ZeRO-3).
    n = len(next(iter(rows.values())))
    sums: dict[str, float] = {}
    mine = list(range(rank, n, world))
    with torch.no_grad():
        for i in range(0, len(mine), spec.ds.micro_batch_size):
            idx = mine[i:i + spec.ds.micro_batch_size]
            part = {k: v[idx] for k, v in rows.items()}
            for k, v in spec.task.evaluate(engine, part).items():
                sums[k] = sums.get(k, 0.0) + float(v)
    keys = sorted(set(sums) | {"count"})
    red = dict(zip(keys, _allreduce([sums.get(k, 0.0) for k in keys])))
    count = max(red.pop("count", 1.0), 1.0)
    return {f"eval/{k}": v / count for k, v in red.items()}
