"""Collective weight sync over gloo, the code path GPUs run over NCCL: real DeepSpeed actor ranks
(ZeRO-3 on 2 ranks, one bucket gathered at a time) broadcast into a real vLLM engine that joined the
group itself. Greedy tokens then equal transformers' on the pushed weights; a corrupted bucket is
named; an engine killed mid-push is restarted and re-synced; a replaced actor group re-forms the group."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import ray

sys.path.insert(0, str(Path(__file__).parent))
from conftest import hf_greedy  # noqa: E402

from llmray.rl.dispatch import register  # noqa: E402
from llmray.rl.weight_collective import CollectiveSync  # noqa: E402
from llmray.rl.weight_sync import WeightSyncError, push_with_restart  # noqa: E402
from llmray.rl.worker_group import WorkerGroup  # noqa: E402
from llmray.rl.workers.actor import ActorWorker  # noqa: E402
from llmray.rl.workers.rollout import RolloutWorker  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 40, 41], [1, 300, 301, 302, 303]]


class FaultyLink:
    """The sender's group with a faulty link (a test double for what a network cannot be made to do on
    demand): `corrupt` flips the bits of the first byte of the second bucket after its checksum was
    taken; `slow` waits 0.3 s before each bucket."""

    def __init__(self, group, fault: str):
        self.group, self.fault, self.sent = group, fault, 0

    def __getattr__(self, name):
        return getattr(self.group, name)

    def post(self, t):
        if self.fault == "corrupt" and self.sent == 1:
            t = t.clone()
            t[0] = 255 - t[0]
        if self.fault == "slow":
            time.sleep(0.3)
        self.sent += 1
        return self.group.post(t)


class FaultyActor(ActorWorker):
    fault: str | None = None

    @register("broadcast")
    def set_fault(self, fault: str | None) -> None:
        self.fault = fault

    @register("rank0")
    def weight_join(self, *args) -> int:
        rank = super().weight_join(*args)
        if self.fault:
            self._weight_group = FaultyLink(self._weight_group, self.fault)
        return rank


def actor_group(model_dir, num_workers: int, zero_stage: int) -> WorkerGroup:
    from llmray.config import to_dict
    from llmray.rl.config import TrainRoleConfig

    rc = TrainRoleConfig()
    ds = {**to_dict(rc.deepspeed), "zero_stage": zero_stage, "micro_batch_size": 2}
    return WorkerGroup("actor", FaultyActor, num_workers, {"CPU": 0.25}, call_timeout_s=300,
                       init_kwargs={"model_dir": str(model_dir), "deepspeed": ds,
                                    "optimizer": to_dict(rc.optimizer)})


@pytest.fixture(scope="module")
def engine(ray_cluster, tiny_model_dir):
    g = WorkerGroup("rollout", RolloutWorker, num_workers=1, resources={"CPU": 0.5}, call_timeout_s=300,
                    init_kwargs={"model_dir": str(tiny_model_dir), "max_model_len": 128, "dtype": "float32",
                                 "kv_cache_gb": 1})
    yield g
    g.shutdown()


@pytest.fixture(scope="module")
def actor(ray_cluster, other_model_dir):
    g = actor_group(other_model_dir, 2, 3)
    yield g
    g.shutdown()


@pytest.fixture(scope="module")
def hf_models(tiny_model_dir, other_model_dir):
    from llmray.models.factory import load_pretrained

    return load_pretrained(tiny_model_dir)[0], load_pretrained(other_model_dir)[0]


def test_collective_push_from_zero3_then_greedy_equals_transformers(engine, actor, hf_models, tmp_path):
    base, other = hf_models
    expected = [hf_greedy(other, p, 10, 2) for p in PROMPTS]
    assert engine.greedy(PROMPTS, 10) == [hf_greedy(base, p, 10, 2) for p in PROMPTS] != expected
    m = CollectiveSync(bucket_mb=0.25, timeout_s=120, backend="gloo").push_actor(actor, engine)
    assert m["weight_sync/buckets"] > 4 and m["weight_sync/engines"] == 1
    assert m["weight_sync/tensors"] == len(list(other.named_parameters()))
    assert m["weight_sync/bytes"] >= sum(p.numel() * 4 for p in other.parameters())
    assert engine.greedy(PROMPTS, 10) == expected
    # The export gathers the same way (every ZeRO-3 rank takes part, rank 0 saves).
    actor.save_hf(str(tmp_path))
    from llmray.models.factory import load_pretrained

    saved = dict(load_pretrained(tmp_path)[0].named_parameters())
    assert all(saved[n].equal(p) for n, p in other.named_parameters())


def test_corrupted_bucket_is_named(engine, actor):
    actor.set_fault("corrupt")
    try:
        with pytest.raises(WeightSyncError, match=r"checksum mismatch on rollout rank 0, bucket 1 "):
            CollectiveSync(bucket_mb=0.25, timeout_s=120).push_actor(actor, engine)
    finally:
        actor.set_fault(None)


def test_engine_killed_mid_push_is_restarted_and_resynced(engine, actor, hf_models):
    sync = CollectiveSync(bucket_mb=0.25, timeout_s=120)
    actor.set_fault("slow")
    sync.push_actor(actor, engine)                          # group formed, with the slow link
    pid, restarted = engine.pids()[0], []
    killer = threading.Timer(1.0, os.kill, (pid, signal.SIGKILL))
    killer.start()
    t0 = time.monotonic()
    m = push_with_restart(sync, actor, engine, max_restarts=1, on_restart=restarted.append)
    print(f"push with a kill and a restart: {time.monotonic() - t0:.1f}s")
    actor.set_fault(None)
    assert restarted == [0] and engine.pids()[0] != pid and sync.generation == 2
    assert m["weight_sync/buckets"] > 4
    assert engine.greedy(PROMPTS, 10) == [hf_greedy(hf_models[1], p, 10, 2) for p in PROMPTS]


def test_replaced_actor_group_reforms_the_group(engine, hf_models, tiny_model_dir, other_model_dir):
    """An actor restart (a new group, new processes): the next push forms a new group and lands."""
    sync = CollectiveSync(bucket_mb=1, timeout_s=120)
    first = actor_group(other_model_dir, 1, 0)
    try:
        sync.push_actor(first, engine)
    finally:
        first.shutdown()
    second = actor_group(tiny_model_dir, 1, 0)
    try:
        sync.push_actor(second, engine)
        assert sync.generation == 2
        assert engine.greedy(PROMPTS, 10) == [hf_greedy(hf_models[0], p, 10, 2) for p in PROMPTS]
    finally:
        second.shutdown()
