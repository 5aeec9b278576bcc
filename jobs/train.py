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
5. the final checkpoint's model is logged with `mlflow.pytorch` and its spec, registered with an alias,
   evaluated on the validation videos (`jobs.evaluate.evaluate_model`), and its URI printed last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import tempfile
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from flows import labels as flabels
from flows import storage, tensor_parquet
from flows.clips import DECODE_TASK_CPUS, ClipConfig, VideoRow, clip_dataset, list_video_rows, video_dataset
from flows.transforms import Augment, audio_crop, augment, flip_labels, temporal_crop
from jobs.config import ConfigError, redact
from jobs.registered import DEFAULT_MLFLOW_DIR
from models import MODELS, build, head_loss, save_model

log = logging.getLogger(__name__)

TASKS = ("category", "action", "action_steps", "sentiment", "valence", "importance")
STEP_BACKBONES = ("cnn_lstm",)  # backbones with per-step features (for the action_steps loss)
CLIP_MODELS = ("multitask", "sentiment", "c3d_small", "c3d", "cnn_lstm", "graph")


# --- configuration --------------------------------------------------------------------------------------


def _require(ok: bool, key: str, why: str, value: Any) -> None:
    if not ok:
        shown = redact(str(value)) if isinstance(value, str) else value
        raise ConfigError(f"config key '{key}': {why}, got {shown!r}")


@dataclass(frozen=True)
class ModelSection:
    """Which model to train and the clips it reads.

    `name`: "multitask" (a backbone with one head per task), "sentiment" (video + audio + subtitle text),
    "summarizer" (per-video sequences of clip features), or a single backbone from `models.MODELS`.
    `kwargs` go to the builder (e.g. {channels: [16, 32, 64, 128], hidden: 128}).
    """

    name: str = "multitask"
    backbone: str = "cnn_lstm"
    clip_len: int = 16
    frame_size: tuple[int, int] = (64, 64)
    fps: float = 15.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    registered_name: str | None = None
    features_from: str | None = None  # summarizer: the registered clip model whose features it reads

    def __post_init__(self) -> None:
        _require(self.name in MODELS, "model.name", f"must be one of {', '.join(MODELS)}", self.name)
        backbones = [m for m in CLIP_MODELS if m not in ("multitask", "sentiment")]
        _require(
            self.backbone in backbones,
            "model.backbone",
            f"must be one of {', '.join(backbones)}",
            self.backbone,
        )
        _require(self.clip_len >= 2, "model.clip_len", "must be >= 2 frames", self.clip_len)
        _require(
            min(self.frame_size) >= 16,
            "model.frame_size",
            "must be (height, width), each >= 16",
            self.frame_size,
        )
        _require(self.fps > 0, "model.fps", "must be > 0", self.fps)
        if self.name == "summarizer":
            _require(
                bool(self.features_from),
                "model.features_from",
                "the summarizer needs the registered clip model that makes its features (models:/NAME@ALIAS)",
                self.features_from,
            )

    @property
    def display_name(self) -> str:
        return self.registered_name or f"reelflow-{self.name}"


@dataclass(frozen=True)
class TasksSection:
    """Loss weight of each task; 0 leaves the task (and its head) out.

    category: the video's label on each clip; action: the action covering most of the clip, else "none";
    action_steps: the action of each frame (CNN-LSTM step head); sentiment + valence: the video's;
    importance: the fraction of the clip inside a highlight segment.
    """

    category: float = 1.0
    action: float = 1.0
    action_steps: float = 0.5
    sentiment: float = 1.0
    valence: float = 1.0
    importance: float = 1.0

    def __post_init__(self) -> None:
        for task in TASKS:
            value = getattr(self, task)
            _require(value >= 0 and math.isfinite(value), f"tasks.{task}", "must be a weight >= 0", value)
        _require(any(getattr(self, t) > 0 for t in TASKS), "tasks", "give at least one task a weight > 0", 0)
        if self.action_steps > 0:
            why = "needs tasks.action > 0 (it shares the action head)"
            _require(self.action > 0, "tasks.action_steps", why, self.action_steps)
        if self.valence > 0:
            _require(
                self.sentiment > 0,
                "tasks.valence",
                "needs tasks.sentiment > 0 (valence is its score)",
                self.valence,
            )

    def weights(self) -> dict[str, float]:
        """{task: weight} of the tasks that train."""
        return {t: getattr(self, t) for t in TASKS if getattr(self, t) > 0}


@dataclass(frozen=True)
class DataSection:
    """Where labels come from, how videos are split, and how clips are cut and augmented."""

    labels: str | None = None  # default CORPUS/labels.parquet
    validation_fraction: float = 0.2
    split_seed: int = 0
    max_videos: int | None = None
    clips_per_video: int = 8
    val_clips_per_video: int = 4
    batch_size: int = 16
    jitter_frames: int = 4
    crop_margin: float = 0.125
    min_crop: float = 0.85
    flip: bool = True
    flip_pairs: dict[str, str] = field(default_factory=dict)
    cache: bool = True
    in_memory: bool = True
    shuffle_buffer: int = 256
    decoder: Literal["auto", "decord", "pyav"] = "auto"

    def __post_init__(self) -> None:
        _require(
            0 < self.validation_fraction < 1,
            "data.validation_fraction",
            "must be in (0, 1)",
            self.validation_fraction,
        )
        _require(self.split_seed >= 0, "data.split_seed", "must be >= 0", self.split_seed)
        _require(
            self.max_videos is None or self.max_videos >= 2,
            "data.max_videos",
            "must be >= 2",
            self.max_videos,
        )
        for key in ("clips_per_video", "val_clips_per_video", "batch_size"):
            _require(getattr(self, key) >= 1, f"data.{key}", "must be >= 1", getattr(self, key))
        _require(self.jitter_frames >= 0, "data.jitter_frames", "must be >= 0", self.jitter_frames)
        _require(0 <= self.crop_margin <= 0.5, "data.crop_margin", "must be in [0, 0.5]", self.crop_margin)
        _require(0.5 <= self.min_crop <= 1, "data.min_crop", "must be in [0.5, 1]", self.min_crop)
        _require(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0", self.shuffle_buffer)


@dataclass(frozen=True)
class OptimSection:
    """Optimizer, schedule (linear warmup, then cosine to `min_lr_ratio` × lr) and accumulation."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    epochs: int = 10
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    min_lr_ratio: float = 0.05
    grad_accum: int = 1
    grad_clip: float | None = 5.0

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "optim.epochs", "must be >= 1", self.epochs)
        _require(0 < self.lr < 10, "optim.lr", "must be in (0, 10)", self.lr)
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", self.weight_decay)
        _require(self.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0", self.warmup_epochs)
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        _require(self.grad_accum >= 1, "optim.grad_accum", "must be >= 1", self.grad_accum)
        _require(
            self.grad_clip is None or self.grad_clip > 0,
            "optim.grad_clip",
            "must be > 0 or null",
            self.grad_clip,
        )


PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class ScalingSection:
    """Ray Train workers. `torch_threads` per worker: 1 on a shared CPU (more threads than free cores make
    small models several times slower); null leaves torch's default. bf16 autocast applies on GPUs only.
    `placement` is Ray's placement group strategy for the workers: PACK fills a node first (least network
    for the gradients), SPREAD puts them on different nodes (each node keeps CPUs for its share of ingest)."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int | None = 1
    bf16: bool = True
    ray_address: str | None = None
    placement: str = "PACK"

    def __post_init__(self) -> None:
        _require(self.num_workers >= 1, "scaling.num_workers", "must be >= 1", self.num_workers)
        _require(self.cpus_per_worker > 0, "scaling.cpus_per_worker", "must be > 0", self.cpus_per_worker)
        _require(self.placement in PLACEMENTS, "scaling.placement", f"must be one of {', '.join(PLACEMENTS)}",
                 self.placement)  # fmt: skip
        _require(
            self.torch_threads is None or self.torch_threads >= 1,
            "scaling.torch_threads",
            "must be >= 1 or null",
            self.torch_threads,
        )


@dataclass(frozen=True)
class MlflowSection:
    """Tracking (default: MLFLOW_TRACKING_URI, else SQLite under the run's folder) and registration."""

    tracking_uri: str | None = None
    experiment: str = "reelflow-train"
    alias: str = "candidate"
    evaluate: bool = True

    def __post_init__(self) -> None:
        _require(bool(self.experiment.strip()), "mlflow.experiment", "must not be empty", self.experiment)
        _require(
            self.alias.replace("-", "_").isidentifier(),
            "mlflow.alias",
            "must be letters, digits, _ or -",
            self.alias,
        )


@dataclass(frozen=True)
class TrainConfig:
    """Everything `reelflow train` needs. `corpus` is a folder or s3:// prefix of videos + labels.parquet;
    checkpoints, the clip cache and (by default) MLflow live under `storage`/`run_name`."""

    corpus: str
    run_name: str = "reelflow-train"
    storage: str = "reelflow-runs"
    seed: int = 0
    max_failures: int = 1
    keep_checkpoints: int = 2
    model: ModelSection = field(default_factory=ModelSection)
    tasks: TasksSection = field(default_factory=TasksSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    mlflow: MlflowSection = field(default_factory=MlflowSection)

    def __post_init__(self) -> None:
        _require(bool(self.corpus.strip()), "corpus", "must name a folder or s3:// prefix", self.corpus)
        for key in ("corpus", "storage"):
            try:
                storage.canonical_uri(getattr(self, key))
            except ValueError as err:
                raise ConfigError(f"config key '{key}': {err}") from None
        ok_name = bool(self.run_name) and all(c.isalnum() or c in "-_." for c in self.run_name)
        _require(ok_name, "run_name", "must be letters, digits, '-', '_' or '.'", self.run_name)
        _require(self.seed >= 0, "seed", "must be >= 0", self.seed)
        _require(
            self.max_failures >= -1, "max_failures", "must be >= 0 (or -1: retry forever)", self.max_failures
        )
        _require(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1", self.keep_checkpoints)
        self._check_model_tasks()

    def _check_model_tasks(self) -> None:
        name, tasks = self.model.name, self.tasks
        if name == "summarizer":
            others = [t for t in TASKS if t != "importance" and getattr(tasks, t) > 0]
            _require(
                not others,
                f"tasks.{others[0]}" if others else "tasks",
                "the summarizer trains importance only; set the other task weights to 0",
                1,
            )
            _require(tasks.importance > 0, "tasks.importance", "the summarizer needs importance > 0", 0)
            return
        has_steps = (self.model.backbone if name == "multitask" else name) in STEP_BACKBONES
        if tasks.action_steps > 0:
            why = f"model {self._model_label} has no per-step features; set it to 0"
            _require(has_steps, "tasks.action_steps", why, tasks.action_steps)

    @property
    def _model_label(self) -> str:
        return f"multitask:{self.model.backbone}" if self.model.name == "multitask" else self.model.name

    @property
    def run_uri(self) -> str:
        """The run's folder or prefix: checkpoints, the clip cache, errors, the default MLflow store."""
        return storage.join_uri(self.storage, self.run_name)

    @property
    def labels_uri(self) -> str:
        return self.data.labels or storage.join_uri(self.corpus, flabels.LABELS_FILE)


# --- planning: everything checked before Ray starts -----------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What the job will train on: the videos of each split, their labels and the model's heads."""

    manifest: flabels.Manifest
    corpus: str
    train_rows: tuple[VideoRow, ...]
    val_rows: tuple[VideoRow, ...]
    heads: dict[str, tuple[str, ...]]
    spec: Any
    unlabelled: tuple[str, ...]  # corpus files the manifest does not describe

    @property
    def train_files(self) -> list[str]:
        return sorted(self.manifest_file(r) for r in self.train_rows)

    @property
    def val_files(self) -> list[str]:
        return sorted(self.manifest_file(r) for r in self.val_rows)

    def manifest_file(self, row: VideoRow) -> str:
        return flabels.relative_file(row.uri, self.corpus)


def plan_run(config: TrainConfig) -> Plan:
    """Read the manifest, list and split the corpus, build the model once; raises one-line errors."""
    manifest = flabels.read_manifest(config.labels_uri)
    rows = list_video_rows(config.corpus)
    if not rows:
        raise FileNotFoundError(f"corpus {config.corpus}: no video files found")
    by_file = {flabels.relative_file(r.uri, config.corpus): r for r in rows}
    labelled = sorted(f for f in by_file if f in manifest.videos)
    unlabelled = tuple(sorted(f for f in by_file if f not in manifest.videos))
    if config.data.max_videos is not None:
        labelled = labelled[: config.data.max_videos]
    if len(labelled) < 2:
        raise ValueError(
            f"corpus {config.corpus}: {len(labelled)} videos have labels in {config.labels_uri}; need >= 2"
        )
    strata = [manifest.videos[f].category for f in labelled]
    train, val = flabels.split_videos(
        labelled, strata, config.data.validation_fraction, config.data.split_seed
    )
    if not train or not val:
        raise ValueError(f"data.validation_fraction={config.data.validation_fraction}: leaves an empty split")
    heads = model_heads(config, manifest.labels)
    model = build_model(config, heads)
    return Plan(
        manifest=manifest,
        corpus=storage.canonical_uri(config.corpus),
        train_rows=tuple(by_file[f] for f in train),
        val_rows=tuple(by_file[f] for f in val),
        heads=heads,
        spec=model.spec,
        unlabelled=unlabelled,
    )


def model_heads(config: TrainConfig, labels: flabels.LabelSet) -> dict[str, tuple[str, ...]]:
    """Head name → label names for the tasks that train (names from the manifest, sorted)."""
    weights = config.tasks.weights()
    heads: dict[str, tuple[str, ...]] = {}
    if "category" in weights:
        heads["category"] = labels.categories
    if "action" in weights:
        heads["action"] = labels.actions
    if "sentiment" in weights:
        heads["sentiment"] = labels.sentiments
        heads["valence"] = ()
    if "importance" in weights:
        heads["importance"] = ()
    return heads


def build_model(config: TrainConfig, heads: Mapping[str, Sequence[str]]) -> nn.Module:
    """The model the config names, with `heads`; a bad builder argument is a one-line config error."""
    m = config.model
    clip = {"clip_len": m.clip_len, "frame_size": list(m.frame_size), "fps": m.fps}
    heads = {k: list(v) for k, v in heads.items()}
    try:
        if m.name == "multitask":
            steps = ["action"] if config.tasks.action_steps > 0 else []
            return build("multitask", backbone=m.backbone, heads=heads, step_heads=steps, **clip, **m.kwargs)
        if m.name == "sentiment":
            return build("sentiment", heads=heads, **clip, **m.kwargs)
        if m.name == "summarizer":
            return build("summarizer", **clip, **m.kwargs)
        if m.name == "cnn_lstm":
            steps = ["action"] if config.tasks.action_steps > 0 else []
            return build("cnn_lstm", heads=heads, step_heads=steps, **clip, **m.kwargs)
        return build(m.name, heads=heads, **clip, **m.kwargs)
    except TypeError as err:
        raise ConfigError(f"config key 'model.kwargs': {m.name}: {err}") from None
    except ValueError as err:
        raise ConfigError(f"config key 'model': {' '.join(str(err).split())}") from None


def augmentation(config: TrainConfig, labels: flabels.LabelSet) -> Augment:
    """The training views: jitter, crop and flip from `data`, direction labels swapped per `flip_pairs`."""
    d = config.data
    try:
        perm = labels.swap_permutation(d.flip_pairs) if d.flip and d.flip_pairs else None
    except ValueError as err:
        raise ConfigError(f"config key 'data.flip_pairs': {err}") from None
    return Augment(
        clip_len=config.model.clip_len,
        frame_size=tuple(config.model.frame_size),
        jitter_frames=d.jitter_frames,
        crop_margin=d.crop_margin,
        min_crop=d.min_crop if d.crop_margin > 0 else 1.0,
        flip=d.flip,
        flip_permutation=tuple(perm) if perm else None,
    )


# --- data -----------------------------------------------------------------------------------------------


def clip_configs(config: TrainConfig, spec: Any, aug: Augment) -> tuple[ClipConfig, ClipConfig]:
    """(training, validation) clip configs: random longer/larger clips; evenly spaced clips at model size."""
    modalities = getattr(spec, "modalities", ("video",))
    common = {
        "target_fps": config.model.fps,
        "decoder": config.data.decoder,
        "audio": "audio" in modalities,
        "audio_rate": spec.audio_rate or 16_000,
        "subtitles": "text" in modalities,
    }
    train = ClipConfig(
        clip_len=aug.decode_len,
        size=aug.decode_size,
        sampling="random",
        clips_per_video=config.data.clips_per_video,
        seed=config.seed,
        **common,
    )
    val = ClipConfig(
        clip_len=config.model.clip_len,
        size=tuple(config.model.frame_size),
        sampling="uniform",
        clips_per_video=config.data.val_clips_per_video,
        **common,
    )
    return train, val


def model_columns(spec: Any) -> list[str]:
    """Columns a training worker reads: frames, the model's other inputs, and the targets."""
    columns = ["frames", "category", "sentiment", "valence", "action_steps", "importance_steps"]
    if "audio" in spec.modalities:
        columns.append("audio")
    if "text" in spec.modalities:
        columns.append("text")
    return columns


def labelled_clips(rows: Sequence[VideoRow], clips: ClipConfig, plan: Plan, errors_uri: str) -> Any:
    """Lazy dataset: decode the videos' clips and add their per-frame targets."""
    videos = {plan.manifest_file(r): plan.manifest.videos[plan.manifest_file(r)] for r in rows}
    ds = clip_dataset(video_dataset(list(rows)), clips, errors_uri)
    return ds.map_batches(
        flabels.attach_targets,
        batch_size=None,
        batch_format="numpy",
        fn_kwargs={"videos": videos, "labels": plan.manifest.labels, "corpus_uri": plan.corpus},
        num_cpus=DECODE_TASK_CPUS,  # fused into the decode tasks (see `tensor_parquet.write_parquet`)
    )


@dataclass
class TrainData:
    train: Any
    validation: Any
    train_clips: int
    errors: int


def prepare_data(config: TrainConfig, plan: Plan, aug: Augment) -> TrainData:
    """The training and validation datasets; with `data.cache`, decoded once to Parquet under the run."""
    train_clips, val_clips = clip_configs(config, plan.spec, aug)
    errors_uri = storage.join_uri(config.run_uri, "errors")
    columns = model_columns(plan.spec)
    train = labelled_clips(plan.train_rows, train_clips, plan, errors_uri)
    val = labelled_clips(plan.val_rows, val_clips, plan, errors_uri)
    n_train = len(plan.train_rows) * config.data.clips_per_video
    if config.data.cache:
        cache = storage.join_uri(config.run_uri, "cache")
        key = _cache_key(config, plan, train_clips, val_clips)
        marker = storage.join_uri(cache, "COMPLETE.json")
        if not (storage.exists(marker) and json.loads(storage.read_bytes(marker)).get("key") == key):
            _write_cache(cache, marker, key, {"train": train, "validation": val}, columns)
        counts = json.loads(storage.read_bytes(marker))["rows"]
        n_train = counts["train"]
        # Files in a new order every epoch; the workers' shuffle buffers mix clips across videos.
        train = _read_cache(storage.join_uri(cache, "train"), shuffle="files")
        val = _read_cache(storage.join_uri(cache, "validation"))
    train = train.select_columns(columns)
    val = val.select_columns(columns)
    if config.data.in_memory:
        # Read (or decode) once into Ray's object store: epochs then cost no Parquet decoding at all.
        train, val = train.materialize(), val.materialize()
        n_train = train.count()
        train = train.randomize_block_order()
    # One error file per failed video (flows.side_outputs.ErrorSink).
    errors = len(storage.list_files(errors_uri, ".parquet")) if storage.exists(errors_uri) else 0
    return TrainData(train, val, n_train, errors)


def _cache_key(config: TrainConfig, plan: Plan, *clip_configs: ClipConfig) -> str:
    """What the cached clips depend on: the videos (by content id), their labels and how clips are cut."""
    parts = {
        "videos": [r.video_id for r in (*plan.train_rows, *plan.val_rows)],
        "split": [plan.train_files, plan.val_files],
        "labels": asdict(plan.manifest.labels),
        "targets": sorted(
            json.dumps(asdict(plan.manifest.videos[f]), sort_keys=True)
            for f in (*plan.train_files, *plan.val_files)
        ),
        "clips": [asdict(c) for c in clip_configs],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _write_cache(cache: str, marker: str, key: str, datasets: Mapping[str, Any], columns: list[str]) -> None:
    from jobs.runtime import console

    if storage.exists(cache):
        storage.remove(cache, recursive=True)
    rows = {}
    for name, ds in datasets.items():
        started = time.perf_counter()
        uri = storage.join_uri(cache, name)
        fs, path = storage.arrow_filesystem(uri)
        selected = ds.select_columns([*columns, "file"])
        tensor_parquet.write_parquet(selected, path, filesystem=fs, num_cpus=DECODE_TASK_CPUS)
        rows[name] = _parquet_rows(uri)
        console.print(f"train: cached {rows[name]} {name} clips in {time.perf_counter() - started:.1f} s")
    # Written last: a cache without its marker (a crash mid-write) is rebuilt.
    storage.write_bytes(marker, json.dumps({"key": key, "rows": rows}).encode())


def _read_cache(uri: str, shuffle: str | None = None) -> Any:
    fs, path = storage.arrow_filesystem(uri)
    return tensor_parquet.read_parquet(path, filesystem=fs, shuffle=shuffle)


def _parquet_rows(uri: str) -> int:
    import pyarrow.parquet as pq

    if not storage.exists(uri):
        return 0
    total = 0
    for file in storage.list_files(uri, ".parquet"):
        fs, path = storage.arrow_filesystem(file)
        total += pq.ParquetFile(path, filesystem=fs).metadata.num_rows
    return total


# --- the training loop (runs in every Ray Train worker) --------------------------------------------------


@dataclass
class TrainState:
    """What a checkpoint carries besides the weights: progress, and where each attempt started."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    starts: list[int] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)


MODEL_FILE, STATE_FILE, REPORT_FILE = "model.pt", "train_state.pt", "report.json"


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's per-worker function: restore, then train / validate / checkpoint one epoch at a time."""
    import ray.train
    import ray.train.torch

    config: TrainConfig = loop_config["config"]
    heads: dict[str, tuple[str, ...]] = loop_config["heads"]
    labels: flabels.LabelSet = loop_config["labels"]
    aug: Augment = loop_config["augment"]
    if config.scaling.torch_threads:
        torch.set_num_threads(config.scaling.torch_threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    model = build_model(config, heads)
    state, optimizer_state = TrainState(), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state, optimizer_state = load_checkpoint(Path(folder), model)
    state.starts.append(state.epoch)
    weights = config.tasks.weights()
    # Heads without a loss get no gradient, and the sentiment model skips the encoder of a modality
    # that no sample of a batch has: DDP must expect unused parameters then.
    unused = bool(set(model.spec.heads) - set(weights)) or config.model.name == "sentiment"
    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": unused})
    optimizer = make_optimizer(_unwrap(ddp), config.optim)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)  # moves the state to the parameters' device
    tracker = _Tracker(loop_config["run_id"], loop_config["tracking_uri"]) if rank == 0 else None
    if tracker:
        tracker.log({"attempt_start_epoch": state.epoch}, step=len(state.starts) - 1)

    steps_per_epoch = max(
        1, loop_config["train_clips"] // (world * config.data.batch_size * config.optim.grad_accum)
    )
    schedule = Schedule(config.optim, steps_per_epoch)
    use_bf16 = device.type == "cuda" and config.scaling.bf16
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    last: dict[str, float] = state.history[-1] if state.history else {}
    for epoch in range(state.epoch, config.optim.epochs):
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(zlib.crc32(f"{config.seed}:{rank}:{epoch}".encode()))
        batches = train_shard.iter_torch_batches(
            batch_size=config.data.batch_size,
            collate_fn=collate,
            local_shuffle_buffer_size=config.data.shuffle_buffer or None,
            local_shuffle_seed=config.seed + 1000 * epoch + rank,
            drop_last=True,
        )
        train_metrics = train_epoch(
            ddp, optimizer, batches, config, labels, aug, schedule, state, device, generator, use_bf16
        )
        train_seconds = time.perf_counter() - started
        val_batches = val_shard.iter_torch_batches(batch_size=config.data.batch_size, collate_fn=collate)
        val_metrics, report = validate(_unwrap(ddp), val_batches, config, labels, heads, device, use_bf16)
        state.epoch = epoch + 1
        last = {
            "epoch": float(epoch),
            **train_metrics,
            **val_metrics,
            "lr": schedule(state.step),
            "train_clips_per_s": train_metrics["train_clips"] * world / max(train_seconds, 1e-9),
            "epoch_seconds": time.perf_counter() - started,
        }
        state.history.append(last)
        if tracker:
            tracker.log(last, step=epoch)
        with tempfile.TemporaryDirectory(prefix="reelflow-ckpt-") as folder:
            ckpt = None
            if rank == 0:
                save_checkpoint(Path(folder), _unwrap(ddp), optimizer, state, report)
                ckpt = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(last, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch:04d}")
    return {"starts": state.starts, "epochs": state.epoch, "metrics": last}


def collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """A numpy batch → tensors (text stays a list of strings)."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key in ("text", "file"):
            out[key] = [str(v) for v in value]
        elif key == "audio":
            out[key] = torch.from_numpy(np.stack([np.asarray(v, dtype=np.float32) for v in value]))
        else:
            array = np.asarray(value)
            out[key] = torch.from_numpy(array if array.flags.writeable else array.copy())
    return out


class Schedule:
    """Learning rate per optimizer step: linear warmup, then cosine decay to `min_lr_ratio` × lr."""

    def __init__(self, optim: OptimSection, steps_per_epoch: int) -> None:
        self.base = optim.lr
        self.min_ratio = optim.min_lr_ratio
        self.total = max(1, optim.epochs * steps_per_epoch)
        self.warmup = min(self.total - 1, round(optim.warmup_epochs * steps_per_epoch))

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.base * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.base * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov momentum); no weight decay on biases and normalization weights."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.dim() <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=optim.lr)


def model_inputs(
    model: nn.Module, frames: torch.Tensor, batch: Mapping[str, Any], device: torch.device
) -> Any:
    """What the model's forward takes: normalized clips, plus audio and text for a multimodal model."""
    spec = model.spec
    video = spec.prepare(frames).to(device, non_blocking=True)
    if spec.modalities == ("video",):
        return video
    inputs: dict[str, Any] = {"video": video}
    if "audio" in spec.modalities:
        inputs["audio"] = batch["audio"].to(device)
    if "text" in spec.modalities:
        inputs["text"] = batch["text"]
    return inputs


def train_targets(
    batch: Mapping[str, Any], views: Any, aug: Augment, labels: flabels.LabelSet, device: torch.device
) -> dict[str, torch.Tensor]:
    """Targets of the augmented clips: per-frame ones cut like the frames, clip ones derived from them."""
    steps = temporal_crop(batch["action_steps"], views.offsets, aug.clip_len)
    steps = flip_labels(steps, views.flipped, aug.flip_permutation)
    importance = temporal_crop(batch["importance_steps"], views.offsets, aug.clip_len)
    return _targets(batch, steps, importance, labels, device)


def _targets(
    batch: Mapping[str, Any],
    steps: torch.Tensor,
    importance: torch.Tensor,
    labels: flabels.LabelSet,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    targets = {
        "category": batch["category"],
        "action": flabels.clip_action(steps, labels.background),
        "action_steps": steps,
        "sentiment": batch["sentiment"],
        "valence": batch["valence"].float(),
        "importance": flabels.clip_importance(importance),
    }
    return {k: v.to(device, non_blocking=True) for k, v in targets.items()}


def task_losses(
    outputs: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    spec: Any,
    weights: Mapping[str, float],
) -> dict[str, torch.Tensor]:
    """Each task's loss (unweighted), computed in float32 whatever the autocast."""
    floats = {k: v.float() for k, v in outputs.items()}
    return {task: head_loss(floats, {task: targets[task]}, spec) for task in weights}


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Any,
    config: TrainConfig,
    labels: flabels.LabelSet,
    aug: Augment,
    schedule: Schedule,
    state: TrainState,
    device: torch.device,
    generator: torch.Generator,
    use_bf16: bool,
) -> dict[str, float]:
    """One pass over this worker's shard; returns this worker's mean losses and clip count."""
    module = _unwrap(model)
    weights = config.tasks.weights()
    accum = config.optim.grad_accum
    model.train()
    sums: dict[str, float] = {}
    clips = micro = 0
    waited = 0.0  # seconds spent waiting for data: what the data plane costs the GPU (or CPU)
    iterator = iter(batches)
    while True:
        asked = time.perf_counter()
        batch = next(iterator, None)
        waited += time.perf_counter() - asked
        if batch is None:
            break
        frames, views = augment(batch["frames"], aug, generator)
        targets = train_targets(batch, views, aug, labels, device)
        inputs = model_inputs(module, frames, _audio_view(batch, views, aug), device)
        sync = (micro + 1) % accum == 0
        with _maybe_no_sync(model, not sync), torch.autocast(device.type, torch.bfloat16, enabled=use_bf16):
            losses = task_losses(model(inputs), targets, module.spec, weights)
            total = sum(weights[t] * losses[t] for t in weights)
            (total / accum).backward()
        micro += 1
        if sync:
            _step(model, optimizer, schedule, state, config.optim.grad_clip)
        n = int(frames.shape[0])
        clips += n
        sums["train_loss"] = sums.get("train_loss", 0.0) + float(total.detach()) * n
        for task, loss in losses.items():
            sums[f"train_loss_{task}"] = sums.get(f"train_loss_{task}", 0.0) + float(loss.detach()) * n
    if micro % accum:  # the epoch's last, partial accumulation group (same count on every worker)
        _step(model, optimizer, schedule, state, config.optim.grad_clip)
    out = {k: v / max(clips, 1) for k, v in sums.items()}
    out["train_clips"] = float(clips)
    out["train_data_wait_s"] = waited
    return out


def _audio_view(batch: Mapping[str, Any], views: Any, aug: Augment) -> Mapping[str, Any]:
    if "audio" not in batch:
        return batch
    decoded = batch["frames"].shape[1]
    return {**batch, "audio": audio_crop(batch["audio"], views.offsets, decoded, aug.clip_len)}


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    state: TrainState,
    clip: float | None,
) -> None:
    lr = schedule(state.step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if clip:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1


def _maybe_no_sync(model: nn.Module, skip_sync: bool) -> Any:
    return model.no_sync() if skip_sync and hasattr(model, "no_sync") else contextlib.nullcontext()


@torch.no_grad()
def validate(
    model: nn.Module,
    batches: Any,
    config: TrainConfig,
    labels: flabels.LabelSet,
    heads: Mapping[str, Sequence[str]],
    device: torch.device,
    use_bf16: bool,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Clip-level validation over every worker's shard (sums all-reduced): each task's metric, its loss,
    and confusion matrices of the classification heads."""
    weights = config.tasks.weights()
    model.eval()
    classes = {h: len(heads[h]) for h in ("category", "action", "sentiment") if h in heads}
    acc = _Sums(classes, device)
    for batch in batches:
        steps = batch["action_steps"]
        targets = _targets(batch, steps, batch["importance_steps"], labels, device)
        inputs = model_inputs(model, batch["frames"], batch, device)
        with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16):
            outputs = {k: v.float() for k, v in model(inputs).items()}
        losses = task_losses(outputs, targets, model.spec, weights)
        acc.add(outputs, targets, losses, weights)
    return acc.reduce(heads)


class _Sums:
    """Running sums of validation counts, all-reduced across workers at the end."""

    def __init__(self, classes: Mapping[str, int], device: torch.device) -> None:
        self.classes = dict(classes)
        self.device = device
        self.scalars: dict[str, float] = {}
        self.confusion = {h: torch.zeros(k, k, dtype=torch.float64) for h, k in self.classes.items()}

    def _add(self, key: str, value: float) -> None:
        self.scalars[key] = self.scalars.get(key, 0.0) + float(value)

    def add(
        self,
        outputs: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        losses: Mapping[str, torch.Tensor],
        weights: Mapping[str, float],
    ) -> None:
        n = len(targets["category"])
        self._add("n", n)
        self._add("loss", sum(weights[t] * float(losses[t]) for t in weights) * n)
        for task, loss in losses.items():
            self._add(f"loss_{task}", float(loss) * n)
        for head in self.classes:
            logits, truth = outputs[head].cpu(), targets[head].cpu()
            pred = logits.argmax(dim=1)
            self._add(f"{head}_correct", (pred == truth).sum())
            k = min(5, logits.shape[1])
            self._add(f"{head}_top5", (logits.topk(k, dim=1).indices == truth[:, None]).any(dim=1).sum())
            self.confusion[head].index_put_(
                (truth, pred), torch.ones(n, dtype=torch.float64), accumulate=True
            )
        if "action_steps" in weights:
            steps = outputs["action_steps"].argmax(dim=-1).cpu()
            self._add("action_steps_correct", (steps == targets["action_steps"].cpu()).sum())
            self._add("action_steps_n", steps.numel())
        if "valence" in weights:
            self._add("valence_abs", (outputs["valence"].cpu() - targets["valence"].cpu()).abs().sum())
        if "importance" in weights:
            self._add(
                "importance_abs", (outputs["importance"].cpu() - targets["importance"].cpu()).abs().sum()
            )

    def reduce(self, heads: Mapping[str, Sequence[str]]) -> tuple[dict[str, float], dict[str, Any]]:
        import torch.distributed as dist

        keys = sorted(self.scalars)
        flat = torch.cat(
            [torch.tensor([self.scalars[k] for k in keys], dtype=torch.float64)]
            + [self.confusion[h].flatten() for h in self.classes]
        )
        if dist.is_available() and dist.is_initialized():
            # Every worker has the same keys: the same tasks, and at least one batch (equal shards).
            flat = flat.to(self.device)
            dist.all_reduce(flat)
            flat = flat.cpu()
        values = dict(zip(keys, flat[: len(keys)].tolist(), strict=True))
        n = max(values.get("n", 0.0), 1.0)
        metrics = {"val_loss": values.get("loss", 0.0) / n, "val_clips": values.get("n", 0.0)}
        for key in keys:
            if key.startswith("loss_"):
                metrics[f"val_{key}"] = values[key] / n
        report: dict[str, Any] = {"confusion": {}, "per_class": {}}
        offset = len(keys)
        for head, k in self.classes.items():
            cm = flat[offset : offset + k * k].reshape(k, k).round().long().numpy()
            offset += k * k
            metrics[f"val_{head}_top1"] = values[f"{head}_correct"] / n
            if k > 5:
                metrics[f"val_{head}_top5"] = values[f"{head}_top5"] / n
            report["confusion"][head] = {"labels": list(heads[head]), "matrix": cm.tolist()}
            report["per_class"][head] = _per_class(cm, heads[head])
        if "action_steps_n" in values:
            metrics["val_action_steps_accuracy"] = values["action_steps_correct"] / max(
                values["action_steps_n"], 1
            )
        if "valence_abs" in values:
            metrics["val_valence_mae"] = values["valence_abs"] / n
        if "importance_abs" in values:
            metrics["val_importance_mae"] = values["importance_abs"] / n
        return metrics, report


def _per_class(cm: np.ndarray, names: Sequence[str]) -> dict[str, dict]:
    from jobs.evaluation import per_class_report

    truth = np.repeat(np.arange(len(names)), cm.sum(axis=1))
    pred = np.concatenate([np.repeat(np.arange(len(names)), row) for row in cm]) if cm.sum() else truth
    if truth.size == 0:
        return {str(n): {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for n in names}
    return per_class_report(truth, pred, names)


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    report: Mapping[str, Any],
) -> None:
    """model.pt (models.save_model: spec + builder + weights), the optimizer and progress, the val report."""
    save_model(model, folder / MODEL_FILE)
    torch.save({"optimizer": optimizer.state_dict(), "state": asdict(state)}, folder / STATE_FILE)
    (folder / REPORT_FILE).write_text(json.dumps({**report, "epoch": state.epoch}))


def load_checkpoint(folder: Path, model: nn.Module) -> tuple[TrainState, dict[str, Any]]:
    """Restore the weights from a checkpoint folder; return its progress and the optimizer's state."""
    payload = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
    if payload["spec"]["heads"] != model.spec.to_dict()["heads"]:
        raise ValueError(f"checkpoint {folder}: its heads differ from this config's; use another run_name")
    model.load_state_dict(payload["state_dict"])
    extra = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    return TrainState(**extra["state"]), extra["optimizer"]


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


class _Tracker:
    """Rank 0's MLflow writer: per-epoch metrics into the job's run (failures are logged, not fatal)."""

    def __init__(self, run_id: str, tracking_uri: str) -> None:
        self.run_id, self.tracking_uri = run_id, tracking_uri

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from jobs import tracking

        try:
            tracking.log_metrics(self.run_id, metrics, step, tracking_uri=self.tracking_uri)
        except Exception as err:  # a tracking hiccup must not kill an hour of training
            log.warning("MLflow: could not log metrics at step %d: %s", step, redact(str(err))[:300])


# --- the job ----------------------------------------------------------------------------------------------


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


def main(config: TrainConfig) -> TrainResult:
    """Run the whole job; returns the registered model and its figures."""
    from jobs import tracking
    from jobs.runtime import console, init_ray

    plan = plan_run(config)
    aug = augmentation(config, plan.manifest.labels)
    storage.makedirs(config.run_uri)
    tracking_uri = tracking.tracking_uri(config.mlflow.tracking_uri, _default_mlflow_dir(config))
    console.rule(f"[bold]train[/] {config.run_name}")
    console.print(
        f"{plan.spec.name}: {len(plan.train_rows)} training / {len(plan.val_rows)} validation videos, "
        f"heads {', '.join(plan.heads)}; run in {config.run_uri}"
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
    # Ray Data logs each dataset's plan and progress at INFO; the job prints its own summary lines.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        data = prepare_data(config, plan, aug)
        if data.errors:
            console.print(f"[yellow]{data.errors} videos could not be decoded (see {config.run_uri}/errors)")
        started = time.perf_counter()
        result = _fit(config, plan, aug, data, run_id, tracking_uri)
        console.print(f"train: fit took {time.perf_counter() - started:.0f} s")
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
        "unlabelled": list(plan.unlabelled),
        "labels": asdict(plan.manifest.labels),
        "heads": {k: list(v) for k, v in plan.heads.items()},
    }
    MlflowClient(tracking_uri).log_text(run_id, json.dumps(split, indent=1), "split.json")


def _fit(
    config: TrainConfig, plan: Plan, aug: Augment, data: TrainData, run_id: str, tracking_uri: str
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
    """The video-level evaluation (`reelflow evaluate`) on the validation videos, logged as `eval_*`."""
    from mlflow import MlflowClient

    from jobs import tracking
    from jobs.evaluate import evaluate_model
    from jobs.runtime import console

    metrics = evaluate_model(
        model_uri, config.corpus, labels=config.labels_uri, videos=plan.val_files, tracking_uri=tracking_uri
    )
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    tracking.log_metrics(
        run_id, {f"eval_{k}": v for k, v in numbers.items()}, config.optim.epochs, tracking_uri=tracking_uri
    )
    MlflowClient(tracking_uri).log_text(run_id, json.dumps(metrics, indent=1, default=str), "evaluation.json")
    counts = ("videos", "videos_scored", "videos_failed", "clips")
    shown = ", ".join(f"{k} {v:.0f}" if k in counts else f"{k} {v:.3f}" for k, v in numbers.items())
    console.print(f"train: validation videos: {shown}")
    return numbers
