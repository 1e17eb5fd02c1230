"""The placement plan, pure: worker groups -> placement-group bundles -> node, local rank, device, on a
described cluster (no Ray, no hardware). `llmray plan` prints it; the RL role groups and the train
workers ask Ray for the very bundles `Group.bundles()` lists (llmray/rl/groups.py: `placement_groups`).

    nodes = [Node("node0", cpus=96, gpus=8, gpu_memory_gb=80), Node("node1", cpus=96, gpus=8, gpu_memory_gb=80)]
    slots = place(placement_groups(cfg), nodes)     # one Slot per worker, or PlanError naming the key

The simulation follows Ray's PACK strategy on an empty cluster: each placement group goes whole onto
the first node that holds all its bundles, else bundle by bundle onto the first node with room.
Within a node a fractional-GPU bundle shares the first GPU with room left (as Ray packs fractions).
Ray may pick a different node of the same shape; local ranks and devices follow the same rules there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmray.errors import UserError

EPS = 1e-9


class PlanError(UserError):
    """The plan cannot fit the described cluster; the message names the config key to change."""


@dataclass(frozen=True)
class Node:
    name: str
    cpus: float
    gpus: int = 0
    gpu_memory_gb: float = 0.0
    memory_gb: float = 0.0
    gpu_type: str = ""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources the node offers (e.g. a node label {"node_b": 8})."""

    def capacity(self) -> dict[str, float]:
        return {"CPU": self.cpus, "GPU": float(self.gpus), **self.resources}


@dataclass(frozen=True)
class Role:
    """One kind of worker: `key` is its config section (`rollout`, `actor`, `scaling`) for error messages."""

    name: str
    num_workers: int
    bundle: dict[str, float]
    """What one worker asks Ray for (CPU, GPU, custom resources)."""
    key: str
    settings: dict[str, str] = field(default_factory=dict)
    """Config key of a resource or of the worker count (`workers`) when not `<key>.cpus_per_worker`,
    `<key>.gpus_per_worker`, `<key>.resources.<name>`, `<key>.num_workers`."""

    def setting(self, what: str) -> str:
        default = {"CPU": "cpus_per_worker", "GPU": "gpus_per_worker", "workers": "num_workers"}
        return self.settings.get(what) or f"{self.key}.{default.get(what, f'resources.{what}')}"


@dataclass(frozen=True)
class Group:
    """One placement group: one role, or two colocated roles sharing each rank's bundle (actor+ref)."""

    roles: tuple[Role, ...]
    ray_train: bool = False
    """Ray Train workers: the node's GPUs of the group are visible to all of them (CUDA_VISIBLE_DEVICES)."""
    strategy: str = "PACK"

    @property
    def name(self) -> str:
        return "+".join(r.name for r in self.roles)

    @property
    def num_workers(self) -> int:
        return self.roles[0].num_workers

    def bundles(self) -> list[dict[str, float]]:
        return [shared_bundle(*(r.bundle for r in self.roles))] * self.num_workers


@dataclass(frozen=True)
class Slot:
    """Where one worker runs."""

    role: str
    rank: int
    group: str
    bundle: int
    node: str
    local_rank: int
    local_world_size: int
    gpu_ids: tuple[int, ...]
    """The node's GPU ids Ray assigns (what CUDA_VISIBLE_DEVICES names); empty without GPUs."""
    device: str
    """What llmray.device.worker_device() answers there: `cpu` or `cuda:<index as the process sees it>`."""
    gpu_share: float = 0.0


def shared_bundle(*bundles: dict[str, float]) -> dict[str, float]:
    """One bundle holding several colocated workers' resources (their sum, key by key)."""
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


def local_ranks(node_of_rank: list[str]) -> list[tuple[int, int]]:
    """Per rank: (local rank, local world size), i.e. its position among the ranks on the same node (in
    rank order) and how many there are. ['a', 'b', 'a'] -> [(0, 2), (0, 1), (1, 2)]."""
    seen: dict[str, int] = {}
    out = []
    for node in node_of_rank:
        out.append(seen.get(node, 0))
        seen[node] = out[-1] + 1
    return [(lr, seen[n]) for lr, n in zip(out, node_of_rank)]


def _fits(free: dict[str, float], bundle: dict[str, float], gpu_free: list[float]) -> bool:
    if any(free.get(k, 0.0) + EPS < v for k, v in bundle.items() if k not in ("GPU", "memory")):
        return False
    return _pick_gpus(gpu_free, bundle.get("GPU", 0.0)) is not None


def _pick_gpus(gpu_free: list[float], want: float) -> list[int] | None:
    """GPU ids for a bundle asking `want` GPUs: a fraction shares the first GPU with room, whole
    numbers take whole free GPUs."""
    if want <= EPS:
        return []
    if want < 1 - EPS:
        return next(([i] for i, f in enumerate(gpu_free) if f + EPS >= want), None)
    whole = [i for i, f in enumerate(gpu_free) if f >= 1 - EPS]
    n = round(want)
    return whole[:n] if len(whole) >= n else None


def _take(free: dict[str, float], gpu_free: list[float], bundle: dict[str, float]) -> list[int]:
    for k, v in bundle.items():
        if k not in ("GPU", "memory"):
            free[k] = free.get(k, 0.0) - v
    want = bundle.get("GPU", 0.0)
    ids = _pick_gpus(gpu_free, want) or []
    for i in ids:
        gpu_free[i] -= min(1.0, want)
    return ids


def _too_big(group: Group, nodes: list[Node]) -> PlanError | None:
    """A bundle larger than every node (even empty): the per-worker setting is wrong."""
    bundle = group.bundles()[0]
    for k, v in sorted(bundle.items(), key=lambda kv: kv[0] != "GPU"):  # GPUs first: the likely culprit
        if k == "memory":
            continue
        most = max(n.capacity().get(k, 0.0) for n in nodes)
        if v > most + EPS:
            role = max(group.roles, key=lambda r: r.bundle.get(k, 0.0))
            together = f" (with {'+'.join(r.name for r in group.roles)} in one bundle: {v:g})" \
                if len(group.roles) > 1 else ""
            return PlanError(f"{role.setting(k)}: a {group.name} worker needs {k}={v:g}{together} but the "
                             f"largest node has {k}={most:g}")
    return None


def place(groups: list[Group], nodes: list[Node]) -> list[Slot]:
    """Every worker's slot, placing the groups in order on an empty cluster; PlanError naming the key
    (`<role>.num_workers`, `<role>.gpus_per_worker`, ...) when one does not fit."""
    if not nodes:
        raise PlanError("cluster: no nodes described")
    free = {n.name: n.capacity() for n in nodes}
    gpu_free = {n.name: [1.0] * n.gpus for n in nodes}
    slots: list[Slot] = []
    for group in groups:
        err = _too_big(group, nodes)
        if err is not None:
            raise err
        bundles = group.bundles()
        where = _whole_group_node(bundles, nodes, free, gpu_free)
        placed: list[tuple[str, list[int]]] = []
        for i, b in enumerate(bundles):
            node = where or next((n.name for n in nodes if _fits(free[n.name], b, gpu_free[n.name])), None)
            if node is None:
                role = group.roles[0]
                short = ", ".join(f"{n.name}: " + " ".join(f"{k}={free[n.name].get(k, 0):g}" for k in b
                                                            if k != "GPU") +
                                  f" GPU={sum(gpu_free[n.name]):g}" for n in nodes)
                key = role.setting("workers")
                raise PlanError(f"{key}: {group.name} worker {i} of {len(bundles)} (bundle {b}) does not fit: "
                                f"the earlier groups left {short}; lower {key} or the per-worker resources, "
                                f"or describe more nodes")
            placed.append((node, _take(free[node], gpu_free[node], b)))
        slots += _slots(group, placed)
    return slots


def _whole_group_node(bundles, nodes, free, gpu_free) -> str | None:
    for n in nodes:
        f, g = dict(free[n.name]), list(gpu_free[n.name])
        ok = True
        for b in bundles:
            if not _fits(f, b, g):
                ok = False
                break
            _take(f, g, b)
        if ok:
            return n.name
    return None


def _slots(group: Group, placed: list[tuple[str, list[int]]]) -> list[Slot]:
    from llmray.device import local_gpu_index

    node_of_rank = [node for node, _ in placed]
    local = local_ranks(node_of_rank)
    out = []
    for role in group.roles:
        gpus = role.bundle.get("GPU", 0.0)
        for rank, (node, ids) in enumerate(placed):
            device = "cpu"
            if gpus > EPS:
                # A plain Ray actor sees only its own GPU(s); Ray Train shows each worker all GPUs of
                # the group's workers on that node.
                visible = sorted({i for n, gi in placed if n == node for i in gi}) if group.ray_train else ids
                device = f"cuda:{local_gpu_index(ids, ','.join(map(str, visible)))}"
            out.append(Slot(role.name, rank, group.name, rank, node, local[rank][0], local[rank][1], tuple(ids),
                            device, gpus))
    return out


def gpu_load(slots: list[Slot]) -> dict[tuple[str, int], list[Slot]]:
    """(node, GPU id) -> the workers computing on it (colocated roles share one)."""
    out: dict[tuple[str, int], list[Slot]] = {}
    for s in slots:
        for g in s.gpu_ids:
            out.setdefault((s.node, g), []).append(s)
    return out
