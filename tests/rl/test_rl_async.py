"""Asynchronous RL on a real local Ray cluster with a real vLLM engine and DeepSpeed actor: the engine
generates the next batches while the actor trains, staleness stays within its bound, reward rises,
and a driver killed mid-run resumes with every prompt of the planned steps trained on exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from rl_helpers import small_config, small_overrides  # noqa: E402

pytestmark = pytest.mark.usefixtures("ray_cluster")

ASYNC = ["algo.algorithm=grpo", "algo.n_samples=8", "algo.prompts_per_step=8", "algo.minibatch_size=64",
         "actor.optimizer.lr=1e-3", "algo.kl_coef=0.01", "algo.tis_cap=2.0", "rollout.mode=async",
         "eval_every=-1"]


def _rows(run_dir: Path) -> list[dict]:
    from llmray.report.metrics import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "rollout/reward_mean" in r]


def test_async_grpo_trains_on_batches_one_version_old_and_reward_rises(rl_sft_model, rl_fixed_prompts, tmp_path):
    from llmray.stages.ppo import run

    cfg = small_config(rl_sft_model, rl_fixed_prompts, tmp_path, *ASYNC, "steps=12", "rollout.max_staleness=1")
    out = run(cfg)
    rows = _rows(Path(cfg.run_dir))
    assert out["steps"] == 12 and [r["step"] for r in rows] == list(range(1, 13))
    # Step 1 trains on the starting policy's batch; every later batch was generated one version back,
    # while the previous step trained.
    assert [r["rollout/staleness"] for r in rows] == [0.0] + [1.0] * 11
    assert [r["prompts/start"] for r in rows] == [8.0 * i for i in range(12)]
    # The stale samples are corrected by truncated importance weights (cap 2), never uncorrected.
    assert all(0.3 < r["actor/tis_weight_mean"] <= 2.0 for r in rows), [r["actor/tis_weight_mean"] for r in rows]
    # Four-step means: at lr 1e-3 the reward of this tiny policy dips for a few steps in both modes
    # before it climbs (sync too), and each step's mean over 64 samples moves by ~0.05.
    vals = [r["rollout/reward_mean"] for r in rows]
    r0, r1 = sum(vals[:4]) / 4, sum(vals[-4:]) / 4
    print(f"async grpo: reward {r0:.3f}->{r1:.3f}; generation wait per step "
          f"{[round(r['time/generation_s'], 2) for r in rows]}")
    assert r1 > r0 + 0.03, f"async grpo reward did not rise: {r0:.3f} -> {r1:.3f}"


def test_async_refuses_uncorrected_stale_logprobs():
    from llmray.config import ConfigError, load
    from llmray.rl.config import RLConfig

    with pytest.raises(ConfigError, match="algo.tis_cap") as e:
        load(RLConfig, None, ["rollout.mode=async", "algo.algorithm=grpo", "algo.minibatch_size=32"])
    assert "rollout.mode" in str(e.value) and "rollout.max_staleness" in str(e.value)


def test_driver_killed_in_async_mode_resumes_each_prompt_exactly_once(rl_sft_model, rl_fixed_prompts, tmp_path):
    """Staleness 2: at every checkpoint two batches are already drawn and buffered. The driver is
    SIGKILLed after a checkpoint, the same command resumes, and the records show steps 1..6 trained
    on prompt positions 0..47 once each, the buffered prompts drawn again rather than lost or doubled."""
    import ray

    args = small_overrides(rl_sft_model, rl_fixed_prompts, tmp_path, *ASYNC, "steps=6", "rollout.max_staleness=2",
                           "checkpoint.every_n_steps=2")
    run_dir = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "llmray.cli", "ppo", *args]
    first = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and first.poll() is None:
            rows = _rows(run_dir) if (run_dir / "metrics.jsonl").exists() else []
            ckpt_done = (run_dir / "checkpoints" / "step_00000002" / "COMPLETE.json").exists()
            if rows and rows[-1]["step"] >= 3 and ckpt_done:
                break
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before it could be killed"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    killed_at = _rows(run_dir)[-1]["step"]
    ckpt = json.loads((run_dir / "checkpoints" / "step_00000002" / "COMPLETE.json").read_text())
    assert ckpt["prompts_consumed"] == 16  # trained on; the two buffered batches (16 more prompts) are not counted
    latest = max(int(p.parent.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*/COMPLETE.json"))
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    rows = _rows(run_dir)
    # The final lineage of each step: the resumed run's row where it redid a step, else the first run's.
    lineage = {r["step"]: r for r in rows}
    assert sorted(lineage) == list(range(1, 7))
    positions = [p for s in range(1, 7) for p in range(int(lineage[s]["prompts/start"]),
                                                       int(lineage[s]["prompts/start"] + lineage[s]["prompts/count"]))]
    assert sorted(positions) == list(range(48)), positions  # every planned prompt exactly once
    redone = [r["step"] for r in rows[len(rows) - (6 - latest):]]
    assert redone == list(range(latest + 1, 7))  # the second run went on from the checkpoint
    print(f"killed after step {killed_at}; resumed from step {latest}")


def test_grpo_with_the_calculator_tool_runs_episodes_and_reward_rises(rl_sft_model, rl_fixed_prompts, tmp_path):
    """The calculator environment end to end on the real engine: every prompt carries the tool
    description, episodes run up to 3 turns, tool outputs (if the policy calls the tool) are masked,
    and GRPO raises the reward."""
    from llmray.stages.ppo import run

    cfg = small_config(rl_sft_model, rl_fixed_prompts, tmp_path, "algo.algorithm=grpo", "steps=8",
                       "algo.n_samples=8", "algo.prompts_per_step=8", "algo.minibatch_size=64",
                       "actor.optimizer.lr=1e-3", "algo.kl_coef=0.01", "eval_every=-1", "rollout.env=calculator",
                       "rollout.max_turns=3", "rollout.max_model_len=512", "rollout.max_tokens=24")
    out = run(cfg)
    rows = _rows(Path(cfg.run_dir))
    assert out["steps"] == 8 and len(rows) == 8
    vals = [r["rollout/reward_mean"] for r in rows]
    r0, r1 = sum(vals[:3]) / 3, sum(vals[-3:]) / 3
    # Every turn but an episode's last made at least one tool call, so calls >= turns - 1 on average.
    for r in rows:
        turns, calls, frac = r["rollout/turns_mean"], r["rollout/tool_calls_mean"], r["rollout/tool_call_frac"]
        assert 1.0 <= turns <= 3.0 and calls >= turns - 1 - 1e-6 and frac <= calls + 1e-6, r
    fracs = [round(r["rollout/tool_call_frac"], 3) for r in rows]
    print(f"grpo with tools: reward {r0:.3f}->{r1:.3f}; share of episodes calling the calculator per step {fracs}")
    assert r1 > r0 + 0.03, f"grpo reward with the calculator environment did not rise: {r0:.3f} -> {r1:.3f}"
