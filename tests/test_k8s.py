"""infra/k8s: the KubeRay manifests, read as KubeRay, kustomize and Kubernetes read them: the CRD schemas
(vendored under infra/schemas), Kubernetes 1.30's, `kubectl kustomize`, the KubeRay autoscaler's parser and
the command line KubeRay's submitter runs."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from infra_files import (
    INFRA,
    K8S,
    SECRET_ENV,
    by_kind,
    dockerfile_instructions,
    k8s_documents,
)

from jobs.cli import build_parser


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


def test_the_cronjob_runs_the_nightly_wrapper_within_its_deadline() -> None:
    (cron,) = by_kind("CronJob")
    job = cron["spec"]["jobTemplate"]["spec"]
    (container,) = job["template"]["spec"]["containers"]
    assert container["command"] == ["/home/ray/reelflow/infra/schedule/nightly-tag.sh"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["REELFLOW_DEADLINE_S"]) < job["activeDeadlineSeconds"]  # the wrapper stops the job first
    # The image holds the wrapper where the command names it.
    assert ("COPY", "--chown=1000:100 infra/schedule/ infra/schedule/") in dockerfile_instructions()
