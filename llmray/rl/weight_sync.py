"""Push the actor's weights into every rollout engine: size-bounded buckets that keep fused groups whole,
a checksum checked per engine and bucket, a timeout on the whole push, prefix cache reset after.

Two transports, one contract (`weight_sync.transport`, see `make_weight_sync` and docs/operations.md):

- `object_store` (`WeightSync`): the actor's rank 0 `ray.put`s each bucket; only object refs travel
  through the controller; each rollout actor fetches the buckets and hands them to vLLM's worker
  extension as safetensors bytes.
- `collective` (`llmray.rl.weight_collective.CollectiveSync`): the actor's rank 0 broadcasts each
  bucket over a gloo (CPU) or nccl (GPU) process group that the engines' model workers joined.

Both gather ZeRO-3 parameters one bucket at a time on every actor rank; only rank 0 keeps them.

    sync = make_weight_sync(cfg.weight_sync, gpu=False)
    metrics = sync.push_actor(actor_group, rollout_group)
    # {"weight_sync/sync_s", "weight_sync/bytes", "weight_sync/buckets", "weight_sync/tensors", ...}
    push_with_restart(sync, actor_group, rollout_group, max_restarts=2)   # a dead engine: restart, push again

A push that does not finish within `timeout_s` raises `WeightSyncError` naming the engine ranks still
loading; a checksum that differs from the sender's raises `WeightSyncError` naming engine and bucket.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    import torch

    from llmray.rl.worker_group import WorkerGroup


class WeightSyncError(RuntimeError):
    """A weight push failed: timeout, checksum mismatch, or an engine error. Names the engine rank;
    `dead_ranks` lists the engines whose process died during the push (restart them and push again)."""

    def __init__(self, message: str, dead_ranks: tuple[int, ...] = ()):
        super().__init__(message)
        self.dead_ranks = dead_ranks


# Tensors that vLLM fuses into one parameter on load (QKVParallelLinear, MergedColumnParallelLinear):
# they must arrive in the same bucket, or the layer is processed with some parts missing.
_FUSED = {
    "q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
}
_FUSED_RE = re.compile(r"^(.*\.)(" + "|".join(_FUSED) + r")\.(weight|bias)$")


def fused_group(name: str) -> str:
    """The group a tensor belongs to: its fused layer (`...self_attn.qkv_proj`) or its own name."""
    m = _FUSED_RE.match(name)
    return f"{m.group(1)}{_FUSED[m.group(2)]}" if m else name


def bucket_names(named_sizes: Iterable[tuple[str, int]], bucket_mb: float) -> list[list[str]]:
    """Names grouped into buckets of about `bucket_mb` MiB (sizes in bytes), in the given order, never
    splitting a fused group; a group larger than the budget gets a bucket of its own."""
    if bucket_mb <= 0:
        raise ValueError(f"weight_sync.bucket_mb must be > 0, got {bucket_mb}")
    budget = bucket_mb * 2**20
    groups: dict[str, list[tuple[str, int]]] = {}
    for name, size in named_sizes:
        groups.setdefault(fused_group(name), []).append((name, size))
    buckets: list[list[str]] = []
    current: list[str] = []
    size = 0
    for members in groups.values():
        g_bytes = sum(s for _, s in members)
        if current and size + g_bytes > budget:
            buckets.append(current)
            current, size = [], 0
        current.extend(n for n, _ in members)
        size += g_bytes
    if current:
        buckets.append(current)
    return buckets


def make_buckets(named_tensors: Iterable[tuple[str, "torch.Tensor"]], bucket_mb: float,
                 device: str | None = "cpu") -> list[dict]:
    """Tensors grouped as `bucket_names` says, moved to `device` (None: left where they are).

    Each bucket is {"tensors": {name: contiguous tensor}, "checksum": str, "bytes": int}.
    """
    tensors = {}
    for name, t in named_tensors:
        t = t.detach() if device is None else t.detach().to(device)
        tensors[name] = t.contiguous()
    names = bucket_names([(n, t.numel() * t.element_size()) for n, t in tensors.items()], bucket_mb)
    return [bucket_dict([(n, tensors[n]) for n in b]) for b in names]


def bucket_dict(named: list[tuple[str, "torch.Tensor"]]) -> dict:
    """{"tensors": {name: tensor}, "checksum": str, "bytes": int}: one bucket as the object store carries it."""
    tensors = {n: t.contiguous() for n, t in named}
    return {"tensors": tensors, "checksum": checksum(tensors.items()),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}


def checksum(named_tensors: Iterable[tuple[str, "torch.Tensor"]]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in name order: equal on both sides of a push."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # no copy; hashlib releases the GIL
    return h.hexdigest()[:32]


def bucket_payload(bucket: dict) -> bytes:
    """A bucket as safetensors bytes (what vLLM's collective_rpc can carry)."""
    from safetensors.torch import save

    return save(dict(bucket["tensors"]))


@dataclass(frozen=True)
class BucketRef:
    """A bucket in the Ray object store: the ref plus what the controller checks without fetching it."""

    ref: Any
    checksum: str
    bytes: int
    names: tuple[str, ...] = field(default=())


def put_buckets(named_tensors: Iterable[tuple[str, "torch.Tensor"]], bucket_mb: float = 64) -> list[BucketRef]:
    """Bucket the tensors and `ray.put` each bucket; call it where the weights live (the actor worker)."""
    import ray

    return [BucketRef(ray.put(b), b["checksum"], b["bytes"], tuple(b["tensors"]))
            for b in make_buckets(named_tensors, bucket_mb)]


class WeightSync:
    """Pushes weights to a rollout WorkerGroup whose workers implement `load_weights(bucket)` and
    `reset_prefix_cache()` (RolloutWorker, HFRolloutWorker)."""

    transport = "object_store"

    def __init__(self, bucket_mb: float = 64, timeout_s: float = 60):
        if bucket_mb <= 0:
            raise ValueError(f"weight_sync.bucket_mb must be > 0, got {bucket_mb}")
        if timeout_s <= 0:
            raise ValueError(f"weight_sync.timeout_s must be > 0, got {timeout_s}")
        self.bucket_mb, self.timeout_s = bucket_mb, timeout_s
        self.pushes = 0
        self.last: list[BucketRef] | None = None

    def push_actor(self, actor_group: "WorkerGroup", rollout_group: "WorkerGroup") -> dict:
        """The actor's current weights (rank 0 puts the buckets; ZeRO-3 ranks gather with it) into every engine."""
        t0 = time.monotonic()
        refs = [r for r in actor_group.weight_refs(self.bucket_mb) if r is not None][0]
        put_s = time.monotonic() - t0
        m = self.push(refs, rollout_group)
        # The whole push, the actor's gather and puts included (as the collective transport counts it).
        return {**m, "weight_sync/sync_s": time.monotonic() - t0, "weight_sync/actor_put_s": put_s}

    def push(self, named_tensors_or_bucket_refs, rollout_group: "WorkerGroup", ranks: list[int] | None = None) -> dict:
        """Load the weights into every engine of `rollout_group` (or only `ranks`); return timing and size metrics.

        BucketRefs put by an actor worker live as long as that worker: after the actor group is
        replaced, push its fresh weights rather than re-pushing old refs (they fail as lost objects).
        """
        import ray

        t0 = time.monotonic()
        items = list(named_tensors_or_bucket_refs)
        if items and not isinstance(items[0], BucketRef):
            items = put_buckets(items, self.bucket_mb)
        if not items:
            raise WeightSyncError("weight sync: nothing to push (no tensors)")
        deadline = t0 + self.timeout_s
        ranks = list(range(rollout_group.num_workers)) if ranks is None else list(ranks)
        # Every bucket goes to every engine at once; each engine loads its queue in order.
        pending = {}
        for b_idx, b in enumerate(items):
            for r in ranks:
                ref = rollout_group.actors[r].call.remote("load_weights", (b.ref,), {})
                pending[ref] = (r, b_idx)
        refs = list(pending)
        done: dict = {}
        while len(done) < len(refs):
            left = deadline - time.monotonic()
            waiting = [x for x in refs if x not in done]
            ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=max(0.0, left))
            for ref in ready:
                r, b_idx = pending[ref]
                try:
                    done[ref] = ray.get(ref, timeout=0)
                except Exception as e:  # noqa: BLE001 - reported with the engine named
                    dead = (r,) if isinstance(e, ray.exceptions.RayActorError) else ()
                    raise WeightSyncError(f"weight sync: rollout engine rank {r} failed loading bucket "
                                          f"{b_idx}/{len(items)}: {type(e).__name__}: {e}", dead) from e
            if len(done) < len(refs) and time.monotonic() >= deadline:
                stuck = sorted({pending[x][0] for x in refs if x not in done})
                n_left = sum(1 for x in refs if x not in done)
                raise WeightSyncError(
                    f"weight sync to {rollout_group.role} timed out after {self.timeout_s:g}s: engine rank(s) "
                    f"{stuck} still loading ({n_left} of {len(refs)} bucket loads pending); "
                    "the engine may be stuck or dead — restart it and push again")
        for ref in refs:
            r, b_idx = pending[ref]
            got = done[ref]["checksum"]
            if got != items[b_idx].checksum:
                raise WeightSyncError(
                    f"weight sync: checksum mismatch on {rollout_group.role} rank {r}, bucket {b_idx} "
                    f"({len(items[b_idx].names)} tensors, first {items[b_idx].names[:1]}): engine loaded "
                    f"{got}, actor sent {items[b_idx].checksum}")
        left = max(1.0, deadline - time.monotonic())
        for r in ranks:
            rollout_group.reset_prefix_cache.on_rank(r, timeout_s=left)
        self.pushes += 1
        self.last = items
        return {
            "weight_sync/sync_s": time.monotonic() - t0,
            "weight_sync/bytes": sum(b.bytes for b in items),
            "weight_sync/buckets": len(items),
            "weight_sync/tensors": sum(len(b.names) for b in items),
            "weight_sync/engines": len(ranks),
        }

    def resync(self, rollout_group: "WorkerGroup", ranks: list[int] | None = None, actor_group=None) -> dict:
        """Push the last pushed buckets again to `ranks` (default: all), e.g. after a rollout engine
        restart: `call_with_restart(group.generate, ..., on_restart=lambda g, r: sync.resync(g, r))`."""
        if self.last is None:
            return {}
        return self.push(self.last, rollout_group, ranks=ranks)


TRANSPORTS = ("object_store", "collective")


def resolve_transport(transport: str, gpu: bool) -> tuple[str, str]:
    """(transport, backend) for `weight_sync.transport` (`auto`, `object_store` or `collective`).

    `auto` is `collective` everywhere: over NCCL on GPUs it is the only transport that keeps the
    bytes off the host, and over gloo on CPU it measured faster than the object store
    (bench/rlhf.py, docs/operations.md). The backend is nccl when actor and engines are on GPUs, else gloo.
    """
    if transport not in ("auto", *TRANSPORTS):
        raise ValueError(f"weight_sync.transport must be auto, object_store or collective, got {transport!r}")
    chosen = "collective" if transport == "auto" else transport
    return chosen, ("nccl" if gpu else "gloo")


def make_weight_sync(cfg, gpu: bool):
    """The transport `cfg` (a WeightSyncConfig) asks for; `gpu`: actor and rollout engines are on GPUs."""
    transport, backend = resolve_transport(cfg.transport, gpu)
    if transport == "object_store":
        return WeightSync(cfg.bucket_mb, cfg.timeout_s)
    from llmray.rl.weight_collective import CollectiveSync

    return CollectiveSync(cfg.bucket_mb, cfg.timeout_s, backend)


def push_with_restart(sync, actor_group: "WorkerGroup", rollout_group: "WorkerGroup", max_restarts: int,
                      on_restart=None) -> dict:
    """`sync.push_actor(...)`; an engine that dies during the push is restarted (it comes back with
    its starting weights) and the push is repeated to all engines, `max_restarts` times at most.
    `on_restart(rank)` runs after each restart (the controller logs it)."""
    from llmray.rl.worker_group import WorkerDiedError

    attempt = 0
    while True:
        try:
            return sync.push_actor(actor_group, rollout_group)
        except (WeightSyncError, WorkerDiedError) as e:
            dead = e.dead_ranks if isinstance(e, WeightSyncError) else e.ranks
            if not dead or e.__class__ is WorkerDiedError and e.role != rollout_group.role \
                    or attempt >= max_restarts:
                raise
            attempt += 1
            for rank in dead:
                rollout_group.restart(rank, cause=f"died during weight sync: {e}")
                if on_restart is not None:
                    on_restart(rank)
