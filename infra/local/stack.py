"""A local multi-node Ray cluster on one machine: a head with the dashboard (Jobs API) plus worker nodes.

For tests and for trying cluster features (the Jobs API, multi-node scheduling, working_dir shipping)
without a cloud. Every port is picked free, the dashboard binds 127.0.0.1, and every node has its own
temp dir, so the stack never collides with another Ray instance on the machine.

Token authentication is always on, with a token of the stack's own (ROOT/auth_token, mode 0600): Ray
2.60 turns it on for a head whenever ~/.ray/auth_token exists (any local `ray.init()` writes one), and a
worker node or client that does not know that is refused. Clients pass `auth_headers()` (HTTP) or run
with `client_env()` (the `ray` CLI, drivers).

Stopping is scoped: `ray stop` kills *every* Ray process on the machine (other tests', other users'),
so it is never used. Each node is one `ray start --block` process started in a session of its own;
Ray ties the node's daemons to that process (kernel fate-sharing), and stopping the node signals that
process, then only the processes of its session.

    stack = LocalRayStack(nodes=2)
    with stack as (gcs_address, dashboard_url):
        client = JobSubmissionClient(dashboard_url, headers=stack.auth_headers())
        client.submit_job(entrypoint="python job.py")

Command line (what `infra/local/cluster.sh` runs):

    python infra/local/stack.py up 3 [--head-cpus 0] [--cpus C] [--gpus-on-node K] [--root DIR]
                                                    # prints RAY_ADDRESS=… and the GCS address
    python infra/local/stack.py status [--root DIR]
    python infra/local/stack.py down [--root DIR]
"""

from __future__ import annotations

import argparse
import contextlib
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
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import psutil

STATE_FILE = "stack.json"
TOKEN_FILE = "auth_token"
DEFAULT_ROOT = Path(tempfile.gettempdir()) / "reelflow-stack"
# The smallest object store Ray accepts is 75 MiB; the default (30 % of RAM per node) would reserve
# gigabytes of /dev/shm for each node of a test cluster.
DEFAULT_OBJECT_STORE_BYTES = 128 * 1024**2


class StackAddress(NamedTuple):
    """Where to reach a running stack: `ray.init(address=gcs_address)`; the Jobs API at `dashboard_url`."""

    gcs_address: str
    dashboard_url: str


@dataclass(frozen=True)
class NodeProcess:
    """One `ray start --block` process: the leader of the session that holds all of that node's processes."""

    pid: int
    temp_dir: str
    log: str


@dataclass(frozen=True)
class StackState:
    """What `up` records in ROOT/stack.json, so that `status` and `down` find exactly its own processes."""

    gcs_address: str
    dashboard_url: str
    token_path: str
    nodes: tuple[NodeProcess, ...]  # head first

    def client_env(self) -> dict[str, str]:
        """Environment for the `ray` CLI or a driver to authenticate to this stack."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path}

    def auth_headers(self) -> dict[str, str]:
        """HTTP headers for the dashboard / Jobs API (JobSubmissionClient(headers=...))."""
        return {"Authorization": f"Bearer {Path(self.token_path).read_text().strip()}"}

    def save(self, root: Path) -> None:
        (root / STATE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, root: Path) -> StackState:
        path = root / STATE_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no local Ray stack recorded here (run `up` first)") from None
        nodes = tuple(NodeProcess(**n) for n in raw["nodes"])
        return cls(raw["gcs_address"], raw["dashboard_url"], raw["token_path"], nodes)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def alive_nodes(dashboard_url: str, headers: dict[str, str] | None = None) -> int:
    """How many nodes the cluster's state API reports ALIVE (0 while the dashboard does not answer)."""
    request = urllib.request.Request(
        f"{dashboard_url}/api/v0/nodes?limit=1000&detail=false", headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            body = json.loads(resp.read())
    except (OSError, ValueError):
        return 0
    rows = body.get("data", {}).get("result", {}).get("result", [])
    return sum(1 for row in rows if row.get("state") == "ALIVE")


def missing_dashboard_packages() -> list[str]:
    """What `ray[default]` (the dashboard, the Jobs API) needs and this Python lacks; [] when all is there."""
    from packaging.requirements import Requirement

    missing = []
    for spec in metadata.requires("ray") or []:
        req = Requirement(spec)
        # Only what the `default` extra adds: true with that extra, false without any.
        added = req.marker is not None and req.marker.evaluate({"extra": "default"})
        if not added or req.marker.evaluate({"extra": ""}):
            continue
        try:
            metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(req.name)
    return missing


def _node_ports() -> list[str]:
    # Ray's fixed defaults (52365 for the agent, 10002-19999 for workers, …) would collide with any
    # other Ray node on this machine, so every port a node opens is chosen here.
    return [
        "--node-manager-port", str(free_port()),
        "--object-manager-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
        "--min-worker-port", "0",
        "--max-worker-port", "0",
    ]  # fmt: skip


def _node_env(python: str, token_path: Path) -> dict[str, str]:
    # Another cluster's address or token in this environment must not leak into the stack's nodes.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    # Job entrypoints run in a shell under the raylet: put this Python's scripts (`reelflow`, `ray`) first.
    env["PATH"] = os.pathsep.join([str(Path(python).parent), env.get("PATH", "")])
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    return env


def _new_token(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes


def _start_node(args: list[str], python: str, temp_dir: Path) -> subprocess.Popen:
    temp_dir.mkdir(parents=True, exist_ok=True)
    command = [python, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
               "--temp-dir", str(temp_dir), *args]  # fmt: skip
    with open(temp_dir.with_suffix(".log"), "wb") as log:
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=_node_env(python, temp_dir.parent / TOKEN_FILE), start_new_session=True,
        )  # fmt: skip


def _record(proc: subprocess.Popen) -> NodeProcess:
    temp_dir = Path(proc.args[proc.args.index("--temp-dir") + 1])
    return NodeProcess(pid=proc.pid, temp_dir=str(temp_dir), log=str(temp_dir.with_suffix(".log")))


def _wait(what: str, ready: Callable[[], bool], procs: Sequence[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        for proc in procs:
            if proc.poll() is not None:
                log = _record(proc).log
                tail = Path(log).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"a ray node exited ({proc.returncode}) before {what}; {log}:\n{tail}")
        if time.monotonic() > deadline:
            logs = ", ".join(_record(p).log for p in procs)
            raise TimeoutError(f"local Ray stack: {what} not ready after {timeout_s:.0f} s (logs: {logs})")
        time.sleep(0.5)


def start_stack(
    nodes: int = 2,
    root: Path | str = DEFAULT_ROOT,
    cpus_per_node: int = 1,
    object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES,
    python: str = sys.executable,
    timeout_s: float = 90.0,
    head_cpus: int | None = None,
    gpu_nodes: Sequence[int] = (),
) -> StackState:
    """Start a head plus `nodes - 1` workers under `root`, wait until all are ALIVE, record the state.

    The head advertises `head_cpus` CPUs (default `cpus_per_node`; 0 models a production head that runs
    no tasks). Each node index in `gpu_nodes` (0 is the head) advertises one GPU: Ray schedules GPU
    requests there, though nothing here has a GPU (placement tests only).
    """
    if nodes < 1:
        raise ValueError(f"nodes: need at least 1 (the head), got {nodes}")
    head_cpus = cpus_per_node if head_cpus is None else head_cpus
    if cpus_per_node < 0 or head_cpus < 0:
        raise ValueError(f"cpus: need >= 0 per node, got {cpus_per_node} (head {head_cpus})")
    if any(not 0 <= i < nodes for i in gpu_nodes):
        raise ValueError(f"gpu_nodes: indexes go from 0 (the head) to {nodes - 1}, got {list(gpu_nodes)}")
    if python == sys.executable and (missing := missing_dashboard_packages()):
        raise RuntimeError(f"the head's dashboard needs ray[default]; missing: {', '.join(missing)}")
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if (root / STATE_FILE).exists() and any(session_pids(n.pid) for n in StackState.load(root).nodes):
        raise RuntimeError(f"{root}: a local Ray stack is already running here (run `down` first)")
    for stale in root.glob("node-*"):  # a dead stack's leftovers: its address file would mislead us
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink()

    token_path = root / TOKEN_FILE
    _new_token(token_path)
    headers = {"Authorization": f"Bearer {token_path.read_text()}"}
    dashboard_url = f"http://127.0.0.1:{(dashboard_port := free_port())}"
    def resources(index: int) -> list[str]:
        cpus = head_cpus if index == 0 else cpus_per_node
        return ["--num-cpus", str(cpus), "--num-gpus", "1" if index in gpu_nodes else "0",
                "--object-store-memory", str(object_store_bytes)]  # fmt: skip

    head = ["--head", "--port", str(free_port()), "--ray-client-server-port", str(free_port()),
            "--include-dashboard=true", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dashboard_port)]  # fmt: skip
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_start_node([*head, *resources(0), *_node_ports()], python, root / "node-0"))
        # `ray start` writes this file last, once the head is up. Ray advertises the machine's own IP
        # rather than the loopback one (see infra/README.md), so the file is the truth.
        address_file = root / "node-0" / "ray_current_cluster"
        _wait("the head started", address_file.exists, procs, timeout_s)
        gcs_address = address_file.read_text().strip()
        for i in range(1, nodes):
            worker = ["--address", gcs_address, *resources(i), *_node_ports()]
            procs.append(_start_node(worker, python, root / f"node-{i}"))
        all_alive = lambda: alive_nodes(dashboard_url, headers) >= nodes  # noqa: E731
        _wait(f"{nodes} nodes were alive", all_alive, procs, timeout_s)
    except BaseException:
        _stop_nodes([_record(p) for p in procs])
        raise
    state = StackState(gcs_address, dashboard_url, str(token_path), tuple(_record(p) for p in procs))
    state.save(root)
    return state


def session_pids(sid: int) -> list[int]:
    """Every live process of session `sid`: the `ray start --block` leader and all it spawned."""
    pids = []
    for proc in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
    return pids


def _stop_nodes(nodes: Sequence[NodeProcess], grace_s: float = 15.0) -> None:
    # Workers first, then the head, so that no node outlives the GCS it reports to. SIGTERM to the
    # `ray start --block` leader makes it stop its node in order (signalling every process at once left
    # raylet and GCS waiting on each other for 10 s); whatever is left after the grace time is killed.
    for node in reversed(nodes):
        with contextlib.suppress(ProcessLookupError):
            os.kill(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while (left := session_pids(node.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(node.pid, os.WNOHANG)  # reap our own child, so it does not linger as a zombie


def stop_stack(root: Path | str = DEFAULT_ROOT) -> int:
    """Stop the stack recorded under `root`, signalling only its own processes; returns how many ran."""
    root = Path(root).resolve()
    state = StackState.load(root)
    running = sum(len(session_pids(n.pid)) for n in state.nodes)
    _stop_nodes(state.nodes)
    (root / STATE_FILE).unlink()
    return running


class LocalRayStack:
    """Context manager: starts a local multi-node Ray cluster, yields its addresses, stops what it started."""

    def __init__(
        self,
        nodes: int = 2,
        cpus_per_node: int = 1,
        root: Path | str | None = None,
        python: str = sys.executable,
        timeout_s: float = 90.0,
        head_cpus: int | None = None,
        gpu_nodes: Sequence[int] = (),
    ) -> None:
        if nodes < 1:
            raise ValueError(f"nodes: need at least 1 (the head), got {nodes}")
        self.nodes, self.cpus_per_node, self.python, self.timeout_s = nodes, cpus_per_node, python, timeout_s
        self.head_cpus, self.gpu_nodes = head_cpus, tuple(gpu_nodes)
        self._root = Path(root) if root is not None else None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.state: StackState | None = None

    @property
    def root(self) -> Path:
        """The folder holding the nodes' temp dirs, their logs and stack.json."""
        if self._root is None:
            # Short on purpose: Ray's Unix socket paths live below it and must stay under 108 bytes.
            self._tmp = tempfile.TemporaryDirectory(prefix="rf-ray-", ignore_cleanup_errors=True)
            self._root = Path(self._tmp.name)
        return self._root

    def __enter__(self) -> StackAddress:
        self.state = start_stack(
            self.nodes, self.root, self.cpus_per_node, python=self.python, timeout_s=self.timeout_s,
            head_cpus=self.head_cpus, gpu_nodes=self.gpu_nodes,
        )  # fmt: skip
        return StackAddress(self.state.gcs_address, self.state.dashboard_url)

    def auth_headers(self) -> dict[str, str]:
        """HTTP headers that authenticate to the running stack's dashboard / Jobs API."""
        assert self.state is not None, "the stack is not running"
        return self.state.auth_headers()

    def client_env(self) -> dict[str, str]:
        """Environment that lets the `ray` CLI (or a driver) authenticate to the running stack."""
        assert self.state is not None, "the stack is not running"
        return self.state.client_env()

    def __exit__(self, *exc: object) -> None:
        if self.state is not None:
            stop_stack(self.root)
            self.state = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = self._root = None


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stack.py", description="A local multi-node Ray cluster.")
    parser.add_argument(
        "--root", type=Path, default=Path(os.environ.get("REELFLOW_STACK_DIR", DEFAULT_ROOT)),
        help="folder for the nodes' temp dirs, logs and stack.json (env REELFLOW_STACK_DIR; %(default)s)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a head and N-1 worker nodes")
    up.add_argument("nodes", type=int, nargs="?", default=2)
    up.add_argument("--cpus", type=int, default=1, help="CPUs each node advertises")
    up.add_argument("--head-cpus", type=int, help="CPUs of the head (default --cpus; 0: it runs no task)")
    up.add_argument(
        "--gpus-on-node", type=int, action="append", default=[], metavar="K",
        help="node K (0 is the head) advertises one GPU, for placement tests; repeatable",
    )  # fmt: skip
    sub.add_parser("status", help="show the recorded stack and its live nodes")
    sub.add_parser("down", help="stop the recorded stack's processes, and nothing else")
    args = parser.parse_args(argv)

    try:
        if args.command == "up":
            state = start_stack(
                args.nodes, args.root, args.cpus, head_cpus=args.head_cpus, gpu_nodes=args.gpus_on_node
            )
            print(f"export RAY_ADDRESS={state.dashboard_url}")
            for key, value in state.client_env().items():
                print(f"export {key}={value}")
            print(f"# GCS address (ray.init): {state.gcs_address}")
            print("# then: ray job submit --working-dir . -- CMD")
        elif args.command == "status":
            state = StackState.load(args.root.resolve())
            print(f"RAY_ADDRESS={state.dashboard_url}\nGCS address: {state.gcs_address}")
            alive = alive_nodes(state.dashboard_url, state.auth_headers())
            print(f"nodes alive: {alive} of {len(state.nodes)}")
            for node in state.nodes:
                print(f"  session {node.pid}: {len(session_pids(node.pid))} processes, log {node.log}")
        else:
            print(f"stopped {stop_stack(args.root)} processes")
    except (OSError, RuntimeError, ValueError) as err:  # TimeoutError and FileNotFoundError are OSErrors
        print(f"stack.py {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
