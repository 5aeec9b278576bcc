"""The spec every model carries: what its input looks like and what its heads mean.

A spec is saved with the weights (see `models.registry.save_model`), so tagging preprocesses clips exactly as
training did and can name every prediction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

# Heads with no labels are scalar scores; their names fix their range.
SCALAR_HEADS = {"valence": "tanh, in [-1, 1]", "importance": "sigmoid, in [0, 1]"}
SENTIMENT_LABELS = ("negative", "neutral", "positive")
# Kinetics statistics, the ones torchvision's video models use; frames are scaled to [0, 1] first.
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
MODALITIES = ("video", "audio", "text", "features")


@dataclass(frozen=True)
class ModelSpec:
    """Input contract and heads of a model.

    - `clip_len` frames sampled at `fps`, each `frame_size` = (height, width); frames in [0, 255] are scaled
      to [0, 1], then normalized with `mean`/`std` per RGB channel (`prepare` does exactly that).
    - `modalities`: inputs the model reads ("video", "audio", "text", or "features" for models that take a
      sequence of clip embeddings of size `feature_dim`).
    - `heads`: head name → label names. A classification head outputs logits over its labels; the scalar heads
      "valence" and "importance" have no labels. `step_heads` also output per-timestep logits as
      "<head>_steps" (for action segments). No heads: a backbone whose heads a `MultiTask` supplies.
    - `audio_rate`: sample rate (Hz) of the mono waveform, for models that read audio.
    - `source`: where pretrained weights came from (a URI or folder), for provenance; None when trained from
      scratch.
    """

    name: str
    clip_len: int
    frame_size: tuple[int, int]
    fps: float
    mean: tuple[float, ...] = KINETICS_MEAN
    std: tuple[float, ...] = KINETICS_STD
    modalities: tuple[str, ...] = ("video",)
    heads: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    step_heads: tuple[str, ...] = ()
    audio_rate: int | None = None
    feature_dim: int | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        # Normalize sequences (JSON and checkpoints give lists) so that equal specs compare equal.
        set_ = object.__setattr__
        set_(self, "frame_size", tuple(int(v) for v in self.frame_size))
        set_(self, "mean", tuple(float(v) for v in self.mean))
        set_(self, "std", tuple(float(v) for v in self.std))
        set_(self, "modalities", tuple(self.modalities))
        set_(self, "heads", {str(k): tuple(str(v) for v in labels) for k, labels in dict(self.heads).items()})
        set_(self, "step_heads", tuple(self.step_heads))
        self._validate()

    def _validate(self) -> None:
        where = f"model spec {self.name!r}"
        if self.clip_len < 1:
            raise ValueError(f"{where}: clip_len={self.clip_len} must be >= 1")
        if len(self.frame_size) != 2 or min(self.frame_size) < 1:
            raise ValueError(f"{where}: frame_size={self.frame_size} must be (height, width), both >= 1")
        if self.fps <= 0:
            raise ValueError(f"{where}: fps={self.fps} must be > 0")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(
                f"{where}: mean/std must be 3 values (RGB), std > 0; got {self.mean}, {self.std}"
            )
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if not self.modalities or unknown:
            raise ValueError(
                f"{where}: modalities {list(self.modalities)} must be a non-empty subset of {MODALITIES}"
            )
        for head, labels in self.heads.items():
            if not head.isidentifier() or head.endswith("_steps"):
                raise ValueError(f"{where}: head name {head!r} must be an identifier not ending in '_steps'")
            if head in SCALAR_HEADS and labels:
                raise ValueError(
                    f"{where}: head {head!r} is a scalar score and takes no labels, got {list(labels)}"
                )
            if head not in SCALAR_HEADS and len(labels) < 2:
                raise ValueError(
                    f"{where}: head {head!r} needs >= 2 label names (scalar heads are {sorted(SCALAR_HEADS)})"
                )
            if len(set(labels)) != len(labels):
                raise ValueError(f"{where}: head {head!r} has duplicate label names")
        bad_steps = [h for h in self.step_heads if h not in self.heads or h in SCALAR_HEADS]
        if bad_steps:
            raise ValueError(f"{where}: step_heads {bad_steps} must be classification heads of this spec")
        if "audio" in self.modalities and not self.audio_rate:
            raise ValueError(f"{where}: a model that reads audio needs audio_rate (Hz)")
        if "features" in self.modalities and not self.feature_dim:
            raise ValueError(f"{where}: a model that reads features needs feature_dim")

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @property
    def classification_heads(self) -> dict[str, tuple[str, ...]]:
        """Heads that output logits over labels."""
        return {h: labels for h, labels in self.heads.items() if h not in SCALAR_HEADS}

    def input_shape(self, batch_size: int = 1) -> tuple[int, int, int, int, int]:
        """Shape of a video batch for this spec: [B, C, T, H, W]."""
        return (batch_size, 3, self.clip_len, *self.frame_size)

    def check_video(self, x: torch.Tensor, exact: bool = True) -> None:
        """A clear error unless x is a float video batch [B, 3, T, H, W] (T, H, W as the spec if `exact`)."""
        want = list(self.input_shape(0)[1:]) if exact else [3]
        ok = x.dim() == 5 and x.is_floating_point() and list(x.shape[1 : 1 + len(want)]) == want
        if not ok:
            shape = "[B, " + ", ".join(map(str, want)) + (", T, H, W]" if not exact else "]")
            raise ValueError(
                f"{self.name}: input must be a float tensor {shape}, got {x.dtype} {list(x.shape)}"
            )

    def prepare(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 frames [B, T, H, W, 3] (or one clip [T, H, W, 3]) → normalized float [B, 3, T, H, W]."""
        frames = torch.as_tensor(frames)
        if frames.dim() == 4:
            frames = frames.unsqueeze(0)
        if frames.dim() != 5 or frames.shape[-1] != 3:
            raise ValueError(f"{self.name}: frames must be [B, T, H, W, 3], got {list(frames.shape)}")
        if tuple(frames.shape[2:4]) != self.frame_size:
            raise ValueError(
                f"{self.name}: frames are {tuple(frames.shape[2:4])}, the spec wants {self.frame_size}"
            )
        x = frames.permute(0, 4, 1, 2, 3).float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1, 1)
        return x.sub_(mean).div_(std)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, dicts, strings and numbers: JSON-able and safe for torch.load(weights_only=True)."""
        d = asdict(self)
        d["heads"] = {k: list(v) for k, v in self.heads.items()}
        for key in ("frame_size", "mean", "std", "modalities", "step_heads"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Inverse of `to_dict`; unknown fields are an error naming them."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"model spec: unknown fields {unknown}")
        return cls(**data)


def example_input(spec: ModelSpec, batch_size: int = 2, steps: int = 32, seed: int = 0) -> Any:
    """A random input of the right form for a model with this spec (for shape checks and benchmarks).

    Video models get normalized clips [B, 3, T, H, W]; a "features" model [B, steps, feature_dim]; a model
    that reads audio or text a dict of the clip, a waveform as long as the clip and a short text per sample.
    """
    gen = torch.Generator().manual_seed(seed)
    if "features" in spec.modalities:
        return torch.randn(batch_size, steps, spec.feature_dim, generator=gen)
    video = torch.randn(spec.input_shape(batch_size), generator=gen)
    if spec.modalities == ("video",):
        return video
    inputs: dict[str, Any] = {"video": video}
    if "audio" in spec.modalities:
        samples = max(1024, round(spec.audio_rate * spec.clip_len / spec.fps))
        inputs["audio"] = 0.1 * torch.randn(batch_size, samples, generator=gen)
    if "text" in spec.modalities:
        inputs["text"] = [f"sample {i} looks great and then rather sad" for i in range(batch_size)]
    return inputs


def label_names(num_classes: int) -> tuple[str, ...]:
    """Default label names for a head given only a class count: class_0, class_1, …"""
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be >= 2")
    return tuple(f"class_{i}" for i in range(num_classes))


def resolve_heads(
    heads: Mapping[str, Sequence[str]] | None, num_classes: int | None, default_head: str
) -> dict[str, tuple[str, ...]]:
    """The heads a builder was asked for: explicit `heads`, or one `default_head` with `num_classes` labels.

    A "sentiment" head always comes with a "valence" score (the sentiment model's contract).
    """
    if heads is not None and num_classes is not None:
        raise ValueError("give either heads or num_classes, not both")
    if heads is None:
        return {default_head: label_names(10 if num_classes is None else num_classes)}
    out = {str(k): tuple(v) for k, v in heads.items()}
    if "sentiment" in out and "valence" not in out:
        out["valence"] = ()
    return out


def clip_spec(
    name: str,
    heads: Mapping[str, Sequence[str]] | None,
    num_classes: int | None = None,
    *,
    default_head: str = "category",
    clip_len: int,
    frame_size: Sequence[int],
    fps: float,
    mean: Sequence[float] = KINETICS_MEAN,
    std: Sequence[float] = KINETICS_STD,
    **fields: Any,
) -> ModelSpec:
    """The spec every clip-model builder makes: its input (frames, size, rate, normalization) and the heads
    it was asked for (`resolve_heads`); `fields` are the other ModelSpec fields (modalities, step_heads…)."""
    return ModelSpec(
        name=name,
        clip_len=clip_len,
        frame_size=tuple(frame_size),
        fps=fps,
        mean=tuple(mean),
        std=tuple(std),
        heads=resolve_heads(heads, num_classes, default_head),
        **fields,
    )
