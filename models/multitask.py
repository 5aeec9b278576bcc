"""One backbone feeding several heads (tagging decodes once and predicts everything), and an ensemble that
averages the class probabilities of several models ("model fusion")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from models._api import build, register_model
from models.heads import STEPS_SUFFIX, Heads
from models.spec import SCALAR_HEADS, ModelSpec, resolve_heads


class MultiTask(nn.Module):
    """Heads (e.g. category, action, sentiment + valence, importance) on a backbone's clip embedding.

    The backbone is any model of this package with `encode(x) -> (pooled [B, D], steps [B, T, D] or None)` and
    `feature_dim`; its own heads are dropped (unused parameters would break distributed training). Each of
    `step_heads` also gives "<head>_steps" logits when the backbone has per-step features (CNN-LSTM).
    """

    backbone_frozen = False  # see freeze_backbone (a class default: modules pickled before it load too)

    def __init__(
        self, backbone: nn.Module, heads: Mapping[str, Sequence[str]], step_heads: Sequence[str] = ()
    ) -> None:
        super().__init__()
        if not heads:
            raise ValueError("multitask: give at least one head")
        backbone.heads = Heads(backbone.feature_dim, {})
        backbone.spec = replace(backbone.spec, heads={}, step_heads=())
        self.backbone = backbone
        self.feature_dim = backbone.feature_dim
        self.spec = replace(
            backbone.spec,
            name=f"multitask:{backbone.spec.name}",
            heads=dict(heads),
            step_heads=tuple(step_heads),
        )
        self.heads = Heads(self.feature_dim, self.spec.heads, self.spec.step_heads)

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Train the heads only (linear probing): the backbone runs in eval mode, without gradients."""
        self.backbone_frozen = frozen
        self.train(self.training)

    def train(self, mode: bool = True) -> MultiTask:
        super().train(mode)
        if self.backbone_frozen:  # its normalization statistics and dropout stay as pretrained
            self.backbone.eval()
        return self

    def encode(self, x: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            return self.backbone.encode(x)

    def features(self, x: Any) -> torch.Tensor:
        """The backbone's clip embedding, [B, D]."""
        return self.encode(x)[0]

    def forward(self, x: Any, with_features: bool = False) -> dict[str, torch.Tensor]:
        """x: whatever the backbone takes ([B, 3, T, H, W] clips) → {head: output} (+ "features")."""
        pooled, steps = self.encode(x)
        out = self.heads(pooled, steps)
        if with_features:
            out["features"] = pooled
        return out


@register_model("multitask")
def multitask(
    backbone: str = "c3d_small",
    heads: Mapping[str, Sequence[str]] | None = None,
    *,
    step_heads: Sequence[str] | None = None,
    **backbone_kwargs: Any,
) -> MultiTask:
    """`backbone` (a name in MODELS, built with `backbone_kwargs` and no heads of its own) with `heads`.

    step_heads defaults to ("action",) when the backbone has per-step features and an "action" head.
    """
    if not heads:
        raise ValueError("multitask: heads is required, e.g. {'category': [...], 'action': [...]}")
    if backbone in ("multitask", "summarizer"):
        raise ValueError(f"multitask: backbone {backbone!r} cannot carry clip heads")
    resolved = resolve_heads(heads, None, "category")
    model = build(backbone, heads={}, **backbone_kwargs)
    has_steps = getattr(model, "has_steps", False)
    if step_heads is None:
        step_heads = ("action",) if has_steps and "action" in resolved else ()
    if step_heads and not has_steps:
        raise ValueError(f"multitask: {backbone} has no per-step features for step_heads {list(step_heads)}")
    out = MultiTask(model, resolved, step_heads)
    # The backbone's own record (a pretrained one's names its architecture, not the files it came from).
    rebuilt = {k: v for k, v in model.build_config["kwargs"].items() if k != "heads"}
    out.rebuild_kwargs = {"backbone": backbone, "heads": resolved, "step_heads": list(step_heads), **rebuilt}
    return out


class Ensemble(nn.Module):
    """Averages several models' outputs on one input.

    Classification outputs (and "<head>_steps") average the softmax probabilities, optionally weighted, and
    are returned as log-probabilities, so softmax of the output is exactly the averaged distribution and every
    consumer of logits works unchanged. Scalar heads (valence, importance) are averaged as they are. A head is
    averaged over the members that have it; members sharing a head must agree on its labels, and all members
    must read the same input (clip length, frame size, fps, normalization, modalities).
    """

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if len(models) < 1:
            raise ValueError("ensemble: give at least one model")
        weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
        if len(weights) != len(models) or min(weights) <= 0:
            raise ValueError(f"ensemble: weights {weights} must be {len(models)} positive numbers")
        self.members = nn.ModuleList(models)
        self.weights = weights
        self.spec = _ensemble_spec([m.spec for m in models])

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Same input as each member; {head: averaged log-probabilities or score}."""
        sums: dict[str, torch.Tensor] = {}
        totals: dict[str, float] = {}
        for model, weight in zip(self.members, self.weights, strict=True):
            for key, value in model(*args, **kwargs).items():
                head = key.removesuffix(STEPS_SUFFIX)
                if head not in self.spec.heads:
                    continue  # "features" and other non-head outputs do not average meaningfully
                value = value if head in SCALAR_HEADS else torch.softmax(value.float(), dim=-1)
                sums[key] = sums.get(key, 0) + weight * value
                totals[key] = totals.get(key, 0.0) + weight
        out = {}
        for key, total in sums.items():
            mean = total / totals[key]
            out[key] = (
                mean if key.removesuffix(STEPS_SUFFIX) in SCALAR_HEADS else torch.log(mean.clamp_min(1e-12))
            )
        return out


def _ensemble_spec(specs: Sequence[ModelSpec]) -> ModelSpec:
    first = specs[0]
    fields = ("clip_len", "frame_size", "fps", "mean", "std", "modalities", "audio_rate", "feature_dim")
    for spec in specs[1:]:
        differ = [f for f in fields if getattr(spec, f) != getattr(first, f)]
        if differ:
            raise ValueError(
                f"ensemble: {spec.name} and {first.name} read different inputs ({', '.join(differ)})"
            )
    heads: dict[str, tuple[str, ...]] = {}
    step_heads: list[str] = []
    for spec in specs:
        for head, labels in spec.heads.items():
            if heads.setdefault(head, labels) != labels:
                raise ValueError(f"ensemble: head {head!r} has different labels in {spec.name}")
        step_heads += [h for h in spec.step_heads if h not in step_heads]
    name = "ensemble:" + "+".join(s.name for s in specs)
    return replace(first, name=name, heads=heads, step_heads=tuple(step_heads))
