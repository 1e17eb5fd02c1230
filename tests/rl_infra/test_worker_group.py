"""WorkerGroup on a real local Ray cluster: dispatch modes with uneven batches, rank env, timeouts,
liveness, worker errors, death detection and restart."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
import ray

from llmray.rl.dispatch import register
from llmray.rl.groups import make_placement_group
from llmray.rl.worker_group import (WorkerDiedError, WorkerGroup, WorkerStartError, WorkerTimeoutError,
                                    call_with_restart)

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test classes travel by value


class Echo:
    def __init__(self, tag: str = "x", fail: bool = False):
        if fail:
            raise ValueError("bad init on purpose")
        self.tag, self.rank = tag, int(os.environ["RANK"])
        self.calls = 0

    @register("split", offset_kwarg="offset")
    def square(self, xs: list[int], offset: int = 0) -> list[dict]:
        self.calls += 1
        return [{"i": offset + i, "x": x * x, "rank": self.rank} for i, x in enumerate(xs)]

    @register("split")
    def pairs(self, a: list[int], b: list[int], scale: int) -> list[int]:
        return [scale * (x + y) for x, y in zip(a, b)]

    @register("broadcast")
    def env(self) -> dict:
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LLMRAY_TEST")
        return {k: os.environ.get(k) for k in keys} | {"tag": self.tag}

    @register("rank0")
    def whoami(self) -> int:
        return self.rank

    @register("broadcast")
    def sleep(self, s: float) -> int:
        time.sleep(s)
        return self.rank

    @register("broadcast")
    def boom(self) -> None:
        raise KeyError("field 'answer' missing")

    @register("broadcast")
    def count(self) -> int:
        return self.calls

    @register("broadcast")
    def torch_threads(self) -> int:
        import torch

        return torch.get_num_threads()


@pytest.fixture(scope="module")
def group(ray_cluster):
    g = WorkerGroup("toy", Echo, num_workers=3, resources={"CPU": 0.1}, init_kwargs={"tag": "t"},
                    call_timeout_s=60, env={"LLMRAY_TEST": "yes"})
    yield g
    g.shutdown()


def test_split_uneven_and_offsets(group):
    out = group.square(list(range(7)))                      # 7 over 3 ranks: 3, 2, 2
    assert [o["x"] for o in out] == [x * x for x in range(7)]
    assert [o["i"] for o in out] == list(range(7))         # global index via offset_kwarg
    assert [o["rank"] for o in out] == [0, 0, 0, 1, 1, 2, 2]
    small = group.square([5, 6])                            # fewer items than ranks: rank 2 gets []
    assert [o["x"] for o in small] == [25, 36] and [o["rank"] for o in small] == [0, 1]
    assert group.count() == [2, 2, 2]                       # every rank was called both times


def test_split_several_lists_and_broadcast_scalars(group):
    assert group.pairs([1, 2, 3, 4], [10, 20, 30, 40], 2) == [22, 44, 66, 88]
    with pytest.raises(ValueError, match="differ in length"):
        group.pairs([1, 2], [1, 2, 3], 1)


def test_broadcast_rank0_and_rank_env(group):
    envs = group.env()
    assert [e["RANK"] for e in envs] == ["0", "1", "2"]
    assert {e["WORLD_SIZE"] for e in envs} == {"3"} and [e["LOCAL_RANK"] for e in envs] == ["0", "1", "2"]
    assert {e["LOCAL_WORLD_SIZE"] for e in envs} == {"3"}  # one node: Ray's local rank = rank here
    assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}) == 1
    assert int(envs[0]["MASTER_PORT"]) > 0 and envs[0]["MASTER_ADDR"]
    assert {e["LLMRAY_TEST"] for e in envs} == {"yes"} and {e["tag"] for e in envs} == {"t"}
    assert group.whoami() == 0
    assert group.whoami(dispatch="broadcast") == [0, 1, 2]
    assert group.call("whoami", dispatch="broadcast") == [0, 1, 2]  # the explicit form, for name clashes


def test_timeout_names_role_method_rank(group):
    t0 = time.monotonic()
    with pytest.raises(WorkerTimeoutError, match=r"toy\.sleep timed out after 1s on rank\(s\) \[0, 1, 2\]") as e:
        group.sleep(6.0, timeout_s=1.0)
    assert time.monotonic() - t0 < 5.0
    assert e.value.role == "toy" and e.value.method == "sleep" and e.value.ranks == [0, 1, 2]
    assert group.alive(timeout_s=5.0) == [True, True, True]  # pings answer while the sleep runs
    assert group.sleep(0.0, timeout_s=30) == [0, 1, 2]        # queued behind the stuck call, then fine


def test_worker_exception_keeps_type_and_names_rank(group):
    with pytest.raises(KeyError, match="answer") as e:
        group.boom()
    import re

    assert re.search(r"in toy rank [012], method boom", "".join(getattr(e.value, "__notes__", [])))


def test_unknown_method(group):
    with pytest.raises(AttributeError, match="no_such"):
        group.no_such()


def test_call_threads_apply_to_that_call_only(group):
    before = group.torch_threads()
    assert group.torch_threads.submit(threads=1).result() == [1, 1, 1]
    assert group.torch_threads.submit(threads=3).result() == [3, 3, 3]
    assert group.torch_threads() == before


def test_phase_threads_split_the_cores():
    from llmray.rl.groups import phase_threads

    assert phase_threads(8, 1) == 8 and phase_threads(8, 3) == 2 and phase_threads(2, 4) == 1
    assert phase_threads(2, 0) == 2


def test_submit_runs_groups_concurrently(group):
    t0 = time.monotonic()
    a = group.sleep.submit(1.5)
    b = group.whoami.submit()
    assert b.result() == 0  # queued behind the sleep on rank 0
    assert a.result() == [0, 1, 2]
    assert time.monotonic() - t0 < 10


def test_kill_by_pid_detect_restart_retry(ray_cluster):
    g = WorkerGroup("toy", Echo, num_workers=2, resources={"CPU": 0.1}, call_timeout_s=60)
    try:
        pids = g.pids()
        assert len(set(pids)) == 2 and all(p > 0 for p in pids)
        os.kill(pids[1], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while g.alive(timeout_s=2.0)[1] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert g.alive(timeout_s=5.0) == [True, False]
        with pytest.raises(WorkerDiedError, match="toy rank 1 died") as e:
            g.square([1, 2, 3, 4])
        assert e.value.ranks == [1]

        os.kill(g.pids()[0], signal.SIGKILL)
        resynced = []
        out = call_with_restart(g.square, [1, 2, 3, 4], on_restart=lambda grp, ranks: resynced.append(ranks),
                                max_restarts=2)
        assert [o["x"] for o in out] == [1, 4, 9, 16]
        assert g.alive() == [True, True]
        assert resynced and sorted(r for rs in resynced for r in rs) == [0, 1]
        assert [r["rank"] for r in g.restarts] == [0, 1] or sorted(r["rank"] for r in g.restarts) == [0, 1]
        assert all("WorkerDiedError" in r["cause"] for r in g.restarts)
        assert g.pids()[0] != pids[0] and g.pids()[1] != pids[1]
        assert [e["RANK"] for e in g.env()] == ["0", "1"]       # same rank env after restart
    finally:
        g.shutdown()


def test_bad_init_and_unschedulable_fail_clearly(ray_cluster):
    with pytest.raises(WorkerStartError, match="toy worker failed to start.*bad init on purpose"):
        WorkerGroup("toy", Echo, num_workers=1, resources={"CPU": 0.1}, init_kwargs={"fail": True})
    with pytest.raises(RuntimeError, match="needs GPU=1"):
        make_placement_group([{"GPU": 1}], timeout_s=0.5, what="rollout group")
