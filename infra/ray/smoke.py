"""Cluster smoke test: run one task on every alive node and report where it ran and which code it used.

Submit it like any job, from the repository root, to check a freshly launched cluster end to end
(Jobs API, working_dir shipping to every node, scheduling on workers):

    ray job submit --address "$RAY_ADDRESS" --working-dir . -- python infra/ray/smoke.py --nodes 3

Prints one line `SMOKE {json}` and exits 1 unless every node ran a task that imported this
repository's `flows` package from the shipped working_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import ray
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


def _alive_node_ids() -> list[str]:
    return sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])


def main(argv: list[str] | None = None) -> int:
    """Wait for `--nodes` alive nodes, run one task pinned to each, print the result line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1, help="alive nodes to wait for")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for them")
    args = parser.parse_args(argv)

    ray.init()  # the cluster the job was submitted to (RAY_ADDRESS is set by the Jobs API)
    deadline = time.monotonic() + args.timeout
    while len(node_ids := _alive_node_ids()) < args.nodes:
        if time.monotonic() > deadline:
            print(f"smoke: {len(node_ids)} alive nodes after {args.timeout:.0f} s, wanted {args.nodes}")
            return 1
        time.sleep(1)

    pinned = [NodeAffinitySchedulingStrategy(node_id, soft=False) for node_id in node_ids]
    ran = ray.get([where.options(scheduling_strategy=s).remote() for s in pinned])
    shipped = all("runtime_resources" in r["flows_dir"] for r in ran)
    ok = sorted(r["node_id"] for r in ran) == node_ids and shipped
    print("SMOKE " + json.dumps({"ok": ok, "nodes": node_ids, "tasks": ran}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
