"""Typed job configs: frozen dataclasses filled from a YAML file, then `a.b=value` command-line overrides.

Everything is checked before any work starts, with one-line errors that name the dotted key:

    >>> cfg = load_config(TrainConfig, "jobs/configs/demo.yaml", ["train.lr=3e-4", "clips.size=[96, 96]"])

Override values are parsed as YAML (`1`, `0.5`, `true`, `null`, `[1, 2]`, `{a: 1}`); a `str` field takes the
text as typed, so `run_name=2024` is the string "2024". Supported field types: str, int, float, bool,
`X | None`, unions, `Literal[...]`, `tuple[...]`, `list[...]`, `dict[str, X]` and nested dataclasses (a
nested dataclass given in part keeps the field's default for the rest). Each dataclass's own
`__post_init__` checks still run.

`flatten` (MLflow params) and `to_yaml` (the config artifact) redact credentials: a field or dict key whose
name says secret / password / token / credential / api_key / access_key (and the bare name `key`, s3fs's
access key) shows as `***`, and a `user:password@` inside any URI value loses its password.
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")
_MISSING = dataclasses.MISSING

REDACTED = "***"
_SECRET_WORDS = frozenset(
    {"secret", "secrets", "password", "passwd", "pwd", "passphrase", "token", "credential", "credentials",
     "apikey", "auth"}
)  # fmt: skip
_SECRET_PARTS = (
    "api_key", "access_key", "secret_key", "private_key", "encryption_key", "signing_key", "ssh_key",
    "key_id", "session_token", "sas_token",
)  # fmt: skip
# Identifiers that merely end in "key" (`run_key`, `sort_key`) are not credentials: only a bare `key`
# (s3fs's access key id) or one of `_SECRET_PARTS` counts.
_URI_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<pw>[^/@\s]+)@")
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&][^=&#\s]*(?:token|secret|sig|password|passwd|key|credential)[^=&#\s]*)=[^&#\s]*",
    re.IGNORECASE,
)


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the key or the file."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` (a dataclass) from the YAML file at `path` (optional) and `key=value` overrides."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"load_config: {cls!r} is not a dataclass")
    data = read_yaml(path) if path is not None else {}
    for item in overrides:
        _apply_override(cls, data, item)
    return _build(cls, data, prefix="", base=None)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file (an empty file is an empty mapping)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as err:
        raise ConfigError(f"config file {path}: cannot read ({err.strerror or err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"config file {path}: invalid YAML: {problem}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top, got {type(data).__name__}")
    return data


def flatten(config: Any) -> dict[str, str]:
    """`{"a.b": "value"}` for every leaf of a config dataclass (MLflow params), credentials redacted.

    Values are written the way an override would be typed (`[112, 112]`, `true`, `null`), so a param
    can be pasted back onto the command line.
    """
    out: dict[str, str] = {}
    _flatten_into(out, "", _plain(config))
    return out


def to_yaml(config: Any) -> str:
    """The config as YAML that `load_config` reads back (credentials show as `***`, so those do not)."""
    return yaml.safe_dump(_plain(config), sort_keys=False, default_flow_style=None, allow_unicode=True)


def is_secret(name: str) -> bool:
    """Whether a field or key name says that its value is a credential."""
    lowered = name.lower()
    words = set(re.split(r"[^a-z0-9]+", lowered))
    return lowered == "key" or bool(words & _SECRET_WORDS) or any(part in lowered for part in _SECRET_PARTS)


def redact(text: str) -> str:
    """`text` with the password of any `scheme://user:password@` and secret-looking query values masked."""
    text = _URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['name']}={REDACTED}", text)


# --- building ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Override:
    """A command-line value: the text as typed and its YAML reading (str fields take the text)."""

    text: str
    value: Any


def _apply_override(cls: type, data: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=0.001")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        shown = REDACTED if is_secret(key) else text
        raise ConfigError(f"override {key}={shown}: the value is not valid YAML") from None

    parts = key.split(".")
    target: Any = cls
    default: Any = _MISSING  # what this path holds when neither the file nor the command line sets it
    node = data
    for depth, name in enumerate(parts):
        dotted = ".".join(parts[: depth + 1])
        parent = target
        target = _child_type(parent, name, dotted)
        default = _default_at(parent, default, name)
        if depth == len(parts) - 1:
            partial = isinstance(value, dict) and _dataclass_in(target) is not None
            if partial and isinstance(node.get(name), dict):
                node[name] = _merge(node[name], value)  # the file's other keys of that section stay
            else:
                node[name] = _Override(text.strip(), value)
            return
        child = node.get(name)
        if isinstance(child, _Override) and isinstance(child.value, dict):
            child = dict(child.value)
        if not isinstance(child, dict):
            # A dotted key sets one entry of a dict field; the other entries keep their default.
            keep = _dataclass_in(target) is None and isinstance(default, Mapping)
            child = dict(default) if keep else {}
        node[name] = child
        node = child


def _default_at(parent: Any, parent_default: Any, name: str) -> Any:
    """The default of `name` under a parent type whose own default is `parent_default`."""
    cls = _dataclass_in(parent)
    if cls is None:
        return parent_default.get(name, _MISSING) if isinstance(parent_default, Mapping) else _MISSING
    if dataclasses.is_dataclass(parent_default) and not isinstance(parent_default, type):
        return getattr(parent_default, name)
    return _field_default(_init_fields(cls)[name])


def _child_type(parent: Any, name: str, dotted: str) -> Any:
    """The type of `name` under `parent` (a dataclass or a dict type), or an unknown-key error."""
    cls = _dataclass_in(parent)
    if cls is not None:
        fields = _init_fields(cls)
        if name not in fields:
            raise _unknown_key(dotted, fields)
        return get_type_hints(cls)[name]
    parent = _strip_optional(parent)
    if get_origin(parent) in (dict, Mapping) or parent in (dict, Any):
        args = get_args(parent)
        return args[1] if len(args) == 2 else Any
    parent_key = dotted.rsplit(".", 1)[0]
    raise ConfigError(f"unknown config key '{dotted}': '{parent_key}' is {_type_name(parent)}, not a section")


def _unknown_key(dotted: str, fields: Mapping[str, Any]) -> ConfigError:
    parent, _, _ = dotted.rpartition(".")
    where = f"under '{parent}'" if parent else "at the top level"
    return ConfigError(f"unknown config key '{dotted}'; valid keys {where}: {', '.join(fields)}")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        both = isinstance(out.get(key), dict) and isinstance(value, dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def _build(cls: type[T], data: Mapping[str, Any], prefix: str, base: T | None) -> T:
    fields = _init_fields(cls)
    hints = get_type_hints(cls)
    for name in data:
        if not isinstance(name, str) or name not in fields:
            raise _unknown_key(_join(prefix, str(name)), fields)

    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = _join(prefix, name)
        tp = hints[name]
        nested = _dataclass_in(tp)
        mapping = value.value if isinstance(value, _Override) else value
        if nested is not None and isinstance(mapping, Mapping):
            default = getattr(base, name) if base is not None else _field_default(fields[name])
            start = default if dataclasses.is_dataclass(default) else None
            kwargs[name] = _build(type(start) if start is not None else nested, mapping, key, start)
        else:
            kwargs[name] = _convert(value, tp, key)

    if base is None:
        missing = [n for n, f in fields.items() if n not in kwargs and _field_default(f) is _MISSING]
        if missing:
            raise ConfigError(f"missing required config key '{_join(prefix, missing[0])}'")
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        where = f" '{prefix}'" if prefix else ""
        message = " ".join(str(err).split())
        raise ConfigError(f"invalid config{where}: {message}") from None


def _convert(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against (and where lossless, converted to) the annotation `tp`."""
    text = value.text if isinstance(value, _Override) else None
    plain = value.value if isinstance(value, _Override) else value
    origin, args = get_origin(tp), get_args(tp)

    if tp is Any:
        return plain
    if origin in (Union, types.UnionType):
        if plain is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and (_dataclass_in(options[0]) or get_args(options[0])):
            return _convert(value, options[0], key)  # errors inside name the inner key
        for option in options:
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
        raise _mismatch(key, tp, value)
    if origin is Literal:
        if plain in args and not (isinstance(plain, bool) and not any(isinstance(a, bool) for a in args)):
            return plain
        if text is not None and text in args:
            return text
        raise _mismatch(key, tp, value)
    if dataclasses.is_dataclass(tp):
        if isinstance(plain, tp):
            return plain
        if isinstance(plain, Mapping):
            return _build(tp, plain, key, None)
        raise _mismatch(key, tp, value)
    if tp is bool:
        if isinstance(plain, bool):
            return plain
        raise _mismatch(key, tp, value)
    if tp is int:
        if isinstance(plain, int) and not isinstance(plain, bool):
            return plain
        raise _mismatch(key, tp, value)
    if tp is float:
        if isinstance(plain, (int, float)) and not isinstance(plain, bool):
            return float(plain)
        if isinstance(plain, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(plain)
            except ValueError:
                pass
        raise _mismatch(key, tp, value)
    if tp is str:
        if text is not None:
            return text
        if isinstance(plain, str):
            return plain
        raise _mismatch(key, tp, value)
    if origin is tuple or tp is tuple:
        if not isinstance(plain, (list, tuple)):
            raise _mismatch(key, tp, value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(plain))
        if args:
            if len(plain) != len(args):
                raise _mismatch(key, tp, value, f" ({len(args)} items)")
            pairs = enumerate(zip(plain, args, strict=True))
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in pairs)
        return tuple(plain)
    if origin is list or tp is list:
        if not isinstance(plain, (list, tuple)):
            raise _mismatch(key, tp, value)
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(plain)] if args else list(plain)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(plain, Mapping):
            raise _mismatch(key, tp, value)
        key_type, value_type = args if len(args) == 2 else (Any, Any)
        out = {}
        for k, v in plain.items():
            # YAML reads a key like `1` as an int; a str-keyed dict takes it as text.
            number = isinstance(k, (int, float)) and not isinstance(k, bool)
            name = str(k) if key_type is str and number else k
            out[_convert(name, key_type, f"{key}.{k}")] = _convert(v, value_type, f"{key}.{k}")
        return out
    if isinstance(tp, type):
        if isinstance(plain, tp):
            return plain
        raise _mismatch(key, tp, value)
    raise TypeError(f"config key '{key}': unsupported annotation {tp!r}")


def _mismatch(key: str, tp: Any, value: Any, extra: str = "") -> ConfigError:
    if isinstance(value, _Override):
        shown = value.text
    elif isinstance(value, str):
        shown = repr(value)
    else:
        dumped = yaml.safe_dump(_plain(value), default_flow_style=True, width=10**6)
        shown = dumped.strip().removesuffix("...").strip()
    leaf = key.rsplit(".", 1)[-1].split("[", 1)[0]
    if is_secret(leaf):
        shown = REDACTED
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ConfigError(f"config key '{key}': expected {_type_name(tp)}{extra}, got {shown}")


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if tp is type(None):
        return "None"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if args:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} keys"
    return getattr(tp, "__name__", str(tp))


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass that `tp` (or `tp | None`) names, if any."""
    tp = _strip_optional(tp)
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not _MISSING:
        return field.default
    if field.default_factory is not _MISSING:
        return field.default_factory()
    return _MISSING


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# --- flattening --------------------------------------------------------------------------------------


def _plain(value: Any, secret: bool = False) -> Any:
    """Dataclasses → dicts, tuples → lists, credentials redacted: what YAML and MLflow params hold."""
    if secret:
        return None if value is None else REDACTED
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), is_secret(f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v, isinstance(k, str) and is_secret(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _flatten_into(out: dict[str, str], prefix: str, value: Any) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten_into(out, _join(prefix, str(k)), v)
    else:
        out[prefix] = _text(value)


def _text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}"
    return str(value)
