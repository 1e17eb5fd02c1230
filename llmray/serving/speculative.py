"""Speculative decoding settings: n-gram prompt lookup or a small draft model, as vLLM's `speculative_config`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmray.config import check


@dataclass(frozen=True)
class SpeculativeConfig:
    method: Literal["none", "ngram", "draft"] = "none"
    """`ngram`: propose tokens by matching the last n-gram against the context (no extra model);
    `draft`: a smaller model with the same tokenizer proposes tokens the target verifies."""
    num_speculative_tokens: int = 4
    """Tokens proposed per step; the target checks them all in one forward pass."""
    prompt_lookup_min: int = 2
    """n-gram: shortest suffix matched against the context."""
    prompt_lookup_max: int = 4
    """n-gram: longest suffix matched against the context."""
    draft_model: str | None = None
    """draft: HF directory of the draft model (must share the target's tokenizer)."""

    def __post_init__(self) -> None:
        check(1 <= self.num_speculative_tokens <= 16, "speculative.num_speculative_tokens", "must be in [1, 16]")
        check(1 <= self.prompt_lookup_min <= self.prompt_lookup_max, "speculative.prompt_lookup_min",
              f"must be in [1, prompt_lookup_max={self.prompt_lookup_max}]")
        check(self.method != "draft" or bool(self.draft_model), "speculative.draft_model",
              "required when speculative.method is draft")

    @property
    def enabled(self) -> bool:
        return self.method != "none"


def to_vllm(cfg: SpeculativeConfig) -> dict[str, Any] | None:
    """vLLM's `speculative_config` dict, or None when speculation is off."""
    if cfg.method == "none":
        return None
    if cfg.method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": cfg.num_speculative_tokens,
                "prompt_lookup_min": cfg.prompt_lookup_min, "prompt_lookup_max": cfg.prompt_lookup_max}
    return {"model": str(cfg.draft_model), "num_speculative_tokens": cfg.num_speculative_tokens}


def check_draft_tokenizer(target_dir: str | Path, draft_dir: str | Path) -> None:
    """Fail before start-up when the draft's vocabulary differs from the target's (its proposals would be garbage)."""
    import json

    from llmray.errors import UserError

    def vocab(d: str | Path) -> dict:
        p = Path(d) / "tokenizer.json"
        if not p.is_file():
            raise UserError(f"speculative.draft_model: no tokenizer.json in {d}")
        return json.loads(p.read_text())["model"]["vocab"]

    if vocab(target_dir) != vocab(draft_dir):
        raise UserError(f"speculative.draft_model: {draft_dir} does not share the tokenizer of {target_dir}")


def with_gate_speculation(serve_cfg, draft_dir: str | Path):
    """`serve_cfg` (a ServeConfig) with the speculation the draft stage's gate enabled in `draft_dir`'s manifest
    (draft model or n-gram), unless the serve section sets its own `engine.speculative` or there is no
    complete draft artifact."""
    import logging

    from llmray import artifacts
    from llmray import config as cfglib

    log = logging.getLogger(__name__)
    if serve_cfg.engine.speculative.enabled or not artifacts.is_complete(draft_dir, "model"):
        return serve_cfg
    spec = artifacts.read_manifest(draft_dir).metrics.get("speculative") or {}
    if not spec.get("method"):
        log.info("draft gate enabled no speculation; serving without it")
        return serve_cfg
    chosen = SpeculativeConfig(method=spec["method"], draft_model=spec.get("draft_model"),
                               num_speculative_tokens=spec.get("num_speculative_tokens") or 3)
    log.info("serving with %s speculation (%s tokens), enabled by the draft gate", chosen.method,
             chosen.num_speculative_tokens)
    return cfglib.replace(serve_cfg, engine=cfglib.replace(serve_cfg.engine, speculative=chosen))
