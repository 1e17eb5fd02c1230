"""RoleGroups starts every role's group at once: all start, or none stays up and the first failure in
role order is raised."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from llmray.rl.groups import RoleGroups


class _Group:
    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def shutdown(self) -> None:
        self.log.append(self.name)


def test_groups_start_concurrently():
    barrier = threading.Barrier(3, timeout=5)  # passes only if all three builders run at the same time
    stopped: list = []
    roles = SimpleNamespace(groups={})

    def build(name):
        def f():
            barrier.wait()
            return _Group(name, stopped)
        return f

    RoleGroups._start_all(roles, {r: build(r) for r in ("rollout", "actor", "ref")})
    assert list(roles.groups) == ["rollout", "actor", "ref"] and stopped == []


def test_a_failed_role_stops_the_others_and_the_first_failure_in_role_order_is_raised():
    stopped: list = []
    roles = SimpleNamespace(groups={})

    def ok(name):
        return lambda: _Group(name, stopped)

    def fail(msg, delay):
        def f():
            time.sleep(delay)
            raise RuntimeError(msg)
        return f

    builders = {"rollout": fail("rollout engine failed", 0.2), "actor": ok("actor"),
                "critic": fail("critic failed", 0.0), "ref": ok("ref")}
    with pytest.raises(RuntimeError, match="rollout engine failed"):  # first in role order, not in time
        RoleGroups._start_all(roles, builders)
    assert sorted(stopped) == ["actor", "ref"] and roles.groups == {}
