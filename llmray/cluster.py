"""Start or join Ray: join `RAY_ADDRESS` when set, else a local cluster bound to 127.0.0.1."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field

from llmray.config import check
from llmray.errors import UserError
from llmray.hardware import has_cuda

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

# Environment every Ray worker of ours gets: DeepSpeed on the CPU accelerator when there is no
# GPU, quiet tokenizers, and no vLLM usage reporting (no network here). Ray Train's print patch
# is off: it tees each worker `print` to stdout and to a logger on stderr, so every step line
# reached the driver twice; the steps are also in the run's metrics.jsonl. Ray Train's controller
# takes one reported result per health check, from a queue of one: at its default 2 s interval each
# `ray.train.report` after the first blocked its worker up to 2 s, and a run ended about 2 s per
# report still queued (6 s of a 12-step test run). 0.5 s costs one small call per worker per poll.
WORKER_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_TRAIN_V2_ENABLED": "1",
}

# A local cluster is one machine that no cloud reclaims: Ray Train's preemption watcher (one more
# actor process per training run, polling the node's drain state) has nothing to watch there.
LOCAL_ONLY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

_local_without_dashboard = False  # set by init_ray; see has_state_api()


class ClusterError(UserError, RuntimeError):
    """The cluster is unreachable, or lacks a resource a stage asks for. The message names it."""



def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (for a server or a torch.distributed rendezvous)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]

@dataclass(frozen=True)
class RayConfig:
    address: str | None = None
    """Cluster to join (`ray://…`, `host:port` or `auto`); default: $RAY_ADDRESS, else a local cluster."""
    num_cpus: int | None = None
    """Logical CPUs of a local cluster; default: the machine's cores, at least 4 (Serve's ingress needs a slot)."""
    object_store_memory_gb: float | None = None
    """Object store size of a local cluster; default: Ray's own choice."""
    dashboard: bool = False
    """Start the dashboard of a local cluster (always on 127.0.0.1)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for every worker."""
    resource_wait_s: float = 120.0
    """How long a stage waits for the resources it asks for before failing with the missing resource named."""
    connect_timeout_s: float = 30.0
    """How long joining `address` retries a TCP connect to it before failing (Ray itself would retry for minutes)."""

    def __post_init__(self) -> None:
        check(self.num_cpus is None or self.num_cpus >= 1, "ray.num_cpus", f"must be >= 1, got {self.num_cpus}")
        check(self.resource_wait_s > 0, "ray.resource_wait_s", "must be > 0")
        check(self.connect_timeout_s > 0, "ray.connect_timeout_s", "must be > 0")


def local_num_cpus() -> int:
    """Logical CPUs for a local cluster: the cores, but at least 4 so that Serve's proxy,
    ingress and a model replica can all be placed on a 2-core laptop (they mostly wait)."""
    return max(4, os.cpu_count() or 1)


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(WORKER_ENV)
    if not has_cuda():
        env["DS_ACCELERATOR"] = "cpu"
    env.update(extra or {})
    return env


def init_ray(cfg: RayConfig | None = None, **overrides) -> dict:
    """Join or start Ray and return `ray.cluster_resources()`.

    Joins `cfg.address` or `$RAY_ADDRESS` when set. Otherwise starts a fresh local instance whose
    node address and dashboard are on 127.0.0.1. Idempotent: a second call in the same process
    returns the running cluster's resources.
    """
    import ray

    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return ray.cluster_resources()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    env = worker_env({**({} if address else LOCAL_ONLY_ENV), **cfg.env})
    for k, v in env.items():  # the driver too, so code paths agree on both sides
        os.environ.setdefault(k, v)
    runtime_env: dict = {"env_vars": _not_set_by_job(env)}
    if address:
        log.info("joining Ray cluster at %s", address)
        wait_reachable(address, cfg.connect_timeout_s)
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, **overrides)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(f"cannot reach the Ray cluster at RAY_ADDRESS={address!r}: {e}") from None
    else:
        _pin_local_node_to_loopback()
        kwargs = dict(
            address="local",
            num_cpus=cfg.num_cpus or local_num_cpus(),
            _node_ip_address=LOOPBACK,
            include_dashboard=cfg.dashboard,
            runtime_env=runtime_env,
        )
        if cfg.dashboard:
            kwargs["dashboard_host"] = LOOPBACK
        if cfg.object_store_memory_gb:
            kwargs["object_store_memory"] = int(cfg.object_store_memory_gb * 2**30)
        kwargs.update(overrides)
        ray.init(**kwargs)
        global _local_without_dashboard
        _local_without_dashboard = not kwargs["include_dashboard"]
    return ray.cluster_resources()


def has_state_api() -> bool:
    """False when this process started a local cluster without the dashboard, which serves Ray's
    State API; True otherwise (a joined cluster, a dashboard, or Ray started by someone else)."""
    return not _local_without_dashboard


def _pin_local_node_to_loopback() -> None:
    """Keep a local single-node cluster on 127.0.0.1.

    Ray 2.60 turns `_node_ip_address="127.0.0.1"` into the machine's interface address (so that
    other nodes could reach it) unless its multi-node support is off. A local cluster has no other
    nodes, so switch that off: for this process (the constant is read at import) and, through the
    environment, for the raylet and workers it starts.
    """
    import ray._private.ray_constants as ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _not_set_by_job(env: dict[str, str]) -> dict[str, str]:
    """Drop the variables a submitted job's runtime_env already sets (`ray job submit
    --runtime-env cluster/runtime_env.yaml`): Ray refuses a driver runtime_env that repeats a job's
    env var key, and the job's own value should win."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return env
    try:
        job_env = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return env
    return {k: v for k, v in env.items() if k not in job_env}


def split_address(address: str) -> tuple[str, int] | None:
    """`ray://h:p`, `http://h:p`, `h:p` -> (h, p); None for `auto`/`local` or an address without a port."""
    rest = address.split("://", 1)[-1].split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or LOOPBACK, int(port)


def wait_reachable(address: str, timeout_s: float) -> None:
    """Retry a TCP connect to `address` for up to `timeout_s`, then fail naming it.

    Ray's own connect loop retries an unreachable GCS for minutes with only warnings; this turns
    a wrong or dead RAY_ADDRESS into one clear error within a bounded time."""
    import socket
    import time

    hp = split_address(address)
    if hp is None:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(hp, timeout=min(5.0, max(0.2, timeout_s))):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"cannot reach the Ray cluster at {address!r} (RAY_ADDRESS / ray.address): {e} "
                    f"after {timeout_s:g}s; is the head running and the port (e.g. a port-forward) open?"
                ) from None
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))


RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def check_custom_resources(resources: dict[str, float], key: str) -> None:
    """A role's or train worker's custom Ray resources (e.g. {"node_b": 1} to pin it to the node that
    offers `node_b`): names non-empty, not CPU/GPU/memory (those have their own keys), amounts > 0.
    Raises ConfigError naming `key`."""
    from llmray.config import check

    check(isinstance(resources, dict), key, f"must be a mapping of resource name to amount, got {resources!r}")
    for name, amount in resources.items():
        check(isinstance(name, str) and name.strip() != "", key, f"resource names must be non-empty, got {name!r}")
        check(name not in RESERVED_RESOURCES, f"{key}.{name}",
              "set CPUs/GPUs with cpus_per_worker/gpus_per_worker (or use_gpu); resources holds custom ones")
        check(isinstance(amount, (int, float)) and amount > 0, f"{key}.{name}", f"must be > 0, got {amount!r}")


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def require_resources(needed: dict[str, float], what: str, timeout_s: float) -> None:
    """Wait up to `timeout_s` for the cluster to offer `needed` (e.g. {"GPU": 2}); then fail,
    naming the missing resource, instead of hanging on an unschedulable placement group.
    An autoscaling cluster may add nodes while we wait."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        total = ray.cluster_resources()
        missing = {k: v for k, v in needed.items() if total.get(k, 0.0) < v}
        if not missing:
            return
        if time.monotonic() >= deadline:
            have = ", ".join(f"{k}={total.get(k, 0):g}" for k in missing)
            want = ", ".join(f"{k}={v:g}" for k, v in missing.items())
            raise ClusterError(
                f"{what} needs {want} but the cluster has {have} after waiting {timeout_s:.0f}s; "
                "add nodes with that resource or lower the request in the config"
            )
        log.warning("%s waiting for resources %s (cluster has %s)", what, missing, total)
        time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
