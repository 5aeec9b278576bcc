"""Model names → builders, and saving/loading a model together with its spec."""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Callable
from typing import IO, Any

import torch
from torch import nn

from models.c3d import c3d, c3d_small
from models.graph import graph
from models.lstm import cnn_lstm
from models.multitask import Ensemble, multitask
from models.sentiment import sentiment
from models.spec import ModelSpec
from models.summarizer import summarizer

MODELS: dict[str, Callable[..., nn.Module]] = {
    "c3d": c3d,
    "c3d_small": c3d_small,
    "cnn_lstm": cnn_lstm,
    "graph": graph,
    "summarizer": summarizer,
    "sentiment": sentiment,
    "multitask": multitask,
}
CHECKPOINT_FORMAT = "reelflow.model/1"


def build(name: str, **kwargs: Any) -> nn.Module:
    """The model `name` built with `kwargs` (see each builder), kept so `save_model` can rebuild it."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    plain = _plain_kwargs(name, kwargs)
    model = MODELS[name](**kwargs)
    model.build_config = {"name": name, "kwargs": plain}
    return model


def _plain_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """kwargs as JSON-like values (tuples become lists): what a weights_only checkpoint can hold."""
    out = {}
    for key, value in kwargs.items():
        try:
            out[key] = json.loads(json.dumps(value, default=_scalar))
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"build({name!r}): argument {key}={value!r} must be numbers, strings, lists or dicts"
            ) from e
    return out


def _scalar(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy and torch scalars from configs
        return value.item()
    raise TypeError(type(value).__name__)


def save_model(model: nn.Module, f: str | os.PathLike | IO[bytes]) -> None:
    """Write the model's spec, builder arguments and weights (an Ensemble: each member's) to a path/file."""
    torch.save(_payload(model), f)


def _payload(model: nn.Module) -> dict[str, Any]:
    if isinstance(model, Ensemble):
        return {
            "format": CHECKPOINT_FORMAT,
            "spec": model.spec.to_dict(),
            "weights": list(model.weights),
            "ensemble": [_payload(m) for m in model.members],
        }
    if getattr(model, "fused_for_inference", False):
        raise ValueError("save_model: this model was fused for inference; save the model before fusing it")
    config = getattr(model, "build_config", None)
    if config is None:
        raise ValueError(f"save_model: this {type(model).__name__} was not made by models.build(name, ...)")
    return {
        "format": CHECKPOINT_FORMAT,
        "builder": config["name"],
        "kwargs": config["kwargs"],
        "spec": model.spec.to_dict(),
        "state_dict": model.state_dict(),
    }


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
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{where}: not a reelflow model checkpoint (expected format {CHECKPOINT_FORMAT})")
    return _from_payload(payload, where).eval()


def _unpickle_reason(error: Exception) -> str:
    """The one line of torch's long weights_only error that says what was refused."""
    text = str(error).split("WeightsUnpickler error:", 1)[-1]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(error).__name__)
    return line.split(" Please use", 1)[0].rstrip(".")


def _from_payload(payload: dict[str, Any], where: str) -> nn.Module:
    if "ensemble" in payload:
        return Ensemble([_from_payload(p, where) for p in payload["ensemble"]], payload["weights"])
    spec = ModelSpec.from_dict(payload["spec"])
    model = build(payload["builder"], **payload["kwargs"])
    if (model.spec.heads, model.spec.step_heads) != (spec.heads, spec.step_heads):
        raise ValueError(f"{where}: the saved spec's heads do not match what {payload['builder']!r} builds")
    # The saved spec wins: fields changed after building (fps, normalization) must survive the round trip.
    model.spec = spec
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise ValueError(
            f"{where}: weights do not fit {payload['builder']!r}: {' '.join(str(e).split())}"
        ) from e
    return model
