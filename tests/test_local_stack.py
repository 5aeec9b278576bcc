"""The production shape on the local stack: a head that runs no task, nodes declaring GPUs, and jobs
submitted through the Jobs API the standard way (their settings in their own runtime_env)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import load_module, wait_for_job

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
stack = load_module(INFRA / "local" / "stack.py")
MISSING_DASHBOARD = stack.missing_dashboard_packages()


PLACEMENT_JOB = """
import json, ray
ray.init()

@ray.remote(num_cpus=1)
def cpu_task():
    return ray.get_runtime_context().get_node_id()

@ray.remote(num_gpus=1, num_cpus=0)
def gpu_task():
    return ray.get_runtime_context().get_node_id()

# The tag job's inference pool, with the options `reelflow tag --gpus true|false` gives it (a probe in place
# of the model: torch here is a CPU build), and its decode tasks.
import ray.data
from flows.clips import DECODE_TASK_CPUS
from flows.predict import PredictConfig, pool_options

class NodeProbe:
    def __call__(self, batch):
        return {"node": [ray.get_runtime_context().get_node_id()] * len(batch["id"])}

def pool_nodes(use_gpu):
    rows = ray.data.range(8, override_num_blocks=8).map_batches(
        NodeProbe, batch_size=1, **pool_options(PredictConfig(use_gpu=use_gpu, concurrency=2, memory_gb=0.1)))
    return sorted({r["node"] for r in rows.take_all()})

decode = ray.data.range(8, override_num_blocks=8).map_batches(
    lambda b: {"node": [ray.get_runtime_context().get_node_id()] * len(b["id"])}, num_cpus=DECODE_TASK_CPUS)
nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
print("PLACEMENT " + json.dumps({"nodes": nodes, "cpu": ray.get([cpu_task.remote() for _ in range(8)]),
                                 "gpu": ray.get(gpu_task.remote()), "gpu_pool": pool_nodes(True),
                                 "cpu_pool": pool_nodes(False),
                                 "decode": sorted({r["node"] for r in decode.take_all()})}))
"""


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING_DASHBOARD), reason=f"needs ray[default], missing {MISSING_DASHBOARD}")
def test_cluster_sh_models_a_head_with_no_cpus_and_a_node_declaring_a_gpu(ray_session: None) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    root = tempfile.mkdtemp(prefix="rf-ray-")  # short: Ray's socket paths live below it
    env = {**os.environ, "REELFLOW_STACK_DIR": root, "PYTHON": sys.executable}
    script = str(INFRA / "local" / "cluster.sh")
    up = subprocess.run([script, "up", "3", "--head-cpus", "0", "--gpus-on-node", "2"], env=env,
                        capture_output=True, text=True, timeout=180)  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr
        exports = dict(line[len("export ") :].split("=", 1) for line in up.stdout.splitlines()
                       if line.startswith("export "))  # fmt: skip
        assert set(exports) == {"RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"}
        token = Path(exports["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        client = JobSubmissionClient(exports["RAY_ADDRESS"], headers={"Authorization": f"Bearer {token}"})
        job = client.submit_job(entrypoint=f"python -c {shlex.quote(PLACEMENT_JOB)}",
                                runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})  # fmt: skip
        status = wait_for_job(client, job)
        logs = client.get_job_logs(job)
        assert status == JobStatus.SUCCEEDED, logs
        (placed,) = [json.loads(line[len("PLACEMENT ") :]) for line in logs.splitlines()
                     if line.startswith("PLACEMENT ")]  # fmt: skip
        cpus = {node: resources.get("CPU", 0) for node, resources in placed["nodes"].items()}
        assert sorted(cpus.values()) == [0, 1, 1]  # a head with no CPU and two workers
        head = next(node for node, n in cpus.items() if n == 0)
        assert set(placed["cpu"]) <= {node for node, n in cpus.items() if n > 0}  # never on the head
        (gpu_node,) = [node for node, resources in placed["nodes"].items() if resources.get("GPU")]
        assert placed["gpu"] == gpu_node != head
        assert placed["gpu_pool"] == [gpu_node]  # --gpus true: the inference actors are on the GPU node
        workers = {node for node, n in cpus.items() if n > 0}
        assert set(placed["cpu_pool"]) <= workers and set(placed["decode"]) <= workers  # never the head

        # The documented check: `ray job submit --working-dir . -- python infra/ray/smoke.py --nodes 3`.
        smoke = client.submit_job(entrypoint="python infra/ray/smoke.py --nodes 3 --timeout 60",
                                  runtime_env={"working_dir": str(REPO)})  # fmt: skip
        status, logs = wait_for_job(client, smoke), client.get_job_logs(smoke)
        assert status == JobStatus.SUCCEEDED, logs
        (line,) = [json.loads(x[len("SMOKE ") :]) for x in logs.splitlines() if x.startswith("SMOKE ")]
        assert line["ok"] and line["without_cpus"] == [head] and len(line["nodes"]) == 3
        assert {t["node_id"] for t in line["tasks"]} == workers
    finally:
        down = subprocess.run([script, "down"], env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)
    assert down.returncode == 0 and down.stdout.startswith("stopped "), down.stderr


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING_DASHBOARD), reason=f"needs ray[default], missing {MISSING_DASHBOARD}")
def test_a_job_submitted_with_its_s3_settings_runs_and_no_secret_reaches_job_info(
    ray_session: None, s3_bucket: str, shared_videos: Path
) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    from flows import storage

    storage.put_file(str(shared_videos / "mmaction2" / "test.mp4"), f"{s3_bucket}/corpus/test.mp4")
    # The standard way: the job names its store in its own runtime_env; credentials come from the nodes'
    # environment (here inherited from this process, on a cluster an IAM role).
    settings = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    runtime_env = yaml.safe_load((INFRA / "schedule" / "runtime-env.yaml").read_text())
    local = stack.LocalRayStack(nodes=2, head_cpus=0)
    with local as (_gcs_address, dashboard_url):
        client = JobSubmissionClient(dashboard_url, headers=local.auth_headers())
        command = f"reelflow clips {s3_bucket}/corpus --out {s3_bucket}/out --clips-per-video 1 --size 32"
        job = client.submit_job(
            entrypoint=command, runtime_env={**runtime_env, "working_dir": str(REPO), "env_vars": settings}
        )
        status = wait_for_job(client, job, timeout_s=240)
        logs = client.get_job_logs(job)
        info = repr(client.get_job_info(job))
    assert status == JobStatus.SUCCEEDED, logs
    assert secret not in logs and secret not in info
    assert storage.list_files(f"{s3_bucket}/out/clips", suffix=".parquet")
