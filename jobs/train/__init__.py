"""`reelflow train`: fit a video model with Ray Train on clips from the clip dataflow, tracked in MLflow.

    reelflow train --config jobs/configs/demo.yaml corpus=reelflow-demo/corpus optim.epochs=8

Reads top to bottom as the job runs:

1. the config (YAML + `a.b=value` overrides) is typed and checked, then the labels manifest is read, the
   corpus listed, the videos split BY VIDEO into train / validation (seeded, stratified by category) and
   the model built once: every mistake is a one-line error before Ray starts;
2. one MLflow run per job, found again by a key made from the run's storage and name (no duplicate run
   after a restart or a re-run), gets the flattened config as params;
3. the clip dataflow decodes random, longer and larger training clips and centred validation clips, and
   attaches per-frame targets; with `data.cache` they are written once to Parquet under the run's folder;
4. `TorchTrainer` runs `train_loop` on `scaling.num_workers` workers (gloo on CPU, NCCL and bf16 autocast on
   GPU): DDP, augmentation, weighted multi-task losses, gradient accumulation, warmup + cosine LR; every
   epoch validates, logs metrics (rank 0 only) and reports a checkpoint. A killed worker restarts the
   group from the last checkpoint (`max_failures`); re-running with the same run name resumes;
5. the final checkpoint's model is logged (safetensors weights, its spec and recipe as JSON) and registered
   with an alias, evaluated (`jobs.evaluate.evaluate_model`) on the manifest's official `test` split (else
   `val`, else the validation videos), and its URI printed last.

The manifest may label any subset of the heads: tasks without labels are left out with a warning, videos
without a head's label add no loss to it, and a `split` column trains on `train` only.

The package: `config` (the typed sections), `plan` (what is checked before Ray starts), `data` (clips and
their targets, the cache), `loop` (what every Ray Train worker runs: `batches` makes a batch's inputs, targets
and losses, `balance` weighs the losses, `validation` scores each epoch); the job itself is here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flows import storage
from flows.transforms import Augment
from jobs.registered import DEFAULT_MLFLOW_DIR
from jobs.train.batches import collate
from jobs.train.config import TASKS, TrainConfig
from jobs.train.data import TrainData, prepare_data
from jobs.train.loop import (
    MODEL_FILE,
    REPORT_FILE,
    Schedule,
    TrainState,
    make_optimizer,
    train_epoch,
    train_loop,
)
from jobs.train.plan import Plan, augmentation, build_model, model_heads, plan_run

__all__ = [
    "TASKS", "Schedule", "TrainConfig", "TrainResult", "TrainState", "augmentation", "build_model", "collate",
    "main", "make_optimizer", "model_heads", "train_epoch", "train_loop",
]  # fmt: skip


@dataclass(frozen=True)
class TrainResult:
    """What a training job produced."""

    model_uri: str
    run_id: str
    tracking_uri: str
    starts: tuple[int, ...]
    metrics: dict[str, float]
    evaluation: dict[str, float]
    val_files: tuple[str, ...]
    eval_files: tuple[str, ...] = ()


def main(config: TrainConfig) -> TrainResult:
    """Run the whole job; returns the registered model and its figures."""
    from jobs import tracking
    from jobs.output import stage, training_detail
    from jobs.runtime import console, init_ray

    plan = plan_run(config)
    config = plan.config  # less the tasks without labels
    aug = augmentation(config, plan.manifest.labels)
    storage.makedirs(config.run_uri)
    tracking_uri = tracking.tracking_uri(config.mlflow.tracking_uri, _default_mlflow_dir(config))
    console.rule(f"[bold]train[/] {config.run_name}")
    console.print(
        f"{plan.spec.name}: {len(plan.train_rows)} training / {len(plan.val_rows)} validation / "
        f"{len(plan.eval_rows)} evaluation videos, "
        f"heads {', '.join(plan.heads)}; run in {config.run_uri}"
    )
    if plan.dropped_tasks:
        console.print(
            f"[yellow]train: tasks {', '.join(plan.dropped_tasks)} have no labels in {config.labels_uri}: "
            "left out"
        )
    if plan.unlabelled:
        console.print(f"[yellow]{len(plan.unlabelled)} corpus files have no labels and are left out")

    run_id = tracking.get_or_create_run(
        config.mlflow.experiment,
        _run_key(config),
        config.run_name,
        tracking_uri=tracking_uri,
        tags={"reelflow.job": "train", "reelflow.model": plan.spec.name},
    )
    tracking.log_config(run_id, config, tracking_uri=tracking_uri)
    _log_split(run_id, plan, tracking_uri)

    init_ray(config.scaling.ray_address)
    try:
        data = prepare_data(config, plan, aug)
        if data.errors:
            console.print(f"[yellow]{data.errors} videos could not be decoded (see {config.run_uri}/errors)")
        with stage("train", done_key="step", detail=training_detail, remote=True) as shown:
            result = _fit(config, plan, aug, data, run_id, tracking_uri, shown.counter)
        model_uri, metrics = _register(config, plan, result, run_id, tracking_uri)
        evaluation = (
            _evaluate(config, plan, model_uri, run_id, tracking_uri) if config.mlflow.evaluate else {}
        )
    except BaseException:  # Ctrl-C too: the run shows it did not finish; re-running resumes it
        with contextlib.suppress(Exception):  # the job's own error is the one to show
            tracking.finish_run(run_id, "FAILED", tracking_uri=tracking_uri)
        raise
    tracking.finish_run(run_id, tracking_uri=tracking_uri)
    returned = result.return_value or {}
    return TrainResult(
        model_uri=model_uri,
        run_id=run_id,
        tracking_uri=tracking_uri,
        starts=tuple(returned.get("starts", ())),
        metrics=metrics,
        evaluation=evaluation,
        val_files=tuple(plan.val_files),
        eval_files=tuple(plan.eval_files),
    )


def _default_mlflow_dir(config: TrainConfig) -> str:
    """SQLite beside the run's checkpoints when they are local; a local folder when they are on S3."""
    return (
        str(Path(DEFAULT_MLFLOW_DIR).resolve())
        if storage.is_s3(config.run_uri)
        else storage.join_uri(config.run_uri, "mlflow")
    )


def _run_key(config: TrainConfig) -> str:
    digest = hashlib.sha256(config.run_uri.encode()).hexdigest()[:12]
    return f"train:{config.run_name}:{digest}"


def _log_split(run_id: str, plan: Plan, tracking_uri: str) -> None:
    from mlflow import MlflowClient

    split = {
        "train": plan.train_files,
        "validation": plan.val_files,
        "evaluation": plan.eval_files,
        "unlabelled": list(plan.unlabelled),
        "labels": asdict(plan.manifest.labels),
        "heads": {k: list(v) for k, v in plan.heads.items()},
    }
    MlflowClient(tracking_uri).log_text(run_id, json.dumps(split, indent=1), "split.json")


def _fit(
    config: TrainConfig,
    plan: Plan,
    aug: Augment,
    data: TrainData,
    run_id: str,
    tracking_uri: str,
    progress: Any | None = None,
) -> Any:
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    s = config.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
    run = {"name": config.run_name, "storage_path": storage.canonical_uri(config.storage)}
    if storage.is_s3(config.storage):
        fs, path = storage.arrow_filesystem(config.storage)
        run.update(storage_path=path, storage_filesystem=fs)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": config,
            "heads": plan.heads,
            "labels": plan.manifest.labels,
            "augment": aug,
            "run_id": run_id,
            "tracking_uri": tracking_uri,
            "train_clips": data.train_clips,
            "progress": progress,  # a flows.progress counter: rank 0 reports epoch, step, loss
        },
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker=resources,
            placement_strategy=s.placement,
        ),
        run_config=RunConfig(
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            **run,
        ),
        datasets={"train": data.train, "validation": data.validation},
        dataset_config=DataConfig(datasets_to_split="all"),
    )
    return trainer.fit()


def _register(
    config: TrainConfig, plan: Plan, result: Any, run_id: str, tracking_uri: str
) -> tuple[str, dict]:
    """Log the confusion matrices, per-class report and the final model; the model only once per run."""
    from mlflow import MlflowClient

    from jobs import tracking
    from models import load_model

    if result.checkpoint is None:
        raise RuntimeError(f"train {config.run_name}: training reported no checkpoint")
    client = MlflowClient(tracking_uri)
    with result.checkpoint.as_directory() as folder:
        report = json.loads((Path(folder) / REPORT_FILE).read_text())
        model = load_model(Path(folder) / MODEL_FILE)
    epoch = int(report["epoch"])
    for head, cm in report["confusion"].items():
        name = f"confusion_matrix_{head}.png"
        tracking.log_confusion_matrix(
            run_id, np.array(cm["matrix"]), cm["labels"], name, tracking_uri=tracking_uri
        )
    client.log_text(run_id, json.dumps(report["per_class"], indent=1), "per_class_report.json")
    client.log_text(run_id, _per_class_text(report["per_class"]), "per_class_report.txt")
    metrics = dict((result.return_value or {}).get("metrics") or result.metrics or {})

    tags = client.get_run(run_id).data.tags
    if tags.get("reelflow.model_uri") and tags.get("reelflow.model_epoch") == str(epoch):
        return tags["reelflow.model_uri"], metrics  # this checkpoint is registered already (a re-run)
    model_uri = tracking.log_model(
        model,
        model.spec,
        config.model.display_name,
        config.mlflow.alias,
        run_id=run_id,
        tracking_uri=tracking_uri,
    )
    client.set_tag(run_id, "reelflow.model_uri", model_uri)
    client.set_tag(run_id, "reelflow.model_epoch", str(epoch))
    return model_uri, metrics


def _per_class_text(per_class: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    lines = []
    for head, rows in per_class.items():
        lines += [f"{head}", f"{'label':<16} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
        for name, r in rows.items():
            lines.append(
                f"{name:<16} {r['precision']:>9.3f} {r['recall']:>9.3f} {r['f1']:>9.3f} {r['support']:>8d}"
            )
        lines.append("")
    return "\n".join(lines)


def _evaluate(
    config: TrainConfig, plan: Plan, model_uri: str, run_id: str, tracking_uri: str
) -> dict[str, float]:
    """The video-level evaluation (`reelflow evaluate`) on the evaluation videos, logged as `eval_*`."""
    from mlflow import MlflowClient

    from jobs import tracking
    from jobs.evaluate import evaluate_model
    from jobs.runtime import console

    metrics = evaluate_model(
        model_uri, config.corpus, labels=config.labels_uri, videos=plan.eval_files, tracking_uri=tracking_uri
    )
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    tracking.log_metrics(
        run_id, {f"eval_{k}": v for k, v in numbers.items()}, config.optim.epochs, tracking_uri=tracking_uri
    )
    MlflowClient(tracking_uri).log_text(run_id, json.dumps(metrics, indent=1, default=str), "evaluation.json")
    counts = ("videos", "videos_scored", "videos_failed", "clips")
    shown = ", ".join(f"{k} {v:.0f}" if k in counts else f"{k} {v:.3f}" for k, v in numbers.items())
    console.print(f"train: evaluation videos: {shown}")
    return numbers
