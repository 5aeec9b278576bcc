"""The rows a chunk of tagged videos adds to every table."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from flows import tables
from flows.aggregate import AggregateConfig, VideoSummary, table_rows
from flows.inference import INFO_COLUMNS, Inference
from flows.media import is_transient
from jobs.registered import RegisteredModel
from jobs.tag.plan import ChunkPlan


def chunk_rows(
    plan: ChunkPlan,
    models: Sequence[RegisteredModel],
    result: Inference,
    per_video: dict[str, list[VideoSummary]],
    config: AggregateConfig,
    run_date: dt.date,
) -> dict[str, pa.Table]:
    """Rows of every table for a chunk of tagged videos: a `videos` row for a video seen for the first time
    (or decoded again to retry an error), and for each model still to do on a video its prediction rows, or
    an error row when it failed (counting the attempts of the error row it replaces)."""
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in tables.TABLES}
    errors = {}
    for e in result.errors:
        errors.setdefault(e["video_id"], e)
    now = dt.datetime.now(dt.timezone.utc)
    rewritten = plan.new_videos | plan.retried_videos
    for video in plan.videos:
        vid = video.video_id
        error = errors.get(vid)
        has_clips = vid in per_video
        todo = [models[i] for i in plan.models_todo.get(vid, ())]
        todo_uris = {m.uri for m in todo}
        if vid in rewritten:
            status = "ok" if has_clips and not error else "partial" if has_clips else "failed"
            info = result.info.get(vid, {})
            out["videos"].append(
                {"video_id": vid, "uri": video.uri, "size_bytes": video.size_bytes, "etag": video.etag,
                 **{c: info.get(c) for c in INFO_COLUMNS}, "status": status, "run_date": run_date}
            )  # fmt: skip
        if error is not None:
            transient = is_transient(error["stage"], error["error_type"])
            for m in todo:  # one row per model version, so the next night knows what failed for it
                earlier = plan.retries.get((vid, m.name, str(m.version)))
                out["errors"].append(
                    {"video_id": vid, "uri": video.uri, "stage": error["stage"],
                     "error_type": error["error_type"], "message": error["message"],
                     "model_name": m.name, "model_version": m.version, "transient": transient,
                     "attempts": earlier.attempts + 1 if earlier else 1,
                     "first_seen": (earlier.first_seen if earlier else None) or now, "last_seen": now,
                     "run_date": run_date}
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
    return {
        name: pa.Table.from_pylist(rows, schema=tables.row_schema(name)) for name, rows in out.items() if rows
    }

