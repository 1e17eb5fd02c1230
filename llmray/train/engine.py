"""Build a DeepSpeed engine for a model from typed settings; gather its full weights (ZeRO-3 too).

Used inside Ray Train workers (pretrain, SFT, reward model, DPO) and inside plain Ray actors (the
RL actor and critic). The caller's process must know its rank and world: either a torch process
group already exists (Ray Train sets one up), or RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT are
in the environment, or it runs alone (world 1; a one-process gloo group is created on loopback).

    engine = build_deepspeed_engine(model, ds, opt, total_steps=1000)
    loss = engine(input_ids=x, labels=x, use_cache=False).loss
    engine.backward(loss); gn = optimizer_step(engine)  # the optimizer runs at accumulation boundaries
    state = gather_full_state_dict(engine, rank0_only=True)  # every rank must call it (a collective at ZeRO-3)

`build_deepspeed_engine(model, ds, None)` gives an inference-only engine (frozen roles such as `ref`), which at
ZeRO-3 keeps parameters sharded.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from llmray.cluster import free_port
from llmray.train import shm_comm  # stdlib imports only; torch/deepspeed inside its functions
from llmray.train.deepspeed_config import DeepSpeedConfig, OptimizerConfig, ds_config, lr_factor

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def setup_env() -> None:
    """CPU defaults every process that builds an engine needs (idempotent)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    root = os.environ.get("LLMRAY_ROOT") or os.getcwd()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(root, ".cache", "torch_extensions"))
    # DeepSpeed compiles its ops with the first `ninja` on PATH. Two ninja versions keep build logs
    # that the other cannot match, so a cache built by one is rebuilt (~45 s) by the other: a system
    # ninja for processes started from a plain shell, the environment's own for ones started with its
    # bin/ on PATH. Use the environment's own (DeepSpeed depends on it) wherever it is installed.
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.isfile(os.path.join(bindir, "ninja")) and not path.startswith(bindir + os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + path
    # DeepSpeed's ZeRO-2/3 collectives call torch's renamed all_gather_into_tensor /
    # reduce_scatter_tensor, and torch warned at every call: dozens of lines per run, nothing to act on.
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`"
                                              r" is deprecated",
                            category=FutureWarning)


def init_distributed(backend: str = "auto", shm_collectives: bool = False) -> None:
    """Make sure torch.distributed is initialised (gloo on CPU, nccl on GPU) and DeepSpeed's comm too.

    With `shm_collectives` on gloo, when every rank shares this host, ZeRO's collectives go through
    DeepSpeed's shared-memory all-reduce (llmray/train/shm_comm.py; `shm_comm.active()` tells which);
    otherwise through gloo."""
    import torch
    import torch.distributed as dist

    setup_env()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if backend == "nccl":
            # NCCL binds to the device this worker computes on (llmray.device), not to cuda:LOCAL_RANK as
            # DeepSpeed's own init would: an RL actor sees only the GPU Ray gave it, as cuda:0.
            from llmray.device import worker_device

            device = worker_device()
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", rank=rank, world_size=world, **({"device_id": device} if world > 1 else {}))
        elif shm_collectives:  # the host check below needs a process group
            dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed

    t0 = time.monotonic()
    shm = shm_collectives and backend == "gloo" and dist.is_initialized() and shm_comm.prepare()
    t1 = time.monotonic()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    t2 = time.monotonic()
    if shm:
        shm_comm.install()
    t3 = time.monotonic()
    log.info("distributed ready (%s%s, world %d) in %.1fs (host check %.1fs, DeepSpeed comm %.1fs, shm %.1fs)",
             backend, " + shared-memory collectives" if shm_comm.active() else "", dist.get_world_size(),
             t3 - t0, t1 - t0, t2 - t1, t3 - t2)


def param_groups(model: "torch.nn.Module", weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on tensors with >= 2 dims (matrices, embeddings); none on norms and biases."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # No empty group: DeepSpeed's ZeRO optimizer drops them, and the LR scheduler's per-group lists
    # would no longer line up (LoRA has only matrices, for example).
    return [g for g in groups if g["params"]]


def build_deepspeed_engine(
    model: "torch.nn.Module",
    ds: DeepSpeedConfig,
    opt: OptimizerConfig | None,
    total_steps: int = 1,
    load_universal: bool = False,
):
    """`deepspeed.initialize` with a torch AdamW client optimizer and a warmup+cosine LambdaLR.

    With `opt=None` the engine is inference-only. Activation checkpointing uses the HF model's own
    gradient checkpointing. The first call in a fresh TORCH_EXTENSIONS_DIR compiles DeepSpeed's
    shared-memory comm op (~1 min on CPU); the time is logged. `load_universal`: the next
    `load_checkpoint` reads a universal checkpoint (llmray/train/elastic.py).
    """
    import deepspeed
    import torch

    init_distributed(ds.backend, ds.shm_collectives)
    world = torch.distributed.get_world_size()
    if ds.activation_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False
    config = ds_config(ds, opt or OptimizerConfig(), world, shm=shm_comm.active(), load_universal=load_universal)
    t0 = time.monotonic()
    args = _device_args()
    if opt is None:
        config.pop("gradient_clipping", None)
        engine, *_ = deepspeed.initialize(args=args, model=model, config=config)
        engine.eval()
    else:
        optimizer = torch.optim.AdamW(param_groups(model, opt.weight_decay), lr=opt.lr, betas=opt.betas, eps=opt.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, opt, total_steps))
        engine, *_ = deepspeed.initialize(args=args, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                          config=config)
    log.info("deepspeed engine ready (ZeRO-%d, %s, world %d) in %.1fs", ds.zero_stage, ds.precision, world,
             time.monotonic() - t0)
    return engine


def _device_args():
    """`deepspeed.initialize(args=...)` that makes the engine (and the model it moves) use the device this
    worker computes on. Without it DeepSpeed takes cuda:LOCAL_RANK, and LOCAL_RANK is the rank among the
    node's workers, not an index into the GPUs Ray made visible to this process. None on the CPU."""
    from types import SimpleNamespace

    from llmray.device import worker_device

    device = worker_device()
    return SimpleNamespace(device_rank=device.index or 0) if device.type == "cuda" else None


def gather_full_state_dict(engine, dtype: "torch.dtype | None" = None, rank0_only: bool = False,
                           bucket_mb: float = 256) -> dict[str, "torch.Tensor"]:
    """The full (unsharded) state dict of the engine's module, on CPU (with `rank0_only`: on rank 0,
    an empty dict on the other ranks).

    At ZeRO-3 the parameters are gathered with `deepspeed.zero.GatheredParameters` about `bucket_mb`
    at a time, a collective: all ranks must call this together, and no rank holds more than one
    bucket gathered beyond what it keeps. Tied weights (embed_tokens / lm_head) both appear, as HF expects.
    """
    import torch

    module = engine.module if hasattr(engine, "module") else engine
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    keep = not rank0_only or rank == 0
    out: dict[str, torch.Tensor] = {}

    def grab(k: str, v) -> None:
        t = v.detach().to("cpu", copy=True)
        out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t

    if not getattr(engine, "zero_optimization_partition_weights", lambda: False)():
        for k, v in module.state_dict().items() if keep else ():
            grab(k, v)
        return out
    import deepspeed

    from llmray.rl.weight_sync import bucket_names

    state = module.state_dict(keep_vars=True)  # key -> the live Parameter (a tied one under both keys)
    keys_of: dict[int, list[str]] = {}
    for k, v in state.items():
        keys_of.setdefault(id(v), []).append(k)
    params = dict(module.named_parameters())
    sizes = [(n, p.ds_numel * p.element_size() if hasattr(p, "ds_numel") else p.numel() * p.element_size())
             for n, p in params.items()]
    done: set[int] = set()
    for names in bucket_names(sizes, bucket_mb):
        ps = [params[n] for n in names]
        with deepspeed.zero.GatheredParameters(ps, modifier_rank=None):
            for p in ps if keep else ():
                done.add(id(p))
                for k in keys_of.get(id(p), []):
                    grab(k, p)
    for k, v in state.items() if keep else ():  # buffers (never partitioned)
        if id(v) not in done and k not in out:
            grab(k, v)
    return out


def optimizer_step(engine) -> float | None:
    """`engine.step()`; at an accumulation boundary, also the global gradient norm (before clipping)
    of that step, else None.

    DeepSpeed's ZeRO and bf16 optimizers record the norm. Its plain torch optimizer (fp32, ZeRO stage 0:
    the RL actor's default) does not, so `get_global_grad_norm()` stayed None there. The norm is then
    computed here, from the already all-reduced gradients, before the step clears them."""
    import torch

    boundary = engine.is_gradient_accumulation_boundary()
    norm = None
    if boundary and not hasattr(engine.optimizer, "_global_grad_norm"):
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    engine.step()
    if boundary and norm is None:
        gn = engine.get_global_grad_norm()
        norm = float(gn) if gn is not None else None
    return norm


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
