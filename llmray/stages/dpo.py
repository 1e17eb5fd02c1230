"""Stage `dpo`: direct preference optimisation on preference pairs with Ray Train + DeepSpeed, against a
frozen reference whose log-probabilities are computed once (the task and loss are `llmray.train.dpo`).

Local:   llmray dpo --config jobs/configs/dpo/tiny_cpu.yaml
Cluster: ray job submit --working-dir . -- python jobs/dpo.py --config jobs/configs/dpo/tiny_cpu.yaml
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmray.config import check, to_dict
from llmray.errors import UserError
from llmray.models.model_dir import check_model_dir, load_tokenizer_checked, model_shape
from llmray.train.dpo import DPOTask, with_ref_logps
from llmray.train.trainer import FineTuneConfig, fit_to_workers


@dataclass(frozen=True)
class DPOConfig(FineTuneConfig):
    """`model`: the policy's start (usually the SFT model). `data`: JSONL {"prompt": [messages],
    "chosen": str, "rejected": str} per line."""

    ref_model: str | None = None
    """Frozen reference; default: the same as `model`."""
    beta: float = 0.1
    """Strength of the KL anchor to the reference (higher = stay closer)."""
    label_smoothing: float = 0.0
    """Probability that a pair's label is flipped (cDPO); 0 = plain DPO."""
    run_dir: str = "runs/dpo"
    output: str = "artifacts/dpo"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        check(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")


Config = DPOConfig
MEMORY_COPIES = 2
"""Forward passes held at once: the chosen and the rejected sequence of each pair."""


def run(cfg: DPOConfig) -> dict:
    import pyarrow.parquet as pq

    from llmray.cluster import init_ray
    from llmray.train.chat_data import preference_rows
    from llmray.train.trainer import check_memory, check_resume, finish, launch, loop_spec, small_dataset

    hf = check_model_dir(cfg.model)
    ref_dir = cfg.ref_model or cfg.model
    ref_hf = check_model_dir(ref_dir, "ref_model")
    if ref_hf["vocab_size"] != hf["vocab_size"]:
        raise UserError(f"ref_model {ref_dir} has vocab_size {ref_hf['vocab_size']} but model {cfg.model} has "
                        f"{hf['vocab_size']}; the reference must share the policy's tokenizer")
    tok = load_tokenizer_checked(cfg.model, hf)
    shape = model_shape(hf)
    if cfg.seq_len > shape.max_position_embeddings:
        raise UserError(f"seq_len {cfg.seq_len} exceeds the model context ({shape.max_position_embeddings})")
    train, held, stats = preference_rows(cfg.data, tok, cfg.seq_len, cfg.eval_fraction, cfg.max_examples)
    held = fit_to_workers(cfg, train, held, "pairs")
    expect = {"model_shape": to_dict(shape), "objective": "dpo"}
    check_resume(cfg, expect)
    check_memory(cfg, shape, cfg.seq_len, copies=MEMORY_COPIES)

    init_ray(cfg.ray)
    run_dir = Path(cfg.run_dir).resolve()
    ref_abs = str(Path(ref_dir).resolve())
    train_file, cached = with_ref_logps(ref_abs, train, run_dir / "data", "train")
    eval_rows = None
    if held:
        eval_file, _ = with_ref_logps(ref_abs, held, run_dir / "data", "eval")
        t = pq.read_table(eval_file)
        import numpy as np

        eval_rows = {c: np.asarray(t.column(c).to_pylist()) for c in t.column_names}
    stats["ref_logps_cached"] = cached
    cols = ["chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels", "ref_chosen", "ref_rejected"]
    ds = small_dataset(train_file, cols)
    task = DPOTask(init_from=str(Path(cfg.model).resolve()), beta=cfg.beta, label_smoothing=cfg.label_smoothing)
    spec = loop_spec(cfg, task, shape, len(train), expect, eval_rows)
    print(f"[llmray] dpo: {stats}", flush=True)
    result = launch(cfg, spec, ds, "dpo")
    return finish(cfg, "dpo", to_dict(cfg), result, [cfg.model] + ([ref_dir] if cfg.ref_model else []), stats)
