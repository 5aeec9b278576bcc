"""Typed configs: YAML + `a.b=value` overrides, one-line errors naming the key, no credentials in params."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from jobs.config import ConfigError, flatten, is_secret, load_config, redact, to_yaml


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    schedule: Literal["cosine", "step", "none"] = "cosine"
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim: lr={self.lr} must be > 0")


@dataclass(frozen=True)
class Store:
    uri: str = "file:///tmp/store"
    secret_access_key: str | None = None
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    corpus: str
    run_name: str = "demo"
    epochs: int = 2
    use_gpu: bool = False
    tasks: tuple[str, ...] = ("category",)
    loss_weights: dict[str, float] = field(default_factory=lambda: {"category": 1.0})
    optim: Optim = Optim(lr=0.5)  # not the class default: a partial `optim:` section must keep it
    store: Store = Store()
    max_steps: int | None = None
    tracking_uri: str | None = None


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


def error(cls: type, path: str | None, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(cls, path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_file_then_overrides(tmp_path: Path) -> None:
    text = "corpus: s3://bucket/corpus\nepochs: 5\noptim:\n  schedule: step\n"
    path = write(tmp_path, text + "loss_weights: {category: 1, action: 0.5}\n")
    cfg = load_config(Job, path, ["epochs=7", "optim.lr=1e-4", "tasks=[category, action]", "use_gpu=true"])
    assert cfg.corpus == "s3://bucket/corpus"
    assert cfg.epochs == 7  # the command line wins over the file
    assert cfg.optim == Optim(lr=1e-4, schedule="step")  # YAML reads `1e-4` as text; a float field takes it
    assert cfg.tasks == ("category", "action")
    assert cfg.use_gpu is True
    assert cfg.loss_weights == {"category": 1.0, "action": 0.5}
    assert isinstance(cfg.loss_weights["category"], float)


def test_partial_sections_keep_the_field_default(tmp_path: Path) -> None:
    cfg = load_config(Job, write(tmp_path, "corpus: c\noptim: {schedule: none}\n"), [])
    assert cfg.optim == Optim(lr=0.5, schedule="none")
    cfg = load_config(Job, None, ["corpus=c", "optim={betas: [0.8, 0.9]}"])
    assert cfg.optim == Optim(lr=0.5, betas=(0.8, 0.9))
    cfg = load_config(Job, write(tmp_path, "corpus: c\noptim: {schedule: step}\n"), ["optim={lr: 0.1}"])
    assert cfg.optim == Optim(lr=0.1, schedule="step")  # merged with the file's section, not replacing it


def test_override_values_are_yaml_but_str_fields_take_the_text() -> None:
    cfg = load_config(Job, None, ["corpus=2024", "run_name=1e3", "max_steps=null", "loss_weights.action=2"])
    assert cfg.corpus == "2024" and cfg.run_name == "1e3"
    assert cfg.max_steps is None
    assert cfg.loss_weights == {"category": 1.0, "action": 2.0}
    assert load_config(Job, None, ["corpus=c", "max_steps=100"]).max_steps == 100
    assert load_config(Job, None, ["corpus=a=b"]).corpus == "a=b"  # split at the first '='


def test_unknown_keys_name_the_full_key_and_the_valid_ones(tmp_path: Path) -> None:
    message = error(Job, write(tmp_path, "corpus: c\noptim:\n  lrr: 0.1\n"), [])
    assert message == "unknown config key 'optim.lrr'; valid keys under 'optim': lr, schedule, betas"
    message = error(Job, None, ["corpus=c", "epoch=3"])
    assert message.startswith("unknown config key 'epoch'; valid keys at the top level: corpus, run_name, ")
    assert "unknown config key 'optim.betas.x'" in error(Job, None, ["corpus=c", "optim.betas.x=1"])
    assert "unknown config key 'store.sekret'" in error(Job, None, ["corpus=c", "store.sekret=1"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("epochs=abc", "config key 'epochs': expected int, got abc"),
        ("epochs=2.5", "config key 'epochs': expected int, got 2.5"),
        ("use_gpu=1", "config key 'use_gpu': expected bool, got 1"),
        ("optim.betas=[0.9]", "config key 'optim.betas': expected tuple[float, float] (2 items), got [0.9]"),
        ("optim.betas=[0.9, x]", "config key 'optim.betas[1]': expected float, got 'x'"),
        (
            "optim.schedule=linear",
            "config key 'optim.schedule': expected one of 'cosine', 'step', 'none', got linear",
        ),
        ("loss_weights={a: high}", "config key 'loss_weights.a': expected float, got 'high'"),
        ("optim=3", "config key 'optim': expected a mapping of Optim keys, got 3"),
        ("max_steps=ten", "config key 'max_steps': expected int | None, got ten"),
    ],
)
def test_wrong_types_name_key_type_and_value(override: str, expected: str) -> None:
    assert error(Job, None, ["corpus=c", override]) == expected


def test_wrong_types_in_the_file(tmp_path: Path) -> None:
    message = error(Job, write(tmp_path, "corpus: c\ntasks: category\n"), [])
    assert message == "config key 'tasks': expected tuple[str, ...], got 'category'"


def test_post_init_checks_still_apply() -> None:
    message = error(Job, None, ["corpus=c", "optim.lr=-1"])
    assert message == "invalid config 'optim': optim: lr=-1.0 must be > 0"


def test_missing_required_key() -> None:
    assert error(Job, None, ["epochs=3"]) == "missing required config key 'corpus'"


def test_bad_files_and_overrides(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert error(Job, str(missing), []) == f"config file {missing}: not found"
    bad = write(tmp_path, "corpus: c\noptim: [1,\n")
    assert error(Job, bad, []).startswith(f"config file {bad}: invalid YAML: ")
    assert "line" in error(Job, bad, [])
    listing = write(tmp_path, "- corpus\n")
    assert error(Job, listing, []) == f"config file {listing}: expected a mapping at the top, got list"
    assert error(Job, None, ["epochs"]).startswith("override 'epochs': expected KEY=VALUE")
    assert error(Job, None, ["corpus=c", "tasks=[a,"]) == "override tasks=[a,: the value is not valid YAML"
    assert load_config(Job, write(tmp_path, ""), ["corpus=c"]).corpus == "c"  # an empty file is no keys


SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCY"


def test_flatten_gives_dotted_params_without_credentials() -> None:
    cfg = load_config(
        Job,
        None,
        [
            "corpus=s3://bucket/c",
            f"store.secret_access_key={SECRET}",
            f"store.options={{token: {SECRET}, region: eu-west-1}}",
            f"tracking_uri=https://alice:{SECRET}@mlflow.example.com:5000",
        ],
    )
    assert cfg.store.secret_access_key == SECRET  # the job itself still gets it
    params = flatten(cfg)
    assert params["corpus"] == "s3://bucket/c"
    assert params["optim.betas"] == "[0.9, 0.999]"
    assert params["use_gpu"] == "false" and params["max_steps"] == "null"
    assert params["loss_weights.category"] == "1.0"
    assert params["store.secret_access_key"] == "***"
    assert params["store.options.token"] == "***" and params["store.options.region"] == "eu-west-1"
    assert params["tracking_uri"] == "https://alice:***@mlflow.example.com:5000"
    assert not any(SECRET in value for value in params.values())
    assert SECRET not in to_yaml(cfg)


def test_a_secret_value_never_appears_in_errors(tmp_path: Path) -> None:
    message = error(Job, write(tmp_path, f"corpus: c\nstore: {{secret_access_key: [{SECRET}]}}\n"), [])
    assert message == "config key 'store.secret_access_key': expected str | None, got ***"
    message = error(Job, None, ["corpus=c", f"store.options.password=[{SECRET}"])
    assert SECRET not in message and "***" in message


def test_to_yaml_reads_back(tmp_path: Path) -> None:
    cfg = load_config(Job, None, ["corpus=c", "run_name=2024", "tasks=[a, b]", "optim.betas=[0.5, 0.6]"])
    assert load_config(Job, write(tmp_path, to_yaml(cfg)), []) == cfg


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("password", True), ("aws_secret_access_key", True), ("aws_access_key_id", True), ("api_key", True),
        ("hf_token", True), ("key", True), ("credentials", True), ("db_passwd", True),
        ("run_key", False), ("sort_key", False), ("tokenizer", False), ("max_tokens", False),
        ("author", False), ("corpus", False),
    ],
)  # fmt: skip
def test_is_secret(name: str, secret: bool) -> None:
    assert is_secret(name) is secret


def test_redact_uris() -> None:
    assert redact("postgresql://app:hunter2@db:5432/mlflow") == "postgresql://app:***@db:5432/mlflow"
    assert redact("https://host/x?X-Amz-Signature=abc&part=1") == "https://host/x?X-Amz-Signature=***&part=1"
    assert redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
