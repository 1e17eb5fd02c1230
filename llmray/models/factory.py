"""Small Llama-architecture decoders (RMSNorm, RoPE, SwiGLU, GQA) from a preset, as transformers models.

Built with transformers' `LlamaForCausalLM` so that a saved directory (config.json, safetensors,
tokenizer files) loads unchanged in transformers and in vLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from llmray.config import ConfigError, check

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


@dataclass(frozen=True)
class ModelConfig:
    preset: Literal["tiny", "small", "base", "1b", "7b", "custom"] = "tiny"
    """Starting shape; the fields below that are set override it."""
    vocab_size: int | None = None
    """Default: the tokenizer's size (set by the stage that knows it)."""
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    """Grouped-query attention: query heads share this many K/V heads (1 = MQA, = num_heads = MHA)."""
    intermediate_size: int | None = None
    """SwiGLU hidden width; default 8/3 · hidden rounded up to a multiple of 32."""
    max_position_embeddings: int | None = None
    tie_embeddings: bool | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02
    """N(0, init_std) for linear and embedding weights; residual projections get init_std/sqrt(2·layers)."""

    def __post_init__(self) -> None:
        s = self.resolved()
        check(s.hidden_size % s.num_heads == 0, "model.num_heads",
              f"must divide model.hidden_size ({s.hidden_size} % {s.num_heads} != 0)")
        check(s.num_heads % s.num_kv_heads == 0, "model.num_kv_heads",
              f"must divide model.num_heads ({s.num_heads} % {s.num_kv_heads} != 0)")
        check((s.hidden_size // s.num_heads) % 2 == 0, "model.hidden_size",
              "hidden_size / num_heads must be even for RoPE")
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "max_position_embeddings"):
            check(getattr(s, key) >= 1, f"model.{key}", "must be >= 1")
        check(self.init_std > 0, "model.init_std", "must be > 0")

    def resolved(self) -> "ModelShape":
        base = PRESETS.get(self.preset, PRESETS["tiny"])
        if self.preset == "custom" and self.hidden_size is None:
            raise ConfigError("model.hidden_size: required when model.preset is custom")
        hidden = self.hidden_size or base.hidden_size
        changes = {k: getattr(self, k) for k in _SHAPE_KEYS if getattr(self, k) is not None}
        if self.hidden_size is not None and self.intermediate_size is None:
            changes["intermediate_size"] = swiglu_width(hidden)
        return replace(base, **changes)


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    tie_embeddings: bool

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, v, i = self.hidden_size, self.vocab_size, self.intermediate_size
        head_dim = h // self.num_heads
        attn = h * h * 2 + 2 * h * head_dim * self.num_kv_heads  # q, o + k, v
        mlp = 3 * h * i
        per_layer = attn + mlp + 2 * h  # two RMSNorm weights
        emb = v * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + emb + h


_SHAPE_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
               "intermediate_size", "max_position_embeddings", "tie_embeddings")


def swiglu_width(hidden: int, multiple_of: int = 32) -> int:
    return multiple_of * math.ceil(int(8 * hidden / 3) / multiple_of)


PRESETS: dict[str, ModelShape] = {
    # ~1.2M parameters at a 2k vocabulary: unit and integration tests.
    "tiny": ModelShape(2048, 192, 2, 4, 2, 512, 512, True),
    # ~12M parameters at an 8k vocabulary: the demo pipeline on a laptop CPU.
    "small": ModelShape(8192, 384, 6, 6, 2, 1024, 1024, True),
    "base": ModelShape(8192, 512, 8, 8, 4, 1376, 1024, True),
    # On paper only: the memory estimator and cluster configs (TinyLlama-like and Llama-2-7B).
    "1b": ModelShape(32000, 2048, 22, 32, 4, 5632, 2048, False),
    "7b": ModelShape(32000, 4096, 32, 32, 32, 11008, 4096, False),
    "custom": ModelShape(8192, 128, 2, 4, 2, 352, 512, True),
}


def hf_config(cfg: ModelConfig, tokenizer: "PreTrainedTokenizerBase | None" = None) -> "LlamaConfig":
    from transformers import LlamaConfig

    s = cfg.resolved()
    vocab = s.vocab_size
    kw = {}
    if tokenizer is not None:
        if cfg.vocab_size is not None and cfg.vocab_size < len(tokenizer):
            raise ConfigError(f"model.vocab_size ({cfg.vocab_size}) is smaller than the tokenizer ({len(tokenizer)})")
        vocab = cfg.vocab_size or len(tokenizer)
        kw = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads,
        max_position_embeddings=s.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=s.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        initializer_range=cfg.init_std,
        torch_dtype="float32",
        **kw,
    )


def build_model(cfg: ModelConfig, tokenizer: "PreTrainedTokenizerBase | None" = None,
                seed: int = 0) -> "LlamaForCausalLM":
    """A freshly initialised decoder: N(0, std) weights, residual projections scaled by 1/sqrt(2L)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config(cfg, tokenizer))
    init_weights(model, cfg.init_std)
    return model


def init_weights(model: "torch.nn.Module", std: float) -> None:
    import torch

    layers = model.config.num_hidden_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2:
                continue  # RMSNorm weights stay 1
            # GPT-2: residual output projections scaled so the residual stream's variance
            # does not grow with depth.
            scale = 1 / math.sqrt(2 * layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            p.normal_(0.0, std * scale)


def save_pretrained(model, tokenizer, out_dir: str | Path) -> Path:
    """config.json + model.safetensors + tokenizer files + generation_config.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def load_pretrained(path: str | Path, dtype: "torch.dtype | None" = None):
    """(model, tokenizer) from a saved directory, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    return model.eval(), tok
