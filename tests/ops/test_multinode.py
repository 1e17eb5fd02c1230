"""Jobs submitted through the Ray Jobs API to a real two-node cluster on this machine (token auth on):
work runs on both nodes, stage jobs succeed with readable logs (data, pretraining with one Ray Train
worker per node, GRPO with the rollout engine on the other node than the actor), auth is enforced,
and bad input (missing config, resources no node has) ends in a clear error instead of a hang. Last,
on the same cluster: the serving API key set only on the driver still guards a replica on the
worker node, whose processes never had the variable."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmray.cluster import ClusterError
from llmray.submit import job_client, load_runtime_env, submit, wait

ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def client(two_node_cluster):
    return job_client(two_node_cluster.dashboard_url, token=two_node_cluster.token)


@pytest.fixture(scope="module")
def runtime_env():
    # The shared runtime_env minus pip: this machine is offline and .venv already has the pins. DeepSpeed's
    # compiled ops come from this checkout's cache, as for the rest of the suite, not from the cluster's
    # per-node /tmp path, which another checkout (other venv paths) on this machine would rebuild.
    return load_runtime_env(ROOT / "cluster" / "runtime_env.yaml", pip=False, working_dir=str(ROOT),
                            env_vars={"TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")})


@pytest.fixture(scope="module")
def jobs(client, runtime_env, tmp_path_factory):
    """Submit the jobs one after another. They share the checkout's working_dir package, and with
    Ray 2.60 a job that ended while another was running took that package away from it (the
    running job's `os.getcwd()` failed), so they do not overlap."""
    out = tmp_path_factory.mktemp("artifacts")
    ids = {}
    ids["smoke"] = submit(client, "python cluster/smoke.py --tasks 6 --task-s 1.0 --min-nodes 2",
                          runtime_env=runtime_env)
    wait(client, ids["smoke"], timeout_s=JOB_TIMEOUT_S)
    # The data job: generate a corpus, then clean and deduplicate it with Ray Data on the cluster.
    ids["data"] = submit(client, " && ".join([
        f"python jobs/corpus.py --config jobs/configs/corpus/tiny.yaml output={out}/corpus",
        (f"python jobs/clean_dedup.py --config jobs/configs/clean_dedup/tiny_cpu.yaml "
         f"input={out}/corpus/docs output={out}/clean ray.resource_wait_s=60"),
    ]), runtime_env=runtime_env)
    wait(client, ids["data"], timeout_s=JOB_TIMEOUT_S)
    ids["missing_config"] = submit(client, "python jobs/corpus.py --config jobs/configs/corpus/nope.yaml",
                                   runtime_env=runtime_env)
    return ids, out


def test_fan_out_runs_on_both_nodes(two_node_cluster, client, jobs):
    run = wait(client, jobs[0]["smoke"], timeout_s=JOB_TIMEOUT_S)
    assert run.ok, run.logs[-2000:]
    report = json.loads(re.search(r"^SMOKE (.*)$", run.logs, re.MULTILINE).group(1))
    nodes = {n["node_id"] for n in two_node_cluster.alive_nodes()}
    assert len(nodes) == 2
    assert set(report["task_nodes"]) == nodes, "tasks ran on both nodes"
    assert sum(report["tasks_per_node"].values()) == 6
    assert report["cluster_resources"]["CPU"] == 4.0


def test_data_job_succeeds_with_readable_logs(client, jobs):
    ids, out = jobs
    run = wait(client, ids["data"], timeout_s=JOB_TIMEOUT_S)
    assert run.ok, run.logs[-3000:]
    # Both stages printed their result JSON; the artifacts are complete on the shared path.
    assert '"documents": 600' in run.logs and '"documents_in": 600' in run.logs
    from llmray import artifacts

    assert artifacts.require(out / "corpus", "corpus").metrics["documents"] == 600
    start = run.logs.index('{\n  "output": "' + str(out / "clean"))
    clean, _ = json.JSONDecoder().raw_decode(run.logs, start)
    assert clean["removed_duplicates"] > 0 and clean["documents_out"] < 600
    assert (out / "clean" / "manifest.json").is_file()
    info = client.get_job_info(ids["data"])
    assert info.runtime_env["working_dir"].startswith("gcs://"), "the checkout was shipped as working_dir"


def test_training_job_on_the_cleaned_data(client, runtime_env, jobs):
    """A second job trains the BPE tokenizer on the data job's output, through the shared path."""
    ids, out = jobs
    assert wait(client, ids["data"], timeout_s=JOB_TIMEOUT_S).ok
    job_id = submit(client, f"python jobs/tokenizer.py --config jobs/configs/tokenizer/tiny.yaml "
                            f"corpus={out}/clean/docs output={out}/tokenizer", runtime_env=runtime_env)
    run = wait(client, job_id, timeout_s=JOB_TIMEOUT_S)
    assert run.ok, run.logs[-3000:]
    assert '"vocab_size": 1024' in run.logs
    from llmray import artifacts

    m = artifacts.require(out / "tokenizer", "tokenizer").metrics
    assert m["vocab_size"] == 1024 and m["chars_per_token"] > 2.0


def test_missing_config_fails_the_job_naming_the_path(client, jobs):
    run = wait(client, jobs[0]["missing_config"], timeout_s=JOB_TIMEOUT_S)
    assert run.status == "FAILED"
    assert "config file not found: jobs/configs/corpus/nope.yaml" in run.logs
    assert "Traceback" not in run.logs, "a user error is one line, not a traceback"


def test_job_asking_for_gpus_reports_pending_resource_and_is_stopped(client, runtime_env):
    job_id = submit(client, "python -c 'print(1)'", runtime_env={"env_vars": runtime_env["env_vars"]},
                    entrypoint_num_gpus=1)
    with pytest.raises(ClusterError, match=r"still PENDING after \d+s: waiting for entrypoint resources GPU=1"):
        wait(client, job_id, timeout_s=60, pending_timeout_s=3, stop_on_timeout=True)
    # Ray 2.60 cannot move a job to STOPPED while its supervisor itself waits for the GPU: the stop
    # is recorded and the job never runs; the cluster's teardown removes it.
    time.sleep(3)
    status = str(getattr(client.get_job_status(job_id), "value", client.get_job_status(job_id)))
    assert status in ("PENDING", "STOPPED"), status


# --- training and RL across the two nodes ---------------------------------------------------

def _node_with(two_node_cluster, resource: str) -> str:
    """The node id of the node started with custom resource `resource` (conftest.NODE_RESOURCES)."""
    ids = [n["node_id"] for n in two_node_cluster.alive_nodes() if resource in n.get("resources_total", {})]
    assert len(ids) == 1, f"one node offers {resource}: {two_node_cluster.alive_nodes()}"
    return ids[0]


def test_pretrain_job_runs_one_worker_per_node(two_node_cluster, client, runtime_env, tokenizer_dir, tmp_path):
    """Ray Train + DeepSpeed across the two nodes: each worker asks for the one `train_slot` a node has.
    (Placed after the jobs above have ended: a job ending while another runs can take the shared
    working_dir package away from it.)"""
    spec = importlib.util.spec_from_file_location("train_helpers", ROOT / "tests" / "train" / "helpers.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    data = helpers.write_packed(tmp_path / "packed", tokenizer_dir, seq_len=64, n_rows=64, n_shards=2)
    run_dir, out = tmp_path / "run", tmp_path / "model"
    job_id = submit(client, (
        f"python jobs/pretrain.py --config jobs/configs/pretrain/tiny_cpu.yaml dataset={data} run_dir={run_dir} "
        f"output={out} max_steps=3 log_every=1 checkpoint.every_n_steps=100 ray.resource_wait_s=60 "
        "'scaling.resources={train_slot: 1}'"), runtime_env=runtime_env)
    run = wait(client, job_id, timeout_s=JOB_TIMEOUT_S)
    assert run.ok, run.logs[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    nodes = {n["node_id"] for n in two_node_cluster.alive_nodes()}
    assert len(result["worker_nodes"]) == 2 and set(result["worker_nodes"]) == nodes, "rank 0 and 1 on different nodes"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses), losses
    from llmray import artifacts

    assert artifacts.require(out, "model").metrics["worker_nodes"] == result["worker_nodes"]


def test_grpo_run_puts_rollout_on_the_other_node(two_node_cluster, client, runtime_env, tiny_model_dir,
                                                 tmp_path):
    """GRPO (grpo_tiny_cpu.yaml, 2 tiny steps): actor pinned to the head (`node_a`), the vLLM rollout engine
    to the worker node (`node_b`); weights cross nodes at every push."""
    from llmray.data import tasks

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    rng = random.Random(5)
    (prompts / "part-00000.jsonl").write_text("".join(
        json.dumps(tasks.prompt_record(tasks.make_task(rng, kind))) + "\n" for kind in ("add", "sub", "max", "repeat")))
    run_dir, out = tmp_path / "run", tmp_path / "model"
    job_id = submit(client, (
        f"python jobs/ppo.py --config jobs/configs/ppo/grpo_tiny_cpu.yaml model={tiny_model_dir} "
        f"prompts={prompts} eval_prompts={prompts} output={out} run_dir={run_dir} steps=2 eval_every=-1 "
        "algo.n_samples=4 algo.prompts_per_step=2 algo.minibatch_size=8 rollout.max_tokens=8 "
        "rollout.max_model_len=128 rollout.kv_cache_gb=0.25 checkpoint.every_n_steps=100 ray.resource_wait_s=60 "
        "'actor.resources={node_a: 1}' 'rollout.resources={node_b: 1}'"), runtime_env=runtime_env)
    run = wait(client, job_id, timeout_s=JOB_TIMEOUT_S)
    assert run.ok, run.logs[-3000:]
    placed = json.loads((run_dir / "nodes.json").read_text())
    head, worker = _node_with(two_node_cluster, "node_a"), _node_with(two_node_cluster, "node_b")
    assert [r["node_id"] for r in placed["actor"]] == [head]
    assert [r["node_id"] for r in placed["rollout"]] == [worker]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "rollout/reward_mean" in r]
    assert len(steps) == 2, rows
    from llmray import artifacts

    assert artifacts.is_complete(out, "model") and (out / "config.json").is_file()


# --- token auth ------------------------------------------------------------------------------

def test_jobs_api_refuses_requests_without_the_token(two_node_cluster):
    import httpx

    body = {"entrypoint": "echo pwned"}
    url = f"{two_node_cluster.dashboard_url}/api/jobs/"
    assert httpx.post(url, json=body, timeout=10).status_code == 401
    bad = {"Authorization": "Bearer " + "0" * 48}
    assert httpx.post(url, json=body, headers=bad, timeout=10).status_code == 403
    assert httpx.get(url, headers=bad, timeout=10).status_code == 403
    ok = httpx.get(url, headers=two_node_cluster.auth_headers, timeout=10)
    assert ok.status_code == 200 and all(j["entrypoint"] != "echo pwned" for j in ok.json())


def test_sdk_with_a_wrong_token_is_refused(two_node_cluster):
    from ray.job_submission import JobSubmissionClient

    with pytest.raises(Exception, match=r"(?i)403|forbidden|invalid authentication token"):
        c = JobSubmissionClient(two_node_cluster.dashboard_url, headers={"Authorization": "Bearer wrong"})
        c.submit_job(entrypoint="echo pwned")


def test_ray_job_submit_cli_without_token_is_refused(two_node_cluster):
    env = two_node_cluster.node_env(with_token=False)  # HOME without ~/.ray/auth_token
    r = subprocess.run([two_node_cluster.env["PATH"].split(":")[0] + "/ray", "job", "submit", "--address",
                        two_node_cluster.dashboard_url, "--no-wait", "--", "echo", "pwned"],
                       env=env, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert r.returncode != 0
    assert re.search(r"(?i)token authentication", r.stdout + r.stderr), r.stderr[-1500:]
    import httpx

    listed = httpx.get(f"{two_node_cluster.dashboard_url}/api/jobs/", headers=two_node_cluster.auth_headers,
                       timeout=10).json()
    assert all("pwned" not in j["entrypoint"] for j in listed), "no job was created"


# --- serving auth across nodes -----------------------------------------------------------------

SERVE_KEY_ENV = "LLMRAY_TWO_NODE_DRIVER_KEY"
SERVE_DRIVER = r"""
import json, os, sys, httpx, ray
from ray.util.state import list_actors
from llmray.config import build
from llmray.serving.config import ServeConfig
from llmray.serving.server import start

ray.init(address=os.environ["RAY_ADDRESS"])
head = ray.get_runtime_context().get_node_id()

@ray.remote
class Hold:  # holds every CPU of the head node: the replica must go to the worker
    def node(self):
        return ray.get_runtime_context().get_node_id()

from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
head_cpus = next(n["Resources"]["CPU"] for n in ray.nodes() if n["NodeID"] == head)
hold = Hold.options(num_cpus=head_cpus,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
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


@pytest.mark.timeout(1200)
def test_key_only_on_the_driver_guards_a_replica_on_another_node(two_node_cluster, tiny_model_dir, tmp_path):
    """The driver (a process of its own, with the key in its environment) starts the app while the head's
    CPUs are held, so the replica lands on the worker node; the key reaches it through the deployment."""
    assert SERVE_KEY_ENV not in os.environ  # the nodes inherit this process's environment: it must lack the key
    env = {**two_node_cluster.env, "RAY_ADDRESS": f"127.0.0.1:{two_node_cluster.gcs_port}",
           SERVE_KEY_ENV: "driver-only-key-0123", "PYTHONPATH": str(ROOT)}
    script = tmp_path / "driver.py"
    script.write_text(SERVE_DRIVER)
    proc = subprocess.run([sys.executable, str(script), str(tiny_model_dir), SERVE_KEY_ENV], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1100)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, (proc.stdout[-3000:], proc.stderr[-3000:])
    out = json.loads(line[7:])
    assert out["replica_nodes"] and all(n != out["head"] for n in out["replica_nodes"]), out
    assert out["no_key"] == 401 and out["metrics_no_key"] == 401 and out["with_key"] == 200, out
