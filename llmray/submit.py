"""Submit stage jobs to a Ray cluster through the Jobs API, with the shared runtime_env and bounded waits.

The same thing as `ray job submit --address … --runtime-env cluster/runtime_env.yaml -- python
jobs/<stage>.py --config …`, from Python: `submit_stage("pretrain", "jobs/configs/pretrain/x.yaml",
address="http://127.0.0.1:8265")` returns a finished `JobRun` (status, message, logs) or raises
`ClusterError` naming what it waited for (an unreachable dashboard, a job still PENDING on a
resource the cluster lacks, a job still running at the deadline).
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmray.cluster import ClusterError, wait_reachable
from llmray.config import ConfigError, read_yaml

log = logging.getLogger(__name__)

RUNTIME_ENV = "cluster/runtime_env.yaml"
# Fields of a runtime_env we ship or accept (Ray's schema has more; these are the ones we support).
RUNTIME_ENV_KEYS = {"working_dir", "excludes", "py_modules", "pip", "uv", "conda", "env_vars",
                    "image_uri", "config", "py_executable"}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass(frozen=True)
class JobRun:
    job_id: str
    status: str
    """SUCCEEDED, FAILED or STOPPED."""
    message: str
    logs: str
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return self.status == "SUCCEEDED"


def load_runtime_env(path: str | Path = RUNTIME_ENV, *, pip: bool = True, working_dir: str | None = None,
                     env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """Read and check a runtime_env YAML; `pip=False` drops the pip section (an image that already
    has the pinned packages, or an offline cluster), `working_dir`/`env_vars` add to it."""
    env = read_yaml(path)
    unknown = sorted(set(env) - RUNTIME_ENV_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown runtime_env key {unknown[0]!r}; "
                          f"allowed: {', '.join(sorted(RUNTIME_ENV_KEYS))}")
    for k, v in (env.get("env_vars") or {}).items():
        if not isinstance(v, str):
            raise ConfigError(f"{path}: env_vars.{k} must be a string (quote it in YAML), got {v!r}")
    p = env.get("pip")
    if p is not None:
        packages = p.get("packages") if isinstance(p, dict) else p
        if not isinstance(packages, list) or not all(isinstance(x, str) for x in packages):
            raise ConfigError(f"{path}: pip must be a list of requirements or {{packages: [...]}}")
    if not pip:
        env.pop("pip", None)
    if working_dir is not None:
        env["working_dir"] = working_dir
    if env_vars:
        env["env_vars"] = {**(env.get("env_vars") or {}), **env_vars}
    return env


def auth_headers(token: str | None = None) -> dict[str, str]:
    """`Authorization: Bearer` for a cluster with token auth: `token`, else $RAY_AUTH_TOKEN, else
    the file at $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; none when there is no token.

    Ray's own client reads ~/.ray/auth_token only when RAY_AUTH_MODE=token is set in the submitting
    shell; without that a laptop holding the cluster's token was refused (401)."""
    token = token or os.environ.get("RAY_AUTH_TOKEN")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    candidates = [Path(path)] if path else []
    candidates.append(Path.home() / ".ray" / "auth_token")
    for p in candidates:
        if token:
            break
        if p.is_file():
            token = p.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def job_client(address: str, *, token: str | None = None, connect_timeout_s: float = 10.0):
    """A `JobSubmissionClient` for the dashboard at `address` (http://host:8265), after a bounded
    reachability check so a wrong address fails fast and names itself."""
    from ray.job_submission import JobSubmissionClient

    wait_reachable(address, connect_timeout_s)
    try:
        return JobSubmissionClient(address, headers=auth_headers(token))
    except (ConnectionError, RuntimeError) as e:
        raise ClusterError(f"cannot use the Ray Jobs API at {address}: {e}") from None


def stage_entrypoint(stage_name: str, config: str | None, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """`python jobs/<stage>.py --config X key=value …` for a registered stage (checked locally first)."""
    from llmray import stages

    stage = stages.get(stage_name)
    root = stages.repo_root()
    if root is not None and not (root / stage.job).is_file():
        raise ClusterError(f"stage {stage_name!r} has no job script {stage.job} yet")
    parts = ["python", stage.job]
    if config is not None:
        if root is not None and not Path(config).is_absolute() and not (root / config).is_file():
            raise ConfigError(f"config file not found: {config} (relative to the working dir {root})")
        parts += ["--config", config]
    return shlex.join([*parts, *overrides])


def submit(client, entrypoint: str, *, runtime_env: dict | None = None, submission_id: str | None = None,
           entrypoint_num_cpus: float | None = None, entrypoint_num_gpus: float | None = None,
           entrypoint_resources: dict[str, float] | None = None) -> str:
    kwargs = {k: v for k, v in dict(
        entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus,
        entrypoint_resources=entrypoint_resources, submission_id=submission_id).items() if v is not None}
    wants = dict(entrypoint_resources or {})
    if entrypoint_num_gpus:
        wants["GPU"] = entrypoint_num_gpus
    if entrypoint_num_cpus:
        wants["CPU"] = entrypoint_num_cpus
    # Recorded with the job so that a bounded wait can name what a PENDING job is waiting for.
    metadata = {"llmray.wants": ", ".join(f"{k}={v:g}" for k, v in sorted(wants.items()))} if wants else None
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata, **kwargs)
    log.info("submitted %s: %s", job_id, entrypoint)
    return job_id


def wait(client, job_id: str, *, timeout_s: float, pending_timeout_s: float | None = None,
         poll_s: float = 1.0, stop_on_timeout: bool = False) -> JobRun:
    """Poll a job until it ends; never wait forever.

    A job still PENDING after `pending_timeout_s` (default `timeout_s`) fails with the resources
    its entrypoint asked for, which is what a cluster without GPUs looks like; a job still running
    at `timeout_s` fails naming it and how to follow or stop it. `stop_on_timeout` stops it first.
    """
    start = time.monotonic()
    pending_timeout_s = timeout_s if pending_timeout_s is None else pending_timeout_s
    last_note = 0.0
    while True:
        info = client.get_job_info(job_id)
        status = str(getattr(info.status, "value", info.status))
        elapsed = time.monotonic() - start
        if status in TERMINAL:
            return JobRun(job_id, status, info.message or "", client.get_job_logs(job_id), round(elapsed, 1))
        limit = pending_timeout_s if status == "PENDING" else timeout_s
        if elapsed >= limit:
            if stop_on_timeout:
                client.stop_job(job_id)
            raise ClusterError(_timeout_message(job_id, status, info, elapsed, stop_on_timeout))
        if status == "PENDING" and elapsed - last_note >= 10:
            log.warning("job %s pending for %.0fs: %s", job_id, elapsed, _wants(info) or info.message)
            last_note = elapsed
        time.sleep(poll_s)


def _wants(info) -> str:
    want = dict(getattr(info, "entrypoint_resources", None) or {})
    if getattr(info, "entrypoint_num_gpus", None):
        want["GPU"] = info.entrypoint_num_gpus
    if getattr(info, "entrypoint_num_cpus", None):
        want["CPU"] = info.entrypoint_num_cpus
    if want:
        return ", ".join(f"{k}={v:g}" for k, v in sorted(want.items()))
    return (getattr(info, "metadata", None) or {}).get("llmray.wants", "")


def _timeout_message(job_id: str, status: str, info, elapsed: float, stopped: bool) -> str:
    then = ("it was stopped" if stopped
            else f"follow it with `ray job logs -f {job_id}`, stop it with `ray job stop {job_id}`")
    if status == "PENDING":
        wants = _wants(info)
        what = (f"waiting for entrypoint resources {wants} that no node offers" if wants
                else (info.message or "not started"))
        return f"job {job_id} still PENDING after {elapsed:.0f}s: {what}; {then}"
    return f"job {job_id} still {status} after {elapsed:.0f}s; {then}"


def submit_stage(stage_name: str, config: str | None, *, address: str, overrides: list[str] | tuple[str, ...] = (),
                 runtime_env: dict | None = None, timeout_s: float = 3600.0, pending_timeout_s: float = 120.0,
                 token: str | None = None, **resources) -> JobRun:
    """Submit `jobs/<stage>.py --config …` with `runtime_env` (default: cluster/runtime_env.yaml
    with the checkout as working_dir) and wait, bounded, for it to end: at most `pending_timeout_s`
    for the cluster to start it (an autoscaler adding a node counts) and `timeout_s` in all."""
    from llmray import stages

    entrypoint = stage_entrypoint(stage_name, config, overrides)
    if runtime_env is None:
        root = stages.repo_root() or Path.cwd()
        runtime_env = load_runtime_env(root / RUNTIME_ENV, working_dir=str(root))
    client = job_client(address, token=token)
    job_id = submit(client, entrypoint, runtime_env=runtime_env, **resources)
    return wait(client, job_id, timeout_s=timeout_s, pending_timeout_s=pending_timeout_s)
