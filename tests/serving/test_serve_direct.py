"""`llmray serve --ingress direct` as a user runs it: its own local Ray cluster, the replica itself
listening on the configured port (no hop through Serve's proxy), the openai client unchanged, errors
still 4xx, and Ctrl-C shutting it down cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.timeout(600)
KEY = "direct-key-0123456789"


def _listener(port: int) -> str:
    """Command line of the process listening on 127.0.0.1:`port`."""
    import psutil

    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return " ".join(psutil.Process(conn.pid).cmdline())
    return ""


@pytest.mark.slow  # starts its own Ray cluster and server through the CLI
def test_llmray_serve_direct_ingress(tiny_model_dir, tmp_path):
    from llmray.cluster import free_port

    port = free_port()
    env = {**os.environ, "LLMRAY_API_KEY": KEY}
    env.pop("RAY_ADDRESS", None)  # its own local cluster, as `llmray serve` starts for a user
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "llmray.cli", "serve", "--model", str(tiny_model_dir),
                             "--served-model-name", "tiny", "--ingress", "direct", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "llmray serve: tiny at" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "server not up in 300 s"
            time.sleep(1)
        assert f"http://127.0.0.1:{port}/v1" in (tmp_path / "serve.log").read_text()
        assert "ServeReplica" in _listener(port), _listener(port)  # the replica, not Serve's proxy

        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY)
        out = client.completions.create(model="tiny", prompt="the cat", max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 6
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
            extra_body={"ignore_eos": True}) if c.choices]
        assert "".join(pieces)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", content=b"{bad json",
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert "shutting down" in (tmp_path / "serve.log").read_text()
