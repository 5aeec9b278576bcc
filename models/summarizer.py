"""Attention summarizer (VASNet: Fajtl et al. 2018, "Summarizing Videos with Attention").

Soft self-attention over a sequence of frame or clip features, a residual, then a two-layer regressor to an
importance score in [0, 1] per step: the highlight and keyframe signal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models._api import register_model
from models.spec import KINETICS_MEAN, KINETICS_STD, ModelSpec, clip_spec


class AttentionSummarizer(nn.Module):
    """[B, T, D] features (+ optional validity mask [B, T]) → {"importance": [B, T] in [0, 1]}.

    As VASNet: Q, K, V and output projections without bias, attention dropout, y = attention + x, dropout,
    LayerNorm, Linear-ReLU, dropout, LayerNorm, Linear, sigmoid. The attention scale is 1/√D (VASNet fixes
    0.06 for D = 1024, about 1.9/√D); `aperture` optionally limits attention to ±aperture steps.
    """

    def __init__(
        self, spec: ModelSpec, dropout: float = 0.5, scale: float | None = None, aperture: int | None = None
    ) -> None:
        super().__init__()
        if spec.feature_dim is None:
            raise ValueError("summarizer: the spec needs feature_dim")
        if aperture is not None and aperture < 1:
            raise ValueError(f"summarizer: aperture={aperture} must be >= 1 or None")
        self.spec = spec
        d = spec.feature_dim
        self.query = nn.Linear(d, d, bias=False)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d, bias=False)
        self.output = nn.Linear(d, d, bias=False)
        self.norm_y = nn.LayerNorm(d)
        self.ka = nn.Linear(d, d)
        self.norm_ka = nn.LayerNorm(d)
        self.kd = nn.Linear(d, 1)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale if scale is not None else 1.0 / math.sqrt(d)
        self.aperture = aperture

    def attention(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention weights [B, T, T]; masked (invalid) steps get no weight."""
        scores = self.query(x) @ self.key(x).transpose(1, 2) * self.scale
        blocked = torch.zeros(scores.shape[1:], dtype=torch.bool, device=x.device)
        if self.aperture is not None:
            steps = torch.arange(x.shape[1], device=x.device)
            blocked = (steps[:, None] - steps[None, :]).abs() > self.aperture
        blocked = blocked.expand_as(scores)
        if mask is not None:
            blocked = blocked | ~mask[:, None, :]
        # A finite floor rather than -inf: a row with every key blocked (a padded step) then stays finite.
        return torch.softmax(scores.masked_fill(blocked, torch.finfo(scores.dtype).min), dim=-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """x: [B, T, D] features of T frames or clips in order; mask: bool [B, T], True where a step is real
        (padding of shorter videos is False). Returns {"importance": [B, T]}, 0 at padded steps."""
        if x.dim() != 3 or x.shape[-1] != self.spec.feature_dim:
            raise ValueError(
                f"summarizer: input must be [B, T, {self.spec.feature_dim}], got {list(x.shape)}"
            )
        if mask is not None and mask.shape != x.shape[:2]:
            raise ValueError(f"summarizer: mask must be [B, T] = {list(x.shape[:2])}, got {list(mask.shape)}")
        if mask is not None:
            # Padding may hold anything; keep it out of every product, not only out of the softmax.
            x = x.masked_fill(~mask[..., None], 0.0)
        weights = self.dropout(self.attention(x, mask))
        y = self.output(weights @ self.value(x)) + x
        y = self.norm_y(self.dropout(y))
        y = self.norm_ka(self.dropout(F.relu(self.ka(y))))
        importance = torch.sigmoid(self.kd(y).squeeze(-1))
        if mask is not None:
            importance = importance.masked_fill(~mask, 0.0)
        return {"importance": importance}


@register_model("summarizer")
def summarizer(
    feature_dim: int = 512,
    *,
    clip_len: int = 16,
    frame_size: Sequence[int] = (64, 64),
    fps: float = 15.0,
    mean: Sequence[float] = KINETICS_MEAN,
    std: Sequence[float] = KINETICS_STD,
    dropout: float = 0.5,
    scale: float | None = None,
    aperture: int | None = None,
) -> AttentionSummarizer:
    """VASNet over clip embeddings of size `feature_dim` (512: c3d_small's fc7). clip_len, frame_size, fps
    and mean/std describe the clips those embeddings were computed from."""
    spec = clip_spec(
        "summarizer",
        {"importance": ()},
        clip_len=clip_len,
        frame_size=frame_size,
        fps=fps,
        mean=mean,
        std=std,
        modalities=("features",),
        feature_dim=feature_dim,
    )
    return AttentionSummarizer(spec, dropout=dropout, scale=scale, aperture=aperture)
