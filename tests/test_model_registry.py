"""Registered models load without unpickling: safetensors weights + a JSON recipe, a pickled version refused
unless trusted, and `reelflow models convert` re-registering an old pickled version in the safe form."""

from __future__ import annotations

import json
import pickle
import tempfile
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from jobs import cli, tracking
from models import build

NAME = "reelflow-registry-test"
HEADS = {"category": ["a", "b", "c"], "sentiment": ["negative", "neutral", "positive"]}


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build(
        "multitask", backbone="cnn_lstm", heads=HEADS, clip_len=4, frame_size=[32, 32],
        channels=[4, 8], hidden=8,
    ).eval()  # fmt: skip


def clips() -> torch.Tensor:
    return torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def registry(tmp_path: Path) -> tuple[str, str]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.get_or_create_run("registry", "registry/test", "test", tracking_uri=uri)
    return uri, run_id


def log_pickled(model: object, uri: str, run_id: str, spec: dict, monkeypatch: pytest.MonkeyPatch) -> str:
    """A version the way reelflow logged models before: MLflow's pytorch flavor, pickled."""
    import mlflow.pytorch
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    # MLflow's process-wide store, pointed here for this test only (later tests use other stores).
    for env in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(env, uri)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", uri)
    monkeypatch.setattr(registry_utils, "_registry_uri", uri)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        spec_file = Path(tmp, "spec.json")
        spec_file.write_text(json.dumps(spec))
        info = mlflow.pytorch.log_model(
            model, name="model", serialization_format="pickle", extra_files=[str(spec_file)],
            pip_requirements=["torch"], registered_model_name=NAME,
        )  # fmt: skip
    return f"models:/{NAME}/{info.registered_model_version}"


class RunsCodeWhenUnpickled(torch.nn.Module):
    """A model file that writes a marker file when unpickled: what an attacker would register."""

    marker = ""

    def __reduce__(self) -> tuple:
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_a_registered_model_loads_without_any_unpickling(
    registry: tuple[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    uri, run_id = registry
    model = small_model()
    model_uri = tracking.log_model(model, model.spec, NAME, "candidate", run_id=run_id, tracking_uri=uri)

    artifacts = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=MlflowClient(uri).get_model_version_download_uri(NAME, "1"),
        dst_path=str(tmp_path / "dl"), tracking_uri=uri,
    ))  # fmt: skip
    assert sorted(p.name for p in artifacts.iterdir()) == ["model.json", "model.safetensors"]
    assert MlflowClient(uri).get_model_version(NAME, "1").tags[tracking.FORMAT_TAG] == tracking.MODEL_FORMAT

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded, spec, ref = tracking.load_model(f"models:/{NAME}@candidate", tracking_uri=uri)
    assert ref.uri == model_uri and spec == model.spec.to_dict() and loaded.spec == model.spec
    assert not loaded.training
    with torch.no_grad():
        want, got = model(clips()), loaded(clips())
    for head in want:
        assert torch.equal(want[head], got[head]), head


def test_a_pickled_model_is_refused_unless_trusted(
    registry: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, run_id = registry
    marker = tmp_path / "code-ran"
    RunsCodeWhenUnpickled.marker = str(marker)
    model_uri = log_pickled(RunsCodeWhenUnpickled(), uri, run_id, small_model().spec.to_dict(), monkeypatch)

    for command in (["evaluate", "--corpus", str(tmp_path)], ["tag", "--corpus", str(tmp_path)]):
        with pytest.raises(ValueError) as info:
            tracking.load_model(model_uri, tracking_uri=uri)
        message = str(info.value)
        assert "\n" not in message and model_uri in message and "pickle" in message, command
        assert f"reelflow models convert {model_uri}" in message and "--trust-pickle" in message
        assert not marker.exists()

    # The refusal is what kept the code from running: trusting the file runs it.
    with pytest.raises(Exception):  # noqa: B017 - the unpickled object is a str, not a model
        tracking.load_model(model_uri, tracking_uri=uri, trust_pickle=True)
    assert marker.read_text() == "pwned"


def test_convert_re_registers_a_pickled_version_in_the_safe_form(
    registry: tuple[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, run_id = registry
    old = small_model(seed=3)
    old_uri = log_pickled(old, uri, run_id, old.spec.to_dict(), monkeypatch)
    client = MlflowClient(uri)
    client.set_registered_model_alias(NAME, "production", "1")
    with pytest.raises(ValueError, match="models convert"):
        tracking.load_model(f"models:/{NAME}@production", tracking_uri=uri)

    assert cli.main(["models", "convert", old_uri, "--tracking-uri", uri]) == 0
    new_uri = capsys.readouterr().out.strip().splitlines()[-1]
    assert new_uri == f"models:/{NAME}/2"
    assert str(client.get_model_version_by_alias(NAME, "production").version) == "2"
    assert client.get_model_version(NAME, "2").tags[tracking.CONVERTED_TAG] == "1"

    loaded, _, ref = tracking.load_model(f"models:/{NAME}@production", tracking_uri=uri)
    assert ref.version == 2
    with torch.no_grad():
        assert torch.equal(old(clips())["category"], loaded(clips())["category"])
    # Converting the safe version again changes nothing.
    assert tracking.convert_model(new_uri, tracking_uri=uri) == new_uri
    assert len(client.search_model_versions(f"name='{NAME}'")) == 2
