"""CNN-LSTM: a per-frame 2D CNN, then a (bi)LSTM over time (the ConvNet+LSTM baseline of Carreira & Zisserman
2017). Gives clip-level outputs for every head and per-timestep logits for action segments.

A per-frame CNN that ends in a global average pool cannot tell a still frame from a shifted or rotated
copy of it, so camera or object motion would reach the LSTM only through small differences between pooled
vectors (or as motion blur). With `motion=True` (the default) each frame goes into the CNN stacked with its
difference from the previous frame (6 input channels), the "RGB difference" modality of TSN (Wang et al.
2016): where and how the picture changes is then visible to the convolutions themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from models._api import register_model
from models.heads import Heads
from models.spec import KINETICS_MEAN, KINETICS_STD, ModelSpec, clip_spec, resolve_heads


class FrameEncoder(nn.Module):
    """Conv 3×3 → BatchNorm → ReLU → 2×2 max-pool per stage, then a global average: [N, Cin, H, W] → [N, C].

    The first convolution has stride `stem_stride` (a strided stem, as in most ImageNet CNNs): most of a
    small CNN's time goes to normalization and pooling at full resolution, not to its convolutions.
    """

    def __init__(self, channels: Sequence[int], stem_stride: int = 2, in_channels: int = 3) -> None:
        super().__init__()
        if not channels or min(channels) < 1:
            raise ValueError(
                f"cnn_lstm: channels={list(channels)} must be positive widths, at least one stage"
            )
        layers: list[nn.Module] = []
        cin = in_channels
        for i, cout in enumerate(channels):
            layers += [
                nn.Conv2d(cin, cout, 3, stride=stem_stride if i == 0 else 1, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            cin = cout
        self.stages = nn.Sequential(*layers)
        self.out_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        frames = frames.contiguous(memory_format=torch.channels_last)
        return self.stages(frames).mean(dim=(2, 3))


def frame_differences(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] → x_t − x_{t−1} per frame; the first frame takes the second's difference (a clip
    starts mid-motion as often as not), and a one-frame clip gets zeros."""
    if x.shape[2] < 2:
        return torch.zeros_like(x)
    diff = x[:, :, 1:] - x[:, :, :-1]
    return torch.cat([diff[:, :, :1], diff], dim=2)


class CNNLSTM(nn.Module):
    """[B, 3, T, H, W] → per-frame embeddings (of each frame and, with `motion`, its difference from the
    previous one) → LSTM → per-step features [B, T, D] and their time mean."""

    has_steps = True  # encode() also returns per-step features

    def __init__(
        self,
        spec: ModelSpec,
        channels: Sequence[int] = (16, 32, 64, 128),
        stem_stride: int = 2,
        hidden: int = 128,
        num_layers: int = 1,
        bidirectional: bool = True,
        dropout: float = 0.2,
        motion: bool = True,
    ) -> None:
        super().__init__()
        if min(spec.frame_size) < stem_stride * 2 ** len(channels):
            raise ValueError(
                f"cnn_lstm: frame_size {spec.frame_size} is too small for {len(channels)} 2×2 pools"
            )
        self.spec = spec
        self.motion = motion
        self.encoder = FrameEncoder(channels, stem_stride, in_channels=6 if motion else 3)
        self.encoder.to(memory_format=torch.channels_last)
        self.lstm = nn.LSTM(
            self.encoder.out_dim, hidden, num_layers=num_layers, batch_first=True, bidirectional=bidirectional
        )
        self.feature_dim = hidden * (2 if bidirectional else 1)
        self.dropout = nn.Dropout(dropout)
        self.heads = Heads(self.feature_dim, spec.heads, spec.step_heads)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(clip embedding [B, D], per-step embeddings [B, T, D])."""
        self.spec.check_video(
            x, exact=False
        )  # any clip length and frame size work; the spec says which to use
        if self.motion:
            x = torch.cat([x, frame_differences(x)], dim=1)
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        per_frame = self.encoder(frames).reshape(b, t, -1)
        steps, _ = self.lstm(per_frame)
        steps = self.dropout(steps)
        return steps.mean(dim=1), steps

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The clip embedding: LSTM outputs averaged over time, [B, D]."""
        return self.encode(x)[0]

    def forward(self, x: torch.Tensor, with_features: bool = False) -> dict[str, torch.Tensor]:
        """x: [B, 3, T, H, W] → {head: logits [B, K] or score [B], "<step head>_steps": logits [B, T, K]}."""
        pooled, steps = self.encode(x)
        out = self.heads(pooled, steps)
        if with_features:
            out["features"] = pooled
        return out


@register_model("cnn_lstm")
def cnn_lstm(
    num_classes: int | None = None,
    heads: Mapping[str, Sequence[str]] | None = None,
    *,
    step_heads: Sequence[str] | None = None,
    clip_len: int = 16,
    frame_size: Sequence[int] = (64, 64),
    fps: float = 15.0,
    mean: Sequence[float] = KINETICS_MEAN,
    std: Sequence[float] = KINETICS_STD,
    channels: Sequence[int] = (16, 32, 64, 128),
    stem_stride: int = 2,
    hidden: int = 128,
    num_layers: int = 1,
    bidirectional: bool = True,
    dropout: float = 0.2,
    motion: bool = True,
) -> CNNLSTM:
    """CNN-LSTM with an "action" head by default; `step_heads` (default: "action" if present) also give
    per-timestep logits. `motion`: feed each frame's difference from the previous one to the CNN too."""
    resolved = resolve_heads(heads, num_classes, "action")
    if step_heads is None:
        step_heads = ("action",) if "action" in resolved else ()
    spec = clip_spec(
        "cnn_lstm",
        resolved,
        clip_len=clip_len,
        frame_size=frame_size,
        fps=fps,
        mean=mean,
        std=std,
        step_heads=tuple(step_heads),
    )
    return CNNLSTM(
        spec,
        channels,
        stem_stride=stem_stride,
        hidden=hidden,
        num_layers=num_layers,
        bidirectional=bidirectional,
        dropout=dropout,
        motion=motion,
    )
