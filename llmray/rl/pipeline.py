"""Rollouts for the RL step, synchronous or asynchronous with bounded staleness.

    pipe = RolloutPipeline(roles, cfg, pad_id)
    batch = pipe.batch(step, draw, sampling)   # sync: generate now; async: the batch generated earlier
    ... score, update ...
    pipe.before_push()                         # async: collect what the engines are still generating
    sync.push(...); pipe.pushed()              # the engines' weight version + 1

Async (`rollout.mode: async`, `rollout.max_staleness: k`): at step t the engines are handed the
prompts of steps t+1 .. t+k (drawn from the run's prompt cursor) with the weights they hold now,
and generate them while the trainer scores and updates on step t's batch. Weight pushes queue
behind those generations in each engine (a Ray actor runs its calls in order), so `before_push`
collects them first; a batch generated with version v is trained at version <= v + k, which
`batch` checks. Every token records the version that generated it (`RLBatch.token_versions`). The
PPO ratio's denominator is then the actor's own recomputed log-probs (the proximal policy), and
the behaviour policy's vLLM log-probs enter through truncated importance weights
(`algo.tis_cap`, required in async mode).

Checkpoints save the cursor of the prompts trained on (`untrained_prompts` are subtracted); the
buffered batches are dropped on resume and their prompts drawn again, so each prompt is trained
on exactly once across a kill and a resume.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

if TYPE_CHECKING:
    from llmray.rl.batch import RLBatch
    from llmray.rl.config import RLConfig
    from llmray.rl.groups import RoleGroups

Draw = Callable[[int], "Prompts"]


class Prompts(NamedTuple):
    """The next prompts of the run's seeded order: token ids, gold answers, and the cursor position
    of the first (the run's records name what each step trained on by these positions)."""

    ids: list[list[int]]
    answers: list[str]
    start: int


@dataclass
class Generation:
    """Prompts handed to the engines for one step: in flight (`pending`) or collected (`batch`)."""

    step: int
    prompts: Prompts
    sampling: dict
    version: int
    pending: Any = None
    batch: "RLBatch | None" = None


class RolloutPipeline:
    def __init__(self, roles: "RoleGroups", cfg: "RLConfig", pad_id: int, tokenizer=None):
        self.roles, self.cfg, self.pad_id, self.tokenizer = roles, cfg, pad_id, tokenizer
        self.version = 0
        """Weight pushes into the engines so far (0: the starting policy)."""
        self.queue: deque[Generation] = deque()

    @property
    def asynchronous(self) -> bool:
        return self.cfg.rollout.mode == "async"

    def batch(self, step: int, draw: Draw, sampling: Callable[[int], dict]) -> tuple["RLBatch", dict]:
        """Step `step`'s rollouts and their staleness metrics; in async mode, first hand the engines
        the prompts of the next `max_staleness` steps."""
        k = self.cfg.rollout.max_staleness if self.asynchronous else 0
        if not self.queue:
            self._submit(step, draw, sampling(step))
        for ahead in range(step + len(self.queue), min(step + 1 + k, self.cfg.steps)):
            self._submit(ahead, draw, sampling(ahead))
        gen = self.queue.popleft()
        if gen.step != step:
            raise RuntimeError(f"rollout pipeline out of order: expected step {step}, have {gen.step}")
        self._collect(gen)
        staleness = self.version - gen.version
        if staleness > k:
            raise RuntimeError(f"step {step}: batch generated with weight version {gen.version}, trainer at "
                               f"{self.version}: staleness {staleness} > rollout.max_staleness {k}")
        return gen.batch, {"rollout/staleness": float(staleness), "rollout/version": float(gen.version),
                           "prompts/start": float(gen.prompts.start), "prompts/count": float(len(gen.prompts.ids))}

    def before_push(self) -> float:
        """Collect every generation still in the engines (the push queues behind them); returns the
        seconds the trainer waited for them."""
        t0 = time.monotonic()
        for gen in self.queue:
            self._collect(gen)
        return time.monotonic() - t0

    def pushed(self) -> None:
        self.version += 1

    def untrained_prompts(self) -> int:
        """Prompts drawn for steps not trained yet (buffered or in flight)."""
        return sum(len(g.prompts.ids) for g in self.queue)

    def reset(self) -> None:
        """Drop buffered and in-flight generations (after a restore: their prompts are drawn again)."""
        self.queue.clear()

    # -- internals ---------------------------------------------------------------------------
    def _submit(self, step: int, draw: Draw, sampling: dict) -> None:
        prompts = draw(self.cfg.algo.prompts_per_step)
        gen = Generation(step, prompts, sampling, self.version)
        if self.asynchronous:
            gen.pending = self.roles.groups["rollout"].generate.submit(prompts.ids, sampling)
        self.queue.append(gen)

    def _collect(self, gen: Generation) -> None:
        """The generation's batch: its pending first turn (async), or generated now; a dead engine is
        restarted and re-synced (`RoleGroups.generate`) and the generation redone with the weights
        pushed last."""
        from llmray.rl.worker_group import WorkerDiedError

        if gen.batch is not None:
            return
        first = None
        if gen.pending is not None:
            try:
                first = gen.pending.result()
            except WorkerDiedError as e:
                group = self.roles.groups["rollout"]
                for rank in e.ranks:
                    group.restart(rank, cause=f"died while generating step {gen.step}: {e}")
                self.roles.on_rollout_restart(group, list(e.ranks))
                gen.version = self.version
            gen.pending = None
        gen.batch = self.play(gen.prompts, gen.sampling, gen.version, first=first)

    def play(self, prompts: Prompts, sampling: dict, version: int, first: list | None = None,
             offset: int = 0) -> "RLBatch":
        """Episodes over `prompts` (`llmray.rl.episodes`; one turn unless `rollout.max_turns` > 1) as a
        batch. `first`: the first turn's rollouts when they were generated already (async). Tokens of
        the first turn carry `version`; later turns are generated now, with the current weights."""
        from llmray.rl.batch import RLBatch
        from llmray.rl.env import env_factories
        from llmray.rl.episodes import run_episodes

        r = self.cfg.rollout
        first_turn = [first]

        def generate(ids: list[list[int]], s: dict) -> list[dict]:
            got, first_turn[0] = first_turn[0], None
            return got if got is not None else self.roles.generate(ids, s)

        versions = iter([version])
        rollouts = run_episodes(generate, env_factories(prompts.answers, r.env), prompts.ids, sampling, r.max_turns,
                                self.tokenizer, r.max_model_len, version=lambda: next(versions, self.version))
        return RLBatch.from_rollouts(rollouts, prompts.answers, pad_id=self.pad_id, prompt_offset=offset,
                                     version=version)
