"""Auth fails closed: a non-loopback bind without a key refuses to start (before any cluster starts),
and a key set only on the driver still guards a replica whose process never had it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

DRIVER_ONLY_KEY_ENV = "LLMRAY_TEST_DRIVER_ONLY_KEY"  # as in conftest.py

pytestmark = pytest.mark.timeout(300)


def test_non_loopback_bind_without_a_key_refuses_to_start(tiny_model_dir):
    env = {k: v for k, v in os.environ.items() if k != "LLMRAY_API_KEY"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "llmray.cli", "serve", "--model", str(tiny_model_dir),
                           "--host", "0.0.0.0", "--port", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "without an API key" in proc.stderr and "export LLMRAY_API_KEY=" in proc.stderr, proc.stderr[-2000:]


def test_require_key_for_bind_allows_loopback_and_keys():
    from llmray.config import build
    from llmray.errors import UserError
    from llmray.serving.auth import require_key_for_bind
    from llmray.serving.config import ServeConfig

    assert require_key_for_bind(build(ServeConfig, {"host": "127.0.0.1", "api_key_env": None})) is None
    assert require_key_for_bind(build(ServeConfig, {"host": "0.0.0.0", "api_key": "k" * 12})) == "k" * 12
    with pytest.raises(UserError, match="without an API key"):
        require_key_for_bind(build(ServeConfig, {"host": "10.1.2.3", "api_key_env": "NOPE_UNSET_VAR"}))


def test_a_replica_without_the_variable_still_requires_the_key(server, headers):
    """One node here (the two-node fixture was not used: a vLLM replica on its 1-CPU worker did not fit the
    time budget); what it would show is the same: the replica's own environment lacks the variable."""
    from ray import serve

    pid = serve.get_deployment_handle("LLMServer", app_name=server.app_name).pid.remote().result(timeout_s=60)
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert not any(e.startswith(DRIVER_ONLY_KEY_ENV.encode() + b"=") for e in environ)
    assert httpx.get(server.url + "/models", timeout=30).status_code == 401
    assert httpx.get(server.base + "/metrics", timeout=30).status_code == 401
    assert httpx.get(server.url + "/models", headers=headers, timeout=30).status_code == 200
