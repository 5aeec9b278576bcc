"""The real pipelines on a local multi-node cluster: a head with no CPUs and two worker nodes, jobs submitted
through the Jobs API, corpus, tables and checkpoints on the S3 server, tracking on a real `mlflow server`
(one machine shares one disk: local paths would prove nothing about a cluster).

In order: `reelflow train` with its two Ray Train workers on different nodes registers a model; `reelflow
tag` with it across both workers writes the tables a single-node run writes; and a night during which a
worker node is killed still finishes, with those same tables.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import load_module, wait_for_job
from test_tag import _rows
from test_train import TINY

from flows import labels as flabels
from flows import storage, tables

REPO = Path(__file__).resolve().parent.parent
stack = load_module(REPO / "infra" / "local" / "stack.py")
MISSING_DASHBOARD = stack.missing_dashboard_packages()
DATE = "2024-05-01"
MODEL = "test-cluster"
RAY_CLI = str(Path(sys.executable).parent / "ray")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING_DASHBOARD), reason=f"needs ray[default], missing {MISSING_DASHBOARD}"),
]


class Cluster:
    """The running stack and a Jobs API client for it."""

    def __init__(self, local, dashboard_url: str) -> None:
        from ray.job_submission import JobSubmissionClient

        self.local = local
        self.dashboard_url = dashboard_url
        self.client = JobSubmissionClient(dashboard_url, headers=local.auth_headers())
        self.runtime_env = yaml.safe_load((REPO / "infra" / "schedule" / "runtime-env.yaml").read_text())
        # The standard way: the job names its store in its own runtime_env; the credentials come from the
        # nodes' environment (here inherited from this process; on a cluster an IAM role).
        self.env_vars = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}

    def submit(self, command: str) -> str:
        return self.client.submit_job(
            entrypoint=command,
            runtime_env={**self.runtime_env, "working_dir": str(REPO), "env_vars": self.env_vars},
        )

    def run(self, command: str, timeout_s: float) -> str:
        """Submit `command`, wait for it, and return its logs; fails unless it SUCCEEDED."""
        from ray.job_submission import JobStatus

        job = self.submit(command)
        status = wait_for_job(self.client, job, timeout_s=timeout_s)
        logs = self.client.get_job_logs(job)
        assert status == JobStatus.SUCCEEDED, logs[-5000:]
        return logs

    def listed(self, what: str) -> list[dict]:
        """`ray list WHAT --detail` (actors, tasks, nodes): everything the cluster has run, alive or dead."""
        env = {**os.environ, **self.local.client_env(), "RAY_ADDRESS": self.dashboard_url}
        out = subprocess.run(
            [RAY_CLI, "list", what, "--detail", "--format", "json", "--limit", "10000"],
            env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return json.loads(out.stdout)

    def actors(self) -> list[dict]:
        """Every actor the cluster has run, with the node it ran on."""
        return self.listed("actors")

    def worker_nodes(self) -> set[str]:
        """The ids of the nodes that declare CPUs."""
        return {n["node_id"] for n in self.listed("nodes") if n["resources_total"].get("CPU")}

    def kill_node(self, index: int) -> None:
        """SIGKILL every process of worker node `index` (its raylet, object store and workers)."""
        node = self.local.state.nodes[index]
        for pid in stack.session_pids(node.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(ray_session, s3_server):
    local = stack.LocalRayStack(nodes=3, cpus_per_node=2, head_cpus=0)
    with local as (_gcs_address, dashboard_url):
        yield Cluster(local, dashboard_url)


@pytest.fixture(scope="module")
def s3_corpora(s3_server, small_corpus):
    """A bucket holding the small corpus for training, and 6 of its videos with its 2 broken files for
    tagging."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    if fs.exists("t-cluster"):
        fs.rm("t-cluster", recursive=True)
    fs.mkdir("t-cluster")
    bucket = "s3://t-cluster"
    manifest = flabels.read_manifest(str(small_corpus / flabels.LABELS_FILE))
    tagged = set(sorted(manifest.videos)[:6])
    for path in sorted(small_corpus.rglob("*")):
        if path.is_file():
            relative = path.relative_to(small_corpus).as_posix()
            storage.put_file(str(path), f"{bucket}/corpus/{relative}")
            if relative in tagged or (relative not in manifest.videos and relative != flabels.LABELS_FILE):
                storage.put_file(str(path), f"{bucket}/tag-corpus/{relative}")
    return bucket


@pytest.fixture(scope="module")
def registered(cluster, s3_corpora, mlflow_server) -> tuple[str, list[dict]]:
    """`reelflow train` on the cluster: two Ray Train workers spread over the two worker nodes."""
    bucket = s3_corpora
    overrides = [
        f"corpus={bucket}/corpus", f"storage={bucket}/runs", "run_name=cluster",
        f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=test-cluster", "mlflow.evaluate=false",
        f"model.registered_name={MODEL}", "optim.epochs=1", "scaling.num_workers=2",
        "scaling.cpus_per_worker=1", "scaling.placement=SPREAD", *TINY,
    ]  # fmt: skip
    command = "reelflow train --config jobs/configs/demo.yaml " + " ".join(shlex.quote(o) for o in overrides)
    logs = cluster.run(command, timeout_s=600)
    workers = [a for a in cluster.actors() if "TrainWorker" in (a.get("class_name") or "")]
    return logs, workers


def test_train_runs_its_workers_on_two_nodes_and_registers_the_model(registered, mlflow_server) -> None:
    from mlflow import MlflowClient

    _logs, workers = registered
    assert len(workers) == 2, workers
    assert len({w["node_id"] for w in workers}) == 2  # SPREAD: one worker per worker node
    version = MlflowClient(mlflow_server).get_model_version_by_alias(MODEL, "candidate")
    assert version.status == "READY" and version.run_id


def _tag_command(bucket: str, tables_uri: str, tracking_uri: str, *extra: str) -> str:
    return (f"reelflow tag --corpus {bucket}/tag-corpus --model models:/{MODEL}@candidate "
            f"--tables {tables_uri} --date {DATE} --tracking-uri {tracking_uri} --batch-size 4 "
            + " ".join(extra))  # fmt: skip


@pytest.fixture(scope="module")
def single_node_tables(registered, s3_corpora, mlflow_server) -> str:
    """The same night on the test session's single-node Ray, in this process."""
    from jobs import tag

    where = f"{s3_corpora}/tables-single"
    tag.main(tag.TagConfig(corpus=f"{s3_corpora}/tag-corpus", models=(f"models:/{MODEL}@candidate",),
                           tables=where, date=DATE, tracking_uri=mlflow_server))  # fmt: skip
    return where


def _same_tables(got: str, want: str) -> None:
    for name in tables.TABLES:
        assert _rows(got, name) == _rows(want, name), name
    assert len(_rows(want, "errors")) == 2 and _rows(want, "classifications")  # the night did something


def test_tag_across_two_worker_nodes_writes_the_single_node_tables(
    cluster, s3_corpora, mlflow_server, single_node_tables
) -> None:
    where = f"{s3_corpora}/tables-cluster"
    before = {a["actor_id"] for a in cluster.actors()}
    logs = cluster.run(_tag_command(s3_corpora, where, mlflow_server, "--commit-every 3"), timeout_s=420)
    assert "chunk 3 committed" in logs, logs[-3000:]
    _same_tables(where, single_node_tables)
    assert tables.read_snapshot(where).chunk == 3
    # The videos were decoded on both worker nodes, and every actor of the night that reserves CPUs
    # (inference, shuffle) ran on a worker: the 0-CPU head holds only bookkeeping actors.
    workers = cluster.worker_nodes()
    decoded_on = {t["node_id"] for t in cluster.listed("tasks") if "_clips_udf" in t["name"] and t["node_id"]}
    assert decoded_on == workers
    night = [a for a in cluster.actors() if a["actor_id"] not in before and a["node_id"]]  # placed ones
    assert {a["node_id"] for a in night if a["required_resources"].get("CPU")} <= workers, night


def test_a_worker_node_killed_mid_tag_and_the_night_still_equals_a_clean_run(
    cluster, s3_corpora, mlflow_server, single_node_tables
) -> None:
    from ray.job_submission import JobStatus

    where = f"{s3_corpora}/tables-killed"
    job = cluster.submit(_tag_command(s3_corpora, where, mlflow_server, "--commit-every 4"))
    deadline = time.monotonic() + 300
    while "chunk 1: tagging" not in cluster.client.get_job_logs(job):
        assert cluster.client.get_job_status(job) not in {JobStatus.FAILED, JobStatus.SUCCEEDED}
        assert time.monotonic() < deadline
        time.sleep(0.5)
    time.sleep(3)  # decode tasks and inference actors are under way on both nodes
    alive = {n["node_id"] for n in cluster.listed("nodes") if n["state"] == "ALIVE"}
    cluster.kill_node(2)
    assert cluster.client.get_job_status(job) == JobStatus.RUNNING  # killed mid-night
    status = wait_for_job(cluster.client, job, timeout_s=420)
    logs = cluster.client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    print(logs[-4000:])  # what the night did about the lost node (a chunk run again, or tasks retried)
    dead = {n["node_id"] for n in cluster.listed("nodes") if n["state"] == "DEAD"} & alive
    assert len(dead) == 1  # the night finished on the one worker left
    _same_tables(where, single_node_tables)
    assert tables.read_snapshot(where).chunk == 2  # 8 videos, 4 a chunk: each committed once
