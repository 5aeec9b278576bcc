"""Paths and readers shared by the infra tests (test_infra, test_k8s, test_nightly)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
WRAPPER = INFRA / "schedule" / "nightly-tag.sh"
SECRET_ENV = re.compile(r"(SECRET|TOKEN|PASSWORD|ACCESS_KEY|SESSION_KEY)", re.IGNORECASE)


def k8s_documents() -> dict[str, list[dict]]:
    """The documents of every manifest under infra/k8s, by path relative to it."""
    return {p.relative_to(K8S).as_posix(): [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted(K8S.rglob("*.yaml"))}  # fmt: skip


def by_kind(kind: str) -> list[dict]:
    return [d for docs in k8s_documents().values() for d in docs if d["kind"] == kind]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]
