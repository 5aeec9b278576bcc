"""C3D (Tran et al. 2015, "Learning Spatiotemporal Features with 3D Convolutional Networks").

8 convolutions (3×3×3, padding 1), 5 max-pools (pool1 1×2×2, pools 2–5 2×2×2, pool5 padded in space so that
a 16×112×112 clip gives 512×1×4×4 = 8192 features), fc6 and fc7 with dropout, then the heads. Parameter
names match the widely used Sports-1M port (conv1, conv2, conv3a … conv5b, fc6, fc7; its fc8 is our head),
so its weights load with `load_sports1m_state_dict`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models._api import register_model
from models.heads import Heads
from models.spec import KINETICS_MEAN, KINETICS_STD, ModelSpec, clip_spec

CONV_NAMES = ("conv1", "conv2", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b")
# The pool that follows a convolution: (kernel, padding) in (T, H, W).
POOL_AFTER = {
    "conv1": ((1, 2, 2), (0, 0, 0)),
    "conv2": ((2, 2, 2), (0, 0, 0)),
    "conv3b": ((2, 2, 2), (0, 0, 0)),
    "conv4b": ((2, 2, 2), (0, 0, 0)),
    "conv5b": ((2, 2, 2), (0, 1, 1)),
}
SPORTS1M_LAYERS = (*CONV_NAMES, "fc6", "fc7", "fc8")
FULL_CHANNELS = (64, 128, 256, 512, 512)
SMALL_CHANNELS = (16, 32, 64, 128, 128)


class C3D(nn.Module):
    """C3D over [B, 3, T, H, W] clips; `channels` are the widths of conv1, conv2, conv3*, conv4*, conv5*.

    `batch_norm` adds a BatchNorm after every convolution (not in the paper; it lets the small variant
    train from scratch in minutes). `channels_last` runs the convolutions in channels_last_3d, which oneDNN
    runs 1.4–1.8× faster on CPU (see BENCHMARKS.md).
    """

    def __init__(
        self,
        spec: ModelSpec,
        channels: Sequence[int] = FULL_CHANNELS,
        fc_dim: int = 4096,
        dropout: float = 0.5,
        batch_norm: bool = False,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if len(channels) != 5 or min(channels) < 1:
            raise ValueError(f"c3d: channels={list(channels)} must be 5 positive widths (conv1 … conv5)")
        self.spec = spec
        c1, c2, c3, c4, c5 = channels
        widths = {
            "conv1": (3, c1),
            "conv2": (c1, c2),
            "conv3a": (c2, c3),
            "conv3b": (c3, c3),
            "conv4a": (c3, c4),
            "conv4b": (c4, c4),
            "conv5a": (c4, c5),
            "conv5b": (c5, c5),
        }
        for name, (cin, cout) in widths.items():
            # No bias under BatchNorm: it would be cancelled by the norm's mean.
            self.add_module(name, nn.Conv3d(cin, cout, kernel_size=3, padding=1, bias=not batch_norm))
        self.norms = (
            nn.ModuleDict({n: nn.BatchNorm3d(widths[n][1]) for n in CONV_NAMES}) if batch_norm else None
        )
        self.pools = nn.ModuleDict(
            {n: nn.MaxPool3d(k, stride=k, padding=p) for n, (k, p) in POOL_AFTER.items()}
        )
        self.flat_dim = c5 * _trunk_out_volume(spec.clip_len, spec.frame_size)
        self.fc6 = nn.Linear(self.flat_dim, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.dropout = nn.Dropout(dropout)
        self.feature_dim = fc_dim
        self.heads = Heads(fc_dim, spec.heads)
        self.channels_last = channels_last
        self._init_weights()
        if channels_last:
            self.to(memory_format=torch.channels_last_3d)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for fc in (self.fc6, self.fc7):
            nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
            nn.init.zeros_(fc.bias)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Convolutions and pools: [B, 3, T, H, W] → pool5 output flattened, [B, flat_dim]."""
        self.spec.check_video(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        for name in CONV_NAMES:
            x = getattr(self, name)(x)
            if self.norms is not None:
                x = self.norms[name](x)
            x = F.relu(x, inplace=True)
            if name in self.pools:
                x = self.pools[name](x)
        # Flatten in (C, T, H, W) order whatever the memory format, as the Sports-1M port's fc6 expects.
        return torch.flatten(x, 1)

    def features(self, x: torch.Tensor, layer: str = "fc7") -> torch.Tensor:
        """The clip embedding after fc6 or fc7 (and its ReLU): [B, fc_dim]."""
        if layer not in ("fc6", "fc7"):
            raise ValueError(f"c3d features: layer={layer!r} must be 'fc6' or 'fc7'")
        h = F.relu(self.fc6(self.trunk(x)))
        if layer == "fc6":
            return h
        return F.relu(self.fc7(self.dropout(h)))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """(clip embedding as the heads see it, no per-step features)."""
        return self.dropout(self.features(x)), None

    def forward(self, x: torch.Tensor, with_features: bool = False) -> dict[str, torch.Tensor]:
        """x: [B, 3, T, H, W] normalized per the spec → {head: logits [B, K] or score [B]} (+ "features")."""
        pooled, _ = self.encode(x)
        out = self.heads(pooled)
        if with_features:
            out["features"] = pooled
        return out


def _pool_out(n: int, kernel: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // kernel + 1


def _trunk_out_volume(clip_len: int, frame_size: tuple[int, int]) -> int:
    """T×H×W after pool5 for a clip, or a clear error when the clip is too small for five pools."""
    dims = [clip_len, *frame_size]
    for kernel, padding in POOL_AFTER.values():
        dims = [
            _pool_out(n, k, p) if n + 2 * p >= k else 0 for n, k, p in zip(dims, kernel, padding, strict=True)
        ]
    if min(dims) < 1:
        raise ValueError(
            f"c3d: a clip of {clip_len} frames of {frame_size[0]}×{frame_size[1]} is too small for 5 pools "
            "(needs >= 16 frames and >= 16×16 pixels)"
        )
    return dims[0] * dims[1] * dims[2]


@register_model("c3d")
def c3d(
    num_classes: int | None = None,
    heads: Mapping[str, Sequence[str]] | None = None,
    *,
    clip_len: int = 16,
    frame_size: Sequence[int] = (112, 112),
    fps: float = 25.0,
    mean: Sequence[float] = KINETICS_MEAN,
    std: Sequence[float] = KINETICS_STD,
    dropout: float = 0.5,
    channels_last: bool = True,
) -> C3D:
    """The paper's C3D: 16×112×112 input, fc6/fc7 4096; 101 "category" classes unless told otherwise."""
    if heads is None and num_classes is None:
        num_classes = 101
    spec = clip_spec(
        "c3d", heads, num_classes, clip_len=clip_len, frame_size=frame_size, fps=fps, mean=mean, std=std
    )
    return C3D(spec, FULL_CHANNELS, fc_dim=4096, dropout=dropout, channels_last=channels_last)


@register_model("c3d_small")
def c3d_small(
    num_classes: int | None = None,
    heads: Mapping[str, Sequence[str]] | None = None,
    *,
    clip_len: int = 16,
    frame_size: Sequence[int] = (64, 64),
    fps: float = 15.0,
    mean: Sequence[float] = KINETICS_MEAN,
    std: Sequence[float] = KINETICS_STD,
    channels: Sequence[int] = SMALL_CHANNELS,
    fc_dim: int = 512,
    dropout: float = 0.5,
    batch_norm: bool = True,
    channels_last: bool = True,
) -> C3D:
    """A C3D that trains on a laptop CPU in minutes: 64×64 input, narrower convolutions, fc6/fc7 of 512."""
    if heads is None and num_classes is None:
        num_classes = 10
    spec = clip_spec(
        "c3d_small", heads, num_classes, clip_len=clip_len, frame_size=frame_size, fps=fps, mean=mean, std=std
    )
    return C3D(
        spec, channels, fc_dim=fc_dim, dropout=dropout, batch_norm=batch_norm, channels_last=channels_last
    )


def load_sports1m_state_dict(
    model: C3D, state_dict: Mapping[str, torch.Tensor], *, classifier: bool = True
) -> None:
    """Load weights in the Sports-1M C3D port's layout (conv1 … conv5b, fc6, fc7, fc8; .weight/.bias).

    fc8 goes to the model's single classification head; with `classifier=False` fc8 is ignored (for
    fine-tuning on new labels, or a model with several heads). Any missing, unexpected or misshapen key is
    a ValueError naming them all; nothing is loaded then.
    """
    if not isinstance(model, C3D):
        raise TypeError(f"load_sports1m_state_dict needs a C3D model, got {type(model).__name__}")
    if model.norms is not None:
        raise ValueError("the Sports-1M layout has no BatchNorm; build the model with batch_norm=False")
    given = dict(state_dict)
    if given and all(k.startswith("module.") for k in given):  # saved from DataParallel
        given = {k.removeprefix("module."): v for k, v in given.items()}
    ours = model.state_dict()
    # Sports-1M key → our key.
    mapping = {f"{layer}.{p}": f"{layer}.{p}" for layer in SPORTS1M_LAYERS[:-1] for p in ("weight", "bias")}
    if classifier:
        heads = list(model.spec.classification_heads)
        if len(heads) != 1:
            raise ValueError(
                f"fc8 needs exactly one classification head, the model has {heads}; pass classifier=False"
            )
        mapping.update({f"fc8.{p}": f"heads.layers.{heads[0]}.{p}" for p in ("weight", "bias")})
    else:
        given = {k: v for k, v in given.items() if not k.startswith("fc8.")}

    missing = sorted(set(mapping) - set(given))
    unexpected = sorted(set(given) - set(mapping))
    misshapen = [
        f"{k}: got {tuple(given[k].shape)}, model has {tuple(ours[mapping[k]].shape)}"
        for k in sorted(set(mapping) & set(given))
        if tuple(given[k].shape) != tuple(ours[mapping[k]].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if misshapen:
        problems.append("shape mismatch " + "; ".join(misshapen))
    if problems:
        raise ValueError("Sports-1M state dict does not fit this C3D: " + "; ".join(problems))
    ours.update({mapping[k]: v for k, v in given.items()})
    model.load_state_dict(ours)
