"""Process-level set-up shared by the jobs: Ray start-up and the console."""

from __future__ import annotations

import logging
import os
from typing import Any

from rich.console import Console

console = Console(stderr=True)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Connect to the Ray cluster named by `address` / RAY_ADDRESS, or start a local one.

    Workers inherit the object-store settings (AWS_*), so a local run against S3 or MinIO needs no
    extra runtime_env; on a cluster those come from the cluster's own environment.
    """
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_") or k.startswith("MLFLOW_")}
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    logging.getLogger("ray").setLevel(logging.WARNING)
    return ray
