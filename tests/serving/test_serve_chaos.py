"""Faults on a server of this module's own (the shared one is left alone, so file order does not
matter): a replica process killed under load is restarted by Serve; shutdown drains in-flight streams."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_model_dir, test_server):
    """This module's server: its replica is killed, then it is shut down under load."""
    start, stop = test_server
    handle = start(tiny_model_dir, app_name="llm-chaos", route_prefix="/chaos")
    yield handle
    stop(handle)


def _replica_pid(server) -> int:
    from ray import serve

    return serve.get_deployment_handle("LLMServer", app_name=server.app_name).pid.remote().result(timeout_s=60)


def test_replica_killed_under_load_is_restarted(server, headers, wait_for):
    import psutil

    old = _replica_pid(server)
    engine_children = [p.pid for p in psutil.Process(old).children(recursive=True)]
    statuses: list[object] = []
    stop = threading.Event()

    def load():
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                try:
                    r = c.post(server.url + "/completions", headers=headers,
                               json={"prompt": "under load", "max_tokens": 16, "ignore_eos": True})
                    statuses.append(r.status_code)
                except httpx.HTTPError as e:
                    statuses.append(type(e).__name__)
                time.sleep(0.05)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: statuses.count(200) >= 4, 120, "load to be flowing")
    os.kill(old, signal.SIGKILL)  # a real process death, not a polite stop
    killed_at = len(statuses)

    def recovered():
        try:
            return _replica_pid(server) != old and httpx.post(
                server.url + "/completions", headers=headers, timeout=60,
                json={"prompt": "after", "max_tokens": 4}).status_code == 200
        except Exception:  # noqa: BLE001 - still restarting
            return False

    wait_for(recovered, 900, "Serve to restart the killed replica", every_s=2)
    wait_for(lambda: statuses[-3:].count(200) == 3 and len(statuses) > killed_at + 3, 120, "load to succeed again")
    stop.set()
    for t in threads:
        t.join(60)
    # The killed replica's vLLM engine process does not outlive it.
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                             for p in engine_children), 120, "the old engine process to exit")


def test_graceful_shutdown_drains_in_flight_streams(server, headers):
    started = [threading.Event() for _ in range(4)]
    results: list[tuple[int, str]] = [(0, "")] * 4

    def stream(i: int):
        body = {"prompt": "drain me", "max_tokens": 120, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        tokens, last = 0, ""
        with httpx.stream("POST", server.url + "/completions", headers=headers, json=body, timeout=300) as r:
            for ln in r.iter_lines():
                if not ln:
                    continue
                started[i].set()
                last = ln
                if ln != "data: [DONE]" and json.loads(ln[6:]).get("usage"):
                    tokens = json.loads(ln[6:])["usage"]["completion_tokens"]
        results[i] = (tokens, last)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for e in started:
        assert e.wait(300)
    server.shutdown()  # returns once the application is gone
    for t in threads:
        t.join(300)
    assert results == [(120, "data: [DONE]")] * 4
    try:
        gone = httpx.get(server.base + "/health", timeout=10).status_code != 200
    except httpx.HTTPError:
        gone = True
    assert gone
