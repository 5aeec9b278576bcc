"""MLflow tracking against a real `mlflow server` and the local SQLite default: one run per job key, params
without credentials, metrics, artifacts, registered versions with an alias, loaded in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from jobs import tracking
from jobs.evaluation import confusion_matrix, per_class_report

MODEL = "reelflow-tiny"
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


@dataclass(frozen=True)
class TinySpec:
    name: str = MODEL
    in_features: int = 4
    classes: tuple[str, ...] = ("a", "b", "c")


class TinyNet(nn.Module):
    def __init__(self, spec: TinySpec) -> None:
        super().__init__()
        self.spec = spec
        self.body = nn.Sequential(nn.Linear(spec.in_features, 8), nn.ReLU())
        self.head = nn.Linear(8, len(spec.classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build_tiny(spec: dict) -> TinyNet:
    return TinyNet(TinySpec(spec["name"], spec["in_features"], tuple(spec["classes"])))


def tiny(seed: int) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(TinySpec())


@dataclass(frozen=True)
class Storage:
    uri: str = "s3://bucket/runs"
    aws_secret_access_key: str | None = None


@dataclass(frozen=True)
class JobConfig:
    corpus: str = "s3://bucket/corpus"
    epochs: int = 2
    storage: Storage = Storage()
    tracking_uri: str | None = None


X = [[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, -0.5, 3.0]]

# Runs in a fresh interpreter: no active run, no MLflow state, only the registry's URI and the model URIs.
LOAD_SCRIPT = """
import importlib, json, sys
import torch
from jobs import tracking

server, module, x = sys.argv[1], sys.argv[2], torch.tensor(json.loads(sys.argv[3]))
build = importlib.import_module(module).build_tiny
out = {}
cases = [("alias", "models:/reelflow-tiny@candidate", build), ("v1", "models:/reelflow-tiny/1", build)]
for key, uri, builder in cases:
    model, spec, ref = tracking.load_model(uri, tracking_uri=server, build=builder)
    with torch.no_grad():
        y = model(x).tolist()
    out[key] = {"y": y, "spec": spec, "ref": [ref.name, ref.version, ref.run_id, ref.uri],
                "type": type(model).__name__, "training": model.training}
print("RESULT " + json.dumps(out))
"""


def test_a_training_run_on_the_server(mlflow_server: str, tmp_path: Path) -> None:
    client = MlflowClient(mlflow_server)
    run_id = tracking.get_or_create_run(
        "reelflow-tests", "train/demo-1", "demo-1", tracking_uri=mlflow_server
    )
    assert (
        tracking.get_or_create_run("reelflow-tests", "train/demo-1", "demo-1", tracking_uri=mlflow_server)
        == run_id
    )

    # Params: the flattened config, credentials redacted, idempotent when a resumed job logs it again.
    config = JobConfig(
        storage=Storage(aws_secret_access_key=SECRET), tracking_uri=f"http://ci:{SECRET}@mlflow:5000"
    )
    params = tracking.log_config(run_id, config, tracking_uri=mlflow_server)
    assert tracking.log_config(run_id, config, tracking_uri=mlflow_server) == params
    logged = client.get_run(run_id).data.params
    assert logged == params
    assert logged["epochs"] == "2" and logged["storage.uri"] == "s3://bucket/runs"
    assert logged["storage.aws_secret_access_key"] == "***"
    assert not any(SECRET in v for v in logged.values())
    with pytest.raises(
        ValueError, match=r"started with another config \(epochs: 2 -> 3\); use a new run name"
    ):
        tracking.log_config(run_id, replace(config, epochs=3), tracking_uri=mlflow_server)

    # Metrics per epoch, a confusion-matrix PNG and a per-class report.
    for epoch, (loss, top1) in enumerate([(1.2, 0.5), (0.7, 0.8)]):
        tracking.log_metrics(
            run_id, {"loss": loss, "val/category_top1": top1}, step=epoch, tracking_uri=mlflow_server
        )
    history = client.get_metric_history(run_id, "val/category_top1")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 0.5), (1, 0.8)]
    labels, preds = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0]
    cm = confusion_matrix(labels, preds, 3)
    tracking.log_confusion_matrix(run_id, cm, ["a", "b", "c"], tracking_uri=mlflow_server)
    client.log_dict(run_id, per_class_report(labels, preds, ["a", "b", "c"]), "per_class_report.json")

    artifacts = Path(mlflow.artifacts.download_artifacts(
        run_id=run_id, dst_path=str(tmp_path / "artifacts"), tracking_uri=mlflow_server
    ))  # fmt: skip
    assert (artifacts / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((artifacts / "per_class_report.json").read_text())["c"]["support"] == 3
    config_yaml = (artifacts / "config.yaml").read_text()
    assert "epochs: 2" in config_yaml and SECRET not in config_yaml

    # Two registered versions; the alias follows the newest.
    first, second = tiny(0), tiny(1)
    uri = tracking.log_model(first, first.spec, MODEL, "candidate", run_id=run_id, tracking_uri=mlflow_server)
    assert uri == f"models:/{MODEL}/1"
    assert client.get_model_version_by_alias(MODEL, "candidate").version == "1"
    assert client.get_model_version(MODEL, "1").run_id == run_id
    uri = tracking.log_model(
        second, second.spec, MODEL, "candidate", run_id=run_id, tracking_uri=mlflow_server
    )
    assert uri == f"models:/{MODEL}/2"
    assert client.get_model_version_by_alias(MODEL, "candidate").version == "2"

    # Loaded in a fresh process by alias and by version, rebuilt from the spec.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), str(Path(__file__).parent)]),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, mlflow_server, TinyNet.__module__, json.dumps(X)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    x = torch.tensor(X)
    with torch.no_grad():
        expected = {"alias": second(x), "v1": first(x)}
    spec = {"name": MODEL, "in_features": 4, "classes": ["a", "b", "c"]}
    for key, version in [("alias", 2), ("v1", 1)]:
        assert torch.allclose(torch.tensor(result[key]["y"]), expected[key], atol=1e-6), key
        assert result[key]["spec"] == spec
        assert result[key]["ref"] == [MODEL, version, run_id, f"models:/{MODEL}/{version}"]
        assert result[key]["type"] == "TinyNet" and result[key]["training"] is False

    # Finished, then the same job again: the same run, running again, and still only one.
    tracking.finish_run(run_id, tracking_uri=mlflow_server)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert (
        tracking.get_or_create_run("reelflow-tests", "train/demo-1", "demo-1", tracking_uri=mlflow_server)
        == run_id
    )
    assert client.get_run(run_id).info.status == "RUNNING"
    experiment = client.get_experiment_by_name("reelflow-tests").experiment_id
    assert len(client.search_runs([experiment])) == 1
    other = tracking.get_or_create_run("reelflow-tests", "train/demo-2", "demo-2", tracking_uri=mlflow_server)
    assert other != run_id


def test_models_not_in_the_registry_get_one_line_errors(mlflow_server: str) -> None:
    for uri in ("models:/no-such-model/1", "models:/no-such-model@candidate"):
        with pytest.raises(ValueError) as info:
            tracking.load_model(uri, tracking_uri=mlflow_server)
        assert str(info.value) == f"model {uri}: not in the MLflow model registry at {mlflow_server}"
    with pytest.raises(ValueError, match="expected models:/NAME/VERSION or models:/NAME@ALIAS"):
        tracking.load_model("runs:/abc/model", tracking_uri=mlflow_server)


def test_the_local_sqlite_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    state = tmp_path / "state"
    uri = tracking.tracking_uri(None, state)
    assert uri == f"sqlite:///{state}/mlflow.db"
    before = mlflow.get_tracking_uri()

    run_id = tracking.get_or_create_run("local", "train/local", "local", tracking_uri=uri)
    tracking.log_metrics(run_id, {"loss": 0.5}, step=0, tracking_uri=uri)
    model = tiny(2)
    assert tracking.log_model(model, model.spec, MODEL, "candidate", run_id=run_id, tracking_uri=uri) == (
        f"models:/{MODEL}/1"
    )
    loaded, spec, ref = tracking.load_model(f"models:/{MODEL}@candidate", tracking_uri=uri, build=build_tiny)
    x = torch.tensor(X)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x))
    assert ref == tracking.ModelRef(MODEL, 1, run_id) and spec["classes"] == ["a", "b", "c"]

    # Everything went under the state folder: nothing into the working directory, and MLflow's
    # process-wide setting is as it was.
    assert list(state.glob("artifacts/**/model/model.safetensors"))
    assert list(cwd.iterdir()) == []
    assert mlflow.get_tracking_uri() == before and "MLFLOW_TRACKING_URI" not in os.environ


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert tracking.tracking_uri("http://from-config:5000", tmp_path) == "http://from-config:5000"
    assert tracking.tracking_uri(None, tmp_path) == "http://from-env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri(None, tmp_path / "x") == f"sqlite:///{tmp_path}/x/mlflow.db"
    assert (
        tracking.artifact_location(f"sqlite:///{tmp_path}/x/mlflow.db")
        == (tmp_path / "x" / "artifacts").as_uri()
    )
    assert tracking.artifact_location("http://from-config:5000") is None


def test_run_keys_are_checked_before_any_request() -> None:
    with pytest.raises(ValueError, match="run key"):
        tracking.get_or_create_run("e", "it's", "r", tracking_uri="http://127.0.0.1:9")


def test_confusion_matrix_figure_shows_counts_and_names() -> None:
    names = ["ball_sports", "traffic", "nature"]
    figure = tracking.confusion_matrix_figure(confusion_matrix([0, 0, 1, 2, 2], [0, 1, 1, 2, 0], 3), names)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert ax.get_xticklabels()[0].get_rotation() == 45
    assert sorted(t.get_text() for t in ax.texts) == sorted(["1", "1", "0", "0", "1", "0", "1", "0", "1"])
    png = BytesIO()
    figure.savefig(png, format="png")
    assert png.getvalue()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="does not match 2 class names"):
        tracking.confusion_matrix_figure([[1, 0, 0]] * 3, ["a", "b"])
