"""MLflow tracking and the model registry: one run per training job, its config, metrics and figures,
and registered models that the tagging job loads by `models:/NAME/VERSION` or `models:/NAME@ALIAS`.

Every function takes the tracking URI explicitly (`tracking_uri=None` means MLflow's own setting or
`MLFLOW_TRACKING_URI`) and a run id rather than the active run, so the same calls work from the driver,
from Ray Train's rank-0 worker and from tagging actors, and a restarted job writes into the same run.

A model is logged as two plain artifacts, registered with `create_model_version`: `model.json` (its spec and
the recipe that rebuilds it: builder name and arguments) and `model.safetensors` (its weights). Loading
rebuilds the module and loads the weights: nothing is unpickled, so whoever can write to the registry cannot
run code on the machines that load from it. Versions an older reelflow logged with MLflow's pickle format
load only when trusted (`trust_pickle`), and `convert_model` re-registers them in the safe form.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from jobs.config import flatten, redact, to_yaml

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import nn

RUN_KEY_TAG = "reelflow.run_key"
MODEL_FILE = "model.json"  # {"format", "spec", "recipe"}: what the model is and how to build it
WEIGHTS_FILE = "model.safetensors"
MODEL_FORMAT = "reelflow.mlflow-model/2"
FORMAT_TAG = "reelflow.format"
CONVERTED_TAG = "reelflow.converted_from"
# What older versions (MLflow's pytorch flavor, pickled) hold beside the pickle.
SPEC_FILE = "spec.json"
STATE_DICT_FILE = "state_dict.pt"
SPEC_METADATA = "reelflow_spec"
_MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))")
_RUN_KEY = re.compile(r"[A-Za-z0-9_.:/@+=, -]{1,250}")
_BATCH = 100  # MLflow's limit of params per log_batch request
_MAX_PARAM = 6000  # MLflow's limit on a param value's length


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """Which registered model version was loaded: what every tagged row records."""

    name: str
    version: int
    run_id: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


# --- where runs go ------------------------------------------------------------------------------------


def tracking_uri(config_value: str | None, default_dir: str | Path) -> str:
    """The config's URI, else `MLFLOW_TRACKING_URI`, else a SQLite store `<default_dir>/mlflow.db`.

    With the SQLite default, artifacts go to `<default_dir>/artifacts` (see `artifact_location`).
    """
    if config_value:
        return config_value
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(default_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """The artifact folder beside a local SQLite store; None where the server decides (HTTP, ...)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:///:memory:"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return None


def experiment_id(name: str, *, tracking_uri: str | None = None) -> str:
    """The id of experiment `name`, created on first use (artifacts beside a local SQLite store)."""
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri))
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # created meanwhile by another process
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise ValueError(
            f"MLflow experiment {name!r} is deleted: restore it or choose another experiment name"
        )
    return experiment.experiment_id


def get_or_create_run(
    experiment: str,
    run_key: str,
    run_name: str,
    *,
    tracking_uri: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """The id of the run tagged `reelflow.run_key = run_key` in `experiment`, created if there is none.

    A restarted or re-run job passes the same key and gets the same run back (set RUNNING again), so
    there is never a duplicate run. A deleted run does not count.
    """
    if not _RUN_KEY.fullmatch(run_key):
        raise ValueError(f"run key {run_key!r}: use 1-250 letters, digits, spaces and _.:/@+=,- only")
    client = _client(tracking_uri)
    exp_id = experiment_id(experiment, tracking_uri=client.tracking_uri)
    query = f"tags.`{RUN_KEY_TAG}` = '{run_key}'"
    found = client.search_runs([exp_id], query, max_results=1, order_by=["attributes.start_time ASC"])
    if found:
        run = found[0]
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    run = client.create_run(exp_id, run_name=run_name, tags={**(tags or {}), RUN_KEY_TAG: run_key})
    return run.info.run_id


def finish_run(run_id: str, status: str = "FINISHED", *, tracking_uri: str | None = None) -> None:
    """Mark the run FINISHED (or FAILED / KILLED)."""
    _client(tracking_uri).set_terminated(run_id, status=status)


# --- what a run records -------------------------------------------------------------------------------


def log_config(run_id: str, config: Any, *, tracking_uri: str | None = None) -> dict[str, str]:
    """Log a config dataclass as params (`flatten`: dotted keys, credentials redacted) and `config.yaml`.

    Logging the same config into a resumed run is a no-op for the params already there; a different
    value for one of them is an error, since MLflow params cannot change and the run would lie.
    Values beyond MLflow's 6000 characters are cut (the whole config is in `config.yaml`).
    """
    client = _client(tracking_uri)
    params = {
        k: v if len(v) <= _MAX_PARAM else v[: _MAX_PARAM - 3] + "..." for k, v in flatten(config).items()
    }
    existing = client.get_run(run_id).data.params
    changed = [k for k, v in params.items() if k in existing and existing[k] != v]
    if changed:
        diffs = ", ".join(f"{k}: {existing[k]} -> {params[k]}" for k in changed[:5])
        raise ValueError(f"MLflow run {run_id} was started with another config ({diffs}); use a new run name")
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    for i in range(0, len(new), _BATCH):
        client.log_batch(run_id, params=new[i : i + _BATCH])
    client.log_text(run_id, to_yaml(config), "config.yaml")
    return params


def log_metrics(
    run_id: str, metrics: Mapping[str, float], step: int, *, tracking_uri: str | None = None
) -> None:
    """Log `metrics` at `step` (e.g. the epoch) in one request."""
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    _client(tracking_uri).log_batch(run_id, metrics=batch)


def confusion_matrix_figure(cm: np.ndarray, class_names: Sequence[str], title: str | None = None) -> Figure:
    """A confusion matrix plot: colour = fraction of the true class (row), text = count.

    Rows are true classes, columns predictions (`evaluation.confusion_matrix`). Built on a bare
    `Figure`, without pyplot, so it needs no display and leaves no global state behind.
    """
    from matplotlib.figure import Figure

    cm = np.asarray(cm)
    n = len(class_names)
    if cm.shape != (n, n):
        raise ValueError(f"confusion_matrix_figure: matrix {cm.shape} does not match {n} class names")
    totals = cm.sum(axis=1, keepdims=True)
    fraction = np.divide(cm, totals, out=np.zeros(cm.shape), where=totals > 0)

    side = min(16.0, max(4.5, 0.55 * n + 2.5))
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"confusion matrix ({int(cm.sum())} samples)")
    if n <= 30:  # beyond that the counts are unreadable; the colours still tell
        size = 10 if n <= 10 else 7
        for i in range(n):
            for j in range(n):
                colour = "white" if fraction[i, j] > 0.5 else "black"
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color=colour, fontsize=size)
    return fig


def log_confusion_matrix(
    run_id: str,
    cm: np.ndarray,
    class_names: Sequence[str],
    artifact_file: str = "confusion_matrix.png",
    *,
    tracking_uri: str | None = None,
) -> None:
    """Log `confusion_matrix_figure(cm, class_names)` as a PNG artifact of the run."""
    figure = confusion_matrix_figure(cm, class_names)
    _client(tracking_uri).log_figure(run_id, figure, artifact_file, save_kwargs={"dpi": 120})


# --- the model registry -------------------------------------------------------------------------------


def log_model(
    model: nn.Module,
    spec: Any,
    registered_name: str,
    alias: str | None = "candidate",
    *,
    run_id: str,
    tracking_uri: str | None = None,
    artifact_name: str = "model",
    tags: Mapping[str, str] | None = None,
) -> str:
    """Log `model`'s weights (safetensors) and spec + recipe (JSON) into run `run_id`, and register them.

    The new version of `registered_name` gets `alias` (moved from any older version) and `tags`. `spec` is a
    dataclass or a mapping of JSON values. Returns `models:/NAME/VERSION`.
    """
    from safetensors.torch import save_file

    module = _unwrap(model)
    client = _client(tracking_uri)
    run = client.get_run(run_id)
    description = {"format": MODEL_FORMAT, "spec": spec_to_dict(spec), "recipe": _recipe(module)}
    # Copies: safetensors refuses tensors that share memory (tied weights), and wants them contiguous.
    state = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
    # A version's files are never overwritten: a second model logged into the run gets "model-2".
    taken = {a.path for a in client.list_artifacts(run_id)}
    artifact_name = next(
        n for n in (artifact_name, *(f"{artifact_name}-{i}" for i in range(2, 10**6))) if n not in taken
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, artifact_name)
        folder.mkdir()
        (folder / MODEL_FILE).write_text(json.dumps(description, indent=1, sort_keys=True))
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": MODEL_FORMAT})
        client.log_artifacts(run_id, str(folder), artifact_name)
    try:
        client.create_registered_model(registered_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # Registered as plain artifacts, not an MLflow flavor: a flavor would pickle the module again.
    version = client.create_model_version(
        registered_name,
        f"{run.info.artifact_uri.rstrip('/')}/{artifact_name}",
        run_id=run_id,
        tags={FORMAT_TAG: MODEL_FORMAT, **(tags or {})},
    ).version
    if alias:
        client.set_registered_model_alias(registered_name, alias, str(version))
    return f"models:/{registered_name}/{version}"


def load_model(
    model_uri: str,
    *,
    build: Callable[[dict[str, Any]], nn.Module] | None = None,
    tracking_uri: str | None = None,
    map_location: str = "cpu",
    trust_pickle: bool = False,
) -> tuple[nn.Module, dict[str, Any], ModelRef]:
    """Load a registered model by `models:/NAME/VERSION` or `models:/NAME@ALIAS`, in eval mode.

    The module is rebuilt from its recipe (a reelflow model) or by `build(spec)`, and its safetensors weights
    loaded into it: nothing is unpickled. A version logged by an older reelflow (MLflow's pickle format) is
    refused unless `trust_pickle`; `convert_model` re-registers it in the safe form. An alias is resolved
    once, so the module, spec and `ModelRef` always describe the same version. Needs no active run.
    """
    name, version, alias = parse_model_uri(model_uri)
    client = _client(tracking_uri)
    try:
        found = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, version)
        )
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise
        where = redact(client.tracking_uri)
        raise ValueError(f"model {model_uri}: not in the MLflow model registry at {where}") from None
    ref = ModelRef(name=name, version=int(found.version), run_id=found.run_id or None)

    with tempfile.TemporaryDirectory() as tmp:
        # Through the version's own artifact location: MLflow resolves a `models:/` URI against the
        # process-wide registry, whatever registry it is given.
        source = client.get_model_version_download_uri(name, str(ref.version))
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=tmp, tracking_uri=client.tracking_uri
            )
        )
        if (local / MODEL_FILE).exists():
            module, spec = _load_safe(local, ref.uri, build, map_location)
        elif (local / "MLmodel").exists():
            module, spec = _load_pickled(local, ref.uri, build, map_location, trust_pickle)
        else:
            raise ValueError(f"model {ref.uri}: its artifacts hold no {MODEL_FILE} (not a reelflow model)")
    return module.eval(), spec, ref


def _load_safe(
    folder: Path, where: str, build: Callable[[dict[str, Any]], nn.Module] | None, map_location: str
) -> tuple[nn.Module, dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from models.registry import from_recipe, load_weights

    description = json.loads((folder / MODEL_FILE).read_text())
    if description.get("format") != MODEL_FORMAT:
        raise ValueError(f"model {where}: {MODEL_FILE} has format {description.get('format')!r}, "
                         f"this reelflow reads {MODEL_FORMAT}")  # fmt: skip
    spec = description["spec"]
    if build is not None:
        module = build(spec)
    elif description.get("recipe"):
        module = from_recipe(description["recipe"], f"model {where}")
    else:
        raise ValueError(f"model {where}: was not made by models.build, so it needs a builder to load")
    try:
        weights = load_file(str(folder / WEIGHTS_FILE), device=map_location)
    except (OSError, SafetensorError) as err:
        raise ValueError(f"model {where}: cannot read {WEIGHTS_FILE}: {err}") from None
    load_weights(module, weights, f"model {where}")
    return module, spec


def _load_pickled(
    folder: Path,
    where: str,
    build: Callable[[dict[str, Any]], nn.Module] | None,
    map_location: str,
    trust_pickle: bool,
) -> tuple[nn.Module, dict[str, Any]]:
    """A version an older reelflow logged with `mlflow.pytorch`; its state_dict copy loads without pickle
    when a `build` is given, the module itself only when trusted."""
    import torch
    from mlflow.models import Model

    spec_file = folder / "extra_files" / SPEC_FILE
    spec = (
        json.loads(spec_file.read_text())
        if spec_file.exists()
        else (Model.load(str(folder)).metadata or {}).get(SPEC_METADATA)
    )
    if spec is None:
        raise ValueError(f"model {where}: has no reelflow spec (not logged by jobs.tracking.log_model)")
    if build is not None and (folder / "extra_files" / STATE_DICT_FILE).exists():
        module = build(spec)
        module.load_state_dict(
            torch.load(folder / "extra_files" / STATE_DICT_FILE, map_location=map_location, weights_only=True)
        )
        return module, spec
    if not trust_pickle:
        raise ValueError(
            f"model {where}: saved as a pickle by an older reelflow, and unpickling runs whatever code the "
            f"file holds; re-register it once with `reelflow models convert {where}` "
            "(or pass --trust-pickle if you trust everyone who can write to this registry)"
        )
    import mlflow.pytorch

    return mlflow.pytorch.load_model(str(folder), map_location=map_location), spec


def convert_model(model_uri: str, *, tracking_uri: str | None = None) -> str:
    """Re-register a version logged in MLflow's pickle format (older reelflow) in the safe form.

    The old version is unpickled once, here, by the caller's decision; the new version gets its aliases and
    a `reelflow.converted_from` tag. A version already in the safe form is returned as it is.
    """
    client = _client(tracking_uri)
    module, spec, ref = load_model(model_uri, tracking_uri=tracking_uri, trust_pickle=True)
    found = client.get_model_version(ref.name, str(ref.version))
    if found.tags.get(FORMAT_TAG) == MODEL_FORMAT:
        return ref.uri
    run_id = ref.run_id or get_or_create_run(
        "reelflow-convert", f"convert/{ref.name}/{ref.version}", "convert", tracking_uri=tracking_uri
    )
    uri = log_model(
        module,
        getattr(module, "spec", spec),
        ref.name,
        None,
        run_id=run_id,
        tracking_uri=tracking_uri,
        tags={CONVERTED_TAG: str(ref.version)},
    )
    new_version = parse_model_uri(uri)[1]
    for alias, version in (client.get_registered_model(ref.name).aliases or {}).items():
        if str(version) == str(ref.version):
            client.set_registered_model_alias(ref.name, alias, new_version)
    return uri


def _recipe(module: nn.Module) -> dict[str, Any] | None:
    """A reelflow model's recipe (builder, arguments, spec); None for any other module."""
    from models import Ensemble, model_recipe

    if isinstance(module, Ensemble) or getattr(module, "build_config", None):
        return model_recipe(module)
    return None


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME/VERSION` → (NAME, VERSION, None); `models:/NAME@ALIAS` → (NAME, None, ALIAS)."""
    match = _MODEL_URI.fullmatch(model_uri.strip())
    if not match:
        raise ValueError(f"model URI {model_uri!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    return match["name"], match["version"], match["alias"]


def spec_to_dict(spec: Any) -> dict[str, Any]:
    """A model spec (dataclass or mapping) as JSON-ready data (tuples become lists)."""
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        data = dataclasses.asdict(spec)
    elif isinstance(spec, Mapping):
        data = dict(spec)
    else:
        raise TypeError(f"model spec: expected a dataclass or a mapping, got {type(spec).__name__}")
    try:
        return json.loads(json.dumps(data))
    except (TypeError, ValueError) as err:
        raise ValueError(f"model spec: not JSON-serializable ({err})") from None


# --- helpers ------------------------------------------------------------------------------------------


def _client(uri: str | None) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
