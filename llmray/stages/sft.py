"""Stage `sft`: supervised fine-tuning of a model artifact on chat JSONL, loss on assistant tokens only.

Local:   llmray sft --config jobs/configs/sft/tiny_cpu.yaml
Cluster: ray job submit --working-dir . -- python jobs/sft.py --config jobs/configs/sft/tiny_cpu.yaml

Conversations are rendered with the tokenizer's ChatML template; labels are -100 outside assistant
turns (multi-turn in one pass); several conversations are packed per row with position_ids restarting
per conversation (no attention across them); optional LoRA through peft, merged on export.

`mix` keeps the language model the run starts from: rows of its pretraining text (the `pack`
artifact) are interleaved with the chat rows, with the LM loss on every token of them, so SFT
teaches the chat format without forgetting the text (held-out perplexity stays near pretraining's).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from llmray.config import check, to_dict
from llmray.errors import UserError
from llmray.models.model_dir import check_model_dir, load_tokenizer_checked, model_shape
from llmray.train.lm import LoRAConfig
from llmray.train.trainer import FineTuneConfig, fit_to_workers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTMixConfig:
    data: str | None = None
    """Packed pretraining dataset (a `pack` artifact: `shards/part-*.parquet` of token ids) mixed into
    the SFT rows with the LM loss on every token; null trains on chat data only."""
    ratio: float = 1.0
    """Rows of general text per chat row (both seq_len tokens long): the general:chat token ratio."""
    lm_coef: float = 1.0
    """The loss is the chat rows' mean (assistant tokens) + lm_coef x the general rows' mean LM loss."""
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.ratio >= 0, "mix.ratio", f"must be >= 0, got {self.ratio}")
        check(self.lm_coef >= 0, "mix.lm_coef", f"must be >= 0, got {self.lm_coef}")


@dataclass(frozen=True)
class SFTConfig(FineTuneConfig):
    model: str = "artifacts/pretrained"
    data: str = "artifacts/corpus/sft"
    """JSONL file or directory: {"messages": [{"role", "content"}, ...]} per line."""
    eval_fraction: float = 0.05
    packing: bool = True
    """Pack several conversations per row (block-diagonal attention); false = one per row, padded."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    mix: SFTMixConfig = field(default_factory=SFTMixConfig)
    run_dir: str = "runs/sft"
    output: str = "artifacts/sft"


Config = SFTConfig


def build_rows(cfg: SFTConfig, tok) -> tuple[list[dict], list[dict], dict]:
    from llmray.stages.pretrain import shard_files
    from llmray.train.chat_data import (encode_chat, general_rows, mix_rows, pack, pad_rows, read_records,
                                        validate_chat)

    recs = read_records(cfg.data, validate_chat, cfg.max_examples)
    encoded, dropped = [], 0
    for r in recs:
        ids, labels = encode_chat(tok, r["messages"])
        if len(ids) > cfg.seq_len:
            dropped += 1
            continue
        encoded.append((ids, labels))
    if not encoded:
        raise UserError(f"every conversation in {cfg.data} is longer than seq_len={cfg.seq_len}; raise seq_len")
    n_eval = int(len(encoded) * cfg.eval_fraction)
    train, held = encoded[: len(encoded) - n_eval], encoded[len(encoded) - n_eval:]
    fn = pack if cfg.packing else pad_rows
    train_rows = fn(train, cfg.seq_len, tok.pad_token_id)
    eval_rows = fn(held, cfg.seq_len, tok.pad_token_id) if held else []
    chat_rows = len(train_rows)
    if cfg.mix.data and cfg.mix.ratio > 0:
        files = shard_files(cfg.mix.data)
        if not files:
            raise UserError(f"mix.data: {cfg.mix.data} has no shards/part-*.parquet (a `pack` artifact)")
        general = general_rows(files, cfg.seq_len, round(cfg.mix.ratio * chat_rows), cfg.mix.seed)
        train_rows = mix_rows(train_rows, general)
    stats = {"conversations": len(recs), "dropped_too_long": dropped, "train_rows": len(train_rows),
             "chat_rows": chat_rows, "general_rows": len(train_rows) - chat_rows, "eval_rows": len(eval_rows),
             "supervised_tokens": sum(sum(1 for label in lab if label != -100) for _, lab in train)}
    return train_rows, eval_rows, stats


def lora_trainable(shape, lora: LoRAConfig) -> int | None:
    """Parameters LoRA trains (its adapters' A and B); None without LoRA (every parameter trains)."""
    if not lora.enabled:
        return None
    h, i, L = shape.hidden_size, shape.intermediate_size, shape.num_layers
    kv = h // shape.num_heads * shape.num_kv_heads
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return L * sum(lora.r * (a + b) for m, (a, b) in dims.items() if m in lora.target_modules)


def run(cfg: SFTConfig) -> dict:

    from llmray.cluster import init_ray
    from llmray.train.chat_data import columns, write_rows
    from llmray.train.lm import CausalLMTask
    from llmray.train.trainer import check_memory, check_resume, finish, launch, loop_spec, small_dataset

    hf = check_model_dir(cfg.model)
    tok = load_tokenizer_checked(cfg.model, hf)
    shape = model_shape(hf)
    if cfg.seq_len > shape.max_position_embeddings:
        raise UserError(f"seq_len {cfg.seq_len} exceeds the model context "
                        f"({shape.max_position_embeddings} in {cfg.model})")
    train_rows, eval_rows, stats = build_rows(cfg, tok)
    eval_rows = fit_to_workers(cfg, train_rows, eval_rows)
    trainable = lora_trainable(shape, cfg.lora)
    expect = {"model_shape": to_dict(shape), "lora": to_dict(cfg.lora) if cfg.lora.enabled else None}
    check_resume(cfg, expect)
    check_memory(cfg, shape, cfg.seq_len, trainable)

    init_ray(cfg.ray)
    run_dir = Path(cfg.run_dir).resolve()
    data_file = write_rows(train_rows, run_dir / "data" / "train.parquet")
    ds = small_dataset(data_file, list(train_rows[0]))
    task = CausalLMTask(tokenizer_dir=str(Path(cfg.model).resolve()), init_from=str(Path(cfg.model).resolve()),
                        seed=cfg.seed, lora=cfg.lora, lm_coef=cfg.mix.lm_coef)
    spec = loop_spec(cfg, task, shape, len(train_rows), expect, columns(eval_rows) if eval_rows else None)
    print(f"[llmray] sft: {stats}", flush=True)
    result = launch(cfg, spec, ds, "sft")
    return finish(cfg, "sft", to_dict(cfg), result, [cfg.model], stats)
