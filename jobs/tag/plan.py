"""What a night has left to do, per the committed tables.

A (video, model version) is done when it has prediction rows, or an error row that stands: a permanent
failure, or a transient one that has failed `max_attempts` times. A transient error row with attempts left
(every error row with `retry_errors`) is retried: the video is decoded again and the chunk that commits it
replaces the error row (and the rows of a partly tagged video) with the new outcome.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from flows import storage, tables
from flows.clips import VideoRow
from flows.table_files import key_schema

Key = tuple[str, str, str]  # (video_id, model_name, model_version)


@dataclass(frozen=True)
class EarlierError:
    """An error row a night retries: how often it failed, since when, and whether it also has predictions
    (clips decoded before the failure), which the retry replaces too."""

    attempts: int
    first_seen: dt.datetime | None
    has_predictions: bool


@dataclass
class NightPlan:
    """The videos a night decodes and, per video, which of the run's models still need its rows."""

    todo: list[VideoRow]
    models_todo: dict[str, tuple[int, ...]]  # video_id → indexes into the run's models
    new_videos: set[str]  # video ids that have no `videos` row yet
    skipped: int
    retries: dict[Key, EarlierError] = field(default_factory=dict)

    @property
    def retried_videos(self) -> set[str]:
        """Videos with an error row this night retries (their `videos` row is rewritten)."""
        return {video_id for video_id, _, _ in self.retries}

    def removals(self, videos: Iterable[VideoRow]) -> dict[str, pa.Table]:
        """Per table, the keys of earlier rows that the rows of `videos` (a chunk of `todo`) replace."""
        ids = {v.video_id for v in videos}
        retried = [key for key in self.retries if key[0] in ids]
        if not retried:
            return {}
        partial = [key for key in retried if self.retries[key].has_predictions]
        out = {"errors": _keys(retried), "videos": _keys([(k[0],) for k in retried], tables.VIDEO_KEY)}
        if partial:
            out.update({name: _keys(partial) for name in tables.PREDICTION_TABLES})
        return out


def plan_night(
    videos: Sequence[VideoRow],
    refs: Sequence[Any],
    tables_uri: str,
    *,
    full: bool = False,
    max_attempts: int = 3,
    retry_errors: bool = False,
) -> NightPlan:
    """What is left to do for the model versions `refs` (anything with `.name` and `.version`): with `full`,
    everything (the chunks replace earlier rows by key); else what the committed tables do not settle."""
    everyone = tuple(range(len(refs)))
    if full or not storage.exists(tables_uri):
        return NightPlan(
            list(videos), {v.video_id: everyone for v in videos}, {v.video_id for v in videos}, 0
        )
    snapshot = tables.read_snapshot(tables_uri)
    tagged = tables.tagged_keys(tables_uri, snapshot)
    settled, retries = _error_rows(tables_uri, snapshot, tagged, max_attempts, retry_errors)
    done = tagged | settled
    known = {vid for (vid,) in tables.committed_keys(tables_uri, "videos", tables.VIDEO_KEY, snapshot)}
    todo, models_todo, retried = [], {}, {}
    for video in videos:
        keys = [(video.video_id, m.name, str(m.version)) for m in refs]
        left = tuple(i for i, key in enumerate(keys) if key in retries or key not in done)
        if left:
            todo.append(video)
            models_todo[video.video_id] = left
            retried.update({keys[i]: retries[keys[i]] for i in left if keys[i] in retries})
    new = {v.video_id for v in todo} - known
    return NightPlan(todo, models_todo, new, len(videos) - len(todo), retried)


def _error_rows(
    tables_uri: str,
    snapshot: tables.Snapshot,
    tagged: set[Key],
    max_attempts: int,
    retry_errors: bool,
) -> tuple[set[Key], dict[Key, EarlierError]]:
    """The committed error rows split into those that stand (the night skips them) and those it retries.

    A row without `transient` (written before errors were classified) counts as permanent, one without
    `attempts` as one attempt.
    """
    columns = [*tables.PREDICTION_KEY, "transient", "attempts", "first_seen"]
    settled: set[Key] = set()
    retries: dict[Key, EarlierError] = {}
    for row in tables.read_table(tables_uri, "errors", columns, snapshot).to_pylist():
        key = (row["video_id"], row["model_name"], row["model_version"])
        attempts = row["attempts"] or 1
        if retry_errors or (row["transient"] and attempts < max_attempts):
            retries[key] = EarlierError(attempts, row["first_seen"], key in tagged)
        else:
            settled.add(key)
    return settled, retries


def _keys(rows: Sequence[tuple[str, ...]], columns: Sequence[str] = tables.PREDICTION_KEY) -> pa.Table:
    return pa.Table.from_pylist([dict(zip(columns, row, strict=True)) for row in rows], key_schema(columns))
