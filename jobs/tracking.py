"""MLflow tracking and the model registry: one run per training job, its config, metrics and figures,
and registered models that the tagging job loads by `models:/NAME/VERSION` or `models:/NAME@ALIAS`.

Every function takes the tracking URI explicitly (`tracking_uri=None` means MLflow's own setting or
`MLFLOW_TRACKING_URI`) and a run id rather than the active run, so the same calls work from the driver,
from Ray Train's rank-0 worker and from tagging actors, and a restarted job writes into the same run.

A model is logged with `mlflow.pytorch` (the pickled module, so MLflow's own tools can load and serve it)
and, beside it in the same MLflow model, its spec (`extra_files/spec.json`, also in the MLmodel metadata)
and a plain `state_dict` (`extra_files/state_dict.pt`). `load_model(uri, build=...)` rebuilds the module
from the spec and loads the weights with `torch.load(weights_only=True)`: no pickled code runs and the
registered version survives renamed classes. Without `build` the pickled module is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
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
) -> str:
    """Log `model` with `mlflow.pytorch` into run `run_id`, with its spec, and register it.

    The new version of `registered_name` gets `alias` (moved from any older version). `spec` is a
    dataclass or a mapping of JSON values. Returns `models:/NAME/VERSION`.
    """
    import mlflow.pytorch
    import torch

    module = _unwrap(model)
    spec_dict = spec_to_dict(spec)
    client = _client(tracking_uri)
    experiment = client.get_run(run_id).info.experiment_id
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp, _process_tracking_uri(client.tracking_uri):
        spec_path, state_path = Path(tmp, SPEC_FILE), Path(tmp, STATE_DICT_FILE)
        spec_path.write_text(json.dumps(spec_dict, indent=2, sort_keys=True))
        torch.save(state, state_path)
        # Created here, in the run's experiment: left to itself MLflow would file the model under the
        # process's current experiment, whatever the run's.
        logged = client.create_logged_model(
            experiment_id=experiment, source_run_id=run_id, name=artifact_name
        )
        info = mlflow.pytorch.log_model(
            module,
            name=artifact_name,
            model_id=logged.model_id,
            run_id=run_id,
            serialization_format="pickle",
            # Pinned here rather than inferred: inference re-imports the model in a subprocess (seconds).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", _pin("cloudpickle")],
            extra_files=[str(spec_path), str(state_path)],
            metadata={SPEC_METADATA: spec_dict, "reelflow_spec_type": _qualname(spec)},
            registered_model_name=registered_name,
        )
    version = str(info.registered_model_version)
    if alias:
        client.set_registered_model_alias(registered_name, alias, version)
    return f"models:/{registered_name}/{version}"


def load_model(
    model_uri: str,
    *,
    build: Callable[[dict[str, Any]], nn.Module] | None = None,
    tracking_uri: str | None = None,
    map_location: str = "cpu",
) -> tuple[nn.Module, dict[str, Any], ModelRef]:
    """Load a registered model by `models:/NAME/VERSION` or `models:/NAME@ALIAS`, in eval mode.

    With `build` (spec dict → fresh module) the weights are loaded into `build(spec)` without unpickling
    code; without it the pickled `mlflow.pytorch` module is loaded. An alias is resolved once, so the
    module, spec and `ModelRef` always describe the same version. Needs no active run.
    """
    import mlflow.pytorch
    import torch
    from mlflow.models import Model

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
        if build is not None:  # the spec and the state_dict are all it needs, not the pickled copy
            source = f"{source.rstrip('/')}/extra_files"
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=tmp, tracking_uri=client.tracking_uri
            )
        )
        extra = local if build is not None else local / "extra_files"
        spec_file = extra / SPEC_FILE
        if spec_file.exists():
            spec = json.loads(spec_file.read_text())
        else:
            spec = (Model.load(str(local)).metadata or {}).get(SPEC_METADATA) if build is None else None
        if spec is None:
            raise ValueError(
                f"model {model_uri}: has no reelflow spec (not logged by jobs.tracking.log_model)"
            )
        if build is not None:
            module = build(spec)
            weights = torch.load(extra / STATE_DICT_FILE, map_location=map_location, weights_only=True)
            module.load_state_dict(weights)
            module.eval()
        else:
            module = mlflow.pytorch.load_model(str(local), map_location=map_location)
    return module, spec, ref


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


@contextmanager
def _process_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URI set to `uri` for the block, then put back.

    `mlflow.pytorch.log_model` and its registration read the store from that global state, not from a
    client. `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI, so the environment is restored too.
    """
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry_utils._registry_uri = saved[1]
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _pin(package: str) -> str:
    from importlib.metadata import version

    return f"{package}=={version(package)}"
