"""Push the actor's weights into every rollout engine: size-bounded buckets that keep fused groups whole,
a checksum checked per engine and bucket, a timeout on the whole push, prefix cache reset after.

Actor side (inside the RL actor worker, weights in HF naming, gathered from ZeRO-3 if sharded):

    from llmray.rl.weight_sync import put_buckets
    refs = put_buckets(model.named_parameters(), bucket_mb=64)   # ray.put per bucket; returns BucketRefs

Controller side:

    sync = WeightSync(bucket_mb=64, timeout_s=60)
    metrics = sync.push(actor_group.weight_refs(64)[0], rollout_group)   # rank 0 puts the buckets
    # or, with tensors in the driver: sync.push(model.named_parameters(), rollout_group)
    # metrics: {"weight_sync/sync_s", "weight_sync/bytes", "weight_sync/buckets", "weight_sync/tensors"}

Only object refs travel through the controller (`BucketRef` holds the ref, the sender's checksum
and the size); each rollout actor fetches the bucket from the object store. A push that does not
finish within `timeout_s` raises `WeightSyncError` naming the engine ranks still loading; a
checksum that differs from the sender's raises `WeightSyncError` naming engine and bucket.
`transport="nccl"` (GPU) broadcasts the same buckets over an NCCL group — see `NcclTransport`.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Literal

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


def make_buckets(named_tensors: Iterable[tuple[str, "torch.Tensor"]], bucket_mb: float,
                 device: str | None = "cpu") -> list[dict]:
    """Group tensors into buckets of about `bucket_mb` MiB, in the given order, never splitting a fused group.

    A group larger than the budget gets a bucket of its own. Tensors are moved to `device`
    (None: left where they are, e.g. on the GPU for the NCCL transport). Each bucket is
    {"tensors": {name: contiguous CPU tensor}, "checksum": str, "bytes": int}.
    """
    if bucket_mb <= 0:
        raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
    budget = bucket_mb * 2**20
    groups: dict[str, list[tuple[str, Any]]] = {}
    for name, t in named_tensors:
        t = t.detach() if device is None else t.detach().to(device)
        groups.setdefault(fused_group(name), []).append((name, t.contiguous()))
    buckets: list[dict] = []
    current: dict[str, Any] = {}
    size = 0
    for members in groups.values():
        g_bytes = sum(t.numel() * t.element_size() for _, t in members)
        if current and size + g_bytes > budget:
            buckets.append(current)
            current, size = {}, 0
        current.update(members)
        size += g_bytes
    if current:
        buckets.append(current)
    return [{"tensors": b, "checksum": checksum(b.items()),
             "bytes": sum(t.numel() * t.element_size() for t in b.values())} for b in buckets]


def checksum(named_tensors: Iterable[tuple[str, "torch.Tensor"]]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in name order: equal on both sides of a push."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
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

    def __init__(self, bucket_mb: float = 64, timeout_s: float = 60,
                 transport: Literal["object_store", "nccl"] = "object_store"):
        if bucket_mb <= 0:
            raise ValueError(f"weight_sync.bucket_mb must be > 0, got {bucket_mb}")
        if timeout_s <= 0:
            raise ValueError(f"weight_sync.timeout_s must be > 0, got {timeout_s}")
        if transport not in ("object_store", "nccl"):
            raise ValueError(f"weight_sync.transport must be object_store or nccl, got {transport!r}")
        self.bucket_mb, self.timeout_s, self.transport = bucket_mb, timeout_s, transport
        self.pushes = 0
        self.last: list[BucketRef] | None = None

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
        if self.transport == "nccl":
            raise WeightSyncError("weight sync: transport=nccl pushes from the actor's GPUs — use "
                                  "NcclTransport(sender_group, rollout_group).push(bucket_mb) (GPU only)")
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

    def resync(self, rollout_group: "WorkerGroup", ranks: list[int] | None = None) -> dict:
        """Push the last pushed buckets again to `ranks` (default: all), e.g. after a rollout engine
        restart: `call_with_restart(group.generate, ..., on_restart=lambda g, r: sync.resync(g, r))`."""
        if self.last is None:
            return {}
        return self.push(self.last, rollout_group, ranks=ranks)


class NcclTransport:
    """GPU transport: the actor's rank 0 broadcasts each bucket over NCCL straight into the engines' GPUs.

    Same contract as `WeightSync.push` (bucketed, fused groups whole, per-engine checksums, one
    timeout for the whole push, prefix cache reset after), but no bytes go through the object
    store. The actor worker class must provide two broadcast methods built from the helpers below:

        @register("broadcast")
        def nccl_open(self, address, port, world_size):   # rank 0: nccl_sender(address, port, world_size)
        @register("broadcast")
        def nccl_send(self, bucket_mb):                   # rank 0: nccl_send_buckets(comm, named_tensors, bucket_mb)

    and returns, from `nccl_send`, the list of (meta, checksum) per bucket it broadcast.
    Written against vLLM's StatelessProcessGroup + PyNcclCommunicator; tested only under `gpu`.
    """

    def __init__(self, actor_group: "WorkerGroup", rollout_group: "WorkerGroup", tp_size: int = 1,
                 timeout_s: float = 120.0):
        import ray

        self.actor_group, self.rollout_group, self.timeout_s = actor_group, rollout_group, timeout_s
        address, port = ray.get(actor_group.actors[0].address.remote())
        world = 1 + rollout_group.num_workers * tp_size
        engines = [rollout_group.actors[r].call.remote("nccl_init", (address, port, 1 + r * tp_size, world), {})
                   for r in range(rollout_group.num_workers)]
        actor_group.nccl_open(address, port, world, timeout_s=timeout_s)
        ray.get(engines, timeout=timeout_s)

    def push(self, bucket_mb: float = 64) -> dict:
        import ray

        t0 = time.monotonic()
        plan = self.actor_group.nccl_plan(bucket_mb, dispatch="rank0", timeout_s=self.timeout_s)
        sent = self.actor_group.nccl_send.submit(bucket_mb, timeout_s=self.timeout_s)
        loads = [[g.call.remote("nccl_receive", (meta,), {}) for g in self.rollout_group.actors] for meta, _ in plan]
        sent.result()
        try:
            reports = ray.get([x for b in loads for x in b], timeout=max(1.0, t0 + self.timeout_s - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            raise WeightSyncError(f"NCCL weight sync to {self.rollout_group.role} timed out after "
                                  f"{self.timeout_s:g}s") from None
        n = self.rollout_group.num_workers
        for i, (meta, digest) in enumerate(plan):
            for r in range(n):
                if reports[i * n + r]["checksum"] != digest:
                    raise WeightSyncError(f"weight sync: checksum mismatch on {self.rollout_group.role} rank {r}, "
                                          f"bucket {i}")
        self.rollout_group.reset_prefix_cache(dispatch="broadcast", timeout_s=self.timeout_s)
        return {"weight_sync/sync_s": time.monotonic() - t0, "weight_sync/buckets": len(plan),
                "weight_sync/bytes": sum(r["bytes"] for r in reports[::n]), "weight_sync/engines": n}


def nccl_sender(address: str, port: int, world_size: int):
    """Rank 0 of the weight-broadcast group, on the actor's current GPU."""
    import torch
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    pg = StatelessProcessGroup.create(host=address, port=port, rank=0, world_size=world_size)
    return PyNcclCommunicator(pg, device=torch.cuda.current_device())


def nccl_plan(named_tensors, bucket_mb: float) -> list[tuple[list, str]]:
    """Per bucket: ([(name, dtype, shape)], checksum) — what the engines need to receive it."""
    return [([(n, str(t.dtype), list(t.shape)) for n, t in b["tensors"].items()], b["checksum"])
            for b in make_buckets(named_tensors, bucket_mb, device=None)]


def nccl_send_buckets(comm, named_tensors, bucket_mb: float) -> int:
    """Broadcast every tensor, bucket by bucket, in the order of `nccl_plan`. Returns bytes sent."""
    import torch

    sent = 0
    for b in make_buckets(named_tensors, bucket_mb, device=None):
        for t in b["tensors"].values():
            t = t.to("cuda", non_blocking=True)
            comm.broadcast(t, src=0, stream=torch.cuda.current_stream())
            sent += t.numel() * t.element_size()
    torch.cuda.synchronize()
    return sent
