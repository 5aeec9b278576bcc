"""Process-level set-up shared by the jobs: Ray start-up (and the console, from `jobs.output`)."""

from __future__ import annotations

import os
from typing import Any

from jobs.output import adopt_loggers, console, start_progress

__all__ = ["choose_local_auth", "console", "init_ray"]


def init_ray(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Connect to the Ray cluster named by `address` / RAY_ADDRESS, or start a local one.

    The job's runtime environment is taken as it is: S3 and MLflow settings reach the workers from the
    cluster's own environment (an IAM role, the pods' env) or from the job's runtime_env (`ray job submit
    --runtime-env-json`), never from a copy made here. Ray shows a runtime_env on the dashboard and in job
    info, and refuses to merge one that repeats the job's keys. A local Ray started here runs its workers
    in this process's environment.
    """
    import ray
    import ray.data

    _inline_metadata_fetch()
    _quiet_ray_data()
    if ray.is_initialized():
        return ray
    # Ray's records go to the handlers `jobs.output.setup` installed: WARNING on the console (INFO with
    # --verbose), INFO in the run's log file. The workers' output stays in Ray's session logs.
    adopt_loggers("ray", "ray.data")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    start_progress()
    return ray


def choose_local_auth() -> None:
    """Call before Ray is imported (Ray reads the setting once): a local Ray that this process starts keeps
    Ray's default, token authentication, chosen here explicitly, so Ray prints no notice about choosing it.
    A cluster named by RAY_ADDRESS keeps its own setting."""
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def _quiet_ray_data() -> None:
    """Turn off Ray Data's progress bars: the jobs show their own, one per stage (`jobs.output.stage`), with
    videos, clips and ETA rather than blocks per operator. Ray Data warns once that its bars are off; that is
    this choice, so its notice is marked as given."""
    import ray.data
    from ray.util.debug import log_once

    ray.data.DataContext.get_current().enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")


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
