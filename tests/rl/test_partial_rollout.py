"""Partial rollouts on a real local Ray cluster, a real vLLM engine and a DeepSpeed actor: async GRPO
generates in segments of 1 token, weight pushes land between segments, and samples in flight
across a push carry both versions, the newer after the older; the run trains within its staleness
bound, and a rollout engine killed while a batch is generated is restarted once. The batches are
read through a pass-through wrapper of `RolloutPipeline.batch` (it records what the real method
returns; nothing is replaced)."""

from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from rl_helpers import small_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_pushes_land_between_segments_and_samples_carry_both_versions(rl_sft_model, rl_fixed_prompts, tmp_path,
                                                                     monkeypatch):
    import torch

    from llmray.report.metrics import read_metrics
    from llmray.rl.pipeline import RolloutPipeline
    from llmray.stages.ppo import run

    batches = []
    real_batch = RolloutPipeline.batch

    def recording_batch(self, step, draw, sampling):
        batch, extra = real_batch(self, step, draw, sampling)
        batches.append((self.version, batch, extra))
        return batch, extra

    monkeypatch.setattr(RolloutPipeline, "batch", recording_batch)
    # One token per segment and temperature 2 (few early EOS: most samples run to max_tokens) make a
    # generation take more engine calls than a step's scoring and training take time, so the pushes
    # land while the next batch is being generated.
    cfg = small_config(rl_sft_model, rl_fixed_prompts, tmp_path, "algo.algorithm=grpo", "algo.n_samples=4",
                       "algo.prompts_per_step=8", "algo.minibatch_size=32", "actor.optimizer.lr=1e-3",
                       "algo.kl_coef=0.01", "algo.tis_cap=2.0", "rollout.mode=async", "rollout.max_staleness=1",
                       "rollout.segment_tokens=1", "rollout.max_tokens=24", "rollout.temperature=2.0",
                       "eval_every=-1", "steps=7")
    assert cfg.rollout.partial_rollouts  # the default in async mode
    killed = []

    def kill_rollout_engine(roles, step, metrics):
        """After step 3, while the driver thread generates step 4's batch: SIGKILL the engine."""
        if step == 3:
            killed.append(roles.groups["rollout"].pids()[0])
            os.kill(killed[0], signal.SIGKILL)

    out = run(cfg, on_step=kill_rollout_engine)
    rows = [r for r in read_metrics(Path(cfg.run_dir) / "metrics.jsonl") if "rollout/reward_mean" in r]
    # The dead engine was restarted once (the push or the collecting step found it dead, not both),
    # re-synced, and the run went on.
    assert killed and out["rollout_restarts"] == 1
    assert out["steps"] == 7 and [r["step"] for r in rows] == list(range(1, 8)) and len(batches) == 7

    spanning = 0
    for (trainer_version, batch, extra), row in zip(batches, rows):
        real = batch.response_mask > 0
        v = batch.token_versions
        for i in range(len(batch)):
            seq = v[i][real[i]].tolist()
            assert seq == sorted(seq), f"row {i}: versions {seq} go back in time"
            assert 0 <= seq[0] and seq[-1] <= trainer_version
        oldest = int(v[real].min())
        # The staleness bound holds on the oldest token, and the metrics say so.
        assert trainer_version - oldest <= 1 and row["rollout/staleness"] == trainer_version - oldest
        spans = [len(set(v[i][real[i]].tolist())) > 1 for i in range(len(batch))]
        assert row["rollout/partial_frac"] == pytest.approx(sum(spans) / len(batch))
        spanning += sum(spans)
        assert math.isfinite(row["rollout/reward_mean"]) and math.isfinite(row["actor/policy_loss"])
        assert 0.3 < row["actor/tis_weight_mean"] <= 2.0
        assert torch.isfinite(batch.rollout_logprobs[real]).all() and (batch.rollout_logprobs[real] <= 0).all()
    fracs = [round(r["rollout/partial_frac"], 3) for r in rows]
    print(f"partial rollouts: share of samples spanning a push per step {fracs}; "
          f"push s per step {[round(r['time/weight_sync_s'], 2) for r in rows]}")
    assert spanning >= 1, f"no sample spanned a weight push: partial_frac per step {fracs}"
