"""The RL controller: one step of PPO, GRPO or RLOO, driven from one process over the role groups.

    rollouts = rollout.generate(prompts)              # vLLM engines, split by rank
    batch = reward.score(batch)                       # rule and/or learned reward
    batch = ref.log_probs(batch); batch = actor.log_probs(batch)
    batch = critic.values(batch)                      # PPO only: no critic group for GRPO/RLOO
    batch, stats = compute_advantages(batch, algo, kl_coef)   # pure, unit-tested
    metrics = actor.update(batch, spec) | critic.update(batch)
    sync.push_actor(actor, rollout)                   # timed, checksummed, bounded

The stage recipe around it (prompts, resume, checkpoints, evaluation) is `llmray.stages.ppo`; the
groups, their placement and restarts are `llmray.rl.groups`. A dead rollout engine is restarted,
re-synced and its call retried here; a dead actor or critic propagates `WorkerDiedError` to the
recipe, which rebuilds both training groups and resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from llmray.rl.algorithms import compute_advantages
from llmray.rl.config import RLConfig
from llmray.rl.groups import phase_threads, thread_budget

if TYPE_CHECKING:
    from llmray.rl.batch import RLBatch
    from llmray.rl.groups import RoleGroups
    from llmray.rl.pipeline import Draw

__all__ = ["Controller", "RLConfig"]


class Controller:
    """Steps of one run: generate, score, log-probs, values, advantages, update, push the weights."""

    def __init__(self, cfg: RLConfig, roles: "RoleGroups", pad_id: int, tokenizer=None):
        from llmray.rl.pipeline import RolloutPipeline

        self.cfg, self.roles, self.pad_id = cfg, roles, pad_id
        self.pipeline = RolloutPipeline(roles, cfg, pad_id, tokenizer)

    def sampling(self, step: int) -> dict:
        """The rollout sampling settings of `step` (its seed depends on the step only)."""
        r = self.cfg.rollout
        return {"n": self.cfg.algo.n_samples, "temperature": r.temperature, "top_p": r.top_p,
                "max_tokens": r.max_tokens, "seed": self.cfg.seed * 100003 + step}

    def step(self, step: int, draw: "Draw", kl_coef: float, ptx_ids=None) -> tuple[dict, float]:
        """One RL step; `draw(k)` hands out the next k prompts (`Prompts`) and advances the run's
        prompt cursor. Returns (metrics, observed sequence KL)."""
        import torch

        c = self.cfg
        times: dict[str, float] = {}
        t = time.monotonic()
        sampling = self.sampling(step)
        batch, extra = self.pipeline.batch(step, draw, self.sampling)
        times["time/generation_s"] = time.monotonic() - t
        if c.algo.dynamic_sampling:
            batch, ds = self.dynamic_sample(batch, draw, sampling, times)
            extra.update(ds)
        # On-policy single update (GRPO/RLOO with the KL as a loss term, one epoch, one minibatch):
        # the actor's pre-update log-probs come from the update's own forward pass instead.
        fused = self.fused_logprobs()
        t = time.monotonic()
        batch = self.score(batch, fused)
        times["time/scoring_s"] = time.monotonic() - t + times.pop("time/reward_first_s", 0.0)
        batch, stats = compute_advantages(batch, c.algo, kl_coef)
        t = time.monotonic()
        results = self.update(batch, step, kl_coef, ptx_ids, fused)
        times["time/training_s"] = time.monotonic() - t
        times["time/rollout_wait_s"] = self.pipeline.before_push()  # async: the engines' next batches
        sync = self.push_weights()
        times["time/weight_sync_s"] = sync["weight_sync/sync_s"]
        metrics = self.metrics(batch, stats, results, fused, times, sync)
        metrics.update(extra)
        return metrics, float(torch.as_tensor(stats["kl/seq_mean"]))

    def dynamic_sample(self, batch: "RLBatch", draw, sampling: dict, times: dict) -> tuple["RLBatch", dict]:
        """DAPO dynamic sampling: keep the prompt groups whose rewards differ, draw and generate more
        prompts until `prompts_per_step` such groups are found or `max_sampling_rounds` run out; fill
        any shortfall with dropped groups (zero group advantage) so the batch keeps its size."""
        from llmray.rl.algorithms import group_rows, informative_groups
        from llmray.rl.batch import RLBatch

        a = self.cfg.algo
        want, n = a.prompts_per_step, a.n_samples
        kept, dropped, drawn, rounds = [], [], want, 0
        scores, correct = [], []
        while True:
            t = time.monotonic()
            batch = self.reward_scores(batch)
            times["time/reward_first_s"] = times.get("time/reward_first_s", 0.0) + time.monotonic() - t
            scores += batch.scores.tolist()
            correct += batch.correct.tolist()
            good = set(informative_groups(batch.scores, n))
            groups = range(len(batch) // n)
            kept += [batch.select(group_rows([g], n)) for g in groups if g in good]
            dropped += [batch.select(group_rows([g], n)) for g in groups if g not in good]
            if len(kept) >= want or rounds >= a.max_sampling_rounds:
                break
            rounds += 1
            k = refill_size(want - len(kept), len(kept), len(kept) + len(dropped), self.cfg.rollout.num_workers)
            t = time.monotonic()
            batch = self.pipeline.play(draw(k), {**sampling, "seed": sampling["seed"] + 7919 * rounds},
                                       self.pipeline.version, offset=drawn)
            times["time/generation_s"] += time.monotonic() - t
            drawn += k
        filled = max(0, want - len(kept))
        final = RLBatch.concat((kept + dropped[:filled])[:want])
        # The policy's reward is measured over everything it generated this step (every drawn prompt
        # once); the trained batch is biased towards mixed groups by construction.
        return final, {"rollout/reward_mean": sum(scores) / len(scores),
                       "rollout/accuracy": sum(correct) / len(correct),
                       "rollout/trained_reward_mean": float(final.scores.mean()),
                       "dynamic_sampling/kept_groups": float(min(len(kept), want)),
                       "dynamic_sampling/dropped_groups": float(len(dropped)),
                       "dynamic_sampling/filled_groups": float(filled),
                       "dynamic_sampling/prompts_drawn": float(drawn),
                       "dynamic_sampling/rounds": float(rounds)}

    def reward_scores(self, batch: "RLBatch") -> "RLBatch":
        """Only the reward role's scores (dynamic sampling needs them before anything else)."""
        from llmray.rl.worker_group import call_with_restart

        g = self.roles.groups
        got = call_with_restart(g["reward"].score, batch, max_restarts=self.cfg.fault.max_trainer_restarts,
                                on_restart=lambda grp, ranks: [self.roles.log_restart("reward", k, "died")
                                                               for k in ranks])
        return batch.replace(scores=got.scores, correct=got.correct)

    def fused_logprobs(self) -> bool:
        """True when pi_old is the current policy for the whole update (one epoch, one minibatch
        per rank, KL not in the reward), so no separate actor log-prob pass is needed."""
        a = self.cfg.algo
        return (not a.uses_critic and not a.kl_to_reward and a.epochs == 1
                and a.minibatch_size >= a.batch_size and a.tis_cap is None)

    def score(self, batch: "RLBatch", fused: bool) -> "RLBatch":
        """Reward scores, ref and actor log-probs and critic values, all at once: each needs only
        the rollouts. A dead reward or ref worker is restarted and its call retried."""
        from llmray.rl.worker_group import WorkerDiedError, call_with_restart

        c, g = self.cfg, self.roles.groups
        # ref, actor, critic, reward model (unless dynamic sampling scored the batch already)
        busy = 1 + (not fused) + c.algo.uses_critic + (c.reward.kind != "rule" and batch.scores is None)
        th = phase_threads(thread_budget(c), busy)
        pending = {"ref": g["ref"].log_probs.submit(batch, threads=th)}
        if batch.scores is None:
            pending["reward"] = g["reward"].score.submit(batch, threads=th)
        if not fused:
            pending["actor"] = g["actor"].log_probs.submit(batch, threads=th)
        if c.algo.uses_critic:
            pending["critic"] = g["critic"].values.submit(batch, threads=th)
        got = {}
        for role, p in pending.items():
            try:
                got[role] = p.result()
            except WorkerDiedError:
                if role not in ("reward", "ref"):
                    raise
                method = g["reward"].score if role == "reward" else g["ref"].log_probs
                got[role] = call_with_restart(
                    method, batch, max_restarts=c.fault.max_trainer_restarts,
                    on_restart=lambda grp, ranks, r=role: [self.roles.log_restart(r, k, "died") for k in ranks])
        scored = got.get("reward", batch)
        return batch.replace(scores=scored.scores, correct=scored.correct,
                             ref_logprobs=got["ref"].ref_logprobs,
                             logprobs=got["actor"].logprobs if not fused else batch.rollout_logprobs,
                             values=got["critic"].values if c.algo.uses_critic else None)

    def update(self, batch: "RLBatch", step: int, kl_coef: float, ptx_ids, fused: bool) -> dict:
        """The actor's and (PPO) the critic's update on the batch, at once; returns role -> per-rank stats."""
        c, g = self.cfg, self.roles.groups
        spec = {"epochs": c.algo.epochs, "minibatch_size": c.algo.minibatch_size // c.actor.num_workers,
                "clip_eps": c.algo.clip_eps, "clip_eps_high": c.algo.clip_eps_high,
                "ratio_level": c.algo.ratio_level, "loss_agg": c.algo.loss_agg, "norm_len": c.rollout.max_tokens,
                "entropy_coef": c.algo.entropy_coef,
                "kl_loss_coef": 0.0 if c.algo.kl_to_reward else kl_coef, "tis_cap": c.algo.tis_cap,
                "ptx_coef": c.algo.ptx_coef, "temperature": c.rollout.temperature, "seed": c.seed + step,
                "on_policy": fused}
        warmup = step < c.algo.critic_warmup  # the critic alone learns the returns' scale first
        th = phase_threads(thread_budget(c), 1 + c.algo.uses_critic - warmup)
        pending = {} if warmup else {"actor": g["actor"].update.submit(batch, spec, ptx_ids=ptx_ids, threads=th)}
        if c.algo.uses_critic:
            pending["critic"] = g["critic"].update.submit(
                batch, c.algo.epochs, c.algo.minibatch_size // c.critic.num_workers, c.algo.value_clip,
                seed=c.seed + step, threads=th)
        return {role: p.result() for role, p in pending.items()}

    def push_weights(self) -> dict:
        """The actor's weights into every rollout engine. An engine that dies during the push is
        restarted (it comes back with the starting weights) and the push is repeated to all engines,
        so that each one also resets its prefix cache (`rollout.max_restarts` times at most)."""
        from llmray.rl.weight_sync import push_with_restart

        g = self.roles.groups
        self.pipeline.before_push()
        with self.pipeline.lock:  # partial rollouts: the push queues behind one segment at most
            out = push_with_restart(self.roles.sync, g["actor"], g["rollout"], self.cfg.rollout.max_restarts,
                                    on_restart=lambda rank: self.roles.log_restart("rollout", rank,
                                                                                   "died during weight sync"))
            self.pipeline.pushed()
        return out

    def metrics(self, batch: "RLBatch", stats: dict, results: dict, fused: bool, times: dict, sync: dict) -> dict:
        """The step's rollout, KL, actor, critic, time and weight-sync metrics."""
        from llmray.rl.ppo.advantages import masked_mean

        mask = batch.train_mask
        actor = _mean_dicts(results["actor"]) if "actor" in results else {}  # none in a critic warmup step
        # Fused: the update measured the gap on its own forward pass.
        gap = (actor["logprob_gap"] if fused
               else masked_mean((batch.logprobs - batch.rollout_logprobs).abs(), mask).item())
        lengths = mask.sum(-1)
        metrics = {
            "rollout/reward_mean": float(batch.scores.mean()),
            "rollout/accuracy": float(batch.correct.mean()),
            "rollout/response_length": float(lengths.mean()),
            "rollout/truncated_frac": float(sum(r == "length" for r in batch.finish_reasons) / len(batch)),
            "rollout/logprob_gap": gap,
            "rollout/tokens": int(lengths.sum()),
            **stats,
            **{f"actor/{k}": v for k, v in actor.items()},
            **({f"critic/{k}": v for k, v in _mean_dicts(results["critic"]).items()} if "critic" in results else {}),
            **times, **{k: v for k, v in sync.items() if k != "weight_sync/sync_s"},
        }
        if batch.turns is not None and self.cfg.rollout.max_turns > 1:  # how the policy uses its turns and tools
            metrics["rollout/turns_mean"] = float(batch.turns.mean())
            metrics["rollout/tool_calls_mean"] = float(batch.tool_calls.mean())
            metrics["rollout/tool_call_frac"] = float((batch.tool_calls > 0).float().mean())
        if self.cfg.algo.uses_critic:
            metrics["critic/value_mean"] = float(masked_mean(batch.values, mask))
        metrics["time/step_s"] = sum(v for k, v in times.items() if k.startswith("time/"))
        return metrics


def refill_size(missing: int, kept: int, seen: int, engines: int) -> int:
    """Prompts to draw for `missing` informative groups: scaled by the keep rate seen so far (at most
    4x the shortfall), rounded up to a multiple of the rollout engine count."""
    rate = max(kept / max(seen, 1), 0.25)
    k = min(math.ceil(missing / rate), 4 * missing)
    return math.ceil(k / engines) * engines


def _mean_dicts(rows) -> dict:
    rows = rows if isinstance(rows, list) else [rows]
    keys = set().union(*(r.keys() for r in rows))
    return {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in sorted(keys)}
