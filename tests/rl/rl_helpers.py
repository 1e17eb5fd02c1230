"""Helpers for the RL tests (a uniquely named module: `conftest` names collide across test dirs)."""

from __future__ import annotations

from pathlib import Path


def small_config(model: Path, prompts: Path, out: Path, *overrides: str):
    """A CPU-sized RLConfig: one vLLM engine, 1-CPU actor, fractional critic/ref/reward."""
    from llmray.config import load
    from llmray.rl.config import RLConfig

    return load(RLConfig, None, small_overrides(model, prompts, out, *overrides))


def small_overrides(model: Path, prompts: Path, out: Path, *overrides: str) -> list[str]:
    """`small_config` as `key=value` overrides (what `llmray ppo` takes on its command line)."""
    return [
        f"model={model}", f"prompts={prompts}", f"output={out / 'model'}", f"run_dir={out / 'run'}",
        "steps=4", "num_eval=48", "algo.n_samples=4", "algo.prompts_per_step=8", "algo.minibatch_size=16",
        "rollout.max_tokens=12", "rollout.max_model_len=128", "rollout.cpus_per_worker=1",
        "actor.cpus_per_worker=1", "critic.cpus_per_worker=0.5", "ref.cpus_per_worker=0.25",
        "reward.cpus_per_worker=0.25", "checkpoint.every_n_steps=2", "save_model=false",
        *overrides,
    ]
