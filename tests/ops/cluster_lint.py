"""Security lint for shipped cluster configs: token auth on, dashboard/Jobs API never on all interfaces.

Works on the parsed YAML of a launcher config, a KubeRay manifest, or any text (a catch-all for
`0.0.0.0` in dashboard or Jobs API settings). Returns a list of problems, empty when clean.
"""

from __future__ import annotations

import re
from typing import Any

ALL_INTERFACES = ("0.0.0.0", "::", "[::]")
_DASH_FLAG = re.compile(r"--dashboard-host[= ]\s*['\"]?([^\s'\";]+)")


def _dashboard_hosts(cmd: str) -> list[str]:
    return _DASH_FLAG.findall(cmd)


def lint_launcher(cfg: dict[str, Any]) -> list[str]:
    problems = []
    head = " ; ".join(cfg.get("head_start_ray_commands") or [])
    workers = " ; ".join(cfg.get("worker_start_ray_commands") or [])
    starts = [c for c in (cfg.get("head_start_ray_commands") or []) + (cfg.get("worker_start_ray_commands") or [])
              if "ray start" in c]
    if not starts:
        problems.append("no `ray start` in head_start_ray_commands/worker_start_ray_commands")
    for c in starts:
        if not re.search(r"RAY_AUTH_MODE=token\s+ray start|export RAY_AUTH_MODE=token", c):
            problems.append(f"`ray start` without RAY_AUTH_MODE=token: {c.strip()[:80]}")
    hosts = _dashboard_hosts(head)
    if not hosts:
        problems.append("head `ray start` must set --dashboard-host=127.0.0.1 explicitly")
    for h in hosts + _dashboard_hosts(workers):
        if h != "127.0.0.1" and h != "localhost":
            problems.append(f"dashboard exposed on {h} (use 127.0.0.1 and `ray dashboard` / SSH port-forward)")
    return problems


def _containers(pod_template: dict) -> list[dict]:
    return list(((pod_template or {}).get("spec") or {}).get("containers") or [])


def ray_cluster_specs(doc: dict) -> list[dict]:
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind == "RayCluster":
        return [spec]
    if kind == "RayJob":
        return [spec["rayClusterSpec"]] if "rayClusterSpec" in spec else []
    if kind == "RayService":
        return [spec["rayClusterConfig"]] if "rayClusterConfig" in spec else []
    return []


def lint_kuberay(doc: dict) -> list[str]:
    problems = []
    name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    for spec in ray_cluster_specs(doc):
        auth = (spec.get("authOptions") or {}).get("mode")
        head = spec.get("headGroupSpec") or {}
        groups = [head, *(spec.get("workerGroupSpecs") or [])]
        env_token = all(
            any(e.get("name") == "RAY_AUTH_MODE" and e.get("value") == "token" for e in c.get("env") or [])
            for g in groups for c in _containers(g.get("template")))
        if auth != "token" and not env_token:
            problems.append(f"{name}: token auth off (set authOptions.mode: token)")
        host = str((head.get("rayStartParams") or {}).get("dashboard-host", ""))
        if host in ALL_INTERFACES or not host:
            problems.append(f"{name}: head dashboard-host is {host or 'unset (KubeRay defaults to 0.0.0.0)'}")
        for c in _containers(head.get("template")):
            for e in c.get("env") or []:
                if e.get("name") in ("RAY_DASHBOARD_HOST",) and e.get("value") in ALL_INTERFACES:
                    problems.append(f"{name}: {e['name']}={e['value']}")
        if doc.get("kind") == "RayJob" and (doc.get("spec") or {}).get("submissionMode") not in ("SidecarMode",):
            problems.append(f"{name}: a dashboard on 127.0.0.1 needs submissionMode: SidecarMode")
    for svc_port in _service_exposures(doc):
        problems.append(f"{name}: {svc_port}")
    return problems


def _service_exposures(doc: dict) -> list[str]:
    """A Service of type LoadBalancer/NodePort publishing the dashboard (8265) or GCS (6379)."""
    out = []
    specs = []
    if doc.get("kind") == "Service":
        specs.append(doc.get("spec") or {})
    for spec in ray_cluster_specs(doc):
        svc = (spec.get("headGroupSpec") or {}).get("headService")
        if svc:
            specs.append(svc.get("spec") or {})
        if (spec.get("headGroupSpec") or {}).get("serviceType") in ("LoadBalancer", "NodePort"):
            out.append(f"head serviceType {spec['headGroupSpec']['serviceType']} publishes the dashboard")
    for s in specs:
        if s.get("type") in ("LoadBalancer", "NodePort"):
            ports = {p.get("port") for p in s.get("ports") or []}
            if ports & {8265, 6379, 10001}:
                out.append(f"Service {s.get('type')} publishes Ray ports {sorted(ports & {8265, 6379, 10001})}")
    return out


def lint_text(text: str) -> list[str]:
    """Catch-all: any dashboard/Jobs API/ray-client setting bound to all interfaces."""
    problems = []
    for i, line in enumerate(text.splitlines(), 1):
        if re.search(r"(dashboard[-_]host|RAY_DASHBOARD_HOST|ray[-_]client[-_]server[-_]host)"
                     r"\W+['\"]?(0\.0\.0\.0|::)", line):
            problems.append(f"line {i}: {line.strip()}")
    return problems
