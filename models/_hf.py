"""Reading Hugging Face model folders (config.json, weights, preprocessor and tokenizer JSON) from local disk.

Nothing here talks to the Hub: a folder is fetched first (`flows.pretrained.fetch_pretrained`). Weights
load into our modules with a strict key check rather than through `from_pretrained`, which only warns about
keys it did not use. `transformers` is imported inside functions: importing it takes seconds.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

# config.json entries that say where a config came from or how outputs are returned, not the architecture.
_NOT_ARCHITECTURE = frozenset(
    {
        "transformers_version", "architectures", "_name_or_path", "id2label", "label2id", "num_labels",
        "problem_type", "finetuning_task", "dtype", "torch_dtype", "return_dict", "output_hidden_states",
        "output_attentions", "_attn_implementation_autoset", "tokenizer_class",
    }
)  # fmt: skip
# Legacy parameter names of old checkpoints → today's (what `transformers` renames on load as well).
LEGACY_RENAMES = (
    (r"\.LayerNorm\.gamma$", ".LayerNorm.weight"),
    (r"\.LayerNorm\.beta$", ".LayerNorm.bias"),
)


def model_folder(pretrained: str | os.PathLike) -> Path:
    """`pretrained` as a local folder holding a config.json, or a one-line ValueError naming it."""
    text = os.fspath(pretrained)
    if "://" in text:
        raise ValueError(f"{text}: a pretrained model must be a local folder; fetch it with fetch_pretrained")
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{text}: no such pretrained model folder")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{text}: not a pretrained model folder (no config.json)")
    return folder


def read_json(folder: Path, name: str, required: bool = True) -> dict[str, Any]:
    """A JSON file of the folder as a dict ({} when absent and not `required`)."""
    path = folder / name
    if not path.is_file():
        if required:
            raise ValueError(f"{folder}: no {name}")
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def make_config(model_type: str | None, values: Mapping[str, Any], where: str) -> Any:
    """A transformers config of `model_type` (None: whatever values["model_type"] names) from a dict."""
    from transformers import AutoConfig

    given = values.get("model_type")
    if model_type is not None and given not in (None, model_type):
        raise ValueError(f"{where}: config is for model_type {given!r}, not {model_type!r}")
    model_type = model_type or given
    if not model_type:
        raise ValueError(f"{where}: config has no model_type")
    kwargs = {k: v for k, v in values.items() if k != "model_type" and k not in _NOT_ARCHITECTURE}
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except ValueError as e:
        raise ValueError(f"{where}: {' '.join(str(e).split())}") from e


def plain_config(config: Any) -> dict[str, Any]:
    """The architecture part of a transformers config as plain JSON values: what rebuilds it."""
    values = {k: v for k, v in config.to_dict().items() if k not in _NOT_ARCHITECTURE}
    return json.loads(json.dumps(values))


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's weights: model.safetensors or pytorch_model.bin, either possibly sharded (*.index.json).

    A .bin is read with `torch.load(weights_only=True)`: a checkpoint cannot run code.
    """
    for name in ("model.safetensors", "pytorch_model.bin"):
        index = folder / f"{name}.index.json"
        files = [folder / name]
        if not files[0].is_file() and index.is_file():
            shards = read_json(folder, index.name).get("weight_map", {})
            files = [folder / shard for shard in sorted(set(shards.values()))]
        if all(f.is_file() for f in files):
            state: dict[str, torch.Tensor] = {}
            for f in files:
                state.update(read_weights_file(f))
            return state
    raise ValueError(f"{folder}: no weights (model.safetensors or pytorch_model.bin)")


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a torch state dict read with `weights_only` (so it cannot run code)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and zip errors alike: the file is not usable weights
        raise ValueError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return state


def load_weights(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    prefix: str,
    ignore: Iterable[str] = (),
    renames: Iterable[tuple[str, str]] = (),
    extra: Mapping[str, nn.Module] | None = None,
    where: str,
) -> None:
    """Load a checkpoint of a base model or of a task model built on it into `module` (the base model).

    Keys under `prefix` (a task model's base model, e.g. "videomae.") lose it; keys matching a regex of
    `ignore` (task heads, decoders) are dropped; `renames` (regex, replacement) update legacy names. Keys
    starting with a name of `extra` go to that module instead (a fine-tuned head's norm). Any other missing,
    unexpected or misshapen key is a ValueError naming them all; nothing is loaded then.
    """
    extra = dict(extra or {})
    if any(k.startswith(prefix) for k in state):
        # A task model's checkpoint: its base model is under the prefix; the rest is its head.
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    ours = {"": module.state_dict(), **{name + ".": m.state_dict() for name, m in extra.items()}}
    # A pattern that names a key of the module itself (a pooler the module has) ignores nothing.
    ignored = [p for p in map(re.compile, ignore) if not any(p.search(k) for k in ours[""])]
    given: dict[str, dict[str, torch.Tensor]] = {k: {} for k in ours}
    unexpected = []
    for key, value in state.items():
        for pattern, repl in (*LEGACY_RENAMES, *renames):
            key = re.sub(pattern, repl, key)
        if any(p.search(key) for p in ignored):
            continue
        target = next((name for name in ours if name and key.startswith(name)), "")
        key = key.removeprefix(target)
        if key in ours[target]:
            given[target][key] = value
        else:
            unexpected.append(target + key)
    # A module of `extra` is optional (a pre-trained checkpoint has no fine-tuned head), but not half of it.
    missing = sorted(
        name + k
        for name, values in given.items()
        if values or not name
        for k in set(ours[name]) - set(values)
    )
    misshapen = [
        f"{name}{k}: checkpoint {tuple(v.shape)}, model {tuple(ours[name][k].shape)}"
        for name, values in given.items()
        for k, v in sorted(values.items())
        if tuple(v.shape) != tuple(ours[name][k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_some(sorted(unexpected))}")
    if misshapen:
        problems.append("shape mismatch " + "; ".join(misshapen[:10]))
    if problems:
        raise ValueError(f"{where}: weights do not fit the model: " + "; ".join(problems))
    module.load_state_dict(given[""])
    for name, m in extra.items():
        if given[name + "."]:
            m.load_state_dict(given[name + "."])


def _some(keys: list[str], most: int = 10) -> str:
    """The first keys of a list, and how many more: a checkpoint of another model differs in hundreds."""
    return str(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")
