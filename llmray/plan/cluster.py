"""The cluster `llmray plan` places a stage on: this machine, a short spec, or a YAML file.

    local                          this machine as `llmray <stage>` would start Ray on it (default)
    2x8xH100-80GB                  2 nodes, each 8 GPUs of 80 GB (12 CPUs and 128 GB of RAM per GPU)
    2x8xH100-80GB:cpus=192:mem=2048:node_b=1
                                   ... with 192 CPUs, 2048 GB RAM and a custom resource node_b=1 per node
    1xcpu:cpus=16+4x8xA100-40GB    a CPU head node (cpus=8 and mem=32 when unset) and four GPU nodes
    cluster.yaml                   nodes: [{count: 2, cpus: 96, gpus: 8, gpu_type: H100,
                                            gpu_memory_gb: 80, memory_gb: 1024, resources: {node_b: 1}}]
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from llmray.config import ConfigError, build, check, read_yaml
from llmray.placement import Node

CPUS_PER_GPU = 12
RAM_GB_PER_GPU = 128
CPU_NODE = {"cpus": 8.0, "mem": 32.0}

_GROUP = re.compile(r"^(\d+)x(?:(\d+)x([A-Za-z0-9_]+)-(\d+(?:\.\d+)?)GB|cpu)((?::[A-Za-z_][\w.-]*=[\d.]+)*)$")


@dataclass(frozen=True)
class NodeGroup:
    """`count` identical nodes."""

    count: int = 1
    cpus: float = 8.0
    gpus: int = 0
    gpu_type: str = ""
    gpu_memory_gb: float = 0.0
    memory_gb: float = 32.0
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(self.count >= 1, "cluster.nodes.count", f"must be >= 1, got {self.count}")
        check(self.cpus > 0, "cluster.nodes.cpus", f"must be > 0, got {self.cpus}")
        check(self.gpus >= 0, "cluster.nodes.gpus", f"must be >= 0, got {self.gpus}")
        check(self.gpus == 0 or self.gpu_memory_gb > 0, "cluster.nodes.gpu_memory_gb", "required with gpus")


@dataclass(frozen=True)
class ClusterFile:
    nodes: list[NodeGroup] = field(default_factory=list)


def expand(groups: list[NodeGroup]) -> list[Node]:
    nodes, i = [], 0
    for g in groups:
        for _ in range(g.count):
            nodes.append(Node(f"node{i}", g.cpus, g.gpus, g.gpu_memory_gb, g.memory_gb, g.gpu_type, dict(g.resources)))
            i += 1
    return nodes


def parse_spec(spec: str) -> list[Node]:
    """`2x8xH100-80GB`, `1xcpu:cpus=16+2x8xA100-40GB:mem=1024`, ... (see the module docstring)."""
    groups = []
    for part in spec.replace(" ", "").split("+"):
        m = _GROUP.match(part)
        if not m:
            raise ConfigError(f"--cluster: cannot read {part!r}; write NODESxGPUSxTYPE-MEMGB (e.g. 2x8xH100-80GB) "
                              "or NODESxcpu, with optional :cpus=N :mem=GB :<resource>=N, groups joined by +, "
                              "or a YAML file, or `local`")
        count, gpus, gtype, gmem, opts = m.groups()
        kv = {k: float(v) for k, v in (o.split("=", 1) for o in opts.split(":") if o)}
        g = int(gpus or 0)
        cpus = kv.pop("cpus", CPUS_PER_GPU * g if g else CPU_NODE["cpus"])
        mem = kv.pop("mem", RAM_GB_PER_GPU * g if g else CPU_NODE["mem"])
        groups.append(NodeGroup(int(count), cpus, g, gtype or "", float(gmem or 0), mem, kv))
    return expand(groups)


def local_nodes() -> list[Node]:
    """This machine as `llmray <stage>` starts Ray on it: `local_num_cpus()` logical CPUs, its GPUs."""
    from llmray.cluster import local_num_cpus
    from llmray.hardware import has_cuda

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    gpus, gmem, gtype = 0, 0.0, ""
    if has_cuda():
        import torch

        gpus = torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
        gmem, gtype = props.total_memory / 1024**3, props.name.replace(" ", "-")
    return [Node("local", float(local_num_cpus()), gpus, gmem, ram, gtype)]


def describe(spec: str | None) -> tuple[list[Node], str]:
    """(nodes, one-line description) for a `--cluster` value."""
    if not spec or spec == "local":
        nodes = local_nodes()
        label = "this machine (local)"
    elif spec.endswith((".yaml", ".yml")) or Path(spec).is_file():
        data = read_yaml(spec)
        nodes = expand(build(ClusterFile, data, "cluster").nodes)
        if not nodes:
            raise ConfigError(f"cluster.nodes: {spec} describes no nodes")
        label = spec
    else:
        nodes = parse_spec(spec)
        label = spec
    gpus = sum(n.gpus for n in nodes)
    cpus = sum(n.cpus for n in nodes)
    return nodes, f"{label}: {len(nodes)} node(s), {cpus:g} CPUs, {gpus} GPUs"
