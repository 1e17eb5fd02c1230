"""The role groups of one RL run: start (rollout, actor, critic, ref, reward), placement, thread budget, restarts.

    roles = RoleGroups(cfg, validate_models(cfg))
    roles.start()                                   # every role's group at once
    rollouts = roles.generate(prompt_ids, sampling) # a dead engine is restarted, re-synced, retried
    roles.restart_trainers(cause)                   # a DeepSpeed world cannot lose a rank and go on
    roles.shutdown()

Every restart is logged with its cause in `run_dir`/restarts.jsonl, `run_dir`/workers.json holds the
worker process ids by role (what an operator or a chaos test kills) and `run_dir`/nodes.json the Ray
node each rank runs on.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from functools import partial
from pathlib import Path

from llmray.errors import UserError
from llmray.rl.config import RLConfig

log = logging.getLogger(__name__)


def _res(rc) -> dict:
    """A role worker's Ray resources: its CPUs, GPUs and custom resources (`<role>.resources`): its bundle."""
    return {"CPU": rc.cpus_per_worker, **({"GPU": rc.gpus_per_worker} if rc.gpus_per_worker else {}),
            **rc.resources}


def placement_groups(cfg: RLConfig) -> list:
    """The run's placement groups, in the order `RoleGroups.start` creates them: rollout, actor (+ref when
    colocated), critic (+reward when colocated), then ref and reward on their own. Pure: `llmray plan`
    places them on a described cluster (llmray.placement)."""
    from llmray.placement import Group, Role

    c = cfg

    def role(name: str) -> Role:
        rc = getattr(c, name)
        return Role(name, rc.num_workers, _res(rc), name)

    groups = [Group((role("rollout"),)),
              Group((role("actor"), role("ref")) if c.placement.colocate_actor_ref else (role("actor"),))]
    if c.algo.uses_critic:
        groups.append(Group((role("critic"), role("reward")) if c.placement.colocate_critic_reward
                            else (role("critic"),)))
    if not c.placement.colocate_actor_ref:
        groups.append(Group((role("ref"),)))
    if not c.placement.colocate_critic_reward:
        groups.append(Group((role("reward"),)))
    return groups


def rollout_init_kwargs(cfg: RLConfig, model_dir: str) -> dict:
    """What each rollout worker is built with (the vLLM engine's settings come from these)."""
    r = cfg.rollout
    kw = {"model_dir": model_dir, "max_model_len": r.max_model_len,
          "dtype": r.dtype if r.engine == "vllm" else "float32", "seed": cfg.seed}
    if r.engine == "vllm":
        kw.update(enforce_eager=r.enforce_eager, kv_cache_gb=r.kv_cache_gb,
                  # logprobs of the distribution actually sampled (temperature applied),
                  # which is what the actor recomputes with logits / temperature
                  logprobs_mode="raw_logprobs" if r.temperature == 1.0 else "processed_logprobs")
    return kw


def trainer_deepspeed(cfg: RLConfig, role: str) -> dict:
    """The actor's or critic's DeepSpeed settings: its config, with the engine's micro-batch cut to fit
    the per-rank minibatch."""
    from llmray.config import to_dict

    rc = getattr(cfg, role)
    per_rank = cfg.algo.minibatch_size // rc.num_workers
    ds = to_dict(rc.deepspeed)
    ds["micro_batch_size"] = min(ds["micro_batch_size"], per_rank)
    ds["grad_accum_steps"] = max(1, per_rank // ds["micro_batch_size"])
    return ds


def thread_budget(cfg: RLConfig) -> int:
    return cfg.threads or os.cpu_count() or 1


def thread_env(cfg: RLConfig) -> dict[str, str]:
    """OMP_NUM_THREADS for every role (Ray would set it to the actor's num_cpus, often 1)."""
    return {"OMP_NUM_THREADS": str(thread_budget(cfg))}


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
            raise UserError(f"{key[role]} ({dirs[role]}) has a different tokenizer than the actor "
                            f"({dirs['actor']}): {len(info['vocab'])} vs {len(base['vocab'])} tokens, eos "
                            f"{info['eos']} vs {base['eos']}; every role must share the actor's tokenizer")
        if info["model_vocab"] != base["model_vocab"]:
            raise UserError(f"{key[role]} ({dirs[role]}) has vocab_size {info['model_vocab']} but the actor has "
                            f"{base['model_vocab']}; the reward/critic/ref models must use the actor's vocabulary")
    return dirs


def make_placement_group(bundles: list[dict], strategy: str = "PACK", timeout_s: float = 120.0,
                         what: str = "placement group"):
    """A ready placement group, or an error naming the missing resource instead of hanging.

    Bundles are checked against the cluster's total resources first (with the wait of
    `llmray.cluster.require_resources`, so an autoscaler can add nodes), then the group must
    become ready within `timeout_s` (it may wait for other jobs to free resources).
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from llmray.cluster import require_resources
    from llmray.rl.worker_group import WorkerStartError

    needed: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            needed[k] = needed.get(k, 0.0) + float(v)
    require_resources(needed, what, timeout_s)  # STRICT_PACK's one node is checked by the wait below
    pg = placement_group(bundles, strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        free = ray.available_resources()
        remove_placement_group(pg)
        have = ", ".join(f"{k}={free.get(k, 0):g}" for k in needed)
        raise WorkerStartError(
            f"{what}: placement group {bundles} ({strategy}) not placed within {timeout_s:.0f}s; "
            f"free now: {have}. Other groups hold the resources, or no node fits a bundle",
            what, None, [])
    return pg


class RoleGroups:
    """The worker groups of one run (`groups`: role -> WorkerGroup), their placement and restarts."""

    def __init__(self, cfg: RLConfig, dirs: dict[str, str]):
        self.cfg, self.dirs = cfg, dirs
        self.out = Path(cfg.run_dir)
        self.groups: dict = {}
        self.pgs: list = []
        self.shared_pgs: dict = {}
        """role -> the placement group it shares with its partner (actor+ref, critic+reward)."""
        self.restarts: list[dict] = []
        self.rollout_lock = threading.RLock()
        """Held while the engines' weights change (a push, a restart and its re-sync) and while a call is
        handed to them, so that a driver thread (partial rollouts, `llmray.rl.pipeline`) never sends a
        restarted engine a call before it has the current weights."""
        self.sync = None
        """The weight sync into the rollout engines (`WeightSync` or `CollectiveSync`, by `weight_sync.transport`);
        a restarted engine is given the current weights again through it."""

    def start(self) -> None:
        """Every role's group at once: each role's processes import their libraries and load their models
        in parallel, instead of each role waiting for the one before. If any role fails to start, the
        others are shut down and the first failure in role order (rollout, actor, critic, ref, reward)
        is raised."""
        from llmray.rl.weight_sync import make_weight_sync
        from llmray.rl.worker_group import WorkerGroup
        from llmray.rl.workers.ref import RefWorker
        from llmray.rl.workers.reward import RewardWorker
        from llmray.rl.workers.rollout import HFRolloutWorker, RolloutWorker

        c, r = self.cfg, self.cfg.rollout
        self.sync = make_weight_sync(c.weight_sync, gpu=c.actor.gpus_per_worker > 0 and r.gpus_per_worker > 0)
        builders = {"rollout": partial(
            WorkerGroup, "rollout", RolloutWorker if r.engine == "vllm" else HFRolloutWorker, r.num_workers,
            _res(r), rollout_init_kwargs(c, self.dirs["actor"]), call_timeout_s=r.call_timeout_s, env=thread_env(c))}
        builders.update(self._trainer_builders())  # places the shared placement groups first
        pg_ref = self._shared_placement("actor") if c.placement.colocate_actor_ref else (None, None)
        builders["ref"] = partial(
            WorkerGroup, "ref", RefWorker, c.ref.num_workers, _res(c.ref),
            {"model_dir": self.dirs["ref"], "temperature": r.temperature, "micro_batch_size": c.ref.micro_batch_size},
            placement_group=pg_ref[0], bundle_indices=pg_ref[1], call_timeout_s=c.fault.call_timeout_s,
            env=thread_env(c))
        pg_rw = self._shared_placement("critic") if c.placement.colocate_critic_reward else (None, None)
        builders["reward"] = partial(
            WorkerGroup, "reward", RewardWorker, c.reward.num_workers, _res(c.reward),
            {"kind": c.reward.kind, "model_dir": self.dirs.get("reward"), "rule_weight": c.reward.rule_weight,
             "model_weight": c.reward.model_weight},
            placement_group=pg_rw[0], bundle_indices=pg_rw[1], call_timeout_s=c.fault.call_timeout_s,
            env=thread_env(c))
        self._start_all(builders)

    def _start_all(self, builders: dict) -> None:
        """Build the groups `builders` (role -> constructor) concurrently into `self.groups`; on any
        failure shut down the ones that started and raise the first failure in `builders`' order."""
        from concurrent.futures import ThreadPoolExecutor

        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=len(builders), thread_name_prefix="llmray-role-start") as pool:
            futures = {role: pool.submit(build) for role, build in builders.items()}
        errors = {}
        for role, f in futures.items():
            try:
                self.groups[role] = f.result()
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the others are stopped
                errors[role] = e
        if errors:
            for role in futures:
                g = self.groups.pop(role, None)
                if g is not None:
                    g.shutdown()
            raise next(iter(errors.values()))
        log.info("started %s in %.1fs", ", ".join(builders), time.monotonic() - t0)

    def _shared_placement(self, role: str):
        """(placement group, bundle indices) that `role` shares with its partner (ref with actor,
        reward with critic); placed by `_trainer_placement` before any group starts."""
        n = getattr(self.cfg, role).num_workers
        return self.shared_pgs[role], list(range(n))

    def _trainer_placement(self, role: str, res: dict, num_workers: int):
        """(placement group, bundle indices) of the actor or critic: its own (None, None), or one shared
        with its partner (actor+ref, critic+reward) when the config colocates them."""
        c = self.cfg
        partner, colocate = {"actor": ("ref", c.placement.colocate_actor_ref),
                             "critic": ("reward", c.placement.colocate_critic_reward)}[role]
        if not colocate:
            return None, None
        if role not in self.shared_pgs:  # not a restart, where the partner role still lives there
            from llmray.placement import shared_bundle

            # One bundle per rank holds both roles' fractional resources.
            bundle = shared_bundle(res, _res(getattr(c, partner)))
            pg = make_placement_group([bundle] * num_workers, what=f"{role}+{partner} placement group")
            self.pgs.append(pg)
            self.shared_pgs[role] = pg
        return self.shared_pgs[role], list(range(num_workers))

    def _trainer_builders(self) -> dict:
        """role -> constructor of the actor and critic groups (each in its own placement group, or
        one shared with ref/reward, placed here)."""
        from llmray.config import to_dict
        from llmray.rl.worker_group import WorkerGroup
        from llmray.rl.workers.actor import ActorWorker
        from llmray.rl.workers.critic import CriticWorker

        c = self.cfg
        total = c.steps * c.algo.epochs * (c.algo.batch_size // c.algo.minibatch_size)
        builders = {}
        for role, cls, rc, extra in [("actor", ActorWorker, c.actor, {"temperature": c.rollout.temperature}),
                                     ("critic", CriticWorker, c.critic, {})]:
            if role == "critic" and not c.algo.uses_critic:
                continue
            res = _res(rc)
            pg, bundles = self._trainer_placement(role, res, rc.num_workers)
            init = {"model_dir": self.dirs[role], "deepspeed": trainer_deepspeed(c, role),
                    "optimizer": to_dict(rc.optimizer), "total_steps": max(1, total), "seed": c.seed, **extra}
            builders[role] = partial(WorkerGroup, role, cls, rc.num_workers, res, init, placement_group=pg,
                                     bundle_indices=bundles, call_timeout_s=c.fault.call_timeout_s, env=thread_env(c))
        return builders

    def restart_trainers(self, cause: str) -> None:
        """Replace the actor and critic groups (a DeepSpeed world cannot lose a rank and go on)."""
        for role in ("actor", "critic"):
            g = self.groups.pop(role, None)
            if g is not None:
                g.shutdown()
        # Placement groups shared with ref/reward stay: ref/reward still live in them.
        self._start_all(self._trainer_builders())
        self.log_restart("actor+critic", -1, cause)

    def generate(self, prompt_ids: list[list[int]], sampling: dict) -> list[dict]:
        """Rollouts from the engines (current weights; under `rollout_lock`). A dead engine is restarted, given the last
        pushed weights and the call retried (`rollout.max_restarts` times at most)."""
        from llmray.rl.worker_group import call_with_restart

        with self.rollout_lock:
            return call_with_restart(self.groups["rollout"].generate, prompt_ids, sampling,
                                     on_restart=self.on_rollout_restart, max_restarts=self.cfg.rollout.max_restarts)

    def on_rollout_restart(self, group, ranks) -> None:
        for rank in ranks:
            self.log_restart("rollout", rank, group.restarts[-1]["cause"] if group.restarts else "died")
        if self.sync.last is not None:
            self.sync.resync(group, actor_group=self.groups.get("actor"))

    def write_pids(self) -> dict:
        """`run_dir`/workers.json: role -> worker process ids (what an operator or a chaos test kills);
        `run_dir`/nodes.json: role -> [{node_id, node_ip} by rank] (where each worker runs)."""
        pids = {role: g.pids() for role, g in self.groups.items()}
        nodes = {role: g.nodes() for role, g in self.groups.items()}
        for name, data in (("workers.json", pids), ("nodes.json", nodes)):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.out / name)
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
