"""Stage `serve`: (release gate) -> deploy on Ray Serve -> print the URL -> block until Ctrl-C -> drain.

Local:   llmray serve --config jobs/configs/serve/tiny_cpu.yaml model=runs/default/quantized
Cluster: ray job submit --working-dir . -- python jobs/serve.py --config jobs/configs/serve/gpu_7b.yaml
(`block: false` returns at once, leaving the server up.)
"""

from __future__ import annotations

import os
import time

from llmray.config import replace
from llmray.models.model_dir import check_model_dir
from llmray.serving.config import ServeConfig
from llmray.serving.gates import apply_gate
from llmray.cluster import free_port
from llmray.serving.server import direct_ingress_env, resolve_ingress, start

Config = ServeConfig


def run(cfg: ServeConfig) -> dict:
    """`llmray serve`: (gate) -> start -> print the URL -> block until Ctrl-C -> graceful shutdown."""
    import ray

    from llmray.cluster import init_ray

    from llmray.serving.auth import require_key_for_bind

    check_model_dir(cfg.model)
    require_key_for_bind(cfg)  # fail closed before any cluster starts
    starts_cluster = not ray.is_initialized() and not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    cfg = resolve_ingress(cfg, starts_cluster)
    if cfg.ingress == "direct":  # the flag must be in the cluster's environment before it starts
        cfg = replace(cfg, port=cfg.port or free_port(cfg.host))
        if starts_cluster:
            cfg = replace(cfg, ray=replace(cfg.ray, env={**direct_ingress_env(cfg.port), **cfg.ray.env}))
    init_ray(cfg.ray)
    decision = None
    if cfg.gate.enabled:
        cfg, decision = apply_gate(cfg)
    handle = start(cfg)
    print(f"llmray serve: {handle.model_name} at {handle.url}"
          + (" (API key required)" if handle.api_key else ""), flush=True)
    result = {"url": handle.url, "model": handle.model_name, "speculative": cfg.engine.speculative.method,
              "served_model_dir": cfg.model}
    if decision is not None:
        result["gate"] = decision
    if not cfg.block:
        return result
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("llmray serve: shutting down (draining in-flight requests)", flush=True)
    finally:
        handle.shutdown()
    return result
