"""Clip-level validation, run by every Ray Train worker on its shard: each task's metric and loss, and the
classification heads' confusion matrices, summed across workers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from flows import labels as flabels
from jobs.train.batches import batch_targets, model_inputs, task_losses
from jobs.train.config import TrainConfig


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
        targets = batch_targets(batch, steps, batch["importance_steps"], labels, device)
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
        # Every key is added on every batch (zeros too): the workers all-reduce the same keys.
        for head in self.classes:
            logits, truth = outputs[head].cpu(), targets[head].cpu()
            known = truth >= 0  # clips of videos without this label are not scored
            logits, truth = logits[known], truth[known]
            pred = logits.argmax(dim=1)
            self._add(f"{head}_n", known.sum())
            self._add(f"{head}_correct", (pred == truth).sum())
            k = min(5, logits.shape[1])
            self._add(f"{head}_top5", (logits.topk(k, dim=1).indices == truth[:, None]).any(dim=1).sum())
            self.confusion[head].index_put_(
                (truth, pred), torch.ones(len(truth), dtype=torch.float64), accumulate=True
            )
        if "action_steps" in weights:
            steps, truth = outputs["action_steps"].argmax(dim=-1).cpu(), targets["action_steps"].cpu()
            known = truth >= 0
            self._add("action_steps_correct", (steps[known] == truth[known]).sum())
            self._add("action_steps_n", known.sum())
        for head in ("valence", "importance"):
            if head in weights:
                truth = targets[head].cpu()
                known = torch.isfinite(truth)
                self._add(f"{head}_abs", (outputs[head].cpu()[known] - truth[known]).abs().sum())
                self._add(f"{head}_n", known.sum())

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
            report["confusion"][head] = {"labels": list(heads[head]), "matrix": cm.tolist()}
            report["per_class"][head] = _per_class(cm, heads[head])
            scored = values[f"{head}_n"]
            if not scored:
                continue  # no validation clip has ground truth for this head
            metrics[f"val_{head}_top1"] = values[f"{head}_correct"] / scored
            if k > 5:
                metrics[f"val_{head}_top5"] = values[f"{head}_top5"] / scored
        if values.get("action_steps_n"):
            metrics["val_action_steps_accuracy"] = values["action_steps_correct"] / values["action_steps_n"]
        for head in ("valence", "importance"):
            if values.get(f"{head}_n"):
                metrics[f"val_{head}_mae"] = values[f"{head}_abs"] / values[f"{head}_n"]
        return metrics, report


def _per_class(cm: np.ndarray, names: Sequence[str]) -> dict[str, dict]:
    from jobs.evaluation import per_class_report

    truth = np.repeat(np.arange(len(names)), cm.sum(axis=1))
    pred = np.concatenate([np.repeat(np.arange(len(names)), row) for row in cm]) if cm.sum() else truth
    if truth.size == 0:
        return {str(n): {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for n in names}
    return per_class_report(truth, pred, names)
