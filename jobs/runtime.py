"""Process-level set-up shared by the jobs: Ray start-up and the console."""

from __future__ import annotations

import logging
import os
from typing import Any

from rich.console import Console

console = Console(stderr=True)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Connect to the Ray cluster named by `address` / RAY_ADDRESS, or start a local one.

    The job's runtime environment is taken as it is: S3 and MLflow settings reach the workers from the
    cluster's own environment (an IAM role, the pods' env) or from the job's runtime_env (`ray job submit
    --runtime-env-json`), never from a copy made here. Ray shows a runtime_env on the dashboard and in job
    info, and refuses to merge one that repeats the job's keys. A local Ray started here runs its workers
    in this process's environment.
    """
    import ray

    _inline_metadata_fetch()
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    logging.getLogger("ray").setLevel(logging.WARNING)
    return ray


# Ray Data's executor takes a finished task's outputs on a background thread by default and frees its
# resources only once that thread has passed them on: each decode task then left its core idle 0.15-0.25 s
# before the next one started, a seventh of the time at 360p (docs/decisions.md, "The clips command at the
# decode limit").
_METADATA_FETCH_ENV = "RAY_DATA_METADATA_PREFETCH_ON_THREAD"


def _inline_metadata_fetch() -> None:
    """Have this driver's Ray Data executor take task outputs in its scheduling loop, unless the user chose
    otherwise."""
    os.environ.setdefault(_METADATA_FETCH_ENV, "0")
    inline = os.environ[_METADATA_FETCH_ENV].strip().lower() in ("0", "false")
    try:  # read once at import: an executor module imported before this call keeps its setting otherwise
        from ray.data._internal.execution import metadata_fetcher
    except ImportError:
        return
    if hasattr(metadata_fetcher, "_PREFETCH_ON_THREAD"):
        metadata_fetcher._PREFETCH_ON_THREAD = not inline
