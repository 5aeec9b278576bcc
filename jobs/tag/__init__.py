"""`reelflow tag`: the nightly job. New videos → every head of every model → the analyst tables.

    reelflow tag --corpus s3://videos/ --model models:/reelflow-multitask@candidate \
        --tables s3://analytics/tables --date 2024-05-01

1. Resolve each model URI once to a registered version (an alias may move during the night).
2. Plan in Ray (`jobs.tag.plan`): list the corpus and read the committed keys in tasks, and write the videos
   to do as parts in scratch. A video is to do for each model version that has neither predictions nor a
   standing error row; a transient error is retried up to `--max-attempts` (`--retry-errors`: every error;
   `--full`: every video, replacing its earlier rows). The driver holds nothing per video but a chunk.
3. Take the tables' lease (waiting `--lease-wait` for a live run), roll forward a chunk an earlier run left
   half committed, and plan again if a run committed meanwhile.
4. Chunk by chunk (`--commit-every` videos, `--commit-minutes`, up to `--max-videos`), in Ray
   (`jobs.tag.chunk`): decode each video once in sliding windows at the models' input (CPU tasks), predict
   every head (in those tasks on CPU, an actor pool on GPUs), aggregate per video and write the six tables'
   files in the workers; the driver commits the chunk to all six tables exactly once (`flows.table_writer`).
   A crash loses at most the chunk under way.
5. Print a one-screen summary and record it, with a label-distribution plot, in an MLflow run.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from flows import runs, storage, table_writer, tables
from flows.inference import tagging_clip_config
from flows.predict import ShippedModel
from jobs.output import stage
from jobs.registered import DEFAULT_MLFLOW_DIR, RegisteredModel, load_models, resolve_versions
from jobs.runtime import console
from jobs.tag.chunk import ChunkOutcome, tag_chunk
from jobs.tag.config import EXPERIMENT, TagConfig, TagSummary
from jobs.tag.plan import ChunkPlan, NightPlan, plan_night
from jobs.tag.reporting import print_plan, print_summary, record_run

__all__ = ["EXPERIMENT", "SCRATCH", "TagConfig", "TagSummary", "main", "tagging_clip_config"]
SCRATCH = "_scratch"
PLANS = "plans"
PART_VIDEOS = 10_000  # planned videos per part file in scratch
FIRST_TIMED_CHUNK = 100  # with --commit-minutes, the first chunk's size, before any rate is known
CHUNK_ATTEMPTS = 3  # a chunk that Ray loses (a node died under it) runs again, this often in all
STALE_PLAN_S = 24 * 3600.0  # a plan folder this old belongs to a run that died


def main(config: TagConfig) -> TagSummary:
    """Run one night's tagging; returns its summary."""
    from jobs import tracking
    from jobs.runtime import init_ray

    started, started_at = time.perf_counter(), time.time()
    run_date = tables.parse_run_date(config.date)
    root = tables.root_uri(config.tables)
    tables.check_location(root, must_exist=False)
    tracking_uri = tracking.tracking_uri(config.tracking_uri, DEFAULT_MLFLOW_DIR)
    refs = resolve_versions(config.models, tracking_uri)
    job_run_id = config.job_run_id or f"tag-{run_date.isoformat()}-{uuid.uuid4().hex[:8]}"
    console.rule(f"[bold]tag[/] {run_date} · {job_run_id}")
    console.print("models: " + ", ".join(ref.uri for ref in refs))

    init_ray(config.ray_address)
    plans = storage.join_uri(root, SCRATCH, PLANS)
    models: list[RegisteredModel] = []
    try:
        plan = plan_night(config.corpus, refs, root, _plan_uri(plans, job_run_id), **_planning(config))
        if not plan.listed:
            raise FileNotFoundError(f"corpus {config.corpus}: no video files found")
        print_plan(plan, config.corpus)
        summary = TagSummary(job_run_id, run_date, listed=plan.listed, skipped=plan.skipped)
        if plan.todo or _has_pending_chunks(root):  # a quiet night takes no lease and commits nothing
            with table_writer.writing(
                root, job_run_id, run_date, models=[ref.uri for ref in refs],
                lease_ttl_s=config.lease_ttl_s, lease_wait_s=config.lease_wait_s,
            ) as writer:  # fmt: skip
                summary.rolled_forward = len(writer.recovered)
                if writer.recovered:
                    console.print(
                        f"finished committing {len(writer.recovered)} chunk(s) an earlier run left half done"
                    )
                clean_scratch(storage.join_uri(root, SCRATCH))
                if not config.full and _committed_since(plan, root):  # a run committed while this one waited
                    plan = plan_night(
                        config.corpus, refs, root, _plan_uri(plans, job_run_id), **_planning(config)
                    )
                summary.skipped = plan.skipped
                if plan.todo:
                    models = load_models(refs, tracking_uri, config.trust_pickle)
                    tag_in_chunks(plan, models, writer, config, summary, started_at)
            summary.commit_s = writer.commit_seconds
    finally:
        for folder in _own_plans(plans, job_run_id):
            storage.remove(folder, recursive=True)
    summary.seconds = time.perf_counter() - started
    summary.mlflow_run_id = record_run(config, summary, refs, models, tracking_uri)
    print_summary(summary, root)
    return summary


def _planning(config: TagConfig) -> dict[str, Any]:
    return {"full": config.full, "max_attempts": config.max_attempts, "retry_errors": config.retry_errors,
            "part_videos": PART_VIDEOS}  # fmt: skip


def _plan_uri(plans: str, job_run_id: str) -> str:
    """A fresh folder for one planning pass; its name starts with the time, so stale ones can be told."""
    return storage.join_uri(plans, f"{int(time.time())}-{job_run_id}-{uuid.uuid4().hex[:6]}")


def _own_plans(plans: str, job_run_id: str) -> list[str]:
    return [p for p in storage.list_children(plans) if f"-{job_run_id}-" in p.rsplit("/", 1)[-1]]


def clean_scratch(scratch: str, stale_s: float = STALE_PLAN_S) -> None:
    """Remove what runs that died left in scratch (under the lease, no other run writes chunks there); plans
    are written before the lease, so only those older than `stale_s` go."""
    for child in storage.list_children(scratch):
        if child.rsplit("/", 1)[-1] != PLANS:
            storage.remove(child, recursive=True)
    for plan in storage.list_children(storage.join_uri(scratch, PLANS)):
        created = plan.rsplit("/", 1)[-1].split("-", 1)[0]
        if created.isdigit() and time.time() - int(created) > stale_s:
            storage.remove(plan, recursive=True)


def _committed_since(plan: NightPlan, tables_uri: str) -> bool:
    if plan.snapshot is None:
        return storage.exists(tables_uri) and tables.read_snapshot(tables_uri).run_id is not None
    return tables.read_snapshot(tables_uri).versions != plan.snapshot.versions


def _has_pending_chunks(tables_uri: str) -> bool:
    log = runs.read_log(tables_uri) if storage.exists(tables_uri) else None
    return log is not None and bool(runs.pending_chunks(log))


# --- decode, predict, commit ----------------------------------------------------------------------------


def tag_in_chunks(
    plan: NightPlan,
    models: Sequence[RegisteredModel],
    writer: table_writer.TableWriter,
    config: TagConfig,
    summary: TagSummary,
    job_started_at: float,
) -> None:
    """Decode, predict and commit the planned videos chunk by chunk, adding what each did to `summary`
    (`job_started_at`: the job's wall-clock start, for the time to its first predictions)."""
    clip_config = tagging_clip_config([m.spec for m in models], config.stride, config.decoder)
    # Put in the object store once a night: every chunk's workers then load the same object, and a decode
    # worker that predicted for one chunk keeps its models for the next (`flows.predict.process_predictor`).
    models = [replace(m, module=ShippedModel.put(m.module)) for m in models]
    scratch = storage.join_uri(writer.tables_uri, SCRATCH, writer.job_run_id)
    cursor = plan.cursor(config.max_videos)
    size = config.commit_every if config.commit_minutes is None else FIRST_TIMED_CHUNK
    size = min(size, config.commit_every)
    first_at: float | None = None
    with stage("tag", total=cursor.left, remote=True) as shown:
        for index in itertools.count():
            parts = cursor.take(size)
            if not parts:
                break
            chunk_started = time.perf_counter()
            chunk = ChunkPlan.read(parts, models)
            console.print(f"chunk {index + 1}: tagging {len(chunk.videos)} videos")
            errors_uri = storage.join_uri(scratch, f"chunk-{index + 1}", "errors")
            outcome, inference_started = _tag_chunk_retrying(
                chunk, models, clip_config, config.predict, config.aggregate, tables_uri=writer.tables_uri,
                job_run_id=writer.job_run_id, run_date=writer.run_date, errors_uri=errors_uri,
                partial_uri=storage.join_uri(scratch, f"chunk-{index + 1}", "partial"),
                progress=shown.counter,
            )  # fmt: skip
            committed = writer.commit_chunk(outcome.files, chunk.removals(models, full=config.full) or None)
            storage.remove(storage.join_uri(scratch, f"chunk-{index + 1}"), recursive=True)
            if outcome.times is not None and first_at is None:  # start-up: until the first predictions
                first_at = outcome.times.first_at
                summary.startup_s = first_at - inference_started
                summary.first_prediction_s = first_at - job_started_at
                steady_s = outcome.times.last_at - first_at
                summary.steady_clips_per_s = (
                    (outcome.clips - outcome.times.first_clips) / steady_s if steady_s else 0
                )
            summary.decoded += len(chunk.videos)
            summary.tagged += outcome.tagged
            summary.failed += outcome.failed
            summary.retried += len(chunk.retried_videos)
            summary.clips += outcome.clips
            summary.chunks += 1
            for name, n in (committed.rows if committed else {}).items():
                summary.rows[name] = summary.rows.get(name, 0) + n
            for panel, counts in outcome.labels.items():
                summary.label_counts.setdefault(panel, Counter()).update(counts)
            if index or cursor.left:
                console.print(f"chunk {index + 1} committed: {len(chunk.videos)} videos, {cursor.left} left")
            if config.commit_minutes is not None:  # the next chunk should take about commit_minutes
                rate = len(chunk.videos) / max(time.perf_counter() - chunk_started, 1e-3)
                size = max(1, min(config.commit_every, int(rate * config.commit_minutes * 60)))
    storage.remove(scratch, recursive=True)


def _tag_chunk_retrying(
    *args: Any, errors_uri: str, partial_uri: str, **kwargs: Any
) -> tuple[ChunkOutcome, float]:
    """`tag_chunk`, run again from the start when Ray loses part of it (a node that died takes the shuffle's
    state with it). The files of a lost attempt were never committed; `tables vacuum` deletes them."""
    from ray.exceptions import RayError, RayTaskError

    for attempt in range(1, CHUNK_ATTEMPTS + 1):
        try:
            return tag_chunk(*args, errors_uri=errors_uri, partial_uri=partial_uri, **kwargs)
        except RayError as err:
            if (isinstance(err, RayTaskError) and not _lost_to_the_cluster(err)) or attempt == CHUNK_ATTEMPTS:
                raise
            console.print(
                f"[yellow]the chunk failed on the cluster ({type(err).__name__}); starting it again"
            )
            for uri in (errors_uri, partial_uri):
                storage.remove(uri, recursive=True)
    raise AssertionError("unreachable")


def _lost_to_the_cluster(err: Exception) -> bool:
    """Whether a task failed because the cluster lost a worker, node or object, not in the task's code."""
    from ray.exceptions import (
        ActorDiedError,
        NodeDiedError,
        ObjectLostError,
        OwnerDiedError,
        WorkerCrashedError,
    )

    lost = (ActorDiedError, NodeDiedError, ObjectLostError, OwnerDiedError, WorkerCrashedError)
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, lost) or isinstance(getattr(cause, "cause", None), lost):
            return True
        cause = cause.__cause__
    return False
