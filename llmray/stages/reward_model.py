"""Stage `reward-model`: a scalar reward head on the SFT decoder, trained on preference pairs with
Ray Train + DeepSpeed (the task and loss are `llmray.train.reward_model`).

Local:   llmray reward-model --config jobs/configs/reward_model/tiny_cpu.yaml
Cluster: ray job submit --working-dir . -- python jobs/reward_model.py --config jobs/configs/reward_model/tiny_cpu.yaml
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmray.config import check, to_dict
from llmray.errors import UserError
from llmray.models.model_dir import check_model_dir, load_tokenizer_checked, model_shape
from llmray.train.reward_model import RewardTask
from llmray.train.trainer import FineTuneConfig, fit_to_workers


@dataclass(frozen=True)
class RewardModelConfig(FineTuneConfig):
    """`model`: the SFT model the reward model starts from (its decoder; a fresh scalar head). `data`:
    JSONL {"prompt": [messages], "chosen": str, "rejected": str} per line."""

    margin: float = 0.0
    """Subtracted from r_chosen - r_rejected in the loss: the pair must win by this much."""
    run_dir: str = "runs/reward_model"
    output: str = "artifacts/reward_model"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.margin >= 0, "margin", "must be >= 0")


Config = RewardModelConfig
MEMORY_COPIES = 2
"""Forward passes held at once: the chosen and the rejected sequence of each pair."""


def run(cfg: RewardModelConfig) -> dict:
    from llmray.cluster import init_ray
    from llmray.train.chat_data import columns, preference_rows, write_rows
    from llmray.train.trainer import check_memory, check_resume, finish, launch, loop_spec, small_dataset

    hf = check_model_dir(cfg.model)
    tok = load_tokenizer_checked(cfg.model, hf)
    shape = model_shape(hf)
    if cfg.seq_len > shape.max_position_embeddings:
        raise UserError(f"seq_len {cfg.seq_len} exceeds the model context ({shape.max_position_embeddings})")
    keep = ["chosen_ids", "rejected_ids"]
    train, held, stats = preference_rows(cfg.data, tok, cfg.seq_len, cfg.eval_fraction, cfg.max_examples)
    train = [{k: r[k] for k in keep} for r in train]
    held = [{k: r[k] for k in keep} for r in held]
    held = fit_to_workers(cfg, train, held, "pairs")
    expect = {"model_shape": to_dict(shape), "head": "reward"}
    check_resume(cfg, expect)
    check_memory(cfg, shape, cfg.seq_len, copies=MEMORY_COPIES)
    init_ray(cfg.ray)
    run_dir = Path(cfg.run_dir).resolve()
    ds = small_dataset(write_rows(train, run_dir / "data" / "train.parquet"), keep)
    task = RewardTask(init_from=str(Path(cfg.model).resolve()), margin=cfg.margin)
    spec = loop_spec(cfg, task, shape, len(train), expect, columns(held) if held else None)
    print(f"[llmray] reward-model: {stats}", flush=True)
    result = launch(cfg, spec, ds, "reward-model")
    return finish(cfg, "reward-model", to_dict(cfg), result, [cfg.model], stats)
