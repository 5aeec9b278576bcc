"""Output heads shared by every model, and the matching training loss."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.spec import ModelSpec

STEPS_SUFFIX = "_steps"
IGNORE_INDEX = -100  # a class target without ground truth (cross-entropy's default ignore_index)


class Heads(nn.Module):
    """One linear layer per head on a shared embedding.

    Classification heads output logits [B, K]; "valence" outputs [B] in [-1, 1] (tanh) and "importance" [B]
    in [0, 1] (sigmoid). Each of `step_heads` applies the same layer to per-step features [B, T, D] as well,
    giving "<head>_steps" logits [B, T, K].
    """

    def __init__(
        self, in_dim: int, heads: Mapping[str, Sequence[str]], step_heads: Sequence[str] = ()
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(
            {name: nn.Linear(in_dim, len(labels) or 1) for name, labels in heads.items()}
        )
        self.step_heads = tuple(step_heads)
        for layer in self.layers.values():
            nn.init.normal_(layer.weight, 0.0, 0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, pooled: torch.Tensor, steps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = {name: _activate(name, layer(pooled)) for name, layer in self.layers.items()}
        if steps is not None:
            for name in self.step_heads:
                out[name + STEPS_SUFFIX] = self.layers[name](steps)
        return out


def _activate(name: str, y: torch.Tensor) -> torch.Tensor:
    if name == "valence":
        return torch.tanh(y.squeeze(-1))
    if name == "importance":
        return torch.sigmoid(y.squeeze(-1))
    return y


def head_loss(
    outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor], spec: ModelSpec
) -> torch.Tensor:
    """Sum over the heads named in `targets` of their loss against `outputs`.

    Targets: class indices (long [B], or [B, T] for "<head>_steps"; -100 is ignored) for classification heads,
    floats for "valence" (mean squared error) and "importance" (binary cross-entropy, targets in [0, 1]);
    NaN is ignored. Samples without ground truth (a semi-labelled corpus) add no loss.
    A target for a head the model does not have is an error naming it.
    """
    missing = sorted(set(targets) - set(outputs))
    if missing:
        raise ValueError(f"{spec.name}: targets for unknown heads {missing}; outputs are {sorted(outputs)}")
    if not targets:
        raise ValueError(f"{spec.name}: no targets given")
    total = torch.zeros((), device=next(iter(outputs.values())).device)
    for key, target in targets.items():
        out = outputs[key]
        head = key.removesuffix(STEPS_SUFFIX)
        if head in ("valence", "importance"):
            target = target.to(out.dtype)
            known = torch.isfinite(target)
            if not bool(known.any()):
                total = total + out.sum() * 0.0  # keeps the head in the graph (DDP) at no loss
            elif head == "valence":
                total = total + F.mse_loss(out[known], target[known])
            else:
                total = total + F.binary_cross_entropy(out[known].clamp(1e-6, 1 - 1e-6), target[known])
        else:
            logits, target = out.reshape(-1, out.shape[-1]), target.reshape(-1).long()
            if not bool((target != IGNORE_INDEX).any()):
                total = total + logits.sum() * 0.0
            else:
                total = total + F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    return total
