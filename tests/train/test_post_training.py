"""SFT (LoRA, merged on export), reward model and DPO end to end on real Ray Train + DeepSpeed (1 CPU worker each)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from llmray.config import load


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    from llmray.data import tasks

    rng = random.Random(1)
    f = tmp_path_factory.mktemp("sft") / "part-00000.jsonl"
    f.write_text("".join(json.dumps(tasks.sft_record(tasks.make_task(rng))) + "\n" for _ in range(240)))
    return f


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory) -> Path:
    from llmray.data import tasks

    # Chosen: the gold answer; rejected: an off-format reply. Learnable by a tiny model in a few steps
    # (a wrong number in the right format is not, within this budget).
    rng = random.Random(2)
    f = tmp_path_factory.mktemp("pref") / "part-00000.jsonl"
    bad = ["no idea", "I cannot say that.", "maybe later", "banana banana banana"]
    recs = []
    for _ in range(96):
        rec = tasks.preference_record(tasks.make_task(rng), rng)
        recs.append({**rec, "rejected": rng.choice(bad)})
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return f


def _rows(run_dir: Path) -> list[dict]:
    from llmray.report.metrics import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]


def _common(tmp_path, name):
    return [f"run_dir={tmp_path / name}", f"output={tmp_path / (name + '_model')}", "scaling.num_workers=1",
            "log_every=5", "checkpoint.every_n_steps=100", "ray.resource_wait_s=30"]


def test_sft_lora_merged_on_export(ray_cluster, tiny_model_dir, chat_file, tmp_path):
    from llmray.stages.sft import SFTConfig, run

    cfg = load(SFTConfig, None, [f"model={tiny_model_dir}", f"data={chat_file}", "seq_len=128", "max_steps=12",
                                 "deepspeed.micro_batch_size=4", "deepspeed.zero_stage=2", "optimizer.lr=5e-3",
                                 "optimizer.warmup_steps=2", "lora.enabled=true", "lora.r=8", "eval_fraction=0.1",
                                 *_common(tmp_path, "sft")])
    out = run(cfg)
    rows = _rows(tmp_path / "sft")
    assert len(rows) == 12
    assert sum(r["train/loss"] for r in rows[-3:]) < sum(r["train/loss"] for r in rows[:3]) - 0.3
    assert out["eval/loss"] > 0 and out["conversations"] == 240 and out["train_rows"] < 216  # packed
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "sft_model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    keys = set(merged.state_dict())
    assert not any("lora" in k for k in keys) and keys == set(base.state_dict())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged.state_dict()[q], base.state_dict()[q])  # adapters were merged in
    emb = "model.embed_tokens.weight"
    assert torch.equal(merged.state_dict()[emb], base.state_dict()[emb])  # only adapted modules changed


def test_reward_model_pairwise_training(ray_cluster, tiny_model_dir, pref_file, tmp_path):
    from llmray.stages.reward_model import RewardModelConfig, run
    from llmray.train.reward_model import load_reward_model

    cfg = load(RewardModelConfig, None, [f"model={tiny_model_dir}", f"data={pref_file}", "seq_len=96", "max_steps=20",
                                         "deepspeed.micro_batch_size=8", "optimizer.lr=2e-3",
                                         "optimizer.warmup_steps=2", "margin=0.0", "eval_fraction=0.17",
                                         *_common(tmp_path, "rm")])
    out = run(cfg)
    rows = _rows(tmp_path / "rm")
    first = sum(r["train/loss"] for r in rows[:4]) / 4
    last = sum(r["train/loss"] for r in rows[-4:]) / 4
    assert last < first - 0.1, (first, last)
    assert out["eval/accuracy"] >= 0.75 and out["eval/margin"] > 0
    model, tok = load_reward_model(tmp_path / "rm_model")
    assert model.config.num_labels == 1
    ids = list(tok.apply_chat_template([{"role": "user", "content": "add 2 3"},
                                        {"role": "assistant", "content": "The answer is 5."}],
                                       tokenize=True, return_dict=True)["input_ids"])
    with torch.no_grad():
        r = model(input_ids=torch.tensor([ids])).logits[0, 0]
        padded = model(input_ids=torch.tensor([ids + [tok.pad_token_id] * 7])).logits[0, 0]
    assert r.item() == pytest.approx(padded.item(), abs=1e-4)  # scored at the last non-pad token


def test_dpo_raises_margins_with_cached_reference(ray_cluster, tiny_model_dir, pref_file, tmp_path):
    import math

    from llmray.stages.dpo import DPOConfig, run

    cfg = load(DPOConfig, None, [f"model={tiny_model_dir}", f"data={pref_file}", "seq_len=96", "max_steps=12",
                                 "beta=0.1", "deepspeed.micro_batch_size=8", "optimizer.lr=1e-3",
                                 "optimizer.warmup_steps=2", "eval_fraction=0.17", *_common(tmp_path, "dpo")])
    out = run(cfg)
    rows = _rows(tmp_path / "dpo")
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 1
    assert rows[-1]["train/loss"] < math.log(2) - 0.05
    assert rows[-1]["train/reward_margin"] > 0.1 and rows[-1]["train/accuracy"] > 0.5
    assert "eval/accuracy" in out and "eval/reward_margin" in out
    assert out["ref_logps_cached"] is False
    # The reference log-probs were computed once; the same reference + data finds them cached.
    from llmray.models.tokenizer import load_tokenizer
    from llmray.train.dpo import with_ref_logps
    from llmray.train.chat_data import preference_rows

    train, _, _ = preference_rows(pref_file, load_tokenizer(tiny_model_dir), 96, 0.17)
    path, cached = with_ref_logps(str(Path(tiny_model_dir).resolve()), train, tmp_path / "dpo" / "data", "train")
    assert cached and path.is_file()
