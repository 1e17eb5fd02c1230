"""The one stage registry (CLI and pipeline): one recipe module per stage in this package.

A recipe `llmray/stages/<name>.py` holds `Config` (its frozen config dataclass) and `run(cfg) -> dict`,
the one code path behind both `llmray <stage>` and `python jobs/<stage>.py` (what `ray job submit`
runs). Recipes are imported only when used, so `llmray ls` stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from llmray.errors import UserError


@dataclass(frozen=True)
class Stage:
    name: str
    """CLI name, e.g. `clean-dedup`; its recipe is `llmray/stages/clean_dedup.py`."""
    summary: str
    section: str | None = None
    """The pipeline config section that configures it; None: not a step of the pipeline."""
    artifact: str = ""
    """The pipeline's directory for its output, under the run's workdir."""
    kind: str = ""
    """Artifact kind it publishes (`artifacts.require` checks it); empty: none."""

    @property
    def module(self) -> str:
        return f"llmray.stages.{self.name.replace('-', '_')}"

    @property
    def job(self) -> str:
        return f"jobs/{self.name.replace('-', '_')}.py"

    @property
    def config_dir(self) -> str:
        return f"jobs/configs/{self.name.replace('-', '_')}"

    def config_class(self) -> type:
        """The recipe module's `Config`: its frozen config dataclass."""
        return importlib.import_module(self.module).Config

    def run_fn(self):
        """The recipe's `run(cfg) -> dict`."""
        return importlib.import_module(self.module).run


# In lifecycle order: the pipeline runs the stages with a section, in this order.
STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("corpus", "generate the synthetic corpus with ground-truth labels", "corpus", "corpus", "corpus"),
        Stage("clean-dedup", "clean, filter and deduplicate documents with Ray Data", "clean_dedup", "clean",
              "dataset"),
        Stage("tokenizer", "train a byte-level BPE tokenizer with a chat template", "tokenizer", "tokenizer",
              "tokenizer"),
        Stage("pack", "tokenize documents and pack them into fixed-length training shards", "pack", "packed",
              "dataset"),
        Stage("pretrain", "pretrain a decoder on packed shards (Ray Train + DeepSpeed ZeRO)", "pretrain", "pretrain",
              "model"),
        Stage("sft", "supervised fine-tuning on chat data, loss on assistant tokens only", "sft", "sft", "model"),
        Stage("reward-model", "train a reward model on preference pairs", "reward_model", "reward_model", "model"),
        Stage("dpo", "direct preference optimisation on preference pairs"),
        Stage("ppo", "RL with actor/critic/ref/reward/rollout worker groups (PPO, GRPO, RLOO)", "rl", "rl", "model"),
        Stage("quantize", "quantize a model for vLLM, gated on perplexity", "quantize", "quantized", "model"),
        Stage("draft", "train a draft model for speculative decoding by distilling the target", "draft", "draft",
              "model"),
        Stage("eval", "perplexity, task accuracy, lm-eval and offline generation of a model or endpoint"),
        Stage("serve", "serve a model over an OpenAI-compatible HTTP API on Ray Serve", "serve", "serve"),
        Stage("pipeline", "the whole life: corpus to served model, with a run report"),
    ]
}


def get(name: str) -> Stage:
    if name not in STAGES:
        raise UserError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name]


def repo_root() -> Path | None:
    """The checkout holding jobs/ (cwd or above, else next to the installed package)."""
    for base in [Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parents[1]]:
        if (base / "jobs" / "configs").is_dir():
            return base
    return None


def shipped_configs(stage: Stage) -> list[Path]:
    root = repo_root()
    if root is None:
        return []
    return sorted((root / stage.config_dir).glob("*.yaml"))
