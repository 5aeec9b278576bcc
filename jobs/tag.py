"""`reelflow tag`: the nightly job. New videos → every head of every model → the analyst tables.

    reelflow tag --corpus s3://videos/ --model models:/reelflow-multitask@candidate \
        --tables s3://analytics/tables --date 2024-05-01

1. Resolve each model URI once to a registered version (an alias may move during the night).
2. List the corpus and plan: a video is to do for each model version that has neither tagged nor failed on
   it in the committed tables (`--full`: every video, replacing its earlier rows).
3. Take the tables' lease (waiting `--lease-wait` for a live run), roll forward a chunk an earlier run left
   half committed, and plan again: whatever a run before this one committed is done.
4. In chunks of `--commit-every` videos: decode each video once in sliding windows at the models' input
   (CPU tasks), predict every head in an actor pool, aggregate per video, and commit the chunk to all six
   tables exactly once (`flows.table_writer`). A crash loses at most the chunk under way.
5. Print a one-screen summary and record it, with a label-distribution plot, in an MLflow run.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from flows import runs, storage, table_writer, tables
from flows.aggregate import AggregateConfig, VideoSummary, table_rows
from flows.clips import VideoRow, list_video_rows
from flows.inference import INFO_COLUMNS, Inference, run_inference, summaries, tagging_clip_config
from flows.lease import DEFAULT_TTL_S
from flows.predict import PredictConfig
from jobs.registered import DEFAULT_MLFLOW_DIR, RegisteredModel, load_models, resolve_versions
from jobs.runtime import console

if TYPE_CHECKING:
    from jobs.tracking import ModelRef

EXPERIMENT = "reelflow-tag"
SCRATCH = "_scratch"


@dataclass(frozen=True)
class TagConfig:
    """One night's tagging run.

    `stride` is in output frames between window starts (default: the clip length, windows side by side
    covering the whole video). `tracking_uri` defaults to MLFLOW_TRACKING_URI, else a SQLite store in
    ./reelflow-mlflow (where `reelflow train` registers by default). `commit_every` videos make a chunk;
    `lease_wait_s` is how long to wait for another run's lease (default: its TTL and a quarter).
    """

    corpus: str
    models: tuple[str, ...]
    tables: str
    date: str
    full: bool = False
    tracking_uri: str | None = None
    experiment: str = EXPERIMENT
    job_run_id: str | None = None
    stride: int | None = None
    decoder: str = "auto"
    predict: PredictConfig = field(default_factory=PredictConfig)
    aggregate: AggregateConfig = field(default_factory=AggregateConfig)
    ray_address: str | None = None
    commit_every: int = 10_000
    lease_ttl_s: float = DEFAULT_TTL_S
    lease_wait_s: float | None = None

    def __post_init__(self) -> None:
        from jobs.tracking import parse_model_uri

        object.__setattr__(self, "models", tuple(self.models))
        if not self.models:
            raise ValueError("tag: give at least one --model models:/NAME/VERSION or models:/NAME@ALIAS")
        for uri in self.models:
            parse_model_uri(uri)
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"tag: a model is given twice in {list(self.models)}")
        tables.parse_run_date(self.date)
        if not self.corpus:
            raise ValueError("tag: --corpus is required")
        if self.job_run_id is not None:
            table_writer.check_job_run_id(self.job_run_id)
        checks = [
            ("stride", self.stride is None or self.stride >= 1, "must be >= 1"),
            ("commit_every", self.commit_every >= 1, "must be >= 1"),
            ("lease_ttl_s", self.lease_ttl_s > 0, "must be > 0"),
            ("lease_wait_s", self.lease_wait_s is None or self.lease_wait_s >= 0, "must be >= 0"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"tag: {name}={getattr(self, name)} {rule}")


@dataclass
class TagSummary:
    """What a run did; the same figures go to MLflow."""

    job_run_id: str
    run_date: dt.date
    listed: int
    tagged: int = 0
    skipped: int = 0
    failed: int = 0
    clips: int = 0
    seconds: float = 0.0
    decoded: list[str] = field(default_factory=list)  # video_ids sent to the decoder
    rows: dict[str, int] = field(default_factory=dict)
    chunks: int = 0
    rolled_forward: int = 0  # chunks of earlier runs this run finished committing
    commit_s: float = 0.0  # in the commit protocol: fencing, logging, committing
    mlflow_run_id: str | None = None
    startup_s: float = 0.0  # from the start of inference to its first predictions
    steady_clips_per_s: float = 0.0  # after that
    label_counts: dict[str, Counter[str]] = field(default_factory=dict)  # plot panel → top-1 label → videos

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else 0.0


def main(config: TagConfig) -> TagSummary:
    """Run one night's tagging; returns its summary."""
    from jobs import tracking

    started = time.perf_counter()
    run_date = tables.parse_run_date(config.date)
    root = tables.root_uri(config.tables)
    tables.check_location(root, must_exist=False)
    tracking_uri = tracking.tracking_uri(config.tracking_uri, DEFAULT_MLFLOW_DIR)
    refs = resolve_versions(config.models, tracking_uri)
    job_run_id = config.job_run_id or f"tag-{run_date.isoformat()}-{uuid.uuid4().hex[:8]}"
    console.rule(f"[bold]tag[/] {run_date} · {job_run_id}")
    console.print("models: " + ", ".join(ref.uri for ref in refs))

    videos = list_video_rows(config.corpus)
    if not videos:
        raise FileNotFoundError(f"corpus {config.corpus}: no video files found")
    plan = plan_night(videos, refs, root, config.full)
    console.print(
        f"{len(videos)} videos under {config.corpus}: {len(plan.todo)} to tag, {plan.skipped} already tagged"
    )
    summary = TagSummary(job_run_id, run_date, listed=len(videos), skipped=plan.skipped)
    models: list[RegisteredModel] = []
    if plan.todo or _has_pending_chunks(root):  # a quiet night takes no lease, starts no Ray, commits nothing
        with table_writer.writing(
            root, job_run_id, run_date, models=[ref.uri for ref in refs],
            lease_ttl_s=config.lease_ttl_s, lease_wait_s=config.lease_wait_s,
        ) as writer:  # fmt: skip
            summary.rolled_forward = len(writer.recovered)
            if writer.recovered:
                console.print(
                    f"finished committing {len(writer.recovered)} chunk(s) an earlier run left half done"
                )
            plan = plan_night(videos, refs, root, config.full)  # what runs before this one committed is done
            summary.skipped = plan.skipped
            if plan.todo:
                models = load_models(refs, tracking_uri)
                tag_in_chunks(plan, models, writer, config, summary)
        summary.commit_s = writer.commit_seconds
    summary.seconds = time.perf_counter() - started
    summary.mlflow_run_id = record_run(config, summary, refs, models, tracking_uri)
    print_summary(summary, root)
    return summary


# --- planning -------------------------------------------------------------------------------------------


@dataclass
class NightPlan:
    """The videos a night decodes and, per video, which of the run's models still need its rows."""

    todo: list[VideoRow]
    models_todo: dict[str, tuple[int, ...]]  # video_id → indexes into the run's models
    new_videos: set[str]  # video ids that have no `videos` row yet
    skipped: int


def plan_night(videos: Sequence[VideoRow], refs: Sequence[Any], tables_uri: str, full: bool) -> NightPlan:
    """What is left to do for the model versions `refs` (anything with `.name` and `.version`), per the
    committed tables: a (video, model version) with prediction rows or an error row is done."""
    everyone = tuple(range(len(refs)))
    if full or not storage.exists(tables_uri):
        return NightPlan(
            list(videos), {v.video_id: everyone for v in videos}, {v.video_id for v in videos}, 0
        )
    snapshot = tables.read_snapshot(tables_uri)
    done = tables.tagged_keys(tables_uri, snapshot)
    done |= tables.committed_keys(tables_uri, "errors", tables.PREDICTION_KEY, snapshot)
    known = {vid for (vid,) in tables.committed_keys(tables_uri, "videos", tables.VIDEO_KEY, snapshot)}
    todo, models_todo = [], {}
    for video in videos:
        left = tuple(i for i, m in enumerate(refs) if (video.video_id, m.name, str(m.version)) not in done)
        if left:
            todo.append(video)
            models_todo[video.video_id] = left
    return NightPlan(todo, models_todo, {v.video_id for v in todo} - known, len(videos) - len(todo))


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
) -> None:
    """Decode, predict and commit `plan.todo` chunk by chunk, adding what each did to `summary`."""
    from jobs.runtime import init_ray

    clip_config = tagging_clip_config([m.spec for m in models], config.stride, config.decoder)
    init_ray(config.ray_address)
    scratch = storage.join_uri(writer.tables_uri, SCRATCH)
    storage.remove(scratch, recursive=True)  # left by runs that died: only a lease holder writes there
    todo = plan.todo
    count = -(-len(todo) // config.commit_every)
    for index in range(count):
        chunk = todo[index * config.commit_every : (index + 1) * config.commit_every]
        errors_uri = storage.join_uri(scratch, writer.job_run_id, f"chunk-{index + 1}")
        result = run_inference(chunk, models, clip_config, config.predict, errors_uri, progress=console.print)
        per_video = summaries(result, models, config.aggregate)
        rows = chunk_rows(chunk, plan, models, result, per_video, config.aggregate, writer.run_date)
        committed = writer.write_chunk(rows, replace=config.full)
        storage.remove(errors_uri, recursive=True)
        if index == 0:
            summary.startup_s, summary.steady_clips_per_s = result.first_batch_s, result.steady_clips_per_s
        summary.decoded += [v.video_id for v in chunk]
        summary.tagged += len(chunk) - len(result.failed)
        summary.failed += len(result.failed)
        summary.clips += result.clips
        summary.chunks += 1
        for name, n in (committed.rows if committed else {}).items():
            summary.rows[name] = summary.rows.get(name, 0) + n
        count_top_labels(per_video, models, summary.label_counts)
        if count > 1:
            console.print(f"chunk {index + 1}/{count} committed: {len(chunk)} videos")
    storage.remove(scratch, recursive=True)


def chunk_rows(
    videos: Sequence[VideoRow],
    plan: NightPlan,
    models: Sequence[RegisteredModel],
    result: Inference,
    per_video: dict[str, list[VideoSummary]],
    config: AggregateConfig,
    run_date: dt.date,
) -> dict[str, pa.Table]:
    """Rows of every table for a chunk of tagged videos: a `videos` row for a video seen for the first
    time, and for each model still to do on a video its prediction rows, or an error row when it failed."""
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in tables.TABLES}
    errors = {}
    for e in result.errors:
        errors.setdefault(e["video_id"], e)
    now = dt.datetime.now(dt.timezone.utc)
    for video in videos:
        vid = video.video_id
        error = errors.get(vid)
        has_clips = vid in per_video
        todo = [models[i] for i in plan.models_todo.get(vid, ())]
        todo_uris = {m.uri for m in todo}
        if vid in plan.new_videos:
            status = "ok" if has_clips and not error else "partial" if has_clips else "failed"
            info = result.info.get(vid, {})
            out["videos"].append(
                {"video_id": vid, "uri": video.uri, "size_bytes": video.size_bytes, "etag": video.etag,
                 **{c: info.get(c) for c in INFO_COLUMNS}, "status": status, "run_date": run_date}
            )  # fmt: skip
        if error is not None:
            for m in todo:  # one row per model version, so the next night skips what failed for it
                out["errors"].append(
                    {"video_id": vid, "uri": video.uri, "stage": error["stage"],
                     "error_type": error["error_type"], "message": error["message"],
                     "model_name": m.name, "model_version": m.version, "attempts": 1,
                     "first_seen": now, "last_seen": now, "run_date": run_date}
                )  # fmt: skip
        if not has_clips:
            continue
        for m, summary in zip(models, per_video[vid], strict=True):
            if m.uri not in todo_uris:
                continue
            common = {"video_id": vid, "uri": video.uri, "model_name": m.name, "model_version": m.version,
                      "mlflow_run_id": m.run_id, "run_date": run_date}  # fmt: skip
            for name, rows in table_rows(summary, m.spec.heads, config.top_k).items():
                out[name] += [{**common, **row} for row in rows]
    return {name: pa.Table.from_pylist(rows, schema=_row_schema(name)) for name, rows in out.items() if rows}


def _row_schema(name: str) -> pa.Schema:
    """The table's schema without job_run_id, which the writer fills in."""
    full = tables.schema(name)
    return full.remove(full.get_field_index("job_run_id"))


# --- reporting ------------------------------------------------------------------------------------------


def count_top_labels(
    per_video: dict[str, list[VideoSummary]],
    models: Sequence[RegisteredModel],
    counts: dict[str, Counter[str]],
) -> None:
    """Add each video's top-1 label, per classification head of each model, to `counts` (panel → label)."""
    for vid_summaries in per_video.values():
        for m, s in zip(models, vid_summaries, strict=True):
            for head, probs in s.classes.items():
                panel = counts.setdefault(f"{m.name} v{m.version} · {head}", Counter())
                panel[m.spec.heads[head][int(np.argmax(probs))]] += 1


def record_run(
    config: TagConfig, summary: TagSummary, refs: Sequence[ModelRef], models: Sequence[RegisteredModel],
    tracking_uri: str,
) -> str:  # fmt: skip
    """An MLflow run with the summary's figures and a plot of the top-1 labels tagged this run."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from jobs import tracking

    run_id = tracking.get_or_create_run(
        config.experiment,
        f"tag:{summary.job_run_id}",
        summary.job_run_id,
        tracking_uri=tracking_uri,
        tags={"reelflow.job": "tag", "reelflow.run_date": summary.run_date.isoformat()},
    )
    client = MlflowClient(tracking_uri)
    params = {"corpus": storage.canonical_uri(config.corpus), "tables": tables.root_uri(config.tables),
              "models": ",".join(ref.uri for ref in refs), "run_date": summary.run_date.isoformat(),
              "full": str(config.full), "batch_size": str(config.predict.batch_size),
              "commit_every": str(config.commit_every)}  # fmt: skip
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    metrics = {"videos_listed": summary.listed, "videos_tagged": summary.tagged,
               "videos_skipped": summary.skipped, "videos_failed": summary.failed, "clips": summary.clips,
               "clips_per_s": summary.clips_per_s, "seconds": summary.seconds, "chunks": summary.chunks,
               "commit_s": summary.commit_s, "startup_s": summary.startup_s,
               "steady_clips_per_s": summary.steady_clips_per_s,
               **{f"rows_{k}": v for k, v in summary.rows.items()}}  # fmt: skip
    tracking.log_metrics(run_id, metrics, 0, tracking_uri=tracking_uri)
    if models:  # a quiet night has no labels to plot
        client.log_figure(run_id, label_distribution_figure(summary.label_counts), "label_distribution.png")
    tracking.finish_run(run_id, tracking_uri=tracking_uri)
    return run_id


def label_distribution_figure(counts: dict[str, Counter[str]]) -> Any:
    """Bars: videos per top-1 label, for each classification head of each model (this run's videos)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 2.2 + 1.6 * max(1, len(counts))), layout="constrained")
    if not counts:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no videos tagged in this run", ha="center", va="center")
        ax.set_axis_off()
        return fig
    for i, (title, panel) in enumerate(sorted(counts.items())):
        ax = fig.add_subplot(len(counts), 1, i + 1)
        labels = sorted(panel, key=lambda k: (-panel[k], k))
        ax.barh(labels[::-1], [panel[k] for k in labels][::-1], color="tab:blue")
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_xlabel("videos (top-1 label)")
    return fig


def print_summary(summary: TagSummary, tables_uri: str) -> None:
    """The one-screen summary at the end of a run."""
    console.rule("[bold]tag summary")
    console.print(
        f"videos: {summary.listed} listed, [green]{summary.tagged} tagged[/], {summary.skipped} skipped, "
        f"[red]{summary.failed} failed[/]"
    )
    console.print(
        f"clips: {summary.clips} in {summary.seconds:.1f} s ({summary.clips_per_s:.1f} clips/s end to end)"
    )
    if summary.rows:
        console.print("rows: " + ", ".join(f"{k} {v}" for k, v in summary.rows.items()))
        chunks = f"{summary.chunks} chunk{'s' if summary.chunks != 1 else ''}"
        console.print(
            f"committed {summary.job_run_id} ({chunks}, {summary.commit_s:.2f} s committing) to "
            f"{tables.root_uri(tables_uri)} (run_date={summary.run_date})"
        )
    else:
        console.print("nothing new to commit")
    console.print(f"MLflow run {summary.mlflow_run_id}")
