"""Rollouts for the RL step, synchronous or asynchronous with bounded staleness, with partial rollouts.

    pipe = RolloutPipeline(roles, cfg, pad_id)
    batch = pipe.batch(step, draw, sampling)   # sync: generate now; async: the batch generated earlier
    ... score, update ...
    pipe.before_push()                         # async without partial rollouts: collect the next batches
    with pipe.lock:                            # no segment is handed to the engines during the push
        sync.push(...); pipe.pushed()          # the engines' weight version + 1

Async (`rollout.mode: async`, `rollout.max_staleness: k`): at step t the engines are handed the
prompts of steps t+1 .. t+k (drawn from the run's prompt cursor) and generate them while the
trainer scores and updates on step t's batch. Every token records the version that generated it
(`RLBatch.token_versions`); a batch is trained at most k versions after its oldest token's version,
which `batch` checks. The PPO ratio's denominator is then the actor's own recomputed log-probs (the
proximal policy), and the behaviour policy's vLLM log-probs enter through truncated importance
weights (`algo.tis_cap`, required in async mode).

Partial rollouts (`rollout.partial`, on by default in async mode): a driver thread generates the
queued batches one after another in segments of `rollout.segment_tokens` tokens
(`llmray.rl.segments`), each segment one engine call, so a weight push queues behind one segment
only and the segments after it continue the unfinished samples on the new weights; their tokens
carry both versions (`rollout/partial_frac`: the share of samples that do). The thread hands a
segment to the engines under `lock` and reads the version there; a push holds `lock` from its first
call to `pushed()`, and a Ray actor runs one caller's calls in order, so each segment runs wholly on
the weights of the version it recorded. Without partial rollouts the push queues behind the whole
generations, so `before_push` collects them first.

Checkpoints save the cursor of the prompts trained on (`untrained_prompts` are subtracted); the
buffered batches are dropped on resume and their prompts drawn again, so each prompt is trained
on exactly once across a kill and a resume.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future
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
    cancelled: bool = False
    segments: int = 0
    """Partial rollouts: the engine calls the first turn took (one per segment)."""


class RolloutPipeline:
    def __init__(self, roles: "RoleGroups", cfg: "RLConfig", pad_id: int, tokenizer=None):
        self.roles, self.cfg, self.pad_id, self.tokenizer = roles, cfg, pad_id, tokenizer
        self.version = 0
        """Weight pushes into the engines so far (0: the starting policy)."""
        self.queue: deque[Generation] = deque()
        self.lock = roles.rollout_lock
        """Held while the engines' weights change (a push, a restart) and while a call is handed to them."""
        self._jobs: queue.Queue | None = None
        """Partial rollouts: generations for the driver thread that runs their segments, in order."""

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
        oldest, partial_frac = version_stats(gen.batch, gen.version)
        staleness = self.version - oldest
        if staleness > k:
            raise RuntimeError(f"step {step}: batch's oldest tokens generated with weight version {oldest}, "
                               f"trainer at {self.version}: staleness {staleness} > rollout.max_staleness {k}")
        return gen.batch, {"rollout/staleness": float(staleness), "rollout/version": float(oldest),
                           "rollout/partial_frac": partial_frac, "rollout/segments": float(gen.segments),
                           "prompts/start": float(gen.prompts.start), "prompts/count": float(len(gen.prompts.ids))}

    def before_push(self) -> float:
        """Without partial rollouts, collect every generation still in the engines (the push queues
        behind them); returns the seconds the trainer waited for them. With partial rollouts the push
        waits for one segment only (inside the push)."""
        t0 = time.monotonic()
        if not self.cfg.rollout.partial_rollouts:
            for gen in self.queue:
                self._collect(gen)
        return time.monotonic() - t0

    def pushed(self) -> None:
        self.version += 1

    def untrained_prompts(self) -> int:
        """Prompts drawn for steps not trained yet (buffered or in flight)."""
        return sum(len(g.prompts.ids) for g in self.queue)

    def reset(self) -> None:
        """Drop buffered and in-flight generations (after a restore: their prompts are drawn again); the
        driver thread hands none of their segments to the engines from now on."""
        with self.lock:
            for gen in self.queue:
                gen.cancelled = True
                if isinstance(gen.pending, Future):
                    gen.pending.cancel()
        self.queue.clear()

    # -- internals ---------------------------------------------------------------------------
    def _submit(self, step: int, draw: Draw, sampling: dict) -> None:
        prompts = draw(self.cfg.algo.prompts_per_step)
        gen = Generation(step, prompts, sampling, self.version)
        if self.cfg.rollout.partial_rollouts:
            gen.pending = Future()
            if self._jobs is None:
                self._jobs = queue.Queue()
                threading.Thread(target=self._run_jobs, name="llmray-partial-rollouts", daemon=True).start()
            self._jobs.put(gen)
        elif self.asynchronous:
            gen.pending = self.roles.groups["rollout"].generate.submit(prompts.ids, sampling)
        self.queue.append(gen)

    def _run_jobs(self) -> None:
        """The driver thread of partial rollouts: each queued generation's segments, one after another."""
        while True:
            gen = self._jobs.get()
            if not gen.pending.set_running_or_notify_cancel():
                continue
            try:
                gen.pending.set_result(self._segmented(gen))
            except BaseException as e:  # noqa: BLE001 - raised where the batch is collected
                gen.pending.set_exception(e)

    def _segmented(self, gen: Generation) -> list[dict]:
        """The first turn of `gen` generated segment by segment; each segment with the weights the
        engines hold when it is handed to them (`lock`), its version recorded on its tokens."""
        from llmray.rl.segments import advance, finished_records, segment_requests

        group = self.roles.groups["rollout"]
        ids, parts = gen.prompts.ids, None
        for seg in itertools.count():
            requests = segment_requests(ids, gen.sampling, self.cfg.rollout.segment_tokens, seg, parts)
            if not requests:
                break
            with self.lock:
                if gen.cancelled:
                    raise CancelledError(f"step {gen.step}'s generation was dropped")
                version = self.version
                pending = [group.generate.submit(r.prompt_ids, r.sampling) for r in requests]
            parts = advance(ids, gen.sampling, parts, requests, [p.result() for p in pending], version)
            gen.segments += len(requests)
        return finished_records(ids, parts, self.tokenizer)

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
                with self.lock:  # a rank restarted already for an earlier generation is alive again
                    alive = group.alive()
                    dead = [r for r in e.ranks if not alive[r]]
                    for rank in dead:
                        group.restart(rank, cause=f"died while generating step {gen.step}: {e}")
                    if dead:
                        self.roles.on_rollout_restart(group, dead)
                gen.version = self.version
            gen.pending = None
        gen.batch = self.play(gen.prompts, gen.sampling, gen.version, first=first)

    def play(self, prompts: Prompts, sampling: dict, version: int, first: list | None = None,
             offset: int = 0) -> "RLBatch":
        """Episodes over `prompts` (`llmray.rl.episodes`; one turn unless `rollout.max_turns` > 1) as a
        batch. `first`: the first turn's rollouts when they were generated already (async; with
        `token_versions` when partial). Other tokens of the first turn carry `version`; later turns
        are generated now, with the current weights."""
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


def version_stats(batch: "RLBatch", version: int) -> tuple[int, float]:
    """(oldest weight version among the batch's response tokens, share of rows whose tokens span more
    than one version); `version` when the batch has no response token."""
    import torch

    v, real = batch.token_versions, batch.response_mask > 0
    if v is None or not bool(real.any()):
        return int(version), 0.0
    big = torch.iinfo(v.dtype).max
    lo = torch.where(real, v, torch.full_like(v, big)).min(dim=1).values
    hi = torch.where(real, v, torch.full_like(v, -1)).max(dim=1).values
    rows = real.any(dim=1)
    return int(lo[rows].min()), float(((hi > lo) & rows).float().mean())
