"""`llmray plan`: runs for every shipped config (collected from jobs/configs/, so a new config is covered),
prints the placement and the DeepSpeed / vLLM arguments the stage would use, and fails naming the key
when the plan cannot fit the described cluster. No Ray is started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llmray.config import load
from llmray.errors import UserError
from llmray.plan import make_plan, render, to_json
from llmray.plan.cluster import describe, parse_spec

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*/*.y*ml"))
GPU_CLUSTER = "2x8xH100-80GB"


def needs_gpu(path: Path) -> bool:
    text = path.read_text()
    return "gpus_per_worker: 1" in text or "use_gpu: true" in text or "num_gpus: 1" in text \
        or "gpus_per_worker: 0." in text


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_plan_runs_for_every_shipped_config(path: Path):
    plan = make_plan(str(path), cluster=GPU_CLUSTER, preset="tiny")
    text = render(plan)
    assert text.startswith(f"stage {plan.stage} on {GPU_CLUSTER}")
    d = to_json(plan)
    if plan.stage in ("pretrain", "sft", "reward-model", "dpo", "ppo", "serve"):
        assert plan.slots and "placement" in text
        assert all(s.node.startswith("node") for s in plan.slots)
    if plan.stage in ("pretrain", "sft", "reward-model", "dpo", "ppo"):
        assert plan.deepspeed and "deepspeed config" in text and plan.memory
        for ds in plan.deepspeed.values():
            assert ds["train_batch_size"] == (ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
                                              * len({s.rank for s in plan.slots if s.role in ("train", "actor")}))
    if plan.stage in ("ppo", "serve") and "engine: hf" not in path.read_text():
        assert plan.vllm and "vllm engine kwargs" in text
    if plan.stage == "pipeline":
        assert [p["stage"] for p in d["parts"]][:2] == ["corpus", "clean-dedup"]
    if needs_gpu(path):
        assert any(s.device.startswith("cuda") for s in plan.slots), "a GPU config must land on GPUs"


@pytest.mark.parametrize("path", [p for p in CONFIGS if not needs_gpu(p)],
                         ids=[str(p.relative_to(ROOT)) for p in CONFIGS if not needs_gpu(p)])
def test_cpu_configs_fit_this_kind_of_machine(path: Path):
    """The default cluster is this machine (as `llmray <stage>` starts Ray on it: >= 4 logical CPUs)."""
    make_plan(str(path), cluster="1xcpu:cpus=4:mem=24")


def test_plan_prints_what_the_stage_itself_computes():
    from llmray.rl.config import RLConfig
    from llmray.rl.groups import rollout_init_kwargs, trainer_deepspeed
    from llmray.rl.workers.rollout import rollout_engine
    from llmray.train.deepspeed_config import DeepSpeedConfig, ds_config
    from llmray.config import build
    from llmray.vllm_engine import llm_kwargs

    path = ROOT / "jobs/configs/ppo/gpu_1b.yaml"
    plan = make_plan(str(path), cluster=GPU_CLUSTER, preset="1b")
    cfg = load(RLConfig, path)
    ds = build(DeepSpeedConfig, trainer_deepspeed(cfg, "actor"))
    assert plan.deepspeed["actor"] == ds_config(ds, cfg.actor.optimizer, cfg.actor.num_workers)
    ecfg, extra = rollout_engine(**rollout_init_kwargs(cfg, cfg.model))
    assert plan.vllm["rollout"] == llm_kwargs(cfg.model, ecfg, gpu=True, check_files=False, **extra)
    assert plan.vllm["rollout"]["dtype"] == "bfloat16" and plan.vllm["rollout"]["max_model_len"] == 2048
    assert plan.deepspeed["actor"]["zero_optimization"]["stage"] == 3
    mem = {m["role"]: m["per_worker_gb"] for m in plan.memory}
    assert 5 < mem["actor"] < 40 and mem["ref"] > 1  # 1.1B params, ZeRO-3 over 4, bf16, checkpointing


def test_plan_that_cannot_fit_names_the_key():
    with pytest.raises(UserError, match=r"^rollout\.gpus_per_worker: .*largest node has GPU=0"):
        make_plan(str(ROOT / "jobs/configs/ppo/gpu_1b.yaml"), cluster="1xcpu:cpus=64")
    with pytest.raises(UserError, match=r"^critic\.num_workers: "):
        make_plan(str(ROOT / "jobs/configs/ppo/gpu_1b.yaml"), cluster="1x8xH100-80GB")
    with pytest.raises(UserError, match=r"^scaling\.num_workers: train worker 4 of 8"):
        make_plan(str(ROOT / "jobs/configs/pretrain/1b_zero3.yaml"), cluster="1x4xH100-80GB")
    # memory per worker > GPU memory: the estimate names the DeepSpeed keys to change
    with pytest.raises(UserError, match=r"exceeds the 24 GB of one GPU.*deepspeed\.offload_optimizer=true"):
        make_plan(str(ROOT / "jobs/configs/pretrain/1b_zero3.yaml"), cluster="1x8xA10-24GB",
                  overrides=["memory_budget_gb=null", "deepspeed.micro_batch_size=16"])
    with pytest.raises(UserError, match=r"actor\.deepspeed\.activation_checkpointing=true"):
        make_plan(str(ROOT / "jobs/configs/ppo/gpu_1b.yaml"), cluster=GPU_CLUSTER, preset="1b",
                  overrides=["actor.deepspeed.activation_checkpointing=false"])


def test_cluster_descriptions(tmp_path):
    nodes = parse_spec("1xcpu:cpus=16+2x8xA100-40GB:mem=1024:node_b=1")
    assert [(n.cpus, n.gpus, n.gpu_memory_gb, n.memory_gb) for n in nodes] == [
        (16, 0, 0, 32), (96, 8, 40, 1024), (96, 8, 40, 1024)]
    assert nodes[1].resources == {"node_b": 1.0} and nodes[0].resources == {}
    f = tmp_path / "c.yaml"
    f.write_text("nodes:\n  - {count: 2, cpus: 32, gpus: 4, gpu_type: L4, gpu_memory_gb: 24, memory_gb: 128}\n")
    nodes, label = describe(str(f))
    assert len(nodes) == 2 and nodes[1].gpus == 4 and "8 GPUs" in label
    with pytest.raises(UserError, match="--cluster: cannot read '2x8H100'"):
        parse_spec("2x8H100")
    f.write_text("nodes:\n  - {count: 1, gpus: 2}\n")
    with pytest.raises(UserError, match="cluster.nodes.gpu_memory_gb"):
        describe(str(f))
    assert describe(None)[0][0].name == "local"


def test_cli_prints_the_plan_and_exits_2_naming_the_key():
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "llmray.cli", "plan", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    r = cli("--config", "jobs/configs/ppo/gpu_1b.yaml", "--cluster", GPU_CLUSTER)
    assert r.returncode == 0, r.stderr
    assert "actor+ref" in r.stdout and "deepspeed config (actor)" in r.stdout and "vllm engine kwargs" in r.stdout
    r = cli("--config", "jobs/configs/ppo/gpu_1b.yaml", "--cluster", "2x8xH100-80GB", "rollout.num_workers=64",
            "algo.prompts_per_step=128")
    assert r.returncode == 2 and r.stderr.startswith("llmray plan: error: rollout.num_workers") \
        and "Traceback" not in r.stderr


def test_memory_comes_from_the_model_directory_when_it_exists(tiny_model_dir):
    """No --model-preset needed once the model exists: the shape is read from its config.json, as the
    stage's own check_memory does."""
    from llmray.models.model_dir import check_model_dir, model_shape
    from llmray.stages.sft import SFTConfig
    from llmray.train.trainer import estimate_memory

    path = ROOT / "jobs/configs/sft/tiny_lora.yaml"
    plan = make_plan(str(path), cluster="local", overrides=[f"model={tiny_model_dir}"])
    cfg = load(SFTConfig, path, [f"model={tiny_model_dir}"])
    from llmray.stages.sft import lora_trainable

    shape = model_shape(check_model_dir(str(tiny_model_dir)))
    want = estimate_memory(cfg, shape, cfg.seq_len, lora_trainable(shape, cfg.lora))
    assert plan.memory[0]["per_worker_gb"] == round(want.device_gb, 2) and not plan.notes
    rl = make_plan(str(ROOT / "jobs/configs/ppo/tiny_cpu.yaml"), cluster="local", overrides=[f"model={tiny_model_dir}"])
    assert {m["role"] for m in rl.memory} == {"actor", "critic", "ref"} and all(m["where"] == "host" for m in rl.memory)
