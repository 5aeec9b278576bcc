"""The model registry's leaf: model families register their builders here by name, and `build` makes them.

Nothing here imports a model family, so a family may call `build` (a multi-task model builds its backbone)
without an import circle; `models/__init__.py` imports every family, which fills `MODELS`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}
Builder = TypeVar("Builder", bound=Callable[..., nn.Module])


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: file the builder under `name` in MODELS (a second builder for a name is an error)."""

    def register(builder: Builder) -> Builder:
        if name in MODELS and MODELS[name] is not builder:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = builder
        return builder

    return register


def build(name: str, **kwargs: Any) -> nn.Module:
    """The model `name` built with `kwargs` (see each builder), remembering how to build it again.

    A builder that reads something outside its arguments (pretrained weights, a config file) sets
    `model.rebuild_kwargs`: the arguments that rebuild the same architecture without that source, which is
    what a saved model records.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    model = MODELS[name](**kwargs)
    rebuild = getattr(model, "rebuild_kwargs", None)
    model.build_config = {"name": name, "kwargs": plain_kwargs(name, kwargs if rebuild is None else rebuild)}
    return model


def plain_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """kwargs as JSON values (tuples become lists): what a saved model's JSON can hold."""
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
