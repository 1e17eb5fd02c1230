"""The lifecycle stages: CLI name, job script, config class and run function of each.

A stage's `run(cfg) -> dict` is the one code path behind both `llmray <stage>` and
`python jobs/<stage>.py` (what `ray job submit` runs). Config classes and run functions are named
by import path so that `llmray ls` stays fast and a stage's heavy imports load only when it runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from llmray.errors import UserError


@dataclass(frozen=True)
class Stage:
    name: str
    """CLI name, e.g. `clean-dedup`."""
    summary: str
    config: str
    """`module:Class` of the stage's frozen config dataclass."""
    run: str
    """`module:function` taking the config and returning a dict of key results."""

    @property
    def job(self) -> str:
        return f"jobs/{self.name.replace('-', '_')}.py"

    @property
    def config_dir(self) -> str:
        return f"jobs/configs/{self.name.replace('-', '_')}"

    def config_class(self) -> type:
        return _resolve(self.config)

    def run_fn(self):
        return _resolve(self.run)


def _resolve(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("corpus", "generate the synthetic corpus with ground-truth labels",
              "llmray.data.synthetic:CorpusConfig", "llmray.data.synthetic:run"),
        Stage("clean-dedup", "clean, filter and deduplicate documents with Ray Data",
              "llmray.data.pipeline:CleanDedupConfig", "llmray.data.pipeline:run"),
        Stage("tokenizer", "train a byte-level BPE tokenizer with a chat template",
              "llmray.models.tokenizer:TokenizerConfig", "llmray.models.tokenizer:run"),
        Stage("pack", "tokenize documents and pack them into fixed-length training shards",
              "llmray.data.pack:PackConfig", "llmray.data.pack:run"),
        Stage("pretrain", "pretrain a decoder on packed shards (Ray Train + DeepSpeed ZeRO)",
              "llmray.train.pretrain:PretrainConfig", "llmray.train.pretrain:run"),
        Stage("sft", "supervised fine-tuning on chat data, loss on assistant tokens only",
              "llmray.train.sft:SFTConfig", "llmray.train.sft:run"),
        Stage("reward-model", "train a reward model on preference pairs",
              "llmray.rl.reward_model:RewardModelConfig", "llmray.rl.reward_model:run"),
        Stage("dpo", "direct preference optimisation on preference pairs",
              "llmray.rl.dpo:DPOConfig", "llmray.rl.dpo:run"),
        Stage("ppo", "RL with actor/critic/ref/reward/rollout worker groups (PPO, GRPO, RLOO)",
              "llmray.rl.controller:RLConfig", "llmray.rl.controller:run"),
        Stage("quantize", "quantize a model for vLLM, gated on perplexity",
              "llmray.serving.quantize:QuantizeConfig", "llmray.serving.quantize:run"),
        Stage("serve", "serve a model over an OpenAI-compatible HTTP API on Ray Serve",
              "llmray.serving.stage:ServeConfig", "llmray.serving.stage:run"),
        Stage("pipeline", "the whole life: corpus to served model, with a run report",
              "llmray.pipeline:PipelineConfig", "llmray.pipeline:run"),
    ]
}


def register(stage: Stage) -> None:
    STAGES[stage.name] = stage


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
