"""The train job's typed configuration: one frozen dataclass per YAML section, each key checked with a
one-line error that names it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from flows import labels as flabels
from flows import storage
from jobs.config import ConfigError, redact
from jobs.train.balance import BALANCES
from models import MODELS

TASKS = ("category", "action", "action_steps", "sentiment", "valence", "importance")
STEP_BACKBONES = ("cnn_lstm",)  # backbones with per-step features (for the action_steps loss)
CLIP_MODELS = (
    "multitask", "sentiment", "c3d_small", "c3d", "cnn_lstm", "graph", "videomae", "timesformer",
)  # fmt: skip
TRANSFORMER_BACKBONES = ("videomae", "timesformer")  # pretrained from a Hugging Face folder
SPORTS1M_BACKBONES = ("c3d", "c3d_small")  # pretrained from a Sports-1M-layout state dict


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

    `balance` (jobs/train/balance.py): "fixed" trains on Σ weight·loss; "uncertainty" learns one weight per
    task (Kendall et al. 2018, Σ weight·(exp(−s)·loss + s)), the weights above acting as prior multipliers;
    "gradnorm" learns them so that each task's gradient follows how far its loss lags (Chen et al. 2018),
    `balance_alpha` setting how strongly; with either, the weights above multiply the learned ones.
    `balance_lr_scale` multiplies the learning rate of the learned weights' parameters.
    """

    category: float = 1.0
    action: float = 1.0
    action_steps: float = 0.5
    sentiment: float = 1.0
    valence: float = 1.0
    importance: float = 1.0
    balance: str = "fixed"
    balance_lr_scale: float = 10.0
    balance_alpha: float = 1.5

    def __post_init__(self) -> None:
        for task in TASKS:
            value = getattr(self, task)
            _require(value >= 0 and math.isfinite(value), f"tasks.{task}", "must be a weight >= 0", value)
        why = f"must be one of {', '.join(BALANCES)}"
        _require(self.balance in BALANCES, "tasks.balance", why, self.balance)
        _require(
            0 < self.balance_lr_scale <= 1000 and math.isfinite(self.balance_lr_scale),
            "tasks.balance_lr_scale",
            "must be in (0, 1000]",
            self.balance_lr_scale,
        )
        ok = 0 <= self.balance_alpha <= 10 and math.isfinite(self.balance_alpha)
        _require(ok, "tasks.balance_alpha", "must be in [0, 10]", self.balance_alpha)
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


@dataclass(frozen=True)
class FinetuneSection:
    """Starting from pretrained weights, and how the backbone of a multi-task model trains then.

    `pretrained`: the backbone's weights, a folder or s3:// URI — for videomae/timesformer a Hugging Face
    folder (config.json, model.safetensors, preprocessor_config.json: the architecture, clip length, frame
    size and normalization come from there); for c3d a Sports-1M-layout state dict (.pt or .safetensors).
    `freeze_backbone_epochs`: the first N epochs train the heads only (backbone in eval mode, no gradients).
    `backbone_lr_ratio`: the backbone's learning rate as a fraction of optim.lr. `layer_decay` (transformers):
    each layer below the top learns at this factor of the one above (BEiT/VideoMAE's layer-wise decay).
    `gradient_checkpointing` (transformers): recompute activations in the backward pass (memory for time).
    """

    pretrained: str | None = None
    freeze_backbone_epochs: int = 0
    backbone_lr_ratio: float = 1.0
    layer_decay: float = 1.0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        e = self.freeze_backbone_epochs
        _require(e >= 0, "finetune.freeze_backbone_epochs", "must be >= 0", e)
        r = self.backbone_lr_ratio
        _require(0 < r <= 10, "finetune.backbone_lr_ratio", "must be in (0, 10]", r)
        _require(0 < self.layer_decay <= 1, "finetune.layer_decay", "must be in (0, 1]", self.layer_decay)
        if self.pretrained is not None:
            try:
                storage.canonical_uri(self.pretrained)
            except ValueError as err:
                raise ConfigError(f"config key 'finetune.pretrained': {err}") from None

    @property
    def changes_backbone_training(self) -> bool:
        return self.freeze_backbone_epochs > 0 or self.backbone_lr_ratio != 1 or self.layer_decay != 1


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
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
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
        self._check_finetune()

    def _check_finetune(self) -> None:
        f, multitask = self.finetune, self.model.name == "multitask"
        if f.pretrained is not None:
            known = (*TRANSFORMER_BACKBONES, *SPORTS1M_BACKBONES)
            _require(multitask and self.model.backbone in known, "finetune.pretrained",
                     f"needs model.name multitask with a backbone of {', '.join(known)}; "
                     f"model is {self._model_label}", f.pretrained)  # fmt: skip
        if f.changes_backbone_training:
            why = f"applies to a multi-task model's backbone; model is {self._model_label}"
            _require(multitask, "finetune", why, self.model.name)
        _require(f.freeze_backbone_epochs < self.optim.epochs, "finetune.freeze_backbone_epochs",
                 f"must be < optim.epochs ({self.optim.epochs}): some epoch must train the backbone",
                 f.freeze_backbone_epochs)  # fmt: skip
        if f.gradient_checkpointing:
            names = ", ".join(TRANSFORMER_BACKBONES)
            why = f"needs a transformer backbone ({names}); model is {self._model_label}"
            _require(multitask and self.model.backbone in TRANSFORMER_BACKBONES,
                     "finetune.gradient_checkpointing", why, True)  # fmt: skip

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
