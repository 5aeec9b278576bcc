"""Video transformers of Hugging Face `transformers` as backbones: VideoMAE (Tong et al. 2022, "VideoMAE:
Masked Autoencoders are Data-Efficient Learners for Self-Supervised Video Pre-Training") and TimeSformer
(Bertasius et al. 2021, "Is Space-Time Attention All You Need for Video Understanding?").

A model comes from a local folder in Hugging Face layout (`pretrained`: config.json, model.safetensors or
pytorch_model.bin, optionally preprocessor_config.json) or from a config dict (random init). Its spec takes
the frame size and clip length from the config and the normalization from the preprocessor config, so clips
are prepared as the checkpoint was trained. `rebuild_kwargs` hold the config, never the folder: a saved model
rebuilds without the files (its weights are in its checkpoint).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models._api import register_model
from models._hf import load_weights, make_config, model_folder, plain_config, read_json, read_state_dict
from models.heads import Heads
from models.spec import ModelSpec, clip_spec

# What the transformers image and video processors normalize with when a folder does not say.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The base models of the papers (the transformers defaults today, written out so that they cannot drift).
VIDEOMAE_BASE: dict[str, Any] = {
    "image_size": 224, "patch_size": 16, "num_frames": 16, "tubelet_size": 2, "hidden_size": 768,
    "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "use_mean_pooling": True,
}  # fmt: skip
TIMESFORMER_BASE: dict[str, Any] = {
    "image_size": 224, "patch_size": 16, "num_frames": 8, "hidden_size": 768, "num_hidden_layers": 12,
    "num_attention_heads": 12, "intermediate_size": 3072, "attention_type": "divided_space_time",
}  # fmt: skip
# Sampling rates of the Kinetics recipes on 30 fps video: VideoMAE 16 frames every 4th, TimeSformer "8×32".
VIDEOMAE_FPS = 30 / 4
TIMESFORMER_FPS = 30 / 32
KINETICS_CLASSES = 400

_ENCODER_LAYER = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")
_EMBEDDINGS = re.compile(r"(?:^|\.)embeddings\.")


@dataclass(frozen=True)
class _Family:
    """How one transformers model family is read: its classes, checkpoint layout and pooling."""

    model_type: str  # config.json's model_type
    model_class: str  # the transformers base model
    prefix: str  # where its task models (classification, pre-training) keep the base model's weights
    ignore: tuple[str, ...]  # task-model keys that are not the base model's (regexes)
    renames: tuple[tuple[str, str], ...] = ()  # legacy key names → today's
    pooling: str = "cls"


FAMILIES = {
    "videomae": _Family(
        "videomae",
        "VideoMAEModel",
        "videomae.",
        (r"^classifier\.", r"^decoder\.", r"^encoder_to_decoder\.", r"^mask_token$"),
        # Checkpoints made before transformers 5 (all of the Hub's) keep the query/value biases apart.
        (
            (r"attention\.attention\.q_bias$", "attention.attention.query.bias"),
            (r"attention\.attention\.v_bias$", "attention.attention.value.bias"),
        ),
        pooling="mean",
    ),
    "timesformer": _Family("timesformer", "TimesformerModel", "timesformer.", (r"^classifier\.",)),
}


class VideoTransformer(nn.Module):
    """A transformers video model as a backbone: [B, 3, T, H, W] clips → clip embedding [B, D] → heads.

    `pooling` "mean" averages the tokens and normalizes the average (VideoMAE's classifier with
    use_mean_pooling); "cls" takes the final [CLS] token (TimeSformer's classifier). For layer-wise
    learning-rate decay, `layer_id(name)` numbers parameters from the embeddings (0) through the encoder
    layers (1 … num_layers) to everything after them (num_layers + 1).
    """

    def __init__(self, spec: ModelSpec, transformer: nn.Module, pooling: str = "cls") -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"{spec.name}: pooling={pooling!r} must be 'mean' or 'cls'")
        config = transformer.config
        self.spec = spec
        self.transformer = transformer
        self.pooling = pooling
        # Without use_mean_pooling, VideoMAE ends in a norm of its own and its classifier adds none.
        norm_pooled = pooling == "mean" and getattr(config, "use_mean_pooling", True)
        self.fc_norm: nn.Module = nn.LayerNorm(config.hidden_size) if norm_pooled else nn.Identity()
        self.feature_dim = config.hidden_size
        self.num_layers = config.num_hidden_layers
        self.heads = Heads(self.feature_dim, spec.heads)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """(clip embedding [B, D], no per-step features)."""
        self.spec.check_video(x)
        # transformers video models take [B, T, C, H, W].
        tokens = self.transformer(pixel_values=x.transpose(1, 2)).last_hidden_state
        pooled = tokens.mean(dim=1) if self.pooling == "mean" else tokens[:, 0]
        return self.fc_norm(pooled), None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The clip embedding: [B, D]."""
        return self.encode(x)[0]

    def forward(self, x: torch.Tensor, with_features: bool = False) -> dict[str, torch.Tensor]:
        """x: [B, 3, T, H, W] normalized per the spec → {head: logits [B, K] or score [B]} (+ "features")."""
        pooled, _ = self.encode(x)
        out = self.heads(pooled)
        if with_features:
            out["features"] = pooled
        return out

    def layer_id(self, name: str) -> int:
        """Depth of a parameter (a name of `named_parameters()`, here or in a model holding this one)."""
        layer = _ENCODER_LAYER.search(name)
        if layer:
            return int(layer.group(1)) + 1
        return 0 if _EMBEDDINGS.search(name) else self.num_layers + 1


@register_model("videomae")
def videomae(
    num_classes: int | None = None,
    heads: Mapping[str, Sequence[str]] | None = None,
    *,
    pretrained: str | os.PathLike | None = None,
    config: Mapping[str, Any] | None = None,
    source: str | None = None,
    fps: float = VIDEOMAE_FPS,
    frame_size: Sequence[int] | None = None,
    clip_len: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    gradient_checkpointing: bool = False,
) -> VideoTransformer:
    """VideoMAE: the weights of a local `pretrained` folder, or a random init from `config` (default ViT-B,
    16×224×224); 400 "category" classes unless told otherwise. `_video_transformer` says what each argument
    does."""
    return _video_transformer("videomae", VIDEOMAE_BASE, **locals())


@register_model("timesformer")
def timesformer(
    num_classes: int | None = None,
    heads: Mapping[str, Sequence[str]] | None = None,
    *,
    pretrained: str | os.PathLike | None = None,
    config: Mapping[str, Any] | None = None,
    source: str | None = None,
    fps: float = TIMESFORMER_FPS,
    frame_size: Sequence[int] | None = None,
    clip_len: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    gradient_checkpointing: bool = False,
) -> VideoTransformer:
    """TimeSformer (divided space-time attention): the weights of a local `pretrained` folder, or a random
    init from `config` (default ViT-B, 8×224×224); 400 "category" classes unless told otherwise."""
    return _video_transformer("timesformer", TIMESFORMER_BASE, **locals())


def _video_transformer(
    name: str,
    base: Mapping[str, Any],
    num_classes: int | None,
    heads: Mapping[str, Sequence[str]] | None,
    *,
    pretrained: str | os.PathLike | None,
    config: Mapping[str, Any] | None,
    source: str | None,
    fps: float,
    frame_size: Sequence[int] | None,
    clip_len: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    gradient_checkpointing: bool,
) -> VideoTransformer:
    """A family's model. With `pretrained`, `config` entries override its config.json (e.g. drop_path_rate);
    without, `config` is the whole config (default: the base model). `frame_size` and `clip_len` set the
    config's image_size and num_frames; `mean`/`std` default to the folder's preprocessor_config.json, then
    ImageNet's. `source` records where the folder came from (default: the folder)."""
    family = FAMILIES[name]
    folder = model_folder(pretrained) if pretrained is not None else None
    where = name if folder is None else f"{name} {os.fspath(pretrained)}"
    values = dict(base) if folder is None and config is None else {}
    preprocessor: dict[str, Any] = {}
    if folder is not None:
        values = read_json(folder, "config.json")
        preprocessor = read_json(folder, "preprocessor_config.json", required=False)
        if "image_size" not in values and _processor_size(preprocessor):
            values["image_size"] = _config_size(_processor_size(preprocessor))
    values.update(config or {})
    if frame_size is not None:
        values["image_size"] = _config_size(frame_size)
    if clip_len is not None:
        values["num_frames"] = int(clip_len)
    hf_config = make_config(family.model_type, values, where)
    size = _size_pair(hf_config.image_size)
    _check_geometry(name, hf_config, size)

    if mean is None or std is None:
        default_mean, default_std = _processor_normalization(preprocessor)
        mean = default_mean if mean is None else mean
        std = default_std if std is None else std
    if source is None and folder is not None:
        source = str(folder.resolve())
    if heads is None and num_classes is None:
        num_classes = KINETICS_CLASSES
    spec = clip_spec(
        name, heads, num_classes, clip_len=hf_config.num_frames, frame_size=size, fps=fps, mean=mean, std=std,
        source=source,
    )  # fmt: skip
    transformer = getattr(importlib.import_module("transformers"), family.model_class)(hf_config)
    model = VideoTransformer(spec, transformer, family.pooling)
    if folder is not None:
        norm = {"fc_norm": model.fc_norm} if isinstance(model.fc_norm, nn.LayerNorm) else None
        load_weights(
            model.transformer,
            read_state_dict(folder),
            prefix=family.prefix,
            ignore=family.ignore,
            renames=family.renames,
            extra=norm,
            where=where,
        )
    if gradient_checkpointing:
        # transformers 5 renamed gradient_checkpointing_enable (deprecated, removed in 6).
        enable = getattr(model.transformer, "activation_checkpointing_enable", None)
        (enable or model.transformer.gradient_checkpointing_enable)()
    model.rebuild_kwargs = {
        **({"heads": heads} if heads is not None else {"num_classes": num_classes}),
        "config": plain_config(hf_config),
        "source": source,
        "fps": fps,
        "frame_size": list(spec.frame_size),
        "clip_len": spec.clip_len,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "gradient_checkpointing": gradient_checkpointing,
    }
    return model


def _size_pair(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _config_size(size: Sequence[int] | tuple[int, int]) -> int | list[int]:
    """A (height, width) as a transformers config writes it: one number for a square."""
    h, w = _size_pair(size)
    return h if h == w else [h, w]


def _processor_size(preprocessor: Mapping[str, Any]) -> tuple[int, int] | None:
    """The frame size a preprocessor config crops (or resizes) to, if it says."""
    for key in ("crop_size", "size"):
        size = preprocessor.get(key)
        if isinstance(size, int):
            return size, size
        if isinstance(size, Mapping):
            if "height" in size and "width" in size:
                return int(size["height"]), int(size["width"])
            if "shortest_edge" in size:
                return int(size["shortest_edge"]), int(size["shortest_edge"])
    return None


def _processor_normalization(preprocessor: Mapping[str, Any]) -> tuple[Sequence[float], Sequence[float]]:
    if preprocessor.get("do_normalize") is False:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return preprocessor.get("image_mean", IMAGENET_MEAN), preprocessor.get("image_std", IMAGENET_STD)


def _check_geometry(name: str, config: Any, size: tuple[int, int]) -> None:
    """A clear error for a clip the patches do not tile (transformers would fail deep inside)."""
    patch = _size_pair(config.patch_size)
    if size[0] % patch[0] or size[1] % patch[1]:
        raise ValueError(f"{name}: frame_size {size} must be a multiple of patch_size {patch}")
    tubelet = getattr(config, "tubelet_size", 1)
    if config.num_frames % tubelet:
        raise ValueError(f"{name}: clip_len {config.num_frames} must be a multiple of tubelet_size {tubelet}")
    if name == "timesformer" and size[0] != size[1]:
        raise ValueError(f"timesformer: frame_size {size} must be square (its attention assumes it)")
