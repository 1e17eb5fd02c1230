"""Fixtures for the RL algorithm tests: one SFT'd tiny model per session (TEST SETUP, plain torch)
and RL prompt files. `rl_helpers.small_config` builds an RLConfig that fits the 4-CPU test cluster."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def rl_sft_model(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model after a short SFT on task chats: formats answers, partly right (test setup)."""
    from sft_setup import quick_sft

    return quick_sft(tiny_model_dir, tmp_path_factory.mktemp("rl_sft"), steps=100)


@pytest.fixture(scope="session")
def rl_fixed_prompts(tmp_path_factory) -> Path:
    """Eight task prompts, used as both the RL set and the eval set: with prompts_per_step=8 every
    step samples the same prompts, so a rising reward is learning, not an easier draw of prompts."""
    from llmray.data import tasks

    root = tmp_path_factory.mktemp("rl_fixed_prompts")
    rng = random.Random(3)
    lines = [json.dumps(tasks.prompt_record(tasks.make_task(rng, kind))) + "\n"
             for kind in ("add", "sub", "max", "repeat") * 2]
    for split in ("prompts", "eval"):
        (root / split).mkdir()
        (root / split / "part-00000.jsonl").write_text("".join(lines))
    return root
