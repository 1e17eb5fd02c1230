"""Start a model on Ray Serve behind an OpenAI-compatible API, on an already initialised Ray:

    from llmray.serving.server import start
    handle = start(ServeConfig(model="artifacts/model", port=0))
    handle.url        # "http://127.0.0.1:PORT/v1" -- point the openai client here
    handle.api_key    # the bearer key, or None when auth is off
    handle.shutdown() # graceful: in-flight requests finish (up to deployment.graceful_shutdown_timeout_s)

The `serve` stage (`llmray.stages.serve`) wraps this with the release gate and a blocking wait.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from llmray.cluster import free_port
from llmray.config import replace
from llmray.errors import UserError
from llmray.serving.config import (AutoscalingConfig, DeploymentConfig, GateConfig, LimitsConfig,
                                   ServeConfig)
from llmray.models.model_dir import check_model_dir
from llmray.vllm_engine import EngineConfig
from llmray.serving.speculative import SpeculativeConfig

log = logging.getLogger(__name__)

__all__ = ["AutoscalingConfig", "DeploymentConfig", "EngineConfig", "GateConfig", "LimitsConfig",
           "ServeConfig", "ServerHandle", "SpeculativeConfig", "start"]


@dataclass
class ServerHandle:
    """A running Serve application: its base URL, key, and a graceful `shutdown()`."""
    url: str
    api_key: str | None
    app_name: str
    model_name: str
    port: int

    @property
    def base(self) -> str:
        return self.url.removesuffix("/v1")

    def shutdown(self, timeout_s: float = 120.0) -> None:
        """Delete the application; Serve stops routing to it and waits for in-flight requests."""
        from ray import serve

        if self.app_name not in serve.status().applications:
            return
        serve.delete(self.app_name, _blocking=False)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.app_name not in serve.status().applications:
                return
            time.sleep(0.5)
        log.warning("application %s still shutting down after %.0fs", self.app_name, timeout_s)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def direct_ingress_env(port: int) -> dict[str, str]:
    """Environment of a Ray cluster whose Serve apps take HTTP directly in their replicas
    (`ingress: direct`): the first replica listens on `port` and requests bypass Serve's proxy (which
    Serve still starts, idle, on the head node). Ray reads it when the cluster
    starts (`llmray serve` passes it to the local cluster it starts; elsewhere set it on every node).
    Without a load balancer in front there is nothing to deregister from, so a stopping replica
    drains its in-flight requests without Serve's 30 s hold for load balancers."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(min(65535, port + 100)),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def resolve_ingress(cfg: ServeConfig, starts_cluster: bool = False) -> ServeConfig:
    """`ingress: auto` made concrete: `direct` for a single replica when the cluster is ours to start
    (`starts_cluster`) or runs with direct ingress on (its flag in this process's environment);
    `proxy` otherwise. `proxy` and `direct` pass through."""
    if cfg.ingress != "auto":
        return cfg
    direct = cfg.deployment.autoscaling.max_replicas == 1 and (
        starts_cluster or os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1")
    return replace(cfg, ingress="direct" if direct else "proxy")


def _direct_port(app_name: str) -> int | None:
    """The HTTP port of `app_name`'s ingress replica under direct ingress (None until it has one).
    Serve's controller publishes it in the app's target group; a cluster without direct ingress
    publishes only its proxies, which is named as the error."""
    import ray
    from ray import serve

    controller = serve.context._get_global_client()._controller
    groups = ray.get(controller.get_target_groups.remote(app_name))
    for g in groups:
        if g.protocol == "HTTP" and g.app_name == app_name and g.targets:  # RequestProtocol is a str enum
            return g.targets[0].port
    if groups and all(not g.app_name for g in groups):
        raise UserError("ingress: direct, but this Ray cluster runs Serve's HTTP proxy: start it with "
                        "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 (llmray serve does so on the local cluster it "
                        "starts), or set ingress=proxy")
    return None


def _ensure_serve(cfg: ServeConfig) -> int:
    """Start Serve's HTTP proxy on cfg.host:cfg.port, or reuse a running one; return its port."""
    from ray import serve

    try:
        details = serve.context._get_global_client(raise_if_no_controller_running=False)
    except Exception:  # noqa: BLE001 - no controller yet
        details = None
    if details is not None:
        opts = details.http_config
        if cfg.port not in (0, opts.port):
            log.warning("Serve already runs on port %s; ignoring port=%s", opts.port, cfg.port)
        return opts.port
    import ray

    # With `ingress: direct` Serve still starts an (idle) head-node proxy: keep it off the replica's port.
    port = free_port(cfg.host) if cfg.ingress == "direct" else cfg.port or free_port(cfg.host)
    try:
        serve.start(http_options={"host": cfg.host, "port": port}, detached=False)
    except (ray.exceptions.ActorDiedError, TimeoutError) as e:
        # On an overloaded node the controller may replace a proxy that started too slowly; the
        # controller is up and brings a new proxy on the same port, which start() waits for.
        log.warning("Serve proxy not ready yet (%s); waiting for its replacement", type(e).__name__)
    return port


def start(cfg: ServeConfig) -> ServerHandle:
    """Deploy `cfg` on the current Ray cluster; return once the model answers /ready."""
    import httpx
    from ray import serve

    from llmray.serving.app import build_app
    from llmray.serving.auth import resolve_api_key

    check_model_dir(cfg.model)
    cfg = resolve_ingress(cfg)
    port = _ensure_serve(cfg)
    application = build_app(cfg)
    serve.run(application, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    base = None if cfg.ingress == "direct" else f"http://{host}:{port}{cfg.route_prefix.rstrip('/')}"
    deadline = time.monotonic() + cfg.ready_timeout_s
    while True:
        status = serve.status().applications.get(cfg.app_name)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"serve application {cfg.app_name} failed to deploy: {status.message}")
        if base is None and status is not None and status.status == "RUNNING":
            try:
                port = _direct_port(cfg.app_name)
            except UserError:
                serve.delete(cfg.app_name, _blocking=False)
                raise
            base = f"http://{host}:{port}{cfg.route_prefix.rstrip('/')}" if port else None
        try:
            if (base is not None and status is not None and status.status == "RUNNING"
                    and httpx.get(base + "/ready", timeout=5).status_code == 200):
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not ready after ready_timeout_s={cfg.ready_timeout_s:g}s "
                               f"(status: {status.status if status else 'none'})")
        time.sleep(0.5)
    return ServerHandle(url=base + "/v1", api_key=resolve_api_key(cfg.api_key, cfg.api_key_env),
                        app_name=cfg.app_name, model_name=cfg.name(), port=port)
