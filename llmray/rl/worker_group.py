"""A role (actor, critic, ref, reward, rollout) as a group of Ray actors with rank env, declared dispatch,
per-call timeouts, liveness checks and restart of a dead rank.

    group = WorkerGroup("rollout", RolloutWorker, num_workers=2, resources={"CPU": 1},
                        init_kwargs={"model_dir": d, "max_model_len": 512})
    samples = group.generate(prompt_ids, sampling)     # dispatched as RolloutWorker declares (split)
    pending = group.generate.submit(prompt_ids, sampling, threads=2); ...; samples = pending.result()
    group.load_weights(bucket, dispatch="broadcast", timeout_s=30); group.reset_prefix_cache.on_rank(1)
    group.alive(); group.pids(); group.nodes(); group.restart(1, cause="..."); group.shutdown()

Each worker instance lives inside a small host actor. The host is created first; then rank 0 reports
its node IP and a free port, every host its node, and every host sets RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE (Ray's: among the group's workers on its node), MASTER_ADDR, MASTER_PORT before it
builds the worker, so a torch.distributed/DeepSpeed world can form inside the group.
Liveness pings and pid queries run in a separate concurrency group, so they answer while a long
call (generation, a training step) is running; worker methods still run one at a time.

Worker methods named like a group attribute (`call`, `alive`, `pids`, ...): `group.call("name", ...)`.

Errors: a call past its timeout raises `WorkerTimeoutError`; a dead actor `WorkerDiedError` (role, ranks)
so the controller can `restart` it and retry (`call_with_restart`); an exception inside the worker
propagates with its own type and a note naming role, rank and method.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

from llmray.cluster import free_port
from llmray.errors import UserError
from llmray.placement import local_ranks
from llmray.rl import dispatch as _dispatch

log = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """A worker-group call failed for an infrastructure reason (not a bug in the method)."""

    def __init__(self, message: str, role: str, method: str | None, ranks: list[int]):
        super().__init__(message)
        self.role, self.method, self.ranks = role, method, ranks

    @property
    def rank(self) -> int:
        return self.ranks[0]


class WorkerDiedError(WorkerError):
    """A worker actor died (process killed, OOM, node lost). `ranks` lists the dead ranks."""


class WorkerTimeoutError(WorkerError):
    """A call did not finish within its timeout. The worker may still be busy with it."""


class WorkerStartError(WorkerError, UserError):
    """A worker failed to start (bad model dir, engine start-up failure, unschedulable resources)."""


class _Host:
    """Holds one worker instance in a Ray actor; sets the rank env before building it."""

    def __init__(self, role: str, rank: int):
        self.role, self.rank, self.worker = role, rank, None

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), free_port("")  # other nodes connect: any interface

    def build(self, worker_cls: type, init_kwargs: dict, env: dict[str, str]) -> int:
        os.environ.update(env)
        self.worker = worker_cls(**init_kwargs)
        return os.getpid()

    def call(self, method: str, args: tuple, kwargs: dict, threads: int | None = None) -> Any:
        if not threads:
            return getattr(self.worker, method)(*args, **kwargs)
        import torch  # this call's share of the node's cores (other roles may run at the same time)

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return getattr(self.worker, method)(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    def ping(self) -> bool:
        return True

    def node(self) -> dict[str, str]:  # where this rank runs (nodes.json)
        import ray
        return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}


class PendingCall:
    """A submitted group call; `result()` waits (bounded by the call's timeout) and merges."""

    def __init__(self, group: "WorkerGroup", method: str, mode: str, ranks: list[int], refs: list, timeout_s: float):
        self.group, self.method, self.mode, self.ranks, self.refs = group, method, mode, ranks, refs
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s

    def result(self) -> Any:
        results = self.group._wait(self.method, self.ranks, self.refs, self.deadline, self.timeout_s)
        if self.mode == "split":
            return _dispatch.gather(results)
        if self.mode == "rank0":
            return results[0]
        return results


class GroupMethod:
    """`group.name`: a worker method of the group. Calling it runs it as declared and waits; `submit`
    starts it and returns the `PendingCall`; `on_rank` calls one rank only."""

    def __init__(self, group: "WorkerGroup", name: str):
        self.group, self.name = group, name

    def __call__(self, *args, **kwargs) -> Any:
        return self.group.call(self.name, *args, **kwargs)

    def submit(self, *args, **kwargs) -> PendingCall:
        return self.group.submit(self.name, *args, **kwargs)

    def on_rank(self, rank: int, *args, **kwargs) -> Any:
        return self.group.call_rank(rank, self.name, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self.group.role}.{self.name}>"


class WorkerGroup:
    """`num_workers` Ray actors of one role, called as one object."""

    def __init__(
        self,
        role: str,
        worker_cls: type,
        num_workers: int = 1,
        resources: dict | None = None,
        init_kwargs: dict | None = None,
        placement_group=None,
        bundle_indices: list[int] | None = None,
        call_timeout_s: float = 600.0,
        env: dict | None = None,
        start_timeout_s: float = 900.0,
    ):
        import ray

        if num_workers < 1:
            raise UserError(f"{role}.num_workers must be >= 1, got {num_workers}")
        if bundle_indices is not None and len(bundle_indices) != num_workers:
            raise UserError(f"{role}.bundle_indices has {len(bundle_indices)} entries for {num_workers} workers")
        self.role, self.worker_cls, self.num_workers = role, worker_cls, num_workers
        self.resources = dict(resources or {"CPU": 1})
        self.init_kwargs = dict(init_kwargs or {})
        self.call_timeout_s, self.start_timeout_s = call_timeout_s, start_timeout_s
        self._env = {str(k): str(v) for k, v in (env or {}).items()}
        self.restarts: list[dict] = []
        self._own_pg = placement_group is None
        if placement_group is None:
            from llmray.rl.groups import make_placement_group
            placement_group = make_placement_group([self.resources] * num_workers, timeout_s=start_timeout_s,
                                                   what=f"{role} worker group")
        self.placement_group = placement_group
        self.bundle_indices = bundle_indices if bundle_indices is not None else list(range(num_workers))
        # Pings and pid answer from the `control` group while a long call runs in the default one.
        self._remote_host = ray.remote(concurrency_groups={"control": 2})(_Host)
        self.actors: list = [self._new_host(r) for r in range(num_workers)]
        try:
            master_addr, master_port = self._get(self.actors[0].address.remote(), "address", [0], 120.0)
            self._nodes = self._wait("node", list(range(num_workers)), [a.node.remote() for a in self.actors],
                                     time.monotonic() + 120.0, 120.0)
            local = local_ranks([n["node_id"] for n in self._nodes])  # Ray's local rank: among this group's, per node
            self._rank_env = [
                {"RANK": str(r), "WORLD_SIZE": str(num_workers), "LOCAL_RANK": str(local[r][0]),
                 "LOCAL_WORLD_SIZE": str(local[r][1]), "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}
                for r in range(num_workers)
            ]
            refs = [self._build(r) for r in range(num_workers)]
            self._pids = self._wait_start(list(range(num_workers)), refs)
        except BaseException:
            self.shutdown()
            raise

    # -- actors ----------------------------------------------------------------------------
    def _new_host(self, rank: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from llmray.cluster import worker_env

        res = dict(self.resources)
        opts: dict[str, Any] = {
            "num_cpus": res.pop("CPU", 0),
            "num_gpus": res.pop("GPU", 0),
            "memory": res.pop("memory", None),
            "resources": res or None,
            "max_restarts": 0,  # restarts are ours (restart()): we re-sync weights after them
            "runtime_env": {"env_vars": worker_env(self._env)},
            "name": None,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.placement_group,
                placement_group_bundle_index=self.bundle_indices[rank],
            ),
        }
        opts = {k: v for k, v in opts.items() if v is not None}
        return self._remote_host.options(**opts).remote(self.role, rank)

    def _build(self, rank: int):
        return self.actors[rank].build.remote(self.worker_cls, self.init_kwargs, self._rank_env[rank])

    def _wait_start(self, ranks: list[int], refs: list) -> list[int]:
        import ray

        try:
            return self._wait("__init__", ranks, refs, time.monotonic() + self.start_timeout_s, self.start_timeout_s)
        except WorkerTimeoutError as e:
            raise WorkerStartError(
                f"{self.role} rank(s) {e.ranks} did not start within {self.start_timeout_s:.0f}s "
                f"(resources per worker {self.resources}); check the cluster has them free",
                self.role, "__init__", e.ranks) from None
        except WorkerDiedError as e:
            raise WorkerStartError(f"{self.role} rank(s) {e.ranks} died while starting (out of memory? "
                                   f"a crash in the engine?): {e}", self.role, "__init__", e.ranks) from e
        except ray.exceptions.RayTaskError as e:
            raise WorkerStartError(f"{self.role} worker failed to start: {e.cause if hasattr(e, 'cause') else e}",
                                   self.role, "__init__", ranks) from e

    # -- calls ---------------------------------------------------------------------------
    def __getattr__(self, method: str) -> GroupMethod:
        if method.startswith("_"):
            raise AttributeError(method)
        _dispatch.declared(self.worker_cls, method)  # AttributeError for unknown methods
        return GroupMethod(self, method)

    def submit(self, method: str, *args, dispatch: str | None = None, timeout_s: float | None = None,
               threads: int | None = None, **kwargs) -> PendingCall:
        """Start a call on the group without waiting (run several roles at once). `threads`: torch
        threads each worker uses for this call, so that roles sharing a node's cores do not
        oversubscribe them."""
        decl = _dispatch.declared(self.worker_cls, method)
        mode = dispatch or decl["mode"]
        if mode not in _dispatch.DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {_dispatch.DISPATCH_MODES}, got {mode!r}")
        timeout_s = self.call_timeout_s if timeout_s is None else timeout_s
        if mode == "split":
            per_rank = _dispatch.split_args(args, kwargs, self.num_workers, decl["offset_kwarg"])
            ranks = list(range(self.num_workers))
        elif mode == "broadcast":
            ranks = list(range(self.num_workers))
            per_rank = [(args, kwargs)] * self.num_workers
        else:
            ranks, per_rank = [0], [(args, kwargs)]
        refs = [self.actors[r].call.remote(method, a, kw, threads) for r, (a, kw) in zip(ranks, per_rank)]
        return PendingCall(self, method, mode, ranks, refs, timeout_s)

    def call(self, method: str, *args, dispatch: str | None = None, timeout_s: float | None = None, **kwargs) -> Any:
        """Call `method` on the group as declared (or as `dispatch` says) and wait for the result."""
        return self.submit(method, *args, dispatch=dispatch, timeout_s=timeout_s, **kwargs).result()

    def call_rank(self, rank: int, method: str, *args, timeout_s: float | None = None, **kwargs) -> Any:
        """Call `method` on one rank only."""
        timeout_s = self.call_timeout_s if timeout_s is None else timeout_s
        ref = self.actors[rank].call.remote(method, args, kwargs)
        return self._wait(method, [rank], [ref], time.monotonic() + timeout_s, timeout_s)[0]

    def _get(self, ref, method: str, ranks: list[int], timeout_s: float) -> Any:
        return self._wait(method, ranks, [ref], time.monotonic() + timeout_s, timeout_s)[0]

    def _wait(self, method: str, ranks: list[int], refs: list, deadline: float, timeout_s: float) -> list[Any]:
        """Results of `refs` (one per rank in `ranks`), failing fast on the first dead rank."""
        import ray

        pending = list(refs)
        while pending:
            left = deadline - time.monotonic()
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, left))
            if not ready:
                late = [ranks[refs.index(p)] for p in pending]
                raise WorkerTimeoutError(
                    f"{self.role}.{method} timed out after {timeout_s:g}s on rank(s) {late} "
                    f"of {self.num_workers}; raise call_timeout_s or look for a stuck worker",
                    self.role, method, late)
            for ref in ready:
                self._result(ref, method, ranks[refs.index(ref)])  # raise early on failure
        return [self._result(ref, method, r) for ref, r in zip(refs, ranks)]

    def _result(self, ref, method: str, rank: int) -> Any:
        import ray

        try:
            return ray.get(ref, timeout=0)
        except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError,
                ray.exceptions.RayActorError) as e:
            if isinstance(e, ray.exceptions.RayTaskError):
                raise
            dead = [rank] + [r for r, ok in enumerate(self.alive(timeout_s=5.0)) if not ok and r != rank]
            raise WorkerDiedError(
                f"{self.role} rank {rank} died during {method} (dead ranks: {sorted(dead)}): "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}",
                self.role, method, sorted(dead)) from e
        except ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            if hasattr(cause, "add_note"):
                cause.add_note(f"(in {self.role} rank {rank}, method {method})")
            raise cause from None

    # -- health and lifecycle ---------------------------------------------------------------
    def alive(self, timeout_s: float = 10.0) -> list[bool]:
        """Per rank: does the actor answer a ping within `timeout_s` (also while it is busy)?"""
        import ray

        refs = [a.ping.options(concurrency_group="control").remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out = []
        for ref in refs:
            if ref not in ready:
                out.append(False)
                continue
            try:
                out.append(bool(ray.get(ref, timeout=0)))
            except Exception:  # noqa: BLE001 - any failure to answer means not alive
                out.append(False)
        return out

    def pids(self) -> list[int]:
        """Worker process ids by rank (as recorded at start; a dead rank keeps its last pid)."""
        return list(self._pids)

    def nodes(self) -> list[dict[str, str]]:
        """Per rank, the Ray node it runs on ({node_id, node_ip}), as recorded at start and restart."""
        return list(self._nodes)

    def restart(self, rank: int, cause: str) -> None:
        """Replace rank `rank` with a fresh actor built with the same class, init kwargs and env."""
        import ray

        log.warning("restarting %s rank %d: %s", self.role, rank, cause)
        t0 = time.monotonic()
        try:
            ray.kill(self.actors[rank], no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
        self.actors[rank] = self._new_host(rank)
        self._pids[rank] = self._wait_start([rank], [self._build(rank)])[0]
        self._nodes[rank] = self._get(self.actors[rank].node.remote(), "node", [rank], 60.0)
        self.restarts.append({"role": self.role, "rank": rank, "cause": cause, "time": time.time(),
                              "restart_s": time.monotonic() - t0, "pid": self._pids[rank]})
        log.warning("restarted %s rank %d in %.1fs (pid %d)", self.role, rank,
                    time.monotonic() - t0, self._pids[rank])

    def shutdown(self) -> None:
        """Kill every actor, and the placement group if the group created it."""
        import ray

        for a in getattr(self, "actors", []):
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self.actors = []
        if self._own_pg and getattr(self, "placement_group", None) is not None:
            try:
                ray.util.remove_placement_group(self.placement_group)
            except Exception:  # noqa: BLE001
                pass
            self.placement_group = None

    def __repr__(self) -> str:
        return f"WorkerGroup({self.role!r}, {self.worker_cls.__name__}, num_workers={self.num_workers})"


def call_with_restart(method: GroupMethod, *args, on_restart: Callable[[WorkerGroup, list[int]], Any] | None = None,
                      max_restarts: int = 2, restart_on_timeout: bool = False, **kwargs) -> Any:
    """`method(...)` (e.g. `group.generate`), restarting dead ranks and retrying, up to `max_restarts` times.

    After the dead ranks are restarted, `on_restart(group, ranks)` runs before the retry: the
    controller re-syncs the current weights there (e.g. `lambda g, r: sync.resync(g, r)`).
    With `restart_on_timeout`, a timed-out rank is treated as dead (killed and restarted).
    """
    group, attempt = method.group, 0
    while True:
        try:
            return method(*args, **kwargs)
        except (WorkerDiedError, WorkerTimeoutError) as e:
            if isinstance(e, WorkerTimeoutError) and not restart_on_timeout:
                raise
            attempt += 1
            if attempt > max_restarts:
                raise WorkerDiedError(f"{e} — gave up after {max_restarts} restart(s)", e.role, e.method,
                                      e.ranks) from e
            for rank in e.ranks:
                group.restart(rank, cause=f"{type(e).__name__} during {method.name}: {e}")
            if on_restart is not None:
                on_restart(group, list(e.ranks))
