"""Every config under cluster/ is checked: launcher YAMLs against Ray's own JSON schema, KubeRay
manifests structurally, the runtime_env against pyproject's pins, the security lint on all of
them, and every job script and config they name exists."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import cluster_lint  # tests/ops/cluster_lint.py (pytest puts this dir on sys.path)
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHERS = sorted(p for p in CLUSTER.glob("*.yaml") if p.name != "runtime_env.yaml")
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_cluster_dir_has_what_the_issue_asks():
    names = {p.name for p in LAUNCHERS}
    assert {"aws.yaml", "gcp.yaml"} <= names
    kinds = {d["kind"] for p in KUBERAY for d in _docs(p)}
    assert {"RayCluster", "RayJob"} <= kinds
    assert (CLUSTER / "runtime_env.yaml").is_file()


# --- launcher ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_config_matches_ray_schema(path: Path):
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load(path.read_text())
    jsonschema.validate(cfg, schema)
    validate_config(prepare_config(cfg))  # Ray's own checks after filling in provider defaults


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_node_groups_and_setup(path: Path):
    cfg = yaml.safe_load(path.read_text())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert "GPU" not in head["resources"], "the head is a CPU node"
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    cpu = [n for n, t in workers.items() if not t["resources"].get("GPU")]
    gpu = [n for n, t in workers.items() if t["resources"].get("GPU")]
    assert cpu and len(gpu) >= 2, f"a CPU data group and GPU train/serve groups, got {list(workers)}"
    for n, t in workers.items():
        assert t["min_workers"] == 0 < t["max_workers"], f"{n}: autoscales from 0"
        assert t.get("idle_timeout_s", 0) > 0 or cfg["idle_timeout_minutes"] > 0
        assert t["resources"].get("CPU", 0) > 0, f"{n}: declare resources so the autoscaler can plan"
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"] + 4
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "llmray" in setup
    image = cfg["docker"]["image"]
    import ray

    assert image.startswith(f"rayproject/ray:{ray.__version__}"), f"image {image} must match Ray {ray.__version__}"
    assert cluster_lint.lint_launcher(cfg) == []


# --- KubeRay ----------------------------------------------------------------------------------

def _pod_containers(spec: dict) -> list[tuple[str, dict]]:
    out = [("head", c) for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
    for g in spec.get("workerGroupSpecs") or []:
        out += [(g["groupName"], c) for c in g["template"]["spec"]["containers"]]
    return out


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_structure(path: Path):
    import ray

    docs = _docs(path)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        for key in ("apiVersion", "kind", "metadata", "spec"):
            assert key in doc, f"{path.name}: missing {key}"
        assert doc["metadata"].get("name"), f"{path.name}: metadata.name"
        if doc["kind"] not in RAY_KINDS:
            assert (doc["apiVersion"], doc["kind"]) in {("v1", "PersistentVolumeClaim"), ("v1", "Service"),
                                                        ("networking.k8s.io/v1", "NetworkPolicy")}
            continue
        assert doc["apiVersion"] == "ray.io/v1"
        specs = cluster_lint.ray_cluster_specs(doc)
        assert len(specs) == 1, f"{path.name}: one cluster spec"
        spec = specs[0]
        assert spec["rayVersion"] == ray.__version__
        assert spec["enableInTreeAutoscaling"] is True
        for g in spec.get("workerGroupSpecs") or []:
            assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"] and g["maxReplicas"] >= 1
        for group, c in _pod_containers(spec):
            assert c.get("image"), f"{path.name} {group}: image"
            for part in ("requests", "limits"):
                res = c.get("resources", {}).get(part, {})
                assert {"cpu", "memory"} <= set(res), f"{path.name} {group}: resources.{part} cpu+memory"
            if "gpu" in group:
                assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, f"{path.name} {group}: GPU limit"
        assert cluster_lint.lint_kuberay(doc) == []


def test_rayservice_serves_a_valid_autoscaling_app():
    import importlib

    from ray.serve.schema import ServeDeploySchema

    (doc,) = _docs(CLUSTER / "kuberay" / "rayservice.yaml")
    serve = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    for app in serve.applications:
        module, attr = app.import_path.split(":")
        assert hasattr(importlib.import_module(module), attr), app.import_path
        assert app.args["model"].startswith("/mnt/shared/")
        assert (app.args["deployment"]["autoscaling"]["max_replicas"]
                > app.args["deployment"]["autoscaling"]["min_replicas"])
    spec = doc["spec"]["rayClusterConfig"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "$(MY_POD_IP)"  # the operator must reach it
    env = {e["name"] for e in head["template"]["spec"]["containers"][0]["env"]}
    assert {"MY_POD_IP", "LLMRAY_API_KEY"} <= env


def test_kuberay_rayjobs_name_existing_scripts_and_configs():
    from llmray import config as cfglib
    from llmray import stages

    jobs = [d for p in KUBERAY for d in _docs(p) if d["kind"] == "RayJob"]
    assert jobs
    by_job = {s.job: s for s in stages.STAGES.values()}
    for doc in jobs:
        entry = doc["spec"]["entrypoint"].split()
        script, config = entry[1], entry[entry.index("--config") + 1]
        assert script in by_job and (ROOT / script).is_file(), f"{doc['metadata']['name']}: {script}"
        assert (ROOT / config).is_file(), f"{doc['metadata']['name']}: {config}"
        overrides = [t for t in entry[entry.index("--config") + 2:]]
        cfglib.load(by_job[script].config_class(), ROOT / config, overrides)  # overrides are valid keys
        assert all("/mnt/shared/" in o for o in overrides), "artifacts go to the shared volume"
        renv = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        assert renv["working_dir"] and "pip" not in renv


def _rayjob_configs() -> dict:
    """stage name -> the config its RayJob runs (shipped config + the entrypoint's overrides)."""
    from llmray import config as cfglib
    from llmray import stages

    by_job = {s.job: s for s in stages.STAGES.values()}
    out = {}
    for doc in (d for p in KUBERAY for d in _docs(p) if d["kind"] == "RayJob"):
        entry = doc["spec"]["entrypoint"].split()
        stage = by_job[entry[1]]
        i = entry.index("--config")
        out[stage.name] = cfglib.load(stage.config_class(), ROOT / entry[i + 1], entry[i + 2:])
    return out


def _paths(cfg, prefix: str = "") -> dict[str, str]:
    import dataclasses

    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out.update(_paths(v, f"{prefix}{f.name}."))
        elif isinstance(v, str) and (v.startswith(("/", "artifacts/", "runs/")) or "://" in v):
            out[prefix + f.name] = v
    return out


def test_kuberay_rayjobs_keep_every_path_on_the_shared_volume():
    """A relative path lands in the job's temporary working copy, an absolute one outside /mnt/shared
    on a volume no pod mounts: either way the next stage (or a resumed run) would not find it."""
    for stage, cfg in _rayjob_configs().items():
        for key, path in _paths(cfg).items():
            if "://" in path:  # an object-store input (clean-dedup reads your bucket)
                continue
            assert path.startswith("/mnt/shared/"), f"rayjob-{stage}: {key}={path} is not on the shared volume"


def test_kuberay_rayjobs_chain_through_the_shared_volume():
    c = _rayjob_configs()
    assert c["tokenizer"].corpus == c["corpus"].output
    assert c["pack"].input == c["clean-dedup"].output
    assert c["pack"].tokenizer == c["tokenizer"].output
    assert c["pretrain"].dataset == c["pack"].output
    assert c["sft"].model == c["pretrain"].output
    assert c["sft"].data == c["corpus"].output + "/sft"


def test_kuberay_manifests_are_up_to_date_with_the_stage_registry():
    """Stages that gained a job script get a RayJob: rerun cluster/kuberay/generate.py."""
    r = subprocess.run([sys.executable, str(CLUSTER / "kuberay" / "generate.py"), "--check"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


# --- runtime_env ------------------------------------------------------------------------------

def test_runtime_env_pins_match_pyproject():
    import tomllib

    from llmray.submit import load_runtime_env

    env = load_runtime_env(CLUSTER / "runtime_env.yaml")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    want = sorted(d.replace(" ", "") for d in deps if not re.match(r"ray(\[|=|$)", d))
    assert sorted(env["pip"]["packages"]) == want
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert "pip" not in load_runtime_env(CLUSTER / "runtime_env.yaml", pip=False)


def test_runtime_env_errors_name_the_problem(tmp_path):
    from llmray.config import ConfigError
    from llmray.submit import load_runtime_env

    bad = tmp_path / "env.yaml"
    bad.write_text("env_vars:\n  WORKERS: 4\n")
    with pytest.raises(ConfigError, match=r"env_vars.WORKERS must be a string"):
        load_runtime_env(bad)
    bad.write_text("pipp: [torch]\n")
    with pytest.raises(ConfigError, match=r"unknown runtime_env key 'pipp'"):
        load_runtime_env(bad)


# --- security lint ----------------------------------------------------------------------------

def test_no_shipped_config_exposes_the_dashboard():
    files = [*CLUSTER.rglob("*.yaml"), *(ROOT / "serving").glob("*.yaml"), *(ROOT / "jobs" / "configs").rglob("*.yaml")]
    problems = [f"{p.relative_to(ROOT)}: {m}" for p in files for m in cluster_lint.lint_text(p.read_text())]
    assert not problems, "\n".join(problems)


def test_lint_catches_an_exposed_dashboard_and_missing_auth():
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    cfg["head_start_ray_commands"] = ["ray stop", "ray start --head --port=6379 --dashboard-host=0.0.0.0"]
    problems = cluster_lint.lint_launcher(cfg)
    assert any("0.0.0.0" in p for p in problems) and any("RAY_AUTH_MODE" in p for p in problems)

    doc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    doc["spec"].pop("authOptions")
    doc["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] = "0.0.0.0"
    doc["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    problems = cluster_lint.lint_kuberay(doc)
    assert len(problems) == 3, problems
    assert cluster_lint.lint_text("rayStartParams:\n  dashboard-host: '0.0.0.0'\n") == [
        "line 2: dashboard-host: '0.0.0.0'"]


# --- everything that names a job script or config names an existing one -----------------------

def test_docs_and_cluster_files_name_existing_jobs_and_configs():
    files = [*CLUSTER.rglob("*.yaml"), *CLUSTER.rglob("*.py"), ROOT / "docs" / "operations.md",
             ROOT / "docs" / "security.md"]
    missing = []
    for f in files:
        if not f.is_file():
            missing.append(f"{f.relative_to(ROOT)} itself")
            continue
        for ref in set(re.findall(r"(?:jobs|cluster|serving)/[\w./-]+\.(?:py|yaml)", f.read_text())):
            if "<" in ref or "*" in ref or Path(ref).name.startswith("nope"):
                continue  # placeholders, and the missing file of a documented error example
            if not (ROOT / ref).is_file():
                missing.append(f"{f.relative_to(ROOT)} names {ref}")
    assert not missing, "\n".join(missing)
