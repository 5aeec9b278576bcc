"""The rows a chunk's videos add to every table, built per video where the video's predictions are."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from flows import tables
from flows.aggregate import AggregateConfig, VideoSummary, table_rows
from flows.clips import VideoRow
from flows.inference import INFO_COLUMNS
from flows.media import is_transient
from jobs.registered import RegisteredModel
from jobs.tag.plan import ChunkPlan


class ChunkRows:
    """Collects the rows of some of a chunk's videos: a `videos` row for a video seen for the first time (or
    decoded again to retry an error), and for each model still to do on a video its prediction rows, or an
    error row when it failed (counting the attempts of the error row it replaces)."""

    def __init__(
        self, plan: ChunkPlan, models: Sequence[RegisteredModel], config: AggregateConfig, run_date: dt.date
    ) -> None:
        self.plan = plan
        self.models = models
        self.config = config
        self.run_date = run_date
        self.now = dt.datetime.now(dt.timezone.utc)
        self.rewritten = plan.new_videos | plan.retried_videos
        self.rows: dict[str, list[dict[str, Any]]] = {name: [] for name in tables.TABLES}

    def add(
        self,
        video: VideoRow,
        info: Mapping[str, Any],
        summaries: Sequence[VideoSummary] | None,
        error: Mapping[str, Any] | None,
        partial_reason: str | None = None,
    ) -> None:
        """Add one video's rows: `summaries` (one per model) when it gave clips, `error` when it failed (part
        way, if it also gave clips), `partial_reason` when it gave clips from only part of itself."""
        vid = video.video_id
        todo = [self.models[i] for i in self.plan.models_todo.get(vid, ())]
        if vid in self.rewritten:
            status = (
                "ok" if summaries and not (error or partial_reason) else "partial" if summaries else "failed"
            )
            reasons = [partial_reason, error and f"{error['error_type']}: {error['message']}"]
            self.rows["videos"].append(
                {"video_id": vid, "uri": video.uri, "size_bytes": video.size_bytes, "etag": video.etag,
                 **{c: info.get(c) for c in INFO_COLUMNS}, "status": status,
                 "status_reason": "; ".join(r for r in reasons if r) or None, "run_date": self.run_date}
            )  # fmt: skip
        if error is not None:
            transient = is_transient(error["stage"], error["error_type"])
            for m in todo:  # one row per model version, so the next night knows what failed for it
                earlier = self.plan.retries.get((vid, m.name, str(m.version)))
                self.rows["errors"].append(
                    {"video_id": vid, "uri": video.uri, "stage": error["stage"],
                     "error_type": error["error_type"], "message": error["message"],
                     "model_name": m.name, "model_version": m.version, "transient": transient,
                     "attempts": earlier.attempts + 1 if earlier else 1,
                     "first_seen": (earlier.first_seen if earlier else None) or self.now,
                     "last_seen": self.now, "run_date": self.run_date}
                )  # fmt: skip
        if not summaries:
            return
        todo_uris = {m.uri for m in todo}
        for m, summary in zip(self.models, summaries, strict=True):
            if m.uri not in todo_uris:
                continue
            common = {"video_id": vid, "uri": video.uri, "model_name": m.name, "model_version": m.version,
                      "mlflow_run_id": m.run_id, "run_date": self.run_date}  # fmt: skip
            for name, rows in table_rows(summary, m.spec.heads, self.config.top_k).items():
                self.rows[name] += [{**common, **row} for row in rows]

    def tables(self) -> dict[str, pa.Table]:
        """The rows collected so far, per table that has any."""
        return {
            name: pa.Table.from_pylist(rows, schema=tables.row_schema(name))
            for name, rows in self.rows.items()
            if rows
        }
