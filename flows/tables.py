"""The analyst tables: their schemas, where they live, and consistent reads of what is committed.

Under a tables URI (a folder or an s3:// prefix) each table is a Delta Lake table, partitioned by
`run_date` (Parquet data files plus a `_delta_log/`), readable by any Delta reader (Spark, Trino, Athena,
Polars, deltalake, Ray's `read_delta`)::

    TABLES/<table>/run_date=YYYY-MM-DD/part-*.parquet + TABLES/<table>/_delta_log/
    TABLES/_runs/      a small Delta table: the run log, one row per chunk event (see flows.table_writer)
    TABLES/_lease/     the writers' lease (see flows.lease)

Guarantees (how they are kept: flows.table_writer, flows.lease):

- Exactly once per (video, model, model version) in every prediction table and in `errors`, and per video in
  `videos`, across nights, however runs overlapped or crashed.
- Each table's commits are atomic (Delta). A night commits in chunks, all six tables of a chunk recorded
  together in `_runs`; `read_snapshot` pins every table at the versions of the last complete chunk, so the
  query layer never sees half of a chunk across tables. A Delta reader that opens one table at its latest
  version sees that table consistent on its own, possibly one chunk ahead of another table while a chunk is
  being committed, and the chunks of a night that is still running.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from flows import runs, storage
from flows.delta import TIMESTAMP, delta_errors, open_delta

if TYPE_CHECKING:
    from deltalake import DeltaTable

PARTITION = "run_date"
RUNS = runs.FOLDER

# --- schemas ------------------------------------------------------------------------------------------


def _required(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=False)


def _optional(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=True)


_RUN = [_required("job_run_id", pa.string()), _required(PARTITION, pa.date32())]
_PREDICTION = [
    _required("video_id", pa.string()), _required("uri", pa.string()), _required("model_name", pa.string()),
    _required("model_version", pa.string()), _optional("mlflow_run_id", pa.string()),
]  # fmt: skip
_SEGMENT = [_required("start_s", pa.float64()), _required("end_s", pa.float64())]

SCHEMAS: dict[str, pa.Schema] = {
    "videos": pa.schema([
        _required("video_id", pa.string()), _required("uri", pa.string()),
        _optional("size_bytes", pa.int64()), _optional("etag", pa.string()),
        _optional("duration_s", pa.float64()), _optional("fps", pa.float64()),
        _optional("n_frames", pa.int64()), _optional("width", pa.int32()), _optional("height", pa.int32()),
        _optional("codec", pa.string()), _optional("has_audio", pa.bool_()), _required("status", pa.string()),
        _optional("status_reason", pa.string()), *_RUN,
    ]),
    "classifications": pa.schema([
        *_PREDICTION, _required("head", pa.string()), _required("label", pa.string()),
        _required("score", pa.float64()), _required("rank", pa.int32()), *_RUN,
    ]),
    "actions": pa.schema([
        *_PREDICTION, _required("label", pa.string()), *_SEGMENT, _required("score", pa.float64()), *_RUN,
    ]),
    "sentiment": pa.schema([
        *_PREDICTION, _required("scope", pa.string()), _required("label", pa.string()),
        _required("score", pa.float64()), _optional("valence", pa.float64()),
        _optional("start_s", pa.float64()), _optional("end_s", pa.float64()), *_RUN,
    ]),
    "highlights": pa.schema([
        *_PREDICTION, _required("rank", pa.int32()), *_SEGMENT, _required("importance", pa.float64()),
        _required("keyframe_s", pa.float64()), *_RUN,
    ]),
    # One current row per failed (video, model, version). The retry columns are optional so that rows of
    # tables migrated from the previous format, which lack them, still read.
    "errors": pa.schema([
        _required("video_id", pa.string()), _required("uri", pa.string()), _required("stage", pa.string()),
        _required("error_type", pa.string()), _required("message", pa.string()),
        _optional("model_name", pa.string()), _optional("model_version", pa.string()),
        _optional("transient", pa.bool_()), _optional("attempts", pa.int32()),
        _optional("first_seen", TIMESTAMP), _optional("last_seen", TIMESTAMP), *_RUN,
    ]),
}  # fmt: skip
TABLES: tuple[str, ...] = tuple(SCHEMAS)
PREDICTION_TABLES = ("classifications", "actions", "sentiment", "highlights")
PREDICTION_KEY = ("video_id", "model_name", "model_version")
VIDEO_KEY = ("video_id",)
SENTIMENT_SCOPES = ("video", "segment")
# Optional columns a writer may leave out: filled with nulls (columns added to a table after it was created).
_MAY_OMIT: dict[str, frozenset[str]] = {
    "videos": frozenset({"status_reason"}),
    "errors": frozenset({"transient", "attempts", "first_seen", "last_seen"}),
}
# Table properties of every Delta table here: a checkpoint every N commits keeps opening a table fast as
# its history grows (a reader replays at most N JSON commits after the last checkpoint).
CHECKPOINT_INTERVAL = 20
TABLE_CONFIGURATION = {"delta.checkpointInterval": str(CHECKPOINT_INTERVAL)}


class TableError(ValueError):
    """Rows or arguments that do not fit the table contract; the message is one line naming the column."""


class LegacyTablesError(TableError):
    """Tables written in the previous format (plain Parquet and commit manifests), not yet migrated."""


def schema(name: str) -> pa.Schema:
    """The schema analysts see for table `name`, `run_date` included (the Delta table's schema)."""
    _check_table(name)
    return SCHEMAS[name]


def row_schema(name: str) -> pa.Schema:
    """The columns a writer is given for table `name`: all but job_run_id, which the writer fills in."""
    full = schema(name)
    return full.remove(full.get_field_index("job_run_id"))


def file_schema(name: str) -> pa.Schema:
    """The schema of table `name`'s data files: `run_date` is the partition, in the path, not in the file."""
    full = schema(name)
    return full.remove(full.get_field_index(PARTITION))


def key_columns(name: str) -> tuple[str, ...]:
    """The columns whose values a row is exactly once per: per video in `videos`, else per model version."""
    _check_table(name)
    return VIDEO_KEY if name == "videos" else PREDICTION_KEY


def validate(name: str, data: pa.Table | pa.RecordBatch, *, job_run_id: str, run_date: dt.date) -> pa.Table:
    """`data` conformed to the file schema of `name`: columns checked and cast, `job_run_id` filled in.

    `job_run_id` and `run_date` may be left out (the writer fills them); when given they must match.
    """
    target = file_schema(name)
    table = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
    names = table.column_names
    where = f"table {name}"
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise TableError(f"{where}: column '{dup}' appears twice")
    known = set(schema(name).names)
    for column in names:
        if column not in known:
            raise TableError(f"{where}: unknown column '{column}'; expected {', '.join(schema(name).names)}")
    if PARTITION in names:
        given = table.column(PARTITION).cast(pa.date32(), safe=True)
        if given.null_count or pc.any(pc.not_equal(given, pa.scalar(run_date, pa.date32()))).as_py():
            raise TableError(f"{where}: column '{PARTITION}' holds a date other than the run's {run_date}")
    columns = []
    for spec in target:
        if spec.name not in names:
            if spec.name == "job_run_id":
                columns.append(pa.array([job_run_id] * table.num_rows, pa.string()))
                continue
            if spec.name in _MAY_OMIT.get(name, ()):
                columns.append(pa.nulls(table.num_rows, spec.type))
                continue
            raise TableError(f"{where}: missing column '{spec.name}' ({spec.type})")
        column = table.column(spec.name)
        try:
            column = column.cast(spec.type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise TableError(
                f"{where}: column '{spec.name}' has type {column.type}, expected {spec.type} ({first})"
            ) from None
        if not spec.nullable and column.null_count:
            raise TableError(f"{where}: column '{spec.name}' has {column.null_count} null(s); it is required")
        columns.append(column)
    out = pa.Table.from_arrays(columns, schema=target)
    if "job_run_id" in names and pc.any(pc.not_equal(out.column("job_run_id"), job_run_id)).as_py():
        raise TableError(f"{where}: column 'job_run_id' holds a run other than {job_run_id!r}")
    if name == "sentiment" and out.num_rows:
        bad = pc.invert(pc.is_in(out.column("scope"), pa.array(SENTIMENT_SCOPES)))
        if pc.any(bad).as_py():
            value = out.column("scope").filter(bad)[0].as_py()
            raise TableError(f"{where}: column 'scope' has {value!r}; expected 'video' or 'segment'")
    return out


def parse_run_date(value: str | dt.date) -> dt.date:
    """A run date from a `date` or 'YYYY-MM-DD' text."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value).strip())
    except ValueError:
        raise TableError(f"run_date {value!r}: expected YYYY-MM-DD") from None


# --- locations ----------------------------------------------------------------------------------------


def root_uri(tables_uri: str) -> str:
    """The canonical form of a tables location: `s3://bucket/prefix`, or an absolute local path."""
    if storage.is_s3(tables_uri):
        return "s3://" + tables_uri.split("://", 1)[1].strip("/")
    return storage.fsspec_filesystem(tables_uri)[1].rstrip("/") or "/"


def table_uri(tables_uri: str, name: str) -> str:
    """Where table `name` (or `_runs`) of a tables location lives."""
    if name != RUNS:
        _check_table(name)
    return storage.join_uri(root_uri(tables_uri), name)


def check_location(tables_uri: str, *, must_exist: bool) -> None:
    """Fail early on a location that cannot hold tables: a missing bucket, or (`must_exist`) folder."""
    if storage.is_s3(tables_uri):
        bucket = "s3://" + tables_uri.split("://", 1)[1].split("/", 1)[0]
        if not storage.exists(bucket):
            raise FileNotFoundError(f"tables {tables_uri}: bucket {bucket} not found")
    elif must_exist and not storage.exists(tables_uri):
        raise FileNotFoundError(f"tables {tables_uri}: no such folder")


def open_table(tables_uri: str, name: str, version: int | None = None) -> DeltaTable | None:
    """Table `name` (or `_runs`) as a deltalake DeltaTable at `version` (latest when None); None if absent."""
    return open_delta(table_uri(tables_uri, name), version)


def check_format(tables_uri: str) -> None:
    """Raise LegacyTablesError when `tables_uri` holds tables of the previous format, not yet migrated."""
    root = root_uri(tables_uri)
    # Every commit of the previous format wrote a manifest there; the migration removes the folder last.
    if storage.exists(storage.join_uri(root, "_commits")):
        raise LegacyTablesError(
            f"tables {root} are in the previous format (Parquet files and commit manifests); "
            f"convert them in place with `reelflow tables migrate {root}`"
        )


# --- consistent reads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """Every table of a tables location pinned at one version: those of one complete chunk in `_runs`.

    `versions[name]` is None for a table that did not exist at that point (read as empty). `run_id` and
    `chunk` name the chunk the versions come from (None on tables that no run has committed to).
    """

    tables_uri: str
    versions: dict[str, int | None] = field(default_factory=dict)
    run_id: str | None = None
    chunk: int | None = None


def read_snapshot(
    tables_uri: str, as_of: str | dt.date | None = None, log: pa.Table | None = None
) -> Snapshot:
    """The versions of the last complete chunk (in commit order); with `as_of`, of an earlier state.

    `as_of` is a run id (the state when that run's last chunk committed) or a date (the last run, in
    completion order, whose night is on or before it). `log` is the run log when the caller has read it.
    """
    root = root_uri(tables_uri)
    log = log if log is not None else runs.read_log(root)
    if log is None:
        if as_of is not None:
            raise TableError(f"tables {root}: no run has committed yet, so there is nothing as of {as_of}")
        check_format(root)
        latest = {name: _latest_version(root, name) for name in TABLES}
        return Snapshot(root, latest)
    point = runs.snapshot_point(log, as_of)
    if point is None:
        if as_of is not None:
            raise TableError(f"tables {root}: no complete run matches as-of {as_of}")
        return Snapshot(root, dict.fromkeys(TABLES))
    return Snapshot(root, {name: point.versions.get(name) for name in TABLES}, point.run_id, point.chunk)


def _latest_version(root: str, name: str) -> int | None:
    table = open_table(root, name)
    return None if table is None else table.version()


def dataset(tables_uri: str, name: str, snapshot: Snapshot | None = None) -> ds.Dataset:
    """A lazy pyarrow dataset over table `name` at the snapshot's version (the latest complete chunk's).

    DuckDB scans it with projection and filter pushdown (`WHERE run_date = …` reads one partition); a table
    that does not exist yet is an empty dataset with the right schema.
    """
    snap = snapshot if snapshot is not None else read_snapshot(tables_uri)
    version = snap.versions.get(name)
    table = None if version is None else open_table(snap.tables_uri, name, version)
    if table is None:
        return ds.dataset([], schema=schema(name), format="parquet")
    with delta_errors(table_uri(snap.tables_uri, name)):
        return table.to_pyarrow_dataset(schema=schema(name))


def read_table(
    tables_uri: str, name: str, columns: Sequence[str] | None = None, snapshot: Snapshot | None = None
) -> pa.Table:
    """Table `name`'s committed rows, all in memory (for small tables and tests; use `dataset` to scan)."""
    return dataset(tables_uri, name, snapshot).to_table(
        columns=list(columns) if columns is not None else None
    )


def committed_keys(
    tables_uri: str, name: str, columns: Sequence[str], snapshot: Snapshot | None = None
) -> set[tuple[Any, ...]]:
    """Distinct values of `columns` among table `name`'s committed rows, as tuples."""
    full = schema(name)
    for column in columns:
        if column not in full.names:
            raise TableError(f"table {name}: unknown column '{column}'")
    table = dataset(tables_uri, name, snapshot).to_table(columns=list(columns))
    distinct = table.group_by(list(columns)).aggregate([])
    return set(zip(*(distinct.column(c).to_pylist() for c in columns), strict=True))


def tagged_keys(tables_uri: str, snapshot: Snapshot | None = None) -> set[tuple[str, str, str]]:
    """(video_id, model_name, model_version) of every committed prediction, from all prediction tables."""
    snap = snapshot if snapshot is not None else read_snapshot(tables_uri)
    out: set[tuple[str, str, str]] = set()
    for name in PREDICTION_TABLES:
        out |= committed_keys(tables_uri, name, PREDICTION_KEY, snap)  # type: ignore[arg-type]
    return out


def _check_table(name: str) -> None:
    if name not in SCHEMAS:
        raise TableError(f"unknown table {name!r}; tables: {', '.join(SCHEMAS)}")
