"""What a night has left to do, planned in Ray so that no process holds the corpus or its history.

Ray tasks list the corpus (`flows.listing`) and read the committed keys of the run's model versions from the
tables (`ray.data.read_delta` at the snapshot's versions); one group-by on `video_id` decides each listed
video, and the videos to do are written as Parquet parts in scratch. The driver keeps only the parts' list
and reads one chunk of them at a time.

A (video, model version) is done when it has prediction rows, or an error row that stands: a permanent
failure, or a transient one that has failed `max_attempts` times. A transient error row with attempts left
(every error row with `retry_errors`) is retried: the video is decoded again and the chunk that commits it
replaces the error row (and the rows of a partly tagged video) with the new outcome.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from flows import delta, storage, tables
from flows.clips import VideoRow
from flows.listing import list_range, name_ranges
from flows.table_files import key_schema

Key = tuple[str, str, str]  # (video_id, model_name, model_version)
# Every source of the group-by in one schema: a listed object, or a committed `videos` row, prediction key
# or error row of one of the run's models (`model` indexes them).
FACTS = pa.schema([
    ("video_id", pa.string()), ("kind", pa.string()), ("model", pa.int32()), ("uri", pa.string()),
    ("size_bytes", pa.int64()), ("etag", pa.string()), ("transient", pa.bool_()), ("attempts", pa.int32()),
    ("first_seen", delta.TIMESTAMP),
])  # fmt: skip
LISTED, VIDEO, TAGGED, ERROR = "listed", "video", "tagged", "error"
# A planned video: `models` the indexes of the run's models still to do ("0,2"), `retries` the error rows it
# retries as JSON ({model: [attempts, first_seen, has_predictions]}).
TODO = pa.schema([
    ("video_id", pa.string()), ("uri", pa.string()), ("size_bytes", pa.int64()), ("etag", pa.string()),
    ("models", pa.string()), ("new_video", pa.bool_()), ("retries", pa.string()),
])  # fmt: skip
# The shuffle through storage: at least MIN_BUCKETS buckets, and one more per ROWS_PER_BUCKET committed rows,
# so that deciding a bucket holds a bounded number of rows; a listing or reading task writes its rows to
# the buckets every FLUSH_ROWS rows.
MIN_BUCKETS = 64
ROWS_PER_BUCKET = 500_000
FLUSH_ROWS = 50_000
PART_STATS = pa.schema([("path", pa.string()), ("videos", pa.int64()), ("listed", pa.int64()),
                        ("retried", pa.int64())])  # fmt: skip


@dataclass(frozen=True)
class Part:
    """Planned videos in scratch: rows [offset, offset + videos) of a Parquet file."""

    path: str
    videos: int
    offset: int = 0


@dataclass
class NightPlan:
    """The parts holding the videos a night tags, and what planning counted."""

    parts: list[Part]
    listed: int
    retried: int  # videos with an error row to retry
    snapshot: tables.Snapshot | None = None  # the committed state it was planned against

    @property
    def todo(self) -> int:
        return sum(p.videos for p in self.parts)

    @property
    def skipped(self) -> int:
        return self.listed - self.todo

    def chunks(self, commit_every: int, max_videos: int | None = None) -> list[list[Part]]:
        """The planned videos in chunks of `commit_every` (the last one may be smaller), the night capped at
        `max_videos`; a part may be split between two chunks."""
        cursor = self.cursor(max_videos)
        return list(iter(lambda: cursor.take(commit_every), []))

    def cursor(self, max_videos: int | None = None) -> PlanCursor:
        """Takes the planned videos in chunks of any size, in order, the night capped at `max_videos`."""
        return PlanCursor(list(self.parts), self.todo if max_videos is None else min(max_videos, self.todo))


@dataclass
class PlanCursor:
    """Where a night is in its planned parts: `take(n)` hands out the next n videos (fewer at the end)."""

    parts: list[Part]
    left: int
    index: int = 0
    offset: int = 0

    def take(self, n: int) -> list[Part]:
        out = []
        while n > 0 and self.left > 0 and self.index < len(self.parts):
            part = self.parts[self.index]
            count = min(part.videos - self.offset, n, self.left)
            out.append(Part(part.path, count, part.offset + self.offset))
            self.offset += count
            n, self.left = n - count, self.left - count
            if self.offset == part.videos:
                self.index, self.offset = self.index + 1, 0
        return out


@dataclass(frozen=True)
class EarlierError:
    """An error row a night retries: how often it failed, since when, and whether it also has predictions
    (clips decoded before the failure), which the retry replaces too."""

    attempts: int
    first_seen: dt.datetime | None
    has_predictions: bool


@dataclass
class ChunkPlan:
    """One chunk's videos and, per video, which of the run's models still need its rows."""

    videos: list[VideoRow]
    models_todo: dict[str, tuple[int, ...]]  # video_id → indexes into the run's models
    new_videos: set[str]  # video ids that have no `videos` row yet
    retries: dict[Key, EarlierError] = field(default_factory=dict)

    @classmethod
    def read(cls, parts: Sequence[Part], refs: Sequence[Any]) -> ChunkPlan:
        """The chunk of planned videos in `parts`."""
        plan = cls([], {}, set())
        for part in parts:
            table = _read_parquet(part.path, TODO).slice(part.offset, part.videos)
            columns = {name: table[name].to_pylist() for name in TODO.names}
            for i, vid in enumerate(columns["video_id"]):
                uri, size, etag = columns["uri"][i], columns["size_bytes"][i], columns["etag"][i]
                plan.videos.append(VideoRow(vid, uri, size, etag))
                plan.models_todo[vid] = tuple(int(m) for m in columns["models"][i].split(","))
                if columns["new_video"][i]:
                    plan.new_videos.add(vid)
                if columns["retries"][i]:
                    plan._add_retries(vid, json.loads(columns["retries"][i]), refs)
        return plan

    def _add_retries(self, vid: str, retries: dict[str, list[Any]], refs: Sequence[Any]) -> None:
        for model, (attempts, first_seen, partial) in retries.items():
            m = refs[int(model)]
            seen = dt.datetime.fromisoformat(first_seen) if first_seen else None
            self.retries[(vid, m.name, str(m.version))] = EarlierError(attempts, seen, partial)

    @property
    def retried_videos(self) -> set[str]:
        """Videos with an error row this night retries (their `videos` row is rewritten)."""
        return {video_id for video_id, _, _ in self.retries}

    def removals(self, refs: Sequence[Any], full: bool = False) -> dict[str, pa.Table]:
        """Per table, the keys of earlier rows that this chunk's rows replace: those of the error rows it
        retries, and with `full` every (video, model version) it tags and every video it rewrites."""
        retried = list(self.retries)
        if full:
            done = [
                (v, refs[i].name, str(refs[i].version)) for v, todo in self.models_todo.items() for i in todo
            ]
            videos = [(v,) for v in sorted(self.new_videos | self.retried_videos)]
            return {**{name: _keys(done) for name in tables.TABLES if name != "videos"},
                    "videos": _keys(videos, tables.VIDEO_KEY)}  # fmt: skip
        if not retried:
            return {}
        partial = [key for key in retried if self.retries[key].has_predictions]
        out = {"errors": _keys(retried), "videos": _keys([(k[0],) for k in retried], tables.VIDEO_KEY)}
        if partial:
            out.update({name: _keys(partial) for name in tables.PREDICTION_TABLES})
        return out


def plan_night(
    corpus: str,
    refs: Sequence[Any],
    tables_uri: str,
    parts_uri: str,
    *,
    full: bool = False,
    max_attempts: int = 3,
    retry_errors: bool = False,
    part_videos: int = 10_000,
) -> NightPlan:
    """Plan in Ray what is left to do for the model versions `refs` (anything with `.name` and `.version`),
    writing the planned videos under `parts_uri` in parts of at most `part_videos`. With `full`, everything
    is planned (the chunks replace earlier rows by key).

    Two rounds of Ray tasks, a shuffle through storage: the first lists the corpus's name ranges and reads
    the committed tables' files (key columns only), sorting every row into a bucket by video_id; the second
    decides each bucket's videos and writes their parts. Ray Data's own group-by costs seconds a night
    however small the night is (aggregator actors, or a sampling pass).
    """
    import ray

    models = [(m.name, str(m.version)) for m in refs]
    snapshot = tables.read_snapshot(tables_uri) if not full and storage.exists(tables_uri) else None
    work = [{"source": corpus, "kind": LISTED, "lo": lo, "hi": hi} for lo, hi in name_ranges(corpus)]
    rows = 0
    for name in ("videos", *tables.PREDICTION_TABLES, "errors") if snapshot is not None else ():
        version = snapshot.versions.get(name)
        table = None if version is None else tables.open_table(snapshot.tables_uri, name, version)
        if table is None:
            continue
        rows += sum(pa.table(table.get_add_actions(flatten=True)).column("num_records").to_pylist())
        kind = {"videos": VIDEO, "errors": ERROR}.get(name, TAGGED)
        work += [{"source": uri, "kind": kind, "lo": name, "hi": None} for uri in table.file_uris()]
    tasks = 4 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    buckets = max(MIN_BUCKETS, rows // ROWS_PER_BUCKET + 1)
    facts_uri = storage.join_uri(parts_uri, "facts")
    sort = functools.partial(_sort_into_buckets, models=models, facts_uri=facts_uri, buckets=buckets)
    _in_tasks(sort, work, tasks)
    decide = functools.partial(
        _plan_bucket, facts_uri=facts_uri, parts_uri=parts_uri, part_videos=part_videos,
        n_models=len(models), max_attempts=max_attempts, retry_errors=retry_errors,
    )  # fmt: skip
    stats = pa.concat_tables(_in_tasks(decide, [{"bucket": b} for b in range(buckets)], tasks)).to_pylist()
    storage.remove(facts_uri, recursive=True)
    parts = sorted((Part(s["path"], s["videos"]) for s in stats if s["path"]), key=lambda p: p.path)
    listed, retried = sum(s["listed"] for s in stats), sum(s["retried"] for s in stats)
    return NightPlan(parts, listed, retried, snapshot)


def _in_tasks(fn: Callable[[pa.Table], pa.Table], items: list[dict[str, Any]], tasks: int) -> list[pa.Table]:
    """`fn` over `items` in up to `tasks` Ray tasks of contiguous items, all submitted at once; their tables.
    Plain tasks rather than a Ray Data stage: an execution takes ~0.1 s to start and runs one task for its
    first second, which was most of a quiet night."""
    import ray

    if not items:
        return []
    per_task = -(-len(items) // max(1, min(tasks, len(items))))
    apply = ray.remote(_apply)
    groups = [pa.Table.from_pylist(items[i : i + per_task]) for i in range(0, len(items), per_task)]
    return ray.get([apply.remote(fn, group) for group in groups])


def _apply(fn: Callable[[pa.Table], pa.Table], items: pa.Table) -> pa.Table:
    return fn(items)


# --- in Ray tasks ---------------------------------------------------------------------------------------


def _sort_into_buckets(
    work: pa.Table, models: list[tuple[str, str]], facts_uri: str, buckets: int
) -> pa.Table:
    """List name ranges and read committed files (the `work` items of a block) as FACTS rows, written into
    one file per bucket of video_id."""
    pending: list[pa.Table] = []
    size = written = 0
    for item in work.to_pylist():
        for facts in _facts(item, models):
            pending.append(facts)
            size += facts.num_rows
            if size >= FLUSH_ROWS:
                _write_buckets(pa.concat_tables(pending), facts_uri, buckets)
                pending, size, written = [], 0, written + size
    if pending:
        _write_buckets(pa.concat_tables(pending), facts_uri, buckets)
    return pa.table({"rows": [written + size]})


def _facts(item: dict[str, Any], models: list[tuple[str, str]]) -> Iterator[pa.Table]:
    if item["kind"] == LISTED:
        for block in list_range(item["source"], item["lo"], item["hi"]):
            yield _listed_facts(block)
        return
    name = item["lo"]
    columns = ["video_id"] if item["kind"] == VIDEO else [*tables.PREDICTION_KEY]
    if item["kind"] == ERROR:
        columns += ["transient", "attempts", "first_seen"]
    fs, path = storage.arrow_filesystem(item["source"])
    # Through a dataset with the table's schema: a file written before a column was added reads it as nulls.
    rows = ds.dataset(path, filesystem=fs, schema=tables.file_schema(name), format="parquet")
    for batch in rows.to_batches(columns=columns, batch_size=FLUSH_ROWS):
        yield _table_facts(pa.Table.from_batches([batch]), item["kind"], models)


def _write_buckets(facts: pa.Table, facts_uri: str, buckets: int) -> None:
    """One file per bucket that `facts` has rows for, under `facts_uri/b<bucket>/`."""
    bucket = np.array([int(v[:8], 16) % buckets for v in facts["video_id"].to_pylist()], dtype=np.int64)
    order = np.argsort(bucket, kind="stable")
    facts, bucket = facts.take(pa.array(order)), bucket[order]
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    for start, end in zip(starts, [*starts[1:], len(bucket)], strict=True):
        folder = storage.join_uri(facts_uri, f"b{bucket[start]}")
        _write_parquet(folder, facts.slice(start, end - start))


def _plan_bucket(items: pa.Table, facts_uri: str, n_models: int, max_attempts: int, retry_errors: bool,
                 parts_uri: str, part_videos: int) -> pa.Table:  # fmt: skip
    """Decide the videos of some buckets, one bucket at a time, and write the planned ones as parts of up to
    `part_videos`; PART_STATS rows."""
    stats, pending = [], []
    for bucket in items["bucket"].to_pylist():
        files = storage.list_children(storage.join_uri(facts_uri, f"b{bucket}"))
        if not files:
            continue
        facts = pa.concat_tables([_read_parquet(f, FACTS) for f in files])
        pending.append(_decide(facts, n_models, max_attempts, retry_errors))
        if sum(t.num_rows for t in pending) >= part_videos:
            stats.append(_write_parts(pa.concat_tables(pending), parts_uri, part_videos))
            pending = []
    if pending:
        stats.append(_write_parts(pa.concat_tables(pending), parts_uri, part_videos))
    return pa.concat_tables(stats) if stats else PART_STATS.empty_table()


def _read_parquet(uri: str, schema: pa.Schema) -> pa.Table:
    fs, path = storage.arrow_filesystem(uri)
    return pq.read_table(path, filesystem=fs, schema=schema)


def _write_parquet(folder: str, table: pa.Table) -> str:
    """Write `table` as a new Parquet file in `folder`; returns its URI."""
    storage.makedirs(folder)
    uri = storage.join_uri(folder, f"part-{uuid.uuid4().hex}.parquet")
    fs, path = storage.arrow_filesystem(uri)
    pq.write_table(table, path, filesystem=fs)
    return uri


def _as_facts(kind: str, n: int, columns: dict[str, pa.Array]) -> pa.Table:
    """`n` FACTS rows of `kind` from `columns`; every other column null."""
    return pa.table(
        {
            name: columns[name] if name in columns else pa.nulls(n, FACTS.field(name).type)
            for name in FACTS.names
        }
        | {"kind": pa.array([kind] * n, pa.string())},
        schema=FACTS,
    )


def _listed_facts(batch: pa.Table) -> pa.Table:
    return _as_facts(LISTED, batch.num_rows, {name: batch[name] for name in batch.column_names})


def _table_facts(batch: pa.Table, kind: str, models: list[tuple[str, str]]) -> pa.Table:
    """Committed rows as FACTS: only the run's models, and one row per prediction key."""
    columns = {name: batch[name] for name in batch.column_names if name in FACTS.names}
    if kind != VIDEO:
        keys = pc.binary_join_element_wise(batch["model_name"], batch["model_version"], "\x00")
        wanted = pa.array([f"{name}\x00{version}" for name, version in models], pa.string())
        columns["model"] = pc.index_in(keys, value_set=wanted).cast(pa.int32())
    facts = _as_facts(kind, batch.num_rows, columns)
    if kind != VIDEO:
        facts = facts.filter(pc.is_valid(facts["model"]))
    if kind != TAGGED:
        return facts
    keys = facts.group_by(["video_id", "model"]).aggregate([])  # a video has many rows per model: one will do
    return _as_facts(TAGGED, keys.num_rows, {"video_id": keys["video_id"], "model": keys["model"]})


def _decide(facts: pa.Table, n_models: int, max_attempts: int, retry_errors: bool) -> pa.Table:
    """The facts of some videos → a TODO row (plus `listed`) per listed object; `models` is null when the
    video has nothing left to do."""
    by_video: dict[str, list[dict[str, Any]]] = {}
    for row in facts.to_pylist():
        by_video.setdefault(row["video_id"], []).append(row)
    out = []
    for vid, known in by_video.items():
        listed = next((r for r in known if r["kind"] == LISTED), None)
        if listed is None:  # committed, but no longer in the corpus
            continue
        tagged = {r["model"] for r in known if r["kind"] == TAGGED}
        done, retries = set(tagged), {}
        for r in known:
            if r["kind"] != ERROR:
                continue
            attempts = r["attempts"] or 1
            if retry_errors or (r["transient"] and attempts < max_attempts):
                seen = r["first_seen"].isoformat() if r["first_seen"] else None
                retries[str(r["model"])] = [attempts, seen, r["model"] in tagged]
            else:
                done.add(r["model"])
        left = [i for i in range(n_models) if i not in done or str(i) in retries]
        out.append({
            "video_id": vid, "uri": listed["uri"], "size_bytes": listed["size_bytes"], "etag": listed["etag"],
            "models": ",".join(map(str, left)) if left else None,
            "new_video": not any(r["kind"] == VIDEO for r in known),
            "retries": json.dumps(retries) if retries else None,
        })  # fmt: skip
    return pa.Table.from_pylist(out, schema=TODO)


def _write_parts(batch: pa.Table, parts_uri: str, part_videos: int) -> pa.Table:
    """Write the planned videos of `batch` (TODO rows, `models` null when nothing is left) as parts of at most
    `part_videos`; returns a PART_STATS row per part, and one counting the listed objects."""
    todo = batch.filter(pc.is_valid(batch["models"])).select(TODO.names)
    paths, videos, retried = [], [], []
    for offset in range(0, todo.num_rows, part_videos):
        part = todo.slice(offset, part_videos)
        paths.append(_write_parquet(parts_uri, part))
        videos.append(part.num_rows)
        retried.append(int(pc.sum(pc.is_valid(part["retries"]).cast(pa.int64())).as_py() or 0))
    listed = [0] * len(paths) + [batch.num_rows]
    return pa.table(
        {"path": [*paths, None], "videos": [*videos, 0], "listed": listed, "retried": [*retried, 0]},
        schema=PART_STATS,
    )


def _keys(rows: Sequence[tuple[str, ...]], columns: Sequence[str] = tables.PREDICTION_KEY) -> pa.Table:
    return pa.Table.from_pylist([dict(zip(columns, row, strict=True)) for row in rows], key_schema(columns))
