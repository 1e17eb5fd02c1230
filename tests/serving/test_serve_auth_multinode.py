"""The API key set only on the driver still guards a replica on a second node: a real two-node Ray
cluster on loopback (tests/ops' LocalRayCluster, token auth), the head's CPU held so the replica lands
on the worker node, whose processes never had the variable."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KEY_ENV = "LLMRAY_TWO_NODE_DRIVER_KEY"
pytestmark = [pytest.mark.timeout(1200), pytest.mark.slow]

DRIVER = r"""
import json, os, sys, httpx, ray
from ray.util.state import list_actors
from llmray.config import build
from llmray.serving.config import ServeConfig
from llmray.serving.server import start

ray.init(address=os.environ["RAY_ADDRESS"])
head = ray.get_runtime_context().get_node_id()

@ray.remote(num_cpus=1)
class Hold:  # holds the head node's only CPU: the replica must go to the worker
    def node(self):
        return ray.get_runtime_context().get_node_id()

from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
hold = Hold.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
assert ray.get(hold.node.remote()) == head
cfg = build(ServeConfig, {"model": sys.argv[1], "served_model_name": "tiny", "port": 0, "ingress": "proxy",
                          "api_key_env": sys.argv[2], "ready_timeout_s": 900,
                          "engine": {"max_model_len": 128, "max_num_seqs": 2}})
handle = start(cfg)
replica = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "LLMServer" in a.class_name]
out = {"replica_nodes": [a.node_id for a in replica], "head": head,
       "no_key": httpx.get(handle.url + "/models", timeout=60).status_code,
       "metrics_no_key": httpx.get(handle.base + "/metrics", timeout=60).status_code,
       "with_key": httpx.get(handle.url + "/models", timeout=60,
                             headers={"Authorization": "Bearer " + os.environ[sys.argv[2]]}).status_code}
handle.shutdown()
print("RESULT " + json.dumps(out), flush=True)
"""


def _cluster_class():
    spec = importlib.util.spec_from_file_location("ops_conftest", ROOT / "tests" / "ops" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.LocalRayCluster


def test_key_only_on_the_driver_guards_a_replica_on_another_node(tiny_model_dir, tmp_path):
    assert KEY_ENV not in os.environ  # the nodes inherit this process's environment: it must lack the key
    cluster = _cluster_class()(num_cpus=1).start(workers=1)
    try:
        env = {**cluster.env, "RAY_ADDRESS": f"127.0.0.1:{cluster.gcs_port}", KEY_ENV: "driver-only-key-0123",
               "PYTHONPATH": str(ROOT)}
        script = tmp_path / "driver.py"
        script.write_text(DRIVER)
        proc = subprocess.run([sys.executable, str(script), str(tiny_model_dir), KEY_ENV], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=1100)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        assert line, (proc.stdout[-3000:], proc.stderr[-3000:])
        out = json.loads(line[7:])
    finally:
        cluster.stop()
    assert out["replica_nodes"] and all(n != out["head"] for n in out["replica_nodes"]), out
    assert out["no_key"] == 401 and out["metrics_no_key"] == 401 and out["with_key"] == 200, out
