"""Serving fixtures: one real Serve application on 127.0.0.1 (tiny model, API key) shared by the
serving tests, and helpers to talk to it with httpx."""

from __future__ import annotations

import time

import pytest

API_KEY = "test-key-0123456789"
DRIVER_ONLY_KEY_ENV = "LLMRAY_TEST_DRIVER_ONLY_KEY"


def start_test_server(model_dir, app_name: str = "llm-test", route_prefix: str = "/"):
    """A real Serve application on 127.0.0.1 (tiny model, API key). Limits are small so overload is
    reachable: 16 engine slots + 56 queued sequences. The key is set only in this (driver) process's
    environment, after the Ray cluster started: replicas must get it from the deployment's config."""
    import os

    from llmray.config import build
    from llmray.serving.config import ServeConfig
    from llmray.serving.server import start

    os.environ[DRIVER_ONLY_KEY_ENV] = API_KEY
    cfg = build(ServeConfig, {
        "model": str(model_dir), "served_model_name": "tiny", "port": 0, "app_name": app_name,
        "route_prefix": route_prefix, "api_key_env": DRIVER_ONLY_KEY_ENV,
        "engine": {"max_model_len": 256, "max_num_seqs": 16, "kv_cache_gb": 1},
        "limits": {"max_queue": 56, "request_timeout_s": 120, "max_body_bytes": 65536, "default_max_tokens": 40},
        "deployment": {"graceful_shutdown_timeout_s": 60, "health_check_period_s": 2},
    })
    return start(cfg)


def stop_test_server(handle) -> None:
    from ray import serve

    handle.shutdown()
    if not serve.status().applications:
        serve.shutdown()


@pytest.fixture(scope="session")
def server(ray_cluster, tiny_model_dir):
    """The server the serving tests share (none of them stops or kills it)."""
    handle = start_test_server(tiny_model_dir)
    yield handle
    stop_test_server(handle)


@pytest.fixture(scope="session")
def test_server():
    """(start, stop) for a module that needs a server of its own (one it may kill or shut down)."""
    return start_test_server, stop_test_server


@pytest.fixture
def headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def api_key() -> str:
    return API_KEY


@pytest.fixture
def scrape():
    """scrape(handle, name): sum of a Prometheus metric over its labels, from the server's /metrics."""
    import httpx

    from llmray.serving.metrics import metric_sum, parse_prometheus

    def _scrape(handle, name: str) -> float:
        text = httpx.get(handle.base + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).text
        return metric_sum(parse_prometheus(text), name)

    return _scrape


@pytest.fixture
def wait_for():
    """wait_for(predicate, timeout_s, what): poll until truthy, else fail naming what was awaited."""
    def _wait(predicate, timeout_s: float, what: str, every_s: float = 0.5):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(every_s)
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")

    return _wait
