"""Fast checks without Ray: DeepSpeed config generation, LR schedule, checkpoint markers and retention,
the memory estimate, and every bad input refused before any work starts."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from llmray.config import ConfigError, load
from llmray.errors import UserError


def test_ds_config_from_typed_settings():
    from llmray.train.deepspeed_config import DeepSpeedConfig, OptimizerConfig, ds_config

    c = ds_config(DeepSpeedConfig(zero_stage=3, offload_optimizer=True, offload_params=True, precision="bf16",
                                  micro_batch_size=2, grad_accum_steps=4), OptimizerConfig(grad_clip=0.5), world_size=8)
    assert c["train_batch_size"] == 2 * 4 * 8
    assert c["gradient_clipping"] == 0.5 and c["bf16"]["enabled"]
    z = c["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert c["zero_force_ds_cpu_optimizer"] is False
    assert z["reduce_scatter"]  # stage 3: always DeepSpeed's reduce-scatter


def test_ds_config_reduces_whole_buckets_on_shared_memory_at_zero_1_and_2():
    """On shm collectives ZeRO-1/2 all-reduce each gradient bucket in place (no per-rank flatten)."""
    from llmray.train.deepspeed_config import DeepSpeedConfig, OptimizerConfig, ds_config

    def rs(shm: bool, **kw) -> bool:
        cfg = ds_config(DeepSpeedConfig(**kw), OptimizerConfig(), world_size=2, shm=shm)
        return cfg["zero_optimization"]["reduce_scatter"]

    assert not rs(True, zero_stage=1) and not rs(True, zero_stage=2)
    assert rs(False, zero_stage=1) and rs(False, zero_stage=2)  # gloo / nccl: DeepSpeed's default
    assert rs(True, zero_stage=3) and rs(True, zero_stage=2, offload_optimizer=True)


@pytest.mark.parametrize("override, key", [
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("deepspeed.offload_optimizer=true", "deepspeed.offload_optimizer"),  # with the default stage 1
    ("deepspeed.offload_params=true", "deepspeed.offload_params"),
    ("optimizer.lr=0", "optimizer.lr"),
    ("deepspeed.precision=fp8", "deepspeed.precision"),
])
def test_bad_settings_name_the_key(override, key):
    from llmray.stages.pretrain import PretrainConfig

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(PretrainConfig, None, [override])


def test_param_groups_decay_only_matrices(tiny_model_dir):
    from llmray.models.factory import load_pretrained
    from llmray.train.engine import param_groups

    model, _ = load_pretrained(tiny_model_dir)
    decay, no_decay = param_groups(model, 0.1)
    assert len(param_groups(model.model.layers[0].mlp, 0.1)) == 1  # only matrices: no empty group
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(no_decay["params"]) == 2 * model.config.num_hidden_layers + 1  # RMSNorm weights


def test_lr_warmup_then_cosine_to_floor():
    from llmray.train.deepspeed_config import OptimizerConfig, lr_at

    opt = OptimizerConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, opt, 110) == pytest.approx(0.1)
    assert lr_at(9, opt, 110) == pytest.approx(1.0)
    assert lr_at(60, opt, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, opt, 110) == pytest.approx(0.1)
    assert lr_at(500, opt, 110) == pytest.approx(0.1)


class _FakeEngine:
    """Stands in for a DeepSpeed engine's save/load only (the real one is exercised in the Ray tests)."""

    def save_checkpoint(self, path, tag, save_latest=True):
        (Path(path) / tag).mkdir(parents=True)
        (Path(path) / tag / "model.pt").write_text("weights")

    def load_checkpoint(self, path, tag, **kw):
        return (str(Path(path) / tag), {}) if (Path(path) / tag).is_dir() else (None, None)


def test_checkpoint_marker_latest_and_retention(tmp_path):
    from llmray.train import checkpoint as ck

    e = _FakeEngine()
    for step in (10, 20, 30):
        ck.save(e, tmp_path, step, {"consumed_chunks": step, "model_shape": {"hidden_size": 192}},
                {"rng": ck.rng_state()}, keep_last=2)
    assert [s for s, _ in ck.list_complete(tmp_path)] == [20, 30]  # 10 deleted after 30 completed
    # A save cut off mid-way (no marker) is ignored, and retention never deletes it for a complete one.
    cut = ck.step_dir(tmp_path, 40)
    (cut / "state").mkdir(parents=True)
    assert ck.find_latest(tmp_path) == ck.step_dir(tmp_path, 30)
    ck.retain(tmp_path, 1)
    assert [s for s, _ in ck.list_complete(tmp_path)] == [30] and cut.exists()
    meta, rank_state = ck.load(e, ck.find_latest(tmp_path))
    assert meta["step"] == 30 and meta["consumed_chunks"] == 30 and "rng" in rank_state
    with pytest.raises(UserError, match="incomplete"):
        ck.load(e, cut)
    with pytest.raises(UserError, match="model_shape"):
        ck.load(e, ck.find_latest(tmp_path), expect={"model_shape": {"hidden_size": 1}, "consumed_chunks": 30})
    # Re-saving a step whose earlier save was cut off replaces the leftovers.
    ck.save(e, tmp_path, 40, {"consumed_chunks": 40})
    assert ck.find_latest(tmp_path) == cut and ck.read_meta(cut)["step"] == 40


def test_memory_estimate_follows_zero_accounting():
    from llmray.models.factory import ModelConfig
    from llmray.train.deepspeed_config import DeepSpeedConfig
    from llmray.train.memory import estimate

    shape = ModelConfig(preset="7b").resolved()
    n = shape.num_params()
    e0 = estimate(shape, DeepSpeedConfig(zero_stage=0, precision="bf16"), 2048, 8, on_gpu=True)
    # 2 + 2 + 12 bytes per parameter, plus the transient flattened copy of the bf16 weights (2) and
    # foreach AdamW's step() temporaries (8).
    assert e0.weights_gb + e0.grads_gb + e0.optimizer_gb == pytest.approx(26 * n / 1024**3)
    e1 = estimate(shape, DeepSpeedConfig(zero_stage=1, precision="bf16"), 2048, 8, on_gpu=True)
    assert e1.optimizer_gb == pytest.approx(e0.optimizer_gb / 8)
    e3 = estimate(shape, DeepSpeedConfig(zero_stage=3, precision="bf16"), 2048, 8, on_gpu=True)
    assert e3.weights_gb == pytest.approx(e0.weights_gb / 8) and e3.grads_gb == pytest.approx(e0.grads_gb / 8)
    off = estimate(shape, DeepSpeedConfig(zero_stage=3, precision="bf16", offload_optimizer=True), 2048, 8, on_gpu=True)
    assert off.device_gb == pytest.approx(e3.device_gb - e3.optimizer_gb) \
        and off.host_gb == pytest.approx(e3.optimizer_gb)
    ck = estimate(shape, DeepSpeedConfig(zero_stage=3, precision="bf16", activation_checkpointing=True), 2048, 8,
                  on_gpu=True)
    assert ck.activations_gb < e3.activations_gb / 5


# ---- bad input, refused before launch -------------------------------------------------------------

def _pre(dataset, *extra):
    from llmray.stages.pretrain import PretrainConfig

    return load(PretrainConfig, None, [f"dataset={dataset}", "scaling.num_workers=2", *extra])


def test_missing_and_empty_dataset(tmp_path, packed_dataset):
    from llmray.stages.pretrain import prepare

    with pytest.raises(UserError, match="does not exist"):
        prepare(_pre(tmp_path / "nope", f"run_dir={tmp_path}/r"))
    empty = tmp_path / "empty"
    shutil.copytree(packed_dataset, empty)
    for f in (empty / "shards").iterdir():
        f.unlink()
    with pytest.raises(UserError, match="no shards"):
        prepare(_pre(empty, f"run_dir={tmp_path}/r"))
    incomplete = tmp_path / "incomplete"
    shutil.copytree(packed_dataset, incomplete)
    (incomplete / "manifest.json").unlink()
    with pytest.raises(UserError, match="not a complete artifact"):
        prepare(_pre(incomplete, f"run_dir={tmp_path}/r"))


def test_vocab_mismatch_seq_len_and_memory(tmp_path, packed_dataset, tokenizer_dir):
    from llmray.stages.pretrain import prepare

    other = tmp_path / "ds"
    shutil.copytree(packed_dataset, other)
    man = json.loads((other / "manifest.json").read_text())
    man["metrics"]["vocab_size"] = 4096
    (other / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(UserError, match="vocabulary mismatch"):
        prepare(_pre(other, f"run_dir={tmp_path}/r"))
    with pytest.raises(UserError, match="model.max_position_embeddings"):
        prepare(_pre(packed_dataset, f"run_dir={tmp_path}/r", "model.max_position_embeddings=32"))
    with pytest.raises(UserError, match="smaller than the tokenizer"):
        prepare(_pre(packed_dataset, f"run_dir={tmp_path}/r", "model.vocab_size=300"))
    with pytest.raises(UserError, match=r"exceeds memory_budget_gb=0\.001.*deepspeed\.zero_stage=2"):
        prepare(_pre(packed_dataset, f"run_dir={tmp_path}/r", "memory_budget_gb=0.001"))


def test_checkpoint_of_other_model_shape_refused(tmp_path, packed_dataset):
    from llmray.train import checkpoint as ck
    from llmray.stages.pretrain import prepare

    run_dir = tmp_path / "r"
    ck.save(_FakeEngine(), run_dir / "checkpoints", 5, {"consumed_chunks": 5, "model_shape": {"hidden_size": 4096}})
    with pytest.raises(UserError, match="model_shape"):
        prepare(_pre(packed_dataset, f"run_dir={run_dir}"))
    # The same run with resume=never starts fresh and passes the checks.
    prepare(_pre(packed_dataset, f"run_dir={run_dir}", "checkpoint.resume=never"))


def test_bad_preference_data_named_before_work(tmp_path, tiny_model_dir):
    from llmray.stages.dpo import DPOConfig, run as dpo_run
    from llmray.stages.reward_model import RewardModelConfig, run as rm_run

    good = {"prompt": [{"role": "user", "content": "add 1 2"}], "chosen": "The answer is 3.",
            "rejected": "The answer is 4."}
    f = tmp_path / "pref.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps({**good, "rejected": "The answer is 3."}) + "\n")
    for cls, fn in ((DPOConfig, dpo_run), (RewardModelConfig, rm_run)):
        cfg = load(cls, None, [f"model={tiny_model_dir}", f"data={f}", f"run_dir={tmp_path}/run"])
        with pytest.raises(UserError, match=r"pref\.jsonl:2: chosen and rejected are identical"):
            fn(cfg)
    bad = {k: v for k, v in good.items() if k != "chosen"}
    f.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    cfg = load(DPOConfig, None, [f"model={tiny_model_dir}", f"data={f}", f"run_dir={tmp_path}/run"])
    with pytest.raises(UserError, match=r"pref\.jsonl:3: missing field 'chosen'"):
        dpo_run(cfg)
    assert not (tmp_path / "run").exists()  # refused before any work (no run directory)


def test_launch_reserves_a_cpu_for_the_streamed_read_and_names_it(monkeypatch, tmp_path):
    """2 workers x 1 CPU on a 2-CPU cluster left nothing for the parquet read tasks: the run hung
    with the read PENDING forever. Now the pre-launch check asks for the extra CPU and names it."""
    from llmray import cluster
    from llmray.stages.pretrain import PretrainConfig
    from llmray.train.trainer import launch

    seen = {}

    def refuse(needed, what, timeout_s):
        seen.update(needed=needed, what=what)
        raise cluster.ClusterError(f"{what} needs CPU={needed['CPU']:g}")

    monkeypatch.setattr(cluster, "init_ray", lambda *a, **k: {})
    monkeypatch.setattr(cluster, "require_resources", refuse)
    cfg = load(PretrainConfig, None, [f"run_dir={tmp_path / 'run'}", "scaling.num_workers=2"])
    with pytest.raises(cluster.ClusterError, match=r"pretrain \(2 workers x 1 CPU \+ 1 CPU to read the data\)"):
        launch(cfg, None, None, "pretrain", ingest_cpus=1.0)
    assert seen["needed"] == {"CPU": 3.0}
    with pytest.raises(cluster.ClusterError):
        launch(cfg, None, None, "sft")  # an in-memory dataset needs no read tasks
    assert seen["needed"] == {"CPU": 2.0}


def test_a_stale_ray_train_checkpoint_record_is_dropped(tmp_path):
    """Ray Train keeps a record of every reported checkpoint and refused to start when one of them
    was deleted by keep_last: resubmitting an interrupted run failed instead of resuming."""
    from llmray.train.trainer import RAY_TRAIN_SNAPSHOT, forget_ray_train_snapshot

    assert not forget_ray_train_snapshot(tmp_path)
    (tmp_path / RAY_TRAIN_SNAPSHOT).write_text('{"checkpoints": ["step_00000010"]}')
    assert forget_ray_train_snapshot(tmp_path)
    assert not (tmp_path / RAY_TRAIN_SNAPSHOT).exists()


def test_fit_to_workers_refuses_too_few_rows_and_evens_out_the_held_rows():
    from llmray.errors import UserError
    from llmray.stages.dpo import DPOConfig
    from llmray.train.trainer import fit_to_workers

    cfg = load(DPOConfig, None, ["data=/d/pairs.jsonl", "scaling.num_workers=2", "deepspeed.micro_batch_size=4"])
    assert fit_to_workers(cfg, list(range(8)), list(range(7)), "pairs") == list(range(6))
    with pytest.raises(UserError, match=r"/d/pairs.jsonl: 7 training pairs, fewer than .* \(8\)"):
        fit_to_workers(cfg, list(range(7)), [], "pairs")


def test_setup_env_puts_the_environments_own_ninja_first(monkeypatch):
    """DeepSpeed compiles with the first `ninja` on PATH; the environment's own one must win over a
    system ninja, whose build log another version cannot match (every switch rebuilt the op)."""
    import os
    import sys

    from llmray.train.engine import setup_env

    bindir = os.path.dirname(sys.executable)
    assert os.path.isfile(os.path.join(bindir, "ninja")), "DeepSpeed's ninja should be in the environment"
    monkeypatch.setenv("PATH", f"/usr/bin{os.pathsep}/bin")
    setup_env()
    assert os.environ["PATH"].split(os.pathsep)[:2] == [bindir, "/usr/bin"]
    setup_env()  # idempotent
    assert os.environ["PATH"].split(os.pathsep).count(bindir) == 1
