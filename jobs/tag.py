"""`reelflow tag`: the nightly job. New videos → every head of every model → the analyst tables.

    reelflow tag --corpus s3://videos/ --model models:/reelflow-multitask@candidate \
        --tables s3://analytics/tables --date 2024-05-01

1. Resolve each model URI once to a registered version (an alias may move during the night).
2. List the corpus; skip each video that every model version has already tagged or failed on, read from
   the committed tables themselves (`--full` tags everything again).
3. Decode each remaining video once, in sliding windows covering it, at the models' clip length, size and
   fps (CPU tasks), and predict every head in an actor pool (GPU actors when the cluster has GPUs).
4. Aggregate clips per video into rows, stage them and commit the night atomically (`flows.tables`):
   re-running a night, or after a crash, leaves exactly one copy of each row.
5. Print a one-screen summary and record it, with a label-distribution plot, in an MLflow run.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from flows import storage, tables
from flows.aggregate import AggregateConfig, VideoClips, VideoSummary, summarize, table_rows
from flows.clips import ClipConfig, VideoRow, clip_dataset, list_video_rows, read_errors, video_dataset
from flows.predict import PredictConfig, output_column, predict_dataset
from jobs.runtime import console

EXPERIMENT = "reelflow-tag"
DEFAULT_MLFLOW_DIR = "reelflow-mlflow"
PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class TagConfig:
    """One night's tagging run.

    `stride` is in output frames between window starts (default: the clip length, windows side by side
    covering the whole video). `tracking_uri` defaults to MLFLOW_TRACKING_URI, else a SQLite store in
    ./reelflow-mlflow (where `reelflow train` registers by default).
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
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"tag: stride={self.stride} must be >= 1")


@dataclass(frozen=True)
class TaggingModel:
    """A resolved registered model version, the spec it preprocesses with and the loaded module."""

    uri: str  # pinned: models:/NAME/VERSION
    name: str
    version: str
    run_id: str | None
    spec: Any  # models.ModelSpec
    module: Any = field(repr=False, compare=False)


@dataclass
class TagSummary:
    """What a run did; the same figures go to MLflow."""

    job_run_id: str
    run_date: dt.date
    listed: int
    tagged: int
    skipped: int
    failed: int
    clips: int
    seconds: float
    decoded: list[str] = field(default_factory=list)  # video_ids sent to the decoder
    rows: dict[str, int] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    startup_s: float = 0.0  # from the start of inference to its first predictions
    steady_clips_per_s: float = 0.0  # after that

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else 0.0


def main(config: TagConfig) -> TagSummary:
    """Run one night's tagging; returns its summary."""
    from jobs import tracking
    from jobs.runtime import init_ray

    started = time.perf_counter()
    run_date = tables.parse_run_date(config.date)
    tables.check_location(config.tables, must_exist=False)
    tracking_uri = tracking.tracking_uri(config.tracking_uri, DEFAULT_MLFLOW_DIR)
    refs = resolve_versions(config.models, tracking_uri)
    job_run_id = config.job_run_id or f"tag-{run_date.isoformat()}-{uuid.uuid4().hex[:8]}"
    console.rule(f"[bold]tag[/] {run_date} · {job_run_id}")
    console.print("models: " + ", ".join(ref.uri for ref in refs))

    videos = list_video_rows(config.corpus)
    if not videos:
        raise FileNotFoundError(f"corpus {config.corpus}: no video files found")
    todo = videos if config.full else untagged(videos, refs, config.tables)
    console.print(
        f"{len(videos)} videos under {config.corpus}: {len(todo)} to tag, "
        f"{len(videos) - len(todo)} already tagged"
    )

    result = Inference()
    models: list[TaggingModel] = []
    per_video: dict[str, list[VideoSummary]] = {}
    rows: dict[str, int] = {}
    if todo:  # a quiet night loads no model, starts no Ray and commits nothing
        models = load_models(refs, tracking_uri)
        clip_config = tagging_clip_config([m.spec for m in models], config.stride, config.decoder)
        writer = tables.TableWriter(config.tables, job_run_id, run_date)
        init_ray(config.ray_address)
        errors_uri = storage.join_uri(writer.staging_uri, "_decode_errors")  # dropped with the staging
        result = run_inference(todo, models, clip_config, config.predict, errors_uri)
        per_video = summaries(result, models, config.aggregate)
        for name, staged in build_rows(todo, models, result, per_video, config.aggregate, run_date).items():
            if staged:
                writer.stage(name, pa.Table.from_pylist(staged, schema=_row_schema(name)))
        commit = writer.commit(
            {"models": [ref.uri for ref in refs], "corpus": storage.canonical_uri(config.corpus),
             "videos_tagged": len(todo) - len(result.failed), "videos_failed": len(result.failed)}
        )  # fmt: skip
        rows = commit.rows
    summary = TagSummary(
        job_run_id=job_run_id,
        run_date=run_date,
        listed=len(videos),
        tagged=len(todo) - len(result.failed),
        skipped=len(videos) - len(todo),
        failed=len(result.failed),
        clips=result.clips,
        seconds=time.perf_counter() - started,
        decoded=[v.video_id for v in todo],
        startup_s=result.first_batch_s,
        steady_clips_per_s=result.steady_clips_per_s,
        rows=rows,
    )
    summary.mlflow_run_id = record_run(config, summary, refs, models, per_video, tracking_uri)
    print_summary(summary, config.tables)
    return summary


# --- models ---------------------------------------------------------------------------------------------


def resolve_versions(uris: Sequence[str], tracking_uri: str) -> list[Any]:
    """Each URI resolved once to a registered version (a `jobs.tracking.ModelRef`), nothing downloaded."""
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


def load_models(refs: Sequence[Any], tracking_uri: str) -> list[TaggingModel]:
    """The pinned versions, each loaded once here, in the driver (for its spec, and to ship to the actors)."""
    out = []
    for ref in refs:
        module = load_registered(ref.uri, tracking_uri)
        spec = getattr(module, "spec", None)
        if spec is None:
            raise ValueError(f"model {ref.uri}: the loaded module has no spec")
        if "features" in spec.modalities:
            raise ValueError(
                f"model {ref.uri}: {spec.name} reads clip features, not clips; tag needs a clip model"
            )
        out.append(TaggingModel(ref.uri, ref.name, str(ref.version), ref.run_id, spec, module))
    return out


def resolve_models(uris: Sequence[str], tracking_uri: str) -> list[TaggingModel]:
    """Each URI resolved to one registered version, with its spec."""
    return load_models(resolve_versions(uris, tracking_uri), tracking_uri)


def load_registered(model_uri: str, tracking_uri: str) -> Any:
    """The module of a pinned registered version (what each inference actor calls once)."""
    from jobs import tracking

    return tracking.load_model(model_uri, tracking_uri=tracking_uri)[0]


def tagging_clip_config(specs: Sequence[Any], stride: int | None, decoder: str = "auto") -> ClipConfig:
    """Sliding windows covering each video at the models' input; all models must read the same clips."""
    first = specs[0]
    for spec in specs[1:]:
        differ = [f for f in ("clip_len", "frame_size", "fps") if getattr(spec, f) != getattr(first, f)]
        if differ:
            raise ValueError(
                f"tag: models {first.name} and {spec.name} read different clips ({', '.join(differ)}); "
                "tag them in separate runs"
            )
    audio_rates = {s.audio_rate for s in specs if "audio" in s.modalities}
    if len(audio_rates) > 1:
        raise ValueError(f"tag: the models read audio at different rates {sorted(audio_rates)}")
    return ClipConfig(
        clip_len=first.clip_len,
        size=tuple(first.frame_size),
        sampling="sliding",
        stride=min(stride or first.clip_len, first.clip_len),
        target_fps=first.fps,
        decoder=decoder,
        audio=bool(audio_rates),
        audio_rate=audio_rates.pop() if audio_rates else 16_000,
        subtitles=any("text" in s.modalities for s in specs),
        video_info=True,
    )


def untagged(videos: Sequence[VideoRow], models: Sequence[Any], tables_uri: str) -> list[VideoRow]:
    """Videos that some model version (anything with `.name` and `.version`) has neither tagged nor
    failed on, per the committed tables."""
    if not storage.exists(tables_uri):
        return list(videos)
    done = tables.tagged_keys(tables_uri)
    done |= tables.committed_keys(tables_uri, "errors", tables.PREDICTION_KEY)
    return [v for v in videos if any((v.video_id, m.name, str(m.version)) not in done for m in models)]


# --- decode + predict -----------------------------------------------------------------------------------


@dataclass
class Inference:
    """Clip predictions per video (one VideoClips per model), probe facts, and decode failures."""

    clips_by_video: dict[str, list[VideoClips]] = field(default_factory=dict)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    clips: int = 0
    seconds: float = 0.0
    first_batch_s: float = 0.0  # start-up: until the first predictions came back
    first_batch_clips: int = 0

    @property
    def steady_clips_per_s(self) -> float:
        """Clips/s after the first predictions (actor start-up and the first decode excluded)."""
        span = self.seconds - self.first_batch_s
        return (self.clips - self.first_batch_clips) / span if span > 0 else 0.0

    @property
    def failed(self) -> set[str]:
        """Videos that failed and gave no clips at all."""
        return {e["video_id"] for e in self.errors} - set(self.clips_by_video)


INFO_COLUMNS = ("duration_s", "fps", "n_frames", "width", "height", "codec", "has_audio")


def run_inference(
    videos: Sequence[VideoRow],
    models: Sequence[TaggingModel],
    clip_config: ClipConfig,
    predict: PredictConfig,
    errors_uri: str,
    progress: bool = True,
) -> Inference:
    """Decode `videos` into windows and predict them; the driver gathers the small per-clip outputs."""
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the job prints its own progress
    # The driver's copies go through the object store: an actor then starts without importing MLflow or
    # downloading artifacts, and every actor runs exactly the weights the driver resolved.
    loaders = [functools.partial(ray.get, ray.put(m.module)) for m in models]
    clips = clip_dataset(video_dataset(list(videos)), clip_config, errors_uri)
    predictions = predict_dataset(clips, loaders, predict)

    started = time.perf_counter()
    parts: dict[str, list[dict[str, np.ndarray]]] = {}
    out = Inference()
    last = started
    for batch in predictions.iter_batches(batch_format="numpy", batch_size=None):
        ids = batch["video_id"]
        for vid in np.unique(ids):
            rows = ids == vid
            parts.setdefault(str(vid), []).append({k: np.asarray(v)[rows] for k, v in batch.items()})
        out.clips += len(ids)
        now = time.perf_counter()
        if not out.first_batch_clips:
            out.first_batch_s, out.first_batch_clips = now - started, len(ids)
        if progress and (
            out.clips == len(ids) or now - last >= PROGRESS_EVERY_S
        ):  # the first, then every few s
            last = now
            console.print(
                f"tag: {out.clips} clips from {len(parts)}/{len(videos)} videos, "
                f"{out.clips / (now - started):.1f} clips/s"
            )
    out.seconds = time.perf_counter() - started
    for vid, chunks in parts.items():
        merged = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        out.info[vid] = {c: _scalar(merged[c][0]) for c in INFO_COLUMNS if c in merged}
        duration = out.info[vid].get("duration_s")
        out.clips_by_video[vid] = [
            VideoClips(
                merged["start_s"].astype(np.float64),
                merged["end_s"].astype(np.float64),
                {
                    key: merged[output_column(i, key)]
                    for key in _output_keys(m.spec)
                    if output_column(i, key) in merged
                },
                float(duration) if duration else None,
            )
            for i, m in enumerate(models)
        ]
    out.errors = read_error_rows(errors_uri)
    return out


def _output_keys(spec: Any) -> list[str]:
    return [*spec.heads, *(f"{h}_steps" for h in spec.step_heads)]


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def read_error_rows(uri: str) -> list[dict[str, Any]]:
    """The decode error rows written under `uri`, by video."""
    return sorted(read_errors(uri).to_pylist(), key=lambda r: r["video_id"])


# --- rows -----------------------------------------------------------------------------------------------


def summaries(
    result: Inference, models: Sequence[TaggingModel], config: AggregateConfig
) -> dict[str, list[VideoSummary]]:
    """video_id → one VideoSummary per model."""
    return {
        vid: [summarize(c, m.spec.heads, config) for c, m in zip(per_model, models, strict=True)]
        for vid, per_model in result.clips_by_video.items()
    }


def build_rows(
    videos: Sequence[VideoRow],
    models: Sequence[TaggingModel],
    result: Inference,
    per_video: dict[str, list[VideoSummary]],
    config: AggregateConfig,
    run_date: dt.date,
) -> dict[str, list[dict[str, Any]]]:
    """Rows of every table for the tagged `videos` from `per_video` (see `summaries`; job_run_id is filled in
    by the writer)."""
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in tables.TABLES}
    errors = {}
    for e in result.errors:
        errors.setdefault(e["video_id"], e)
    for video in videos:
        vid = video.video_id
        error = errors.get(vid)
        has_clips = vid in per_video
        status = "ok" if has_clips and not error else "partial" if has_clips else "failed"
        info = result.info.get(vid, {})
        out["videos"].append(
            {"video_id": vid, "uri": video.uri, "size_bytes": video.size_bytes, "etag": video.etag,
             **{c: info.get(c) for c in INFO_COLUMNS}, "status": status, "run_date": run_date}
        )  # fmt: skip
        if error is not None:
            for m in models:  # one row per model version, so the next night skips what failed for it
                out["errors"].append(
                    {"video_id": vid, "uri": video.uri, "stage": error["stage"],
                     "error_type": error["error_type"], "message": error["message"],
                     "model_name": m.name, "model_version": m.version, "run_date": run_date}
                )  # fmt: skip
        if not has_clips:
            continue
        for m, summary in zip(models, per_video[vid], strict=True):
            common = {"video_id": vid, "uri": video.uri, "model_name": m.name, "model_version": m.version,
                      "mlflow_run_id": m.run_id, "run_date": run_date}  # fmt: skip
            for name, rows in table_rows(summary, m.spec.heads, config.top_k).items():
                out[name] += [{**common, **row} for row in rows]
    return out


# --- reporting ------------------------------------------------------------------------------------------


def record_run(
    config: TagConfig,
    summary: TagSummary,
    refs: Sequence[Any],
    models: Sequence[TaggingModel],
    per_video: dict[str, list[VideoSummary]],
    tracking_uri: str,
) -> str:
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
              "full": str(config.full), "batch_size": str(config.predict.batch_size)}  # fmt: skip
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    metrics = {"videos_listed": summary.listed, "videos_tagged": summary.tagged,
               "videos_skipped": summary.skipped, "videos_failed": summary.failed, "clips": summary.clips,
               "clips_per_s": summary.clips_per_s, "seconds": summary.seconds,
               "startup_s": summary.startup_s, "steady_clips_per_s": summary.steady_clips_per_s,
               **{f"rows_{k}": v for k, v in summary.rows.items()}}  # fmt: skip
    tracking.log_metrics(run_id, metrics, 0, tracking_uri=tracking_uri)
    if models:  # a quiet night has no labels to plot
        figure = label_distribution_figure(per_video, models)
        client.log_figure(run_id, figure, "label_distribution.png")
    tracking.finish_run(run_id, tracking_uri=tracking_uri)
    return run_id


def label_distribution_figure(
    per_video: dict[str, list[VideoSummary]], models: Sequence[TaggingModel]
) -> Any:
    """Bars: videos per top-1 label, for each classification head of each model (this run's videos)."""
    from matplotlib.figure import Figure

    counts: dict[str, dict[str, int]] = {}
    for vid_summaries in per_video.values():
        for m, s in zip(models, vid_summaries, strict=True):
            for head, probs in s.classes.items():
                label = m.spec.heads[head][int(np.argmax(probs))]
                panel = counts.setdefault(f"{m.name} v{m.version} · {head}", {})
                panel[label] = panel.get(label, 0) + 1
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
        console.print(
            f"committed {summary.job_run_id} to {tables.root_uri(tables_uri)} (run_date={summary.run_date})"
        )
    else:
        console.print("nothing new to commit")
    console.print(f"MLflow run {summary.mlflow_run_id}")


def _row_schema(name: str) -> pa.Schema:
    """The table's schema without job_run_id, which the writer fills in."""
    full = tables.schema(name)
    return full.remove(full.get_field_index("job_run_id"))
