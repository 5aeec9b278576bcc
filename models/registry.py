"""Model names → builders, and saving/loading a model together with its spec."""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping
from typing import IO, Any

import torch
from torch import nn

from models._api import MODELS, build
from models.multitask import Ensemble
from models.spec import ModelSpec

__all__ = ["MODELS", "build", "from_recipe", "load_model", "load_weights", "model_recipe", "save_model"]
CHECKPOINT_FORMAT = "reelflow.model/1"


def save_model(model: nn.Module, f: str | os.PathLike | IO[bytes]) -> None:
    """Write the model's spec, builder arguments and weights (an Ensemble: each member's) to a path/file."""
    torch.save(_payload(model, with_weights=True), f)


def model_recipe(model: nn.Module) -> dict[str, Any]:
    """How to build the model again without its weights: builder, arguments and spec (an Ensemble: its
    members' recipes and weights), as JSON values. `from_recipe` is its inverse."""
    return _payload(model, with_weights=False)


def _payload(model: nn.Module, with_weights: bool) -> dict[str, Any]:
    if isinstance(model, Ensemble):
        return {
            "format": CHECKPOINT_FORMAT,
            "spec": model.spec.to_dict(),
            "weights": list(model.weights),
            "ensemble": [_payload(m, with_weights) for m in model.members],
        }
    if getattr(model, "fused_for_inference", False):
        raise ValueError("save_model: this model was fused for inference; save the model before fusing it")
    config = getattr(model, "build_config", None)
    if config is None:
        raise ValueError(f"save_model: this {type(model).__name__} was not made by models.build(name, ...)")
    out = {
        "format": CHECKPOINT_FORMAT,
        "builder": config["name"],
        "kwargs": config["kwargs"],
        "spec": model.spec.to_dict(),
    }
    if with_weights:
        out["state_dict"] = model.state_dict()
    return out


def load_model(f: str | os.PathLike | IO[bytes], map_location: str | torch.device = "cpu") -> nn.Module:
    """The model saved by `save_model`, rebuilt from MODELS with its spec and weights, in eval mode.

    Only tensors and plain values are unpickled (`weights_only=True`), so a checkpoint cannot run code.
    """
    where = os.fspath(f) if isinstance(f, (str, os.PathLike)) else "model checkpoint"
    try:
        payload = torch.load(f, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, io.UnsupportedOperation) as e:
        raise ValueError(f"{where}: cannot read a model checkpoint: {str(e).splitlines()[0]}") from e
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{where}: not a model checkpoint of tensors and plain values ({_unpickle_reason(e)})"
        ) from e
    return from_recipe(payload, where).eval()


def _unpickle_reason(error: Exception) -> str:
    """The one line of torch's long weights_only error that says what was refused."""
    text = str(error).split("WeightsUnpickler error:", 1)[-1]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(error).__name__)
    return line.split(" Please use", 1)[0].rstrip(".")


def from_recipe(recipe: dict[str, Any], where: str = "model") -> nn.Module:
    """The model `model_recipe` (or `save_model`, weights included) describes, built from MODELS."""
    if not isinstance(recipe, dict) or recipe.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{where}: not a reelflow model checkpoint (expected format {CHECKPOINT_FORMAT})")
    if "ensemble" in recipe:
        return Ensemble([from_recipe(p, where) for p in recipe["ensemble"]], recipe["weights"])
    spec = ModelSpec.from_dict(recipe["spec"])
    model = build(recipe["builder"], **recipe["kwargs"])
    if (model.spec.heads, model.spec.step_heads) != (spec.heads, spec.step_heads):
        raise ValueError(f"{where}: the saved spec's heads do not match what {recipe['builder']!r} builds")
    # The saved spec wins: fields changed after building (fps, normalization) must survive the round trip.
    model.spec = spec
    if "state_dict" in recipe:
        load_weights(model, recipe["state_dict"], where)
    return model


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], where: str = "model") -> None:
    """`model.load_state_dict(state_dict)`, a one-line ValueError naming `where` when they do not fit."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        name = getattr(model, "build_config", {}).get("name", type(model).__name__)
        raise ValueError(f"{where}: weights do not fit {name!r}: {' '.join(str(e).split())}") from e
