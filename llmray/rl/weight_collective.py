"""The `collective` weight-sync transport's data plane: a torch process group (gloo on CPU, nccl on GPU)
of the actor's rank 0 and every rollout engine's model worker, and the bucketed broadcast over it.

Why a process group of our own and not Ray's collective API (`ray.util.collective`) or Ray Direct
Transport (`ray.experimental.rdt`, built on the same groups): Ray's GLOO backend creates, or when one
exists reuses, torch's *default* process group. In the actor that group is DeepSpeed's training
world and in the rollout process vLLM's own, so Ray's group would be carved out of the wrong world.
Ray's NCCL backend needs cupy, a second code path. And Ray's API only runs inside a Ray actor or task,
while a separate-process vLLM engine's model workers (vLLM's own executor on GPU) are plain
processes. Here every member opens the same kind of group, `open_group`, outside the default
group: a `TCPStore` hosted by the sender (the address the controller got from Ray) and torch's
`ProcessGroupGloo` or `ProcessGroupNCCL` on it. The backend name is the only difference between CPU
and GPU, so CI runs the GPU code path on gloo. Ray stays the control plane: it places the members,
hands out the rendezvous address, starts every call with a timeout and restarts dead members.

Receiving side: the vLLM worker extension (`llmray.rl.vllm_ext.WeightLoader`) joins the group itself,
in whatever process vLLM runs its model worker: inside the rollout actor (CPU, `engine_core`) or in
vLLM's worker processes (GPU, one group rank per tensor-parallel worker). Only the plan (names,
dtypes, shapes) crosses `collective_rpc`; tensors arrive by broadcast straight into the worker, so
they never meet collective_rpc's argument serialization (which turns tensors into lists).

One bucket is one broadcast: its tensors packed into one byte buffer (64-byte aligned slots), then
viewed back on each receiver. Sender and receivers checksum the bucket's tensors (`checksum`), off
the critical path (the sender while the bytes travel, a receiver while the bucket loads); the
controller compares them per engine and bucket.
"""

from __future__ import annotations

import datetime
import time
from typing import TYPE_CHECKING, Callable, Iterable

from llmray.rl.weight_sync import WeightSyncError, checksum

if TYPE_CHECKING:
    import torch

    from llmray.rl.worker_group import WorkerGroup

_ALIGN = 64
BACKENDS = ("gloo", "nccl")


class WeightGroup:
    """One member's handle on the weight-broadcast group (rank 0 sends, every other rank receives)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float,
                 name: str):
        import torch
        from torch.distributed import PrefixStore, TCPStore
        from torch.distributed.distributed_c10d import ProcessGroupGloo

        if backend not in BACKENDS:
            raise ValueError(f"weight_sync backend must be one of {BACKENDS}, got {backend!r}")
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world_size, self.backend, self.name = rank, world_size, backend, name
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        # Rank 0 hosts the store; the others connect to it (and retry until `timeout`).
        self.store = TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout,
                              wait_for_workers=False, multi_tenant=True)
        prefix = PrefixStore(name, self.store)
        if backend == "gloo":
            self.pg = ProcessGroupGloo(prefix, rank, world_size, timeout)
        else:
            from torch.distributed.distributed_c10d import ProcessGroupNCCL

            opts = ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = ProcessGroupNCCL(prefix, rank, world_size, opts)

    def post(self, tensor: "torch.Tensor"):
        """Start a broadcast of `tensor` from rank 0 (in place on the others); returns its work (`.wait()`)."""
        from torch.distributed import BroadcastOptions

        opts = BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        return self.pg.broadcast([tensor], opts)

    def broadcast(self, tensor: "torch.Tensor") -> None:
        self.post(tensor).wait()

    def close(self) -> None:
        """Drop the group; peers still waiting on it get a connection error instead of waiting out the timeout."""
        pg, self.pg = getattr(self, "pg", None), None
        if pg is not None and hasattr(pg, "shutdown"):
            try:
                pg.shutdown()
            except Exception:  # noqa: BLE001 - already broken
                pass
        self.store = None


def plan_buckets(named_meta: Iterable[tuple[str, str, list[int], int]], bucket_mb: float) -> list[list[list]]:
    """Per bucket: [[name, dtype, shape], ...], from (name, dtype, shape, element size) without any data
    (ZeRO-3 shapes are known while the parameters are still sharded). Same grouping as `make_buckets`."""
    from llmray.rl.weight_sync import bucket_names

    meta = {n: [n, str(d).removeprefix("torch."), [int(x) for x in shape], size]
            for n, d, shape, size in named_meta}
    sizes = [(n, _numel(m[2]) * m[3]) for n, m in meta.items()]
    return [[meta[n][:3] for n in names] for names in bucket_names(sizes, bucket_mb)]


def _numel(shape) -> int:
    n = 1
    for x in shape:
        n *= int(x)
    return n


def _layout(bucket: list[list]) -> tuple[list[tuple[int, int]], int]:
    """(offset, bytes) per tensor in the packed buffer, and its total size."""
    import torch

    out, off = [], 0
    for _, dtype, shape in bucket:
        n = _numel(shape) * getattr(torch, dtype).itemsize
        out.append((off, n))
        off += -(-n // _ALIGN) * _ALIGN
    return out, off


def pack(named: list[tuple[str, "torch.Tensor"]], bucket: list[list], device) -> "torch.Tensor":
    """The bucket's tensors as one uint8 buffer on `device`, laid out as `_layout(bucket)`."""
    import torch

    slots, total = _layout(bucket)
    buf = torch.empty(total, dtype=torch.uint8, device=device)
    for (name, t), (off, n), (want, _, _) in zip(named, slots, bucket):
        if name != want:
            raise ValueError(f"weight sync: bucket order differs from the plan: {name} where {want} was planned")
        buf[off:off + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
    return buf


def unpack(buf: "torch.Tensor", bucket: list[list]) -> list[tuple[str, "torch.Tensor"]]:
    """Views of `buf` with the planned names, dtypes and shapes (no copy)."""
    import torch

    slots, _ = _layout(bucket)
    return [(name, buf[off:off + n].view(getattr(torch, dtype)).view(shape))
            for (name, dtype, shape), (off, n) in zip(bucket, slots)]


def send_buckets(group: WeightGroup, plan: list[list[list]],
                 buckets: Iterable[list[tuple[str, "torch.Tensor"]] | None]) -> list[str]:
    """Broadcast each bucket (rank 0); `buckets` yields the gathered tensors in plan order. Returns
    the checksum of each bucket as sent."""
    sums = []
    for i, (bucket, named) in enumerate(zip(plan, buckets)):
        if named is None:
            raise ValueError(f"weight sync: bucket {i} has no tensors on the sending rank")
        work = group.post(pack(named, bucket, group.device))
        sums.append(checksum(named))  # while the bytes travel
        work.wait()
    if len(sums) != len(plan):
        raise ValueError(f"weight sync: sent {len(sums)} of {len(plan)} planned buckets")
    return sums


def receive_buckets(group: WeightGroup, plan: list[list[list]],
                    load: Callable[[list[tuple[str, "torch.Tensor"]]], None]) -> list[dict]:
    """Receive every bucket of `plan` and `load` it, in order; per bucket its checksum, tensors and bytes.

    The next bucket's broadcast is posted before the current one loads, so transfer and load overlap;
    the checksum is taken on another thread while the bucket loads.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    def post(i: int):
        buf = torch.empty(_layout(plan[i])[1], dtype=torch.uint8, device=group.device)
        return buf, group.post(buf)

    reports = []
    pending = post(0) if plan else None
    with ThreadPoolExecutor(1, thread_name_prefix="weight-checksum") as pool:
        for i, bucket in enumerate(plan):
            buf, work = pending
            t0 = time.perf_counter()
            work.wait()
            t1 = time.perf_counter()
            pending = post(i + 1) if i + 1 < len(plan) else None
            named = unpack(buf, bucket)
            digest = pool.submit(checksum, named)  # while the bucket loads (both only read `buf`)
            load(named)
            reports.append({"checksum": digest.result(), "num_tensors": len(named), "bytes": int(buf.numel()),
                            "wait_s": t1 - t0, "load_s": time.perf_counter() - t1})
    return reports


class CollectiveSync:
    """Controller side of the `collective` transport, same API as `WeightSync` (`push_actor`, `resync`).

    The group (actor rank 0 + every engine's model workers) is formed before the first push and
    formed again, under a new name and port, when its membership changed (an engine or the actor
    group was restarted: their process ids differ) or a push failed. The bucket plan is asked of
    the actor once per group.
    """

    transport = "collective"

    def __init__(self, bucket_mb: float = 64, timeout_s: float = 120, backend: str = "gloo"):
        if bucket_mb <= 0:
            raise ValueError(f"weight_sync.bucket_mb must be > 0, got {bucket_mb}")
        if timeout_s <= 0:
            raise ValueError(f"weight_sync.timeout_s must be > 0, got {timeout_s}")
        if backend not in BACKENDS:
            raise ValueError(f"weight_sync backend must be one of {BACKENDS}, got {backend!r}")
        self.bucket_mb, self.timeout_s, self.backend = bucket_mb, timeout_s, backend
        self.pushes, self.generation = 0, 0
        self.last: list | None = None
        """The plan of the last successful push (None before the first)."""
        self._members: tuple | None = None
        self._groups: tuple | None = None
        self.plan: list | None = None

    def _form(self, actor_group: "WorkerGroup", rollout_group: "WorkerGroup") -> None:
        import ray

        members = (tuple(actor_group.pids()), tuple(rollout_group.pids()))
        if members == self._members:
            return
        self._leave()
        self.generation += 1
        name = f"llmray-weights-{self.generation}"
        tp = int(rollout_group.init_kwargs.get("tensor_parallel_size", 1))
        world = 1 + rollout_group.num_workers * tp
        host, port = ray.get(actor_group.actors[0].address.remote(), timeout=60)
        args = (host, port, world, self.backend, self.timeout_s, name)
        # Every member must be inside its join at once: the group forms when all have connected.
        sender = actor_group.weight_join.submit(0, *args, timeout_s=self.timeout_s)
        refs = [rollout_group.actors[r].call.remote("weight_join", (1 + r * tp, *args), {})
                for r in range(rollout_group.num_workers)]
        from llmray.rl.worker_group import WorkerDiedError

        try:
            sender.result()
            rollout_group._wait("weight_join", list(range(rollout_group.num_workers)), refs,
                                time.monotonic() + self.timeout_s, self.timeout_s)
        except WorkerDiedError:
            raise  # a dead actor or engine: the caller restarts it
        except Exception as e:
            dead = _dead(rollout_group)
            raise WeightSyncError(f"weight sync: forming the {self.backend} group {name} (world {world}) failed: "
                                  f"{type(e).__name__}: {e}", dead) from e
        self.plan = actor_group.weight_plan(self.bucket_mb, timeout_s=self.timeout_s)
        self._members, self._groups = members, (actor_group, rollout_group)

    def _leave(self) -> None:
        """Drop the previous group on every member still alive (best effort, bounded)."""
        import ray

        if self._groups is None:
            return
        refs = [a.call.remote("weight_leave", (), {}) for g in self._groups for a in g.actors]
        ray.wait(refs, num_returns=len(refs), timeout=min(30.0, self.timeout_s))
        self._members = self._groups = None

    def push_actor(self, actor_group: "WorkerGroup", rollout_group: "WorkerGroup") -> dict:
        """Broadcast the actor's current weights into every engine; metrics as `WeightSync.push`."""

        t0 = time.monotonic()
        self._form(actor_group, rollout_group)
        plan, n = self.plan, rollout_group.num_workers
        deadline = t0 + self.timeout_s
        # All actor ranks take part (ZeRO-3 gathers one bucket at a time on every rank); rank 0 sends.
        sent = actor_group.weight_send.submit(plan, timeout_s=self.timeout_s)
        recv = [rollout_group.actors[r].call.remote("weight_receive", (plan,), {}) for r in range(n)]
        try:
            reports = _wait_engines(rollout_group, recv, deadline, self.timeout_s, len(plan))
            sums = [s for s in sent.result() if s is not None][0]
        except BaseException as e:
            self._members = None  # re-form before the next push
            if isinstance(e, WeightSyncError) and not e.dead_ranks:
                _raise_if_dead(sent)  # the engines failed because the actor died: say that
            _settle(sent.refs)
            raise
        for b_idx, digest in enumerate(sums):
            for r in range(n):
                got = reports[r][b_idx]["checksum"]
                if got != digest:
                    self._members = None
                    raise WeightSyncError(
                        f"weight sync: checksum mismatch on {rollout_group.role} rank {r}, bucket {b_idx} "
                        f"({len(plan[b_idx])} tensors, first {plan[b_idx][0][0]}): engine received {got}, "
                        f"actor sent {digest}")
        left = max(1.0, deadline - time.monotonic())
        rollout_group.reset_prefix_cache(timeout_s=left)
        self.pushes += 1
        self.last = plan
        return {
            "weight_sync/sync_s": time.monotonic() - t0,
            "weight_sync/bytes": sum(r["bytes"] for r in reports[0]),
            "weight_sync/buckets": len(plan),
            "weight_sync/tensors": sum(len(b) for b in plan),
            "weight_sync/engines": n,
            # Where an engine's time went: waiting for bytes vs loading (and checksumming) them; max over engines.
            "weight_sync/engine_wait_s": max(sum(b["wait_s"] for b in rep) for rep in reports),
            "weight_sync/engine_load_s": max(sum(b["load_s"] for b in rep) for rep in reports),
        }

    def resync(self, rollout_group: "WorkerGroup", ranks: list[int] | None = None, actor_group=None) -> dict:
        """After an engine restart: form the group again and push the actor's weights (unchanged since
        the last push: the engines only generate between a push and the next update) to every engine."""
        if self.last is None or actor_group is None:
            return {}
        return self.push_actor(actor_group, rollout_group)


def _settle(refs: list, timeout_s: float = 10.0) -> None:
    """Collect a failed push's other calls (their errors are the same failure, seen from the other side)."""
    import ray

    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for ref in ready:
        try:
            ray.get(ref, timeout=0)
        except Exception:  # noqa: BLE001 - already reported through the engine's error
            pass


def _raise_if_dead(pending, timeout_s: float = 10.0) -> None:
    """WorkerDiedError if a rank of this pending group call died (what the recipe restarts trainers on)."""
    import ray

    from llmray.rl.worker_group import WorkerDiedError

    ready, _ = ray.wait(pending.refs, num_returns=len(pending.refs), timeout=timeout_s)
    for ref in ready:
        try:
            pending.group._result(ref, pending.method, pending.ranks[pending.refs.index(ref)])
        except WorkerDiedError:
            raise
        except Exception:  # noqa: BLE001 - its own failure, secondary to the engines'
            pass


def _dead(group: "WorkerGroup") -> tuple[int, ...]:
    return tuple(r for r, ok in enumerate(group.alive(timeout_s=5.0)) if not ok)


def _wait_engines(group: "WorkerGroup", refs: list, deadline: float, timeout_s: float, n_buckets: int) -> list:
    """Per engine rank, its per-bucket reports; a dead engine or a timeout raises WeightSyncError naming ranks."""
    import ray

    done: dict = {}
    while len(done) < len(refs):
        waiting = [x for x in refs if x not in done]
        ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=max(0.0, deadline - time.monotonic()))
        for ref in ready:
            r = refs.index(ref)
            try:
                done[ref] = ray.get(ref, timeout=0)
            except Exception as e:  # noqa: BLE001 - reported with the engine named
                dead = tuple(sorted({r, *_dead(group)})) if isinstance(e, ray.exceptions.RayActorError) \
                    else _dead(group)
                raise WeightSyncError(f"weight sync: {group.role} rank {r} failed receiving the weights "
                                      f"({n_buckets} buckets): {type(e).__name__}: {e}", dead) from e
        if len(done) < len(refs) and time.monotonic() >= deadline:
            stuck = sorted(refs.index(x) for x in refs if x not in done)
            raise WeightSyncError(f"weight sync to {group.role} timed out after {timeout_s:g}s: engine rank(s) "
                                  f"{stuck} still receiving; the engine may be stuck or dead — restart it and "
                                  f"push again", _dead(group))
    return [done[x] for x in refs]
