"""Registered models for inference: registry URIs resolved once to pinned versions, then loaded.

Shared by the jobs that run registered models (tag, evaluate, the tag benchmark); the data plane gets the
loaded modules and their specs, never a registry URI.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flows.inference import Outputs
    from jobs.tracking import ModelRef
    from models import ModelSpec

# Where `reelflow train` registers when no tracking URI is given: tag and evaluate look there too.
DEFAULT_MLFLOW_DIR = "reelflow-mlflow"


@dataclass(frozen=True)
class RegisteredModel:
    """A resolved registered model version, the spec it preprocesses with and the loaded module."""

    uri: str  # pinned: models:/NAME/VERSION
    name: str
    version: str
    run_id: str | None
    spec: ModelSpec | Outputs  # Outputs where only the heads travel (the tag job's writers)
    module: Any = field(repr=False, compare=False)


def resolve_versions(uris: Sequence[str], tracking_uri: str) -> list[ModelRef]:
    """Each URI resolved once to a registered version, nothing downloaded."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from jobs import tracking
    from jobs.config import redact

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    refs = []
    for uri in uris:
        name, version, alias = tracking.parse_model_uri(uri)
        try:
            found = (
                client.get_model_version_by_alias(name, alias)
                if alias
                else client.get_model_version(name, version)
            )
        except MlflowException:
            where = redact(tracking_uri)
            raise ValueError(f"model {uri}: not in the MLflow model registry at {where}") from None
        refs.append(tracking.ModelRef(name=name, version=int(found.version), run_id=found.run_id or None))
    return refs


def load_models(
    refs: Sequence[ModelRef], tracking_uri: str, trust_pickle: bool = False
) -> list[RegisteredModel]:
    """The pinned versions, each loaded once here, in the driver (for its spec, and to ship to the actors).

    Versions in MLflow's pickle format (older reelflow) load only with `trust_pickle`."""
    from jobs import tracking

    out = []
    for ref in refs:
        module = tracking.load_model(ref.uri, tracking_uri=tracking_uri, trust_pickle=trust_pickle)[0]
        spec = getattr(module, "spec", None)
        if spec is None:
            raise ValueError(f"model {ref.uri}: the loaded module has no spec")
        if "features" in spec.modalities:
            raise ValueError(
                f"model {ref.uri}: {spec.name} reads clip features, not clips; tag needs a clip model"
            )
        out.append(RegisteredModel(ref.uri, ref.name, str(ref.version), ref.run_id, spec, module))
    return out


def resolve_models(
    uris: Sequence[str], tracking_uri: str, trust_pickle: bool = False
) -> list[RegisteredModel]:
    """Each URI resolved to one registered version, with its spec."""
    return load_models(resolve_versions(uris, tracking_uri), tracking_uri, trust_pickle)
