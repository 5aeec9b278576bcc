"""Planning a training run before Ray starts: labels, split, heads and the model, checked up front."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flows import labels as flabels
from flows import storage
from flows.clips import VideoRow, list_video_rows
from flows.pretrained import download, fetch_pretrained
from flows.transforms import Augment
from jobs.config import ConfigError
from jobs.train.config import SPORTS1M_BACKBONES, TRANSFORMER_BACKBONES, TrainConfig
from models import build, load_sports1m_state_dict, read_weights_file


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
    config: TrainConfig  # the job's config, less the tasks the manifest has no labels for
    dropped_tasks: tuple[str, ...] = ()
    eval_rows: tuple[VideoRow, ...] = ()  # the official held-out split (test, else val), else validation

    @property
    def train_files(self) -> list[str]:
        return sorted(self.manifest_file(r) for r in self.train_rows)

    @property
    def val_files(self) -> list[str]:
        return sorted(self.manifest_file(r) for r in self.val_rows)

    @property
    def eval_files(self) -> list[str]:
        return sorted(self.manifest_file(r) for r in self.eval_rows)

    def manifest_file(self, row: VideoRow) -> str:
        return flabels.relative_file(row.uri, self.corpus)


def plan_run(config: TrainConfig) -> Plan:
    """Read the manifest, list and split the corpus, build the model once; raises one-line errors."""
    manifest = flabels.read_manifest(config.labels_uri)
    config, dropped = labelled_tasks(config, manifest)
    rows = list_video_rows(config.corpus)
    if not rows:
        raise FileNotFoundError(f"corpus {config.corpus}: no video files found")
    by_file = {flabels.relative_file(r.uri, config.corpus): r for r in rows}
    labelled = sorted(f for f in by_file if f in manifest.videos)
    unlabelled = tuple(sorted(f for f in by_file if f not in manifest.videos))
    # An official split trains on `train` only; validation is carved from it, never from `test`.
    pool = [f for f in labelled if manifest.videos[f].split in ("train", None)]
    held_out = [f for f in labelled if manifest.videos[f].split == "test"] or [
        f for f in labelled if manifest.videos[f].split == "val"
    ]
    if config.data.max_videos is not None:
        pool = pool[: config.data.max_videos]
    if len(pool) < 2:
        where = "training videos (split 'train')" if manifest.has_split else "videos"
        raise ValueError(
            f"corpus {config.corpus}: {len(pool)} {where} have labels in {config.labels_uri}; need >= 2"
        )
    strata = [manifest.videos[f].category or "" for f in pool]
    train, val = flabels.split_videos(pool, strata, config.data.validation_fraction, config.data.split_seed)
    if not train or not val:
        raise ValueError(f"data.validation_fraction={config.data.validation_fraction}: leaves an empty split")
    heads = model_heads(config, manifest.labels)
    model = build_model(config, heads)
    return Plan(
        manifest=manifest,
        corpus=storage.canonical_uri(config.corpus),
        train_rows=tuple(_row(by_file[f], manifest.videos[f]) for f in train),
        val_rows=tuple(_row(by_file[f], manifest.videos[f]) for f in val),
        heads=heads,
        spec=model.spec,
        unlabelled=unlabelled,
        config=config,
        dropped_tasks=dropped,
        eval_rows=tuple(by_file[f] for f in held_out) or tuple(by_file[f] for f in val),
    )


def _row(row: VideoRow, video: flabels.VideoLabels) -> VideoRow:
    """The video's row, its clips drawn inside its labelled window when it has one (Kinetics)."""
    return replace(row, window_s=video.window) if video.window else row


# The head whose labels each task learns from.
TASK_HEADS = {
    "category": "category",
    "action": "action",
    "action_steps": "action",
    "sentiment": "sentiment",
    "valence": "valence",
    "importance": "importance",
}


def labelled_tasks(config: TrainConfig, manifest: flabels.Manifest) -> tuple[TrainConfig, tuple[str, ...]]:
    """The config with the tasks the manifest has no labels for turned off, and those tasks' names;
    valence goes with sentiment (it is its score). No task left is a one-line config error."""
    weights = config.tasks.weights()
    dropped = [t for t in weights if TASK_HEADS[t] not in manifest.heads]
    if "sentiment" in dropped and "valence" in weights and "valence" not in dropped:
        dropped.append("valence")
    if len(dropped) == len(weights):
        raise ConfigError(
            f"config key 'tasks': none of {sorted(weights)} has labels in {manifest.uri} "
            f"(it labels {', '.join(manifest.heads)})"
        )
    if not dropped:
        return config, ()
    tasks = replace(config.tasks, **dict.fromkeys(dropped, 0.0))
    return replace(config, tasks=tasks), tuple(dropped)


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
    """The model the config names, with `heads` (and `finetune.pretrained`'s weights); a bad builder
    argument is a one-line config error."""
    m = config.model
    clip = {"clip_len": m.clip_len, "frame_size": list(m.frame_size), "fps": m.fps}
    heads = {k: list(v) for k, v in heads.items()}
    try:
        if m.name == "multitask":
            steps = ["action"] if config.tasks.action_steps > 0 else []
            kwargs = {**clip, **m.kwargs, **_finetune_kwargs(config)}
            model = build("multitask", backbone=m.backbone, heads=heads, step_heads=steps, **kwargs)
            _check_pretrained_input(config, model)
            if config.finetune.pretrained and m.backbone in SPORTS1M_BACKBONES:
                load_sports1m_state_dict(model.backbone, sports1m_weights(config.finetune.pretrained),
                                         classifier=False)  # fmt: skip
                model.spec = replace(model.spec, source=config.finetune.pretrained)
            return model
        if m.name == "sentiment" and m.kwargs.get("text_pretrained"):
            uri = m.kwargs["text_pretrained"]
            kwargs = {**m.kwargs, "text_pretrained": str(fetch_pretrained(uri)), "text_source": uri}
            return build("sentiment", heads=heads, **clip, **kwargs)
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
    except ConfigError:
        raise
    except ValueError as err:
        key = "finetune.pretrained" if config.finetune.pretrained else "model"
        raise ConfigError(f"config key '{key}': {' '.join(str(err).split())}") from None


def _finetune_kwargs(config: TrainConfig) -> dict[str, Any]:
    """A transformer backbone's builder arguments from `finetune`: its pretrained folder (fetched here; its
    clip length and frame size are the folder's) and gradient checkpointing."""
    f = config.finetune
    if config.model.backbone not in TRANSFORMER_BACKBONES:
        return {}
    out: dict[str, Any] = {"gradient_checkpointing": f.gradient_checkpointing}
    if f.pretrained:
        out.update(pretrained=str(fetch_pretrained(f.pretrained)), source=f.pretrained)
        out.update(clip_len=None, frame_size=None)
    return out


def _check_pretrained_input(config: TrainConfig, model: nn.Module) -> None:
    """The clips the job decodes must be what a pretrained backbone was built for."""
    m, spec = config.model, model.spec
    if (m.clip_len, tuple(m.frame_size)) != (spec.clip_len, tuple(spec.frame_size)):
        raise ConfigError(
            f"config keys 'model.clip_len', 'model.frame_size': {config.finetune.pretrained} takes "
            f"{spec.clip_len} frames of {list(spec.frame_size)}, the config says {m.clip_len} of "
            f"{list(m.frame_size)}; set them to the backbone's"
        )


def sports1m_weights(uri: str) -> dict[str, torch.Tensor]:
    """A Sports-1M-layout C3D state dict from a .safetensors or a .pt/.pth file (a path or s3:// URI)."""
    if not storage.is_s3(uri):
        return read_weights_file(Path(storage.canonical_uri(uri)))
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp, uri.rstrip("/").rsplit("/", 1)[-1])
        download(uri, local)
        return read_weights_file(local)


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
