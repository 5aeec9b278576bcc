"""`reelflow train` end to end on a tiny generated corpus: real Ray Train workers, a real MLflow server,
a real S3-protocol store (moto) for checkpoints, and a worker process killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from flows import storage
from jobs import cli, tracking, train
from jobs.config import ConfigError, flatten, load_config

DEMO = Path(__file__).resolve().parent.parent / "jobs" / "configs" / "demo.yaml"
# The demo config made tiny: 2 clips per video, a narrow CNN-LSTM, no video-level evaluation.
TINY = (
    "data.clips_per_video=2",
    "data.val_clips_per_video=2",
    "data.batch_size=8",
    "data.shuffle_buffer=16",
    "model.kwargs={channels: [8, 16, 16, 32], hidden: 32}",
)
PER_TASK_METRICS = (
    "val_category_top1",
    "val_action_top1",
    "val_action_steps_accuracy",
    "val_sentiment_top1",
    "val_valence_mae",
    "val_importance_mae",
    *(f"train_loss_{task}" for task in train.TASKS),
    *(f"val_loss_{task}" for task in train.TASKS),
)


def tiny_overrides(corpus: Path | str, storage_uri: str, name: str, tracking_uri: str, *extra: str) -> list:
    return [
        f"corpus={corpus}",
        f"storage={storage_uri}",
        f"run_name={name}",
        f"mlflow.tracking_uri={tracking_uri}",
        f"mlflow.experiment=test-{name}",
        f"model.registered_name=test-{name}",
        *TINY,
        *extra,
    ]


def only_run(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


@pytest.fixture(scope="module")
def trained(small_corpus, ray_session, mlflow_server, tmp_path_factory):
    """One 2-epoch training job on the small corpus, tracked on the MLflow server."""
    runs = tmp_path_factory.mktemp("train-runs")
    overrides = tiny_overrides(small_corpus, str(runs), "tracked", mlflow_server, "optim.epochs=2")
    # The video-level evaluation (`reelflow evaluate` on the validation videos) runs in this job only.
    config = load_config(train.TrainConfig, DEMO, overrides)
    return config, overrides, train.main(config)


def test_run_has_config_params_epoch_metrics_and_artifacts(trained, mlflow_server):
    config, _, result = trained
    client = MlflowClient(mlflow_server)
    run = only_run(client, config.mlflow.experiment)
    assert run.info.run_id == result.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params == flatten(config)

    for name in ("train_loss", "val_loss", *PER_TASK_METRICS):
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == [0, 1], name
        assert all(np.isfinite(m.value) for m in history), name
    assert 0.0 <= run.data.metrics["val_category_top1"] <= 1.0
    assert result.starts == (0,)

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "split.json", "per_class_report.json", "per_class_report.txt"} <= artifacts
    for head in ("category", "action", "sentiment"):
        assert f"confusion_matrix_{head}.png" in artifacts
    with open(client.download_artifacts(run.info.run_id, "confusion_matrix_category.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    report = json.loads(Path(client.download_artifacts(run.info.run_id, "per_class_report.json")).read_text())
    split = json.loads(Path(client.download_artifacts(run.info.run_id, "split.json")).read_text())
    assert set(report["category"]) == set(split["heads"]["category"])
    assert sum(row["support"] for row in report["category"].values()) == run.data.metrics["val_clips"]
    logged = load_config(train.TrainConfig, client.download_artifacts(run.info.run_id, "config.yaml"))
    assert logged == config

    # The video-level evaluation of the registered model on the validation videos, logged into the run.
    evaluation = json.loads(Path(client.download_artifacts(run.info.run_id, "evaluation.json")).read_text())
    assert evaluation["videos_scored"] == len(result.val_files)
    for name in ("category_top1", "category_top5", "action_f1", "sentiment_accuracy", "highlight_f1"):
        assert 0.0 <= run.data.metrics[f"eval_{name}"] <= 1.0
        assert result.evaluation[name] == pytest.approx(evaluation[name])


def test_model_is_registered_with_alias_and_loads(trained, mlflow_server):
    config, _, result = trained
    name = config.model.display_name
    assert result.model_uri == f"models:/{name}/1"
    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias(name, config.mlflow.alias)
    assert version.version == "1" and version.run_id == result.run_id

    module, spec, ref = tracking.load_model(
        f"models:/{name}@{config.mlflow.alias}", tracking_uri=mlflow_server
    )
    assert ref.version == 1
    assert set(spec["heads"]) == {"category", "action", "sentiment", "valence", "importance"}
    clip = np.random.default_rng(0).integers(0, 255, (2, 16, 64, 64, 3), dtype=np.uint8)
    import torch

    outputs = module(module.spec.prepare(torch.from_numpy(clip)))
    assert outputs["category"].shape == (2, len(spec["heads"]["category"]))


def test_validation_videos_are_never_trained_on(trained, small_corpus):
    config, _, result = trained
    manifest = pq.read_table(small_corpus / "labels.parquet", columns=["file", "category"]).to_pylist()
    categories = {row["file"]: row["category"] for row in manifest}
    cache = Path(config.run_uri) / "cache"
    trained_files = set(pq.read_table(cache / "train", columns=["file"]).column("file").to_pylist())
    val_files = set(pq.read_table(cache / "validation", columns=["file"]).column("file").to_pylist())
    assert set(result.val_files) == val_files
    assert val_files and trained_files and not trained_files & val_files
    assert trained_files | val_files == set(categories)  # every labelled video is in one split
    assert {categories[f] for f in val_files} == set(categories.values())


def test_rerunning_the_command_resumes_without_a_new_run(trained, mlflow_server, capsys):
    config, overrides, first = trained
    code = cli.main(["train", "--config", str(DEMO), *overrides])
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == first.model_uri

    client = MlflowClient(mlflow_server)
    run = only_run(client, config.mlflow.experiment)  # the same run, no duplicate
    assert run.info.run_id == first.run_id and run.info.status == "FINISHED"
    # No epoch trained again: one loss per epoch still, and the second attempt started at the end.
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
    starts = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "attempt_start_epoch")}
    assert starts == {0: 0.0, 1: 2.0}
    versions = client.search_model_versions(f"name='{config.model.display_name}'")
    assert [v.version for v in versions] == ["1"]


def _kill_one_worker_after_checkpoints(run_uri: str, stop: threading.Event, killed: list) -> None:
    """Once Ray Train has registered a checkpoint (its controller then writes the checkpoint manager's
    snapshot to the run's storage), SIGKILL one Ray Train worker process of this test session; `killed`
    gets (pid, the checkpoints there were)."""
    import psutil

    snapshot = storage.join_uri(run_uri, "checkpoint_manager_snapshot.json")
    while not stop.is_set():
        if storage.exists(snapshot) and b"epoch_" in storage.read_bytes(snapshot):
            workers = [p for p in psutil.Process().children(recursive=True) if _is_train_worker(p)]
            if workers:
                os.kill(workers[-1].pid, signal.SIGKILL)
                killed.append((workers[-1].pid, storage.list_files(run_uri, "report.json")))
                return
        time.sleep(0.05)


def _is_train_worker(process: Any) -> bool:
    import psutil

    try:
        return any("RayTrainWorker" in part for part in process.cmdline())
    except psutil.Error:  # it exited between the listing and this read (gone, or not yet reaped)
        return False


def test_killed_worker_resumes_from_checkpoint_on_s3(small_corpus, ray_session, mlflow_server, s3_bucket):
    name, epochs = "faulty", 5
    overrides = tiny_overrides(
        small_corpus,
        f"{s3_bucket}/runs",
        name,
        mlflow_server,
        f"optim.epochs={epochs}",
        "data.batch_size=4",  # more, shorter steps: epochs long enough to be killed in
        "max_failures=1",
        "mlflow.evaluate=false",
    )
    config = load_config(train.TrainConfig, DEMO, overrides)
    stop, killed = threading.Event(), []
    killer = threading.Thread(
        target=_kill_one_worker_after_checkpoints, args=(config.run_uri, stop, killed), daemon=True
    )
    killer.start()
    try:
        result = train.main(config)
    finally:
        stop.set()
        killer.join(timeout=10)
    assert killed, "no Ray Train worker was killed"
    assert len(killed[0][1]) < epochs, f"killed after the last epoch: {killed}"
    assert len(result.starts) == 2 and 1 <= result.starts[1] < epochs, (result.starts, killed)
    # Checkpoints went to the bucket, and the run finished all epochs into one MLflow run.
    last = f"/runs/{name}/epoch_{epochs - 1:04d}/"
    assert any(last in f for f in storage.list_files(config.run_uri, "model.pt"))
    client = MlflowClient(mlflow_server)
    run = only_run(client, config.mlflow.experiment)
    assert run.info.status == "FINISHED"
    logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss"))
    assert set(logged) == set(range(epochs))
    assert result.model_uri == f"models:/test-{name}/1"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optim.epochs=0", "optim.epochs"),
        ("optim.epoch=3", "optim.epoch"),
        ("tasks.category=-1", "tasks.category"),
        ("scaling.num_workers=two", "scaling.num_workers"),
        ("model.backbone=resnet", "model.backbone"),
        ("scaling.placement=RANDOM", "scaling.placement"),
    ],
)
def test_bad_config_is_a_one_line_error_naming_the_field(override, named, tmp_path, capsys):
    args = ["train", "--config", str(DEMO), f"storage={tmp_path / 'runs'}", override]
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(train.TrainConfig, DEMO, args[3:])
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert not (tmp_path / "runs").exists()  # nothing started


def test_missing_labels_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    args = ["train", "--config", str(DEMO), f"corpus={tmp_path / 'corpus'}", f"storage={tmp_path / 'runs'}"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "labels.parquet" in err, err
    assert not (tmp_path / "runs").exists()
