"""Bad input around job submission fails fast and names the problem: a missing config, an unreachable
RAY_ADDRESS or dashboard, a resource no node offers. No multi-node cluster needed here."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmray import cli
from llmray.cluster import ClusterError, split_address
from llmray.config import ConfigError
from llmray.errors import UserError
from llmray.submit import job_client, stage_entrypoint

ROOT = Path(__file__).resolve().parents[2]


def _closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


def test_split_address_forms():
    assert split_address("ray://10.0.0.1:10001") == ("10.0.0.1", 10001)
    assert split_address("http://127.0.0.1:8265/") == ("127.0.0.1", 8265)
    assert split_address("127.0.0.1:6379") == ("127.0.0.1", 6379)
    assert split_address("auto") is None and split_address("local") is None


def test_stage_entrypoint_checks_script_and_config_before_submitting():
    assert stage_entrypoint("corpus", "jobs/configs/corpus/tiny.yaml", ["num_documents=10"]) == \
        "python jobs/corpus.py --config jobs/configs/corpus/tiny.yaml num_documents=10"
    with pytest.raises(ConfigError, match=r"config file not found: jobs/configs/corpus/nope.yaml"):
        stage_entrypoint("corpus", "jobs/configs/corpus/nope.yaml")
    with pytest.raises(UserError, match=r"unknown stage 'pretrian'"):
        stage_entrypoint("pretrian", None)


def test_cli_missing_config_is_one_line_and_exit_2(capsys):
    assert cli.main(["corpus", "--config", "jobs/configs/corpus/nope.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["llmray corpus: error: config file not found: jobs/configs/corpus/nope.yaml"]


def test_unreachable_ray_address_fails_fast_naming_it():
    """Ray alone retries an unreachable GCS for minutes; init_ray gives up after connect_timeout_s."""
    port = _closed_port()
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    code = ("from llmray.cluster import init_ray, RayConfig\n"
            "from llmray.errors import UserError\n"
            "try:\n    init_ray(RayConfig(connect_timeout_s=1.5))\n"
            "except UserError as e:\n    print('USER ERROR:', e); raise SystemExit(2)\n")
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"cannot reach the Ray cluster at '127.0.0.1:{port}'" in r.stdout
    assert time.monotonic() - start < 90  # bounded (import time included), never Ray's minutes of retries


def test_unreachable_dashboard_fails_fast_naming_it():
    import ray.job_submission  # noqa: F401 - import time is not what is measured

    port = _closed_port()
    start = time.monotonic()
    with pytest.raises(ClusterError, match=rf"cannot reach the Ray cluster at 'http://127.0.0.1:{port}'"):
        job_client(f"http://127.0.0.1:{port}", connect_timeout_s=1.0)
    assert time.monotonic() - start < 10


def test_missing_gpu_is_named_and_is_a_user_error(ray_cluster):
    from llmray.cluster import require_resources

    with pytest.raises(ClusterError, match=r"pretrain needs GPU=8 but the cluster has GPU=0 after waiting 1s") as e:
        require_resources({"CPU": 1, "GPU": 8}, "pretrain", timeout_s=1.0)
    assert isinstance(e.value, UserError) and isinstance(e.value, RuntimeError)


def test_auth_headers_find_the_token_where_ray_get_auth_token_writes_it(monkeypatch, tmp_path):
    """Without RAY_AUTH_MODE=token in the shell, Ray's client does not read ~/.ray/auth_token and a
    submit_stage() to a token-auth cluster was refused; ours reads it (explicit token and env first)."""
    from llmray.submit import auth_headers

    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("fromfile\n")
    assert auth_headers() == {"Authorization": "Bearer fromfile"}
    other = tmp_path / "other_token"
    other.write_text("frompath")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(other))
    assert auth_headers() == {"Authorization": "Bearer frompath"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "fromenv")
    assert auth_headers() == {"Authorization": "Bearer fromenv"}
    assert auth_headers("explicit") == {"Authorization": "Bearer explicit"}
