"""Driver side of every trainer: shared config sections, pre-launch checks, TorchTrainer launch, artifact publish.

`TrainRunConfig` is the base of the pretrain / SFT / reward-model / DPO configs: DeepSpeed and
optimizer settings, Ray Train scaling, checkpointing, fault tolerance, metrics. `launch(...)` starts
a `TorchTrainer` (ScalingConfig and FailureConfig from the config, storage = the run directory, the
training rows as one ordered Ray Dataset) running `loop.train_loop`, then publishes the exported HF
directory as a `model` artifact with the run's metrics and a loss-curve PNG.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmray.cluster import RayConfig, check_custom_resources
from llmray.config import check
from llmray.errors import UserError
from llmray.train import checkpoint as ckpt
from llmray.train.checkpoint import CheckpointConfig
from llmray.train.deepspeed_config import DeepSpeedConfig, OptimizerConfig

if TYPE_CHECKING:
    import ray.data

    from llmray.train.loop import LoopSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 2
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    """One GPU per worker and NCCL; false = CPU workers on gloo."""
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 1
    """torch intra-op threads per worker (OMP_NUM_THREADS); workers x threads <= cores avoids oversubscription."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each worker requests (Ray Train's resources_per_worker besides CPU/GPU), e.g.
    {worker_node: 1} to place every worker on nodes started with that resource."""

    def __post_init__(self) -> None:
        check(self.num_workers >= 1, "scaling.num_workers", "must be >= 1")
        check(self.cpus_per_worker > 0, "scaling.cpus_per_worker", "must be > 0")
        check(self.threads_per_worker >= 1, "scaling.threads_per_worker", "must be >= 1")
        check_custom_resources(self.resources, "scaling.resources")


@dataclass(frozen=True)
class TrainRunConfig:
    run_dir: str = "runs/train"
    """Checkpoints, metrics.jsonl, tensorboard/, loss.png, export/. Same run_dir = same run (resumes)."""
    output: str = "artifacts/model"
    """Where the trained model artifact (HF directory + manifest.json) is published."""
    max_steps: int = 100
    """Optimizer steps (the data stream repeats in epochs if it is shorter)."""
    seed: int = 0
    log_every: int = 10
    """Print a progress line every N steps (metrics.jsonl gets every step)."""
    peak_flops_per_worker: float = 1.0e12
    """Peak FLOP/s of one worker, for MFU (e.g. 312e12 for an A100 in bf16; ~1e12 for 2 AVX-512 cores)."""
    memory_budget_gb: float | None = None
    """Refuse to start when the estimated memory per worker exceeds this; default: RAM / workers on CPU,
    device memory on GPU."""
    max_failures: int = 1
    """Worker-group restarts Ray Train may do (each resumes from the newest complete checkpoint)."""
    record_rows: bool = False
    """Append the row ids each worker trained on to run_dir/rows/rank<r>.jsonl (an audit of the sharding)."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        check(self.max_steps >= 1, "max_steps", "must be >= 1")
        check(self.log_every >= 1, "log_every", "must be >= 1")
        check(self.peak_flops_per_worker > 0, "peak_flops_per_worker", "must be > 0")
        check(self.max_failures >= 0, "max_failures", "must be >= 0")
        check(self.memory_budget_gb is None or self.memory_budget_gb > 0, "memory_budget_gb", "must be > 0")
        check(self.deepspeed.backend != "nccl" or self.scaling.use_gpu, "deepspeed.backend",
              "nccl needs scaling.use_gpu=true")


@dataclass(frozen=True)
class FineTuneConfig(TrainRunConfig):
    """The shared part of the post-training configs (SFT, reward model, DPO): a model to start from and
    records to train on, the last `eval_fraction` of them held out."""

    model: str = "artifacts/sft"
    """Model artifact (HF directory with its tokenizer) to start from."""
    data: str = "artifacts/corpus/preference"
    """JSONL file or directory of training records."""
    eval_fraction: float = 0.1
    """Share of records held out (the last ones) for the eval metrics."""
    seq_len: int = 256
    max_examples: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.eval_fraction < 1, "eval_fraction", "must be in [0, 1)")
        check(self.seq_len >= 8, "seq_len", "must be >= 8")


def fit_to_workers(cfg: TrainRunConfig, train: list, held: list, what: str = "rows") -> list:
    """Refuse a training set smaller than one micro-batch per worker (UserError naming the data); return
    the held-out rows cut to a multiple of the worker count (every rank evaluates the same number)."""
    w = cfg.scaling.num_workers
    need = cfg.deepspeed.micro_batch_size * w
    if len(train) < need:
        data = getattr(cfg, "data", "the data")
        raise UserError(f"{data}: {len(train)} training {what}, fewer than micro_batch_size x num_workers ({need})")
    return held[: len(held) // w * w]


def default_budget_gb(cfg: TrainRunConfig) -> float:
    if cfg.scaling.use_gpu:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / 1024**3
        return 80.0
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return total / cfg.scaling.num_workers


def estimate_memory(cfg: TrainRunConfig, shape, seq_len: int, trainable: int | None = None, copies: int = 1):
    """Memory per worker of this run (`llmray plan` prints the same estimate)."""
    from llmray.train import memory

    return memory.estimate(shape, cfg.deepspeed, seq_len, cfg.scaling.num_workers, trainable,
                           on_gpu=cfg.scaling.use_gpu, copies=copies)


def check_memory(cfg: TrainRunConfig, shape, seq_len: int, trainable: int | None = None, copies: int = 1):
    """Print the estimate and refuse to start if it exceeds the budget (UserError naming the setting)."""
    from llmray.train import memory

    est = estimate_memory(cfg, shape, seq_len, trainable, copies)
    budget = cfg.memory_budget_gb or default_budget_gb(cfg)
    print(f"[llmray] memory estimate: {est.summary()} (budget {budget:.1f} GB)", flush=True)
    memory.check_budget(est, budget, cfg.deepspeed, cfg.scaling.num_workers)
    return est


def check_resume(cfg: TrainRunConfig, expect: dict[str, Any]) -> Path | None:
    """Which checkpoint the run will start from; a mismatched model shape fails here, before launch."""
    path = ckpt.resume_point(cfg.checkpoint.resume, Path(cfg.run_dir) / "checkpoints")
    if path is None:
        return None
    meta = ckpt.read_meta(path)
    for key, want in expect.items():
        if key in meta and meta[key] != want:
            raise UserError(f"checkpoint {path}: {key} {meta[key]!r} differs from this run's {want!r}; "
                            "a checkpoint of a different model cannot be resumed (set checkpoint.resume=never "
                            "or a new run_dir)")
    resume_deepspeed(cfg, meta)  # another worker count: the global batch must be keepable
    if int(meta.get("step", 0)) > cfg.max_steps:
        raise UserError(f"checkpoint {path} is at step {meta['step']}, beyond max_steps={cfg.max_steps}")
    return path


def resume_deepspeed(cfg: TrainRunConfig, meta: dict[str, Any] | None, say: bool = False) -> DeepSpeedConfig:
    """The DeepSpeed settings a run resuming from a checkpoint with `meta` uses: cfg's, except that a
    checkpoint of another worker count keeps its global batch through grad_accum_steps (printed if `say`).
    UserError naming the keys when it cannot."""
    from dataclasses import replace

    from llmray.train.elastic import elastic_accum

    ds, world = cfg.deepspeed, cfg.scaling.num_workers
    if not meta or int(meta.get("world_size", world)) == world or "global_batch" not in meta:
        return ds
    saved = int(meta["global_batch"])
    if ds.global_batch(world) == saved:
        return ds
    accum = elastic_accum(saved, ds.micro_batch_size, world)
    if say:
        print(f"[llmray] resuming a {meta['world_size']}-worker checkpoint on {world} workers: "
              f"deepspeed.grad_accum_steps {ds.grad_accum_steps} -> {accum} keeps its global batch of {saved}",
              flush=True)
    return replace(ds, grad_accum_steps=accum)


# Ray Train v2 records every reported checkpoint in this file under the run directory and refuses
# to start a run whose record names a checkpoint that is gone. Our retention (keep_last) deletes old
# checkpoints and our loop resumes from the newest complete one itself, so the record is stale.
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"


def forget_ray_train_snapshot(run_dir: str | Path) -> bool:
    """Remove Ray Train's checkpoint record of an earlier attempt of this run (True if there was one).
    Without this, resubmitting a run that had deleted a checkpoint (keep_last) failed with
    CheckpointManagerInitializationError instead of resuming."""
    p = Path(run_dir) / RAY_TRAIN_SNAPSHOT
    if p.is_file():
        p.unlink()
        return True
    return False


def loop_spec(cfg: TrainRunConfig, task, shape, num_rows: int, expect: dict[str, Any],
              eval_rows: dict[str, Any] | None = None) -> "LoopSpec":
    """What every training recipe hands its workers: the task plus the run's shared settings."""
    from llmray.train.loop import LoopSpec

    start = ckpt.resume_point(cfg.checkpoint.resume, Path(cfg.run_dir) / "checkpoints")
    ds = resume_deepspeed(cfg, ckpt.read_meta(start) if start is not None else None, say=True)
    return LoopSpec(
        task=task, ds=ds, opt=cfg.optimizer, max_steps=cfg.max_steps,
        run_dir=str(Path(cfg.run_dir).resolve()), num_rows=num_rows, every_n_steps=cfg.checkpoint.every_n_steps,
        keep_last=cfg.checkpoint.keep_last, resume=cfg.checkpoint.resume, seed=cfg.seed, log_every=cfg.log_every,
        flops_per_token=6.0 * shape.num_params(), peak_flops_per_worker=cfg.peak_flops_per_worker,
        expect_meta=expect, eval_rows=eval_rows, record_rows=cfg.record_rows,
    )


def launch(cfg: TrainRunConfig, spec: "LoopSpec", dataset: "ray.data.Dataset", name: str,
           ingest_cpus: float = 0.0) -> dict[str, Any]:
    """Run `spec` on a TorchTrainer over `dataset`; return the worker's result.json plus timing.

    `ingest_cpus`: CPUs the dataset's own tasks need beside the workers (a streamed parquet read
    needs one): without them the workers hold every CPU and the read never runs, a silent hang."""
    from ray.train import CheckpointConfig as RayCheckpointConfig
    from ray.train import FailureConfig, RunConfig
    from ray.train import ScalingConfig as RayScaling
    from ray.train.torch import TorchConfig, TorchTrainer

    from llmray.cluster import has_state_api, init_ray, require_resources
    from llmray.train.shards import rank_shards_config

    init_ray(cfg.ray)
    sc = cfg.scaling
    per_worker = worker_resources(sc)
    need = {k: v * sc.num_workers for k, v in per_worker.items()}
    need["CPU"] += ingest_cpus
    what = f"{name} ({sc.num_workers} workers x {sc.cpus_per_worker:g} CPU" + (
        f" + {ingest_cpus:g} CPU to read the data)" if ingest_cpus else ")")
    require_resources(need, what, cfg.ray.resource_wait_s)
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").unlink(missing_ok=True)
    if forget_ray_train_snapshot(run_dir):
        log.info("%s: dropped Ray Train's checkpoint record of an earlier attempt; resuming from our own", name)
    backend = cfg.deepspeed.backend if cfg.deepspeed.backend != "auto" else ("nccl" if sc.use_gpu else "gloo")
    env = {"OMP_NUM_THREADS": str(sc.threads_per_worker), "DS_ACCELERATOR": "cuda" if sc.use_gpu else "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  str(Path.cwd() / ".cache" / "torch_extensions"))}
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", env["TORCH_EXTENSIONS_DIR"])
    # Progress is the step log. Ray Data's bars for the workers' reads were never closed when the
    # workers exited, so the driver kept redrawing them through every later stage's output. Off in
    # both contexts: the dataset's own, and the driver's current one that Ray Train copies to workers.
    dataset.context.enable_progress_bars = False
    with _data_progress_bars(False):
        trainer_cls = TorchTrainer if has_state_api() else _without_placement_group_cleaner(TorchTrainer)
        trainer = trainer_cls(
            train_loop_per_worker=_worker_entry,
            train_loop_config={"spec": spec, "env": env},
            torch_config=TorchConfig(backend=backend),
            scaling_config=RayScaling(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                      resources_per_worker=per_worker),
            run_config=RunConfig(
                name=run_dir.name,
                storage_path=str(run_dir.parent),
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                # Retention is ours (keep_last, only after the newer checkpoint is complete).
                checkpoint_config=RayCheckpointConfig(num_to_keep=None),
            ),
            datasets={"train": dataset},
            # Each worker's stream holds only its rows, in order (llmray/train/shards.py).
            dataset_config=rank_shards_config(spec.ds.micro_batch_size, spec.ds.global_batch(sc.num_workers),
                                              spec.num_rows),
        )
        t0 = time.monotonic()
        trainer.fit()
    wall = time.monotonic() - t0
    res_file = run_dir / "result.json"
    if not res_file.is_file():
        raise RuntimeError(f"{name}: training ended without a result (see the worker logs above)")
    result = json.loads(res_file.read_text())
    result["wall_time_s"] = round(wall, 2)
    return result


def worker_resources(sc: ScalingConfig) -> dict[str, float]:
    """Ray Train's `resources_per_worker`: the worker's CPUs, one GPU with use_gpu, and the custom
    resources of `scaling.resources` (which pin workers to the nodes that offer them); `llmray plan`
    places these very bundles."""
    return {"CPU": sc.cpus_per_worker, **({"GPU": 1.0} if sc.use_gpu else {}), **sc.resources}


def _without_placement_group_cleaner(trainer_cls: type) -> type:
    """`trainer_cls` without Ray Train's placement-group cleaner, for a local cluster without the dashboard.

    The cleaner is a detached actor that asks Ray's State API once a second whether the run's
    controller is alive, to free the workers' placement group if it died. The dashboard serves that
    API: without it every ask failed (one warning a second per run) and the cleaner could never act.
    On a local cluster the placement group goes with the cluster anyway. Dropping it saves an actor
    process and ~2.5 s of controller start-up per run. Ray 2.60's trainers build their callbacks in
    `_create_default_callbacks`; if a later Ray renames it, the cleaner simply stays.
    """
    class LocalTrainer(trainer_cls):
        def _create_default_callbacks(self):
            return [cb for cb in super()._create_default_callbacks()
                    if type(cb).__name__ != "PlacementGroupCleanerCallback"]

    LocalTrainer.__name__ = LocalTrainer.__qualname__ = trainer_cls.__name__
    return LocalTrainer


@contextlib.contextmanager
def _data_progress_bars(enabled: bool):
    """Ray Data's progress bars on or off in this process's current data context, restored after."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before, ctx.enable_progress_bars = ctx.enable_progress_bars, enabled
    try:
        yield
    finally:
        ctx.enable_progress_bars = before


def _worker_entry(config: dict[str, Any]) -> None:
    os.environ.update(config.get("env", {}))
    from llmray.train.loop import train_loop

    train_loop(config)


def ordered_parquet(paths: list[str], columns: list[str]) -> "ray.data.Dataset":
    """A Ray Dataset over parquet files in the files' row order, with a `row_id` column (one read task
    per row group; llmray/train/shards.py)."""
    from llmray.train.shards import indexed_parquet

    return indexed_parquet(paths, columns)


def small_dataset(path: str | Path, columns: list[str]) -> "ray.data.Dataset":
    """An already-tokenized, small parquet file (SFT / preference rows) put in the object store once,
    with a `row_id` column: no read tasks in the workers, order fixed (one block)."""
    import pyarrow.parquet as pq

    from llmray.train.shards import in_memory

    return in_memory(pq.read_table(str(path), columns=columns))


def finish(cfg: TrainRunConfig, stage: str, config_dict: dict, result: dict[str, Any],
           inputs: list[str], extra_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Loss PNG, then publish run_dir/export as the `model` artifact at cfg.output."""
    import shutil

    from llmray import artifacts
    from llmray.report.metrics import read_metrics, series
    from llmray.report.plots import plot_curves

    run_dir = Path(cfg.run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    last: dict[int, dict] = {}
    for r in rows:  # after a restart, the replayed steps' last rows win
        last[r["step"]] = {**last.get(r["step"], {}), **r}
    rows = [last[s] for s in sorted(last)]
    curves = {k: series(rows, k) for k in ("train/loss", "eval/loss", "train/lm_loss") if series(rows, k)}
    if curves:
        plot_curves(curves, run_dir / "loss.png", f"{stage} loss")
    train_rows = [r for r in rows if "tokens_per_s" in r]
    metrics = dict(result)
    if train_rows:
        first, final = train_rows[0], train_rows[-1]
        metrics.update({
            "first_loss": first.get("train/loss"), "final_loss": final.get("train/loss"),
            "mean_tokens_per_s": (sum(r["tokens_per_s"] for r in train_rows[1:] or train_rows)
                                  / max(1, len(train_rows[1:] or train_rows))),
            "peak_rss_gb": max(r.get("memory/peak_rss_gb", 0.0) for r in train_rows),
        })
    metrics.update(extra_metrics or {})
    export = run_dir / "export"
    usable_inputs = [p for p in inputs if artifacts.is_complete(p)]
    with artifacts.publish(cfg.output) as tmp:
        for f in export.iterdir():  # the HF files, and a LoRA run's unmerged `adapter/` folder
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        artifacts.write_manifest(tmp, "model", f"llmray.{stage}", config_dict, metrics, usable_inputs)
    out = {"output": cfg.output, "run_dir": str(run_dir),
           **{k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}}
    return out
