"""Check a Ray cluster end to end: fan tasks out over every node and report which nodes ran them.

Run it right after `ray up` or `kubectl apply` to see that every node joined, imports llmray and
runs work (it prints one JSON line; exit 1 when a node never ran a task):

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env cluster/runtime_env.yaml -- python cluster/smoke.py --tasks 8
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=8, help="tasks to fan out (SPREAD over the nodes)")
    p.add_argument("--task-s", type=float, default=0.5, help="seconds each task holds its CPU")
    p.add_argument("--min-nodes", type=int, default=1, help="fail unless at least this many nodes ran tasks")
    args = p.parse_args()

    import ray

    from llmray.cluster import init_ray

    init_ray()  # under `ray job submit` this joins the job's cluster (RAY_ADDRESS is set)

    @ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
    def probe(i: int, hold_s: float) -> dict:
        import llmray  # noqa: F401 - the worker's runtime env must provide the package

        time.sleep(hold_s)  # hold the CPU so the scheduler has to use the other nodes too
        ctx = ray.get_runtime_context()
        return {"task": i, "node_id": ctx.get_node_id(), "host": socket.gethostname(), "pid": os.getpid(),
                "auth_mode": os.environ.get("RAY_AUTH_MODE", "")}

    start = time.monotonic()
    results = ray.get([probe.remote(i, args.task_s) for i in range(args.tasks)])
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    ran_on = sorted({r["node_id"] for r in results})
    report = {
        "alive_nodes": sorted(alive),
        "task_nodes": ran_on,
        "tasks_per_node": {n: sum(r["node_id"] == n for r in results) for n in ran_on},
        "driver_node": ray.get_runtime_context().get_node_id(),
        "cluster_resources": ray.cluster_resources(),
        "elapsed_s": round(time.monotonic() - start, 2),
    }
    print("SMOKE " + json.dumps(report, sort_keys=True), flush=True)
    if len(ran_on) < args.min_nodes:
        print(f"smoke: tasks ran on {len(ran_on)} node(s), expected at least {args.min_nodes}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
