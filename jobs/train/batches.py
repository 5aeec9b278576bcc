"""From a batch of the clip dataflow to what the model and its losses take: inputs, targets, task losses.
Shared by the training epochs and validation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from flows import labels as flabels
from flows.transforms import Augment, flip_labels, temporal_crop
from models import head_loss


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
    return batch_targets(batch, steps, importance, labels, device)


def batch_targets(
    batch: Mapping[str, Any],
    steps: torch.Tensor,
    importance: torch.Tensor,
    labels: flabels.LabelSet,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The targets of a batch of clips, given its per-frame action and importance labels."""
    targets = {
        "category": batch["category"],
        "action_steps": steps,
        "sentiment": batch["sentiment"],
        "valence": batch["valence"].float(),
        "importance": flabels.clip_importance(importance),
    }
    if labels.actions:  # a manifest without action labels has no background class either
        targets["action"] = flabels.clip_action(steps, labels.background)
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
