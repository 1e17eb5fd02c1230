"""A real two-node Ray cluster on this machine, with token auth, that never touches anyone else's Ray.

Each node is `ray start --block --node-ip-address=127.0.0.1` in its own session (setsid) with every
port chosen free (GCS, dashboard, client server, node manager, object manager, agents, metrics),
a `--temp-dir` of its own (with a shared one, one node's runtime_env agent deleted environments the
other node's jobs were using), and HOME pointed at a temp dir holding the token (so ~/.ray/auth_token of
the machine's user is never read or written). Stopping kills exactly the processes of those
sessions, by pid: `ray stop` would end every Ray process of the user, including other engineers'.

The dashboard and Jobs API are on 127.0.0.1. Ray 2.60 itself turns 127.0.0.1 into the machine's
network address once a second node may join, so the GCS and raylets also listen on that address,
behind the token (docs/operations.md section 2 keeps a hand-started cluster in a network namespace;
the test's client would then have to run inside it too).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
# `ray start`, except that the node's wait for its raylet to register with the GCS is patient:
# Ray hard-codes 30 s there, which a 2-core machine shared by several engineers can miss (load
# average 40+ was seen). Same CLI, same processes; the wait stays bounded (120 s).
PATIENT_RAY_START = """
import sys, time
import ray._private.services as services
_get_node = services.get_node
def get_node(*args, **kwargs):
    deadline = time.monotonic() + 120
    while True:
        try:
            return _get_node(*args, **kwargs)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
services.get_node = get_node
from ray.scripts.scripts import main
sys.argv = ["ray", *sys.argv[1:]]
sys.exit(main())
"""
START_TIMEOUT_S = 150  # the shared 2-core machine can be very loaded; bounded all the same


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def session_pids(sid: int) -> list[int]:
    """Pids of every live process in session `sid` (the `ray start` we launched and its children)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(d.name))
    return out


class NodeExited(RuntimeError):
    pass


class LocalRayCluster:
    """Head + workers on 127.0.0.1 with token auth; `stop()` ends only the processes it started."""

    def __init__(self, token: str | None = None, num_cpus: int = 1, node_resources: list[dict] | None = None):
        self.token = token or secrets.token_hex(24)
        self.num_cpus = num_cpus
        self.node_resources = node_resources or []
        """Custom Ray resources per node, head first (what a role's `resources` pins it to)."""
        # Short root: Ray's unix socket paths live under --temp-dir and must stay < 108 chars.
        self.root = Path(tempfile.mkdtemp(prefix="llmray-ops-", dir="/tmp"))
        self.home = self.root / "home"
        (self.home / ".ray").mkdir(parents=True)
        (self.home / ".ray" / "auth_token").write_text(self.token)
        self.nodes: list[subprocess.Popen] = []
        self.crashes_seen: set[str] = set()
        self.gcs_port, self.dashboard_port, self.client_port = free_ports(3)
        self.env = self.node_env()

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def node_env(self, with_token: bool = True) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_AUTH", "RAY_ADDRESS")) and k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        env.update(HOME=str(self.home if with_token else self.root / "nohome"), RAY_AUTH_MODE="token",
                   RAY_USAGE_STATS_ENABLED="0", PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
                   DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"),
                   # A raylet waits a fixed time for its agents (Python processes) to report in and
                   # aborts after it: on a machine at load average 50+ they were seen to miss it.
                   RAY_agent_register_timeout_ms="120000")
        return env

    def _start(self, args: list[str], name: str, index: int = 0) -> None:
        nm, om, agent, agent_grpc, rt_agent, metrics = free_ports(6)
        if index < len(self.node_resources):
            args = [*args, f"--resources={json.dumps(self.node_resources[index])}"]
        cmd = [sys.executable, "-c", PATIENT_RAY_START, "start", "--block", "--node-ip-address=127.0.0.1",
               f"--num-cpus={self.num_cpus}", "--object-store-memory=100000000",
               f"--temp-dir={self.root / ('ray-' + name.split('-')[0])}", "--disable-usage-stats",
               f"--node-manager-port={nm}", f"--object-manager-port={om}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={rt_agent}", f"--metrics-export-port={metrics}", *args]
        with open(self.root / f"{name}.log", "w") as log:  # the child keeps its own copy of the fd
            self.nodes.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True, cwd=self.root))

    def start(self, workers: int = 1) -> LocalRayCluster:
        self._start_retrying(["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                              f"--dashboard-port={self.dashboard_port}",
                              f"--ray-client-server-port={self.client_port}"], "head", 1, index=0)
        for i in range(workers):
            self._start_retrying([f"--address=127.0.0.1:{self.gcs_port}"], f"worker{i}", 2 + i, index=1 + i)
        return self

    def _start_retrying(self, args: list[str], name: str, expect_nodes: int, attempts: int = 4,
                        index: int = 0) -> None:
        """`ray start` gives a raylet a fixed 30 s to register, which a loaded 2-core machine can
        miss: a node that exits during start-up is cleaned up and started again (bounded)."""
        for attempt in range(1, attempts + 1):
            self._start(args, f"{name}-{attempt}", index)
            try:
                self.wait_nodes(expect_nodes)
                return
            except RuntimeError:  # exited, raylet aborted, or not up in time: clean up, try again
                dead = self.nodes.pop()
                self._kill_session(dead)
                if attempt == attempts:
                    raise

    def alive_nodes(self) -> list[dict]:
        import httpx

        r = httpx.get(f"{self.dashboard_url}/api/v0/nodes", headers=self.auth_headers, timeout=10)
        r.raise_for_status()
        return [n for n in r.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def wait_nodes(self, n: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        err = None
        while time.monotonic() < deadline:
            for p in self.nodes:
                if p.poll() is not None:
                    raise NodeExited(f"a Ray node exited with {p.returncode}: {self.logs_tail()}")
            crashed = self.raylet_crashes() - self.crashes_seen
            if crashed:  # a raylet aborted (e.g. its agents were too slow to start): don't wait it out
                self.crashes_seen |= crashed
                raise NodeExited(f"a raylet aborted at start-up: {sorted(crashed)}")
            try:
                if len(self.alive_nodes()) >= n:
                    return
            except Exception as e:  # noqa: BLE001 - dashboard not up yet
                err = e
            time.sleep(1.0)
        raise RuntimeError(f"{n} Ray node(s) not alive after {START_TIMEOUT_S}s ({err}): {self.logs_tail()}")

    def raylet_crashes(self) -> set[str]:
        out = set()
        for f in self.root.glob("ray-*/session_*/logs/raylet*.err"):
            try:
                if "Check failed" in f.read_text(errors="replace"):
                    out.add(str(f))
            except OSError:
                pass
        return out

    def logs_tail(self) -> str:
        return " | ".join(p.read_text()[-400:] for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        """SIGTERM every process of our node sessions (workers first), SIGKILL what is left."""
        for p in reversed(self.nodes):
            for pid in session_pids(p.pid):
                with _quiet():
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and any(session_pids(p.pid) for p in self.nodes):
            time.sleep(0.5)
        for p in self.nodes:
            self._kill_session(p)
        self.nodes = []
        shutil.rmtree(self.root, ignore_errors=True)


    @staticmethod
    def _kill_session(p: subprocess.Popen) -> None:
        for pid in session_pids(p.pid):
            with _quiet():
                os.kill(pid, signal.SIGKILL)
        with _quiet():
            p.wait(timeout=10)


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] in (ProcessLookupError, PermissionError, subprocess.TimeoutExpired)


# Custom resources per node: `node_a` only on the head, `node_b` only on the worker, one `train_slot` on
# each (a Ray Train worker asking for {train_slot: 1} gets a node to itself).
NODE_RESOURCES = [{"node_a": 8, "train_slot": 1}, {"node_b": 8, "train_slot": 1}]


@pytest.fixture(scope="module")
def two_node_cluster():
    """Head + one worker, 2 logical CPUs each (the machine's 2 cores shared), custom resources
    NODE_RESOURCES, token auth on, dashboard on 127.0.0.1:<free port>."""
    cluster = LocalRayCluster(num_cpus=2, node_resources=NODE_RESOURCES)
    try:
        yield cluster.start(workers=1)
    finally:
        cluster.stop()
        leftover = [pid for p in cluster.nodes for pid in session_pids(p.pid)]
        assert not leftover, f"processes left running: {leftover}"
