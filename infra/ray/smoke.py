"""Cluster smoke test: run one task on every alive node that has CPUs and report where it ran and which code
it used. A head started with 0 CPUs (as both deployments start it) counts as a node but runs no task.

Submit it like any job, from the repository root, to check a freshly launched cluster end to end
(Jobs API, working_dir shipping to every node, scheduling on workers):

    ray job submit --address "$RAY_ADDRESS" --working-dir . -- python infra/ray/smoke.py --nodes 3

`--nodes` counts every alive node, the 0-CPU head included. Prints one line `SMOKE {json}` and exits 1
unless every node with CPUs ran a task that imported this repository's `flows` package from the shipped
working_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import ray
from ray.autoscaler.sdk import request_resources
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=1)
def where() -> dict:
    """Which node and which copy of the code this task ran with."""
    import flows  # from the job's working_dir, which Ray unpacks on each node

    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "flows_dir": os.path.dirname(os.path.abspath(flows.__file__)),
    }


def _alive_nodes() -> dict[str, float]:
    """CPUs of every alive node, by node id."""
    return {node["NodeID"]: node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]}


def main(argv: list[str] | None = None) -> int:
    """Wait for `--nodes` alive nodes, run one task pinned to each, print the result line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1, help="alive nodes to wait for")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for them")
    args = parser.parse_args(argv)

    ray.init()  # the cluster the job was submitted to (RAY_ADDRESS is set by the Jobs API)
    deadline = time.monotonic() + args.timeout
    asked = False
    while len(nodes := _alive_nodes()) < args.nodes or not any(cpus >= 1 for cpus in nodes.values()):
        if time.monotonic() > deadline:
            print(f"smoke: {len(nodes)} alive nodes after {args.timeout:.0f} s, wanted {args.nodes}")
            return 1
        if not asked and not any(cpus >= 1 for cpus in nodes.values()):
            # A fresh autoscaling cluster is a 0-CPU head alone: ask the autoscaler for a node with a CPU.
            request_resources(num_cpus=1)
            asked = True
        time.sleep(1)
    if asked:
        request_resources(num_cpus=0)  # withdraw the request: the node may scale down again

    # A task pinned to a node without a CPU would never be scheduled (TaskUnschedulableError).
    with_cpus = sorted(node_id for node_id, cpus in nodes.items() if cpus >= 1)
    pinned = [NodeAffinitySchedulingStrategy(node_id, soft=False) for node_id in with_cpus]
    ran = ray.get([where.options(scheduling_strategy=s).remote() for s in pinned])
    shipped = all("runtime_resources" in r["flows_dir"] for r in ran)
    ok = bool(with_cpus) and sorted(r["node_id"] for r in ran) == with_cpus and shipped
    without = sorted(set(nodes) - set(with_cpus))
    print("SMOKE " + json.dumps({"ok": ok, "nodes": sorted(nodes), "without_cpus": without, "tasks": ran}),
          flush=True)  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
