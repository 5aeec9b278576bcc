"""The analyst tables: schemas, an exactly-once atomic Parquet writer, and committed-snapshot readers.

Layout under a tables URI (a folder or an s3:// prefix)::

    TABLES/<table>/run_date=YYYY-MM-DD/part-<job_run_id>-<n>.parquet   plain hive-partitioned Parquet
    TABLES/_staging/<job_run_id>/<table>/run_date=.../part-...parquet   a run's files before publishing
    TABLES/_commits/<job_run_id>.json                                   commit manifest (the commit point)
    TABLES/_commits/<job_run_id>.published                              marker: the manifest is applied

Readers that skip `_`/`.` paths (pyarrow, Spark, Hive, Athena, DuckDB globs of `<table>/*/*.parquet`)
never see staging or manifests. The partition column `run_date` lives in the path only, as Hive and
Spark write it; `schema(name)` includes it, `file_schema(name)` is what a file holds.

Protocol (one writer per tables URI at a time, which the nightly schedule guarantees):

1. `TableWriter.stage` validates rows against the schema and writes them under `_staging/<job_run_id>/`.
2. `TableWriter.commit` rolls forward any earlier half-published commit, then plans the replacement of
   rows this run supersedes (see below), writing the kept remainder of each touched file as a new staged
   file, and PUTs the manifest that lists every file it adds and every earlier file it removes. That
   single atomic write is the commit point: a crash before it leaves nothing visible.
3. Publish: move the added files into their partitions, delete the removed ones, write the marker,
   drop the staging folder. `recover` repeats whatever is left of this after a crash (idempotent).

Replacement: within one `run_date`, the rows of a later run replace the earlier rows of the same
*claim*: prediction rows by (video_id, model_name, model_version), `videos` and `errors` rows by
video_id. A run claims every key it wrote a row for in any table of that kind, so a video re-tagged with
zero action segments still replaces the old segments. After publishing, the folder itself holds exactly
one copy of each row, so external readers need no log.

Readers (`read_snapshot`, `committed_files`, `dataset`) list the manifests first and only take files of
committed runs (job_run_id is in each file name); for a committed but unpublished run they read the staged
copy of a file not yet moved and skip the files it removes. A listing raced by a new commit is retried.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from flows import storage

log = logging.getLogger(__name__)

PARTITION = "run_date"
STAGING = "_staging"
COMMITS = "_commits"
FORMAT_VERSION = 1

# --- schemas ------------------------------------------------------------------------------------------

_RUN = [pa.field("job_run_id", pa.string(), nullable=False), pa.field(PARTITION, pa.date32(), nullable=False)]
_PREDICTION = [
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("model_name", pa.string(), nullable=False),
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("mlflow_run_id", pa.string()),
]


def _f(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


_SEGMENT = [_f("start_s", pa.float64()), _f("end_s", pa.float64())]

SCHEMAS: dict[str, pa.Schema] = {
    "videos": pa.schema([
        _f("video_id", pa.string()), _f("uri", pa.string()), _f("size_bytes", pa.int64(), True),
        _f("etag", pa.string(), True), _f("duration_s", pa.float64(), True), _f("fps", pa.float64(), True),
        _f("n_frames", pa.int64(), True), _f("width", pa.int32(), True), _f("height", pa.int32(), True),
        _f("codec", pa.string(), True), _f("has_audio", pa.bool_(), True), _f("status", pa.string()),
        *_RUN,
    ]),
    "classifications": pa.schema([
        *_PREDICTION, _f("head", pa.string()), _f("label", pa.string()), _f("score", pa.float64()),
        _f("rank", pa.int32()), *_RUN,
    ]),
    "actions": pa.schema([
        *_PREDICTION, _f("label", pa.string()), *_SEGMENT, _f("score", pa.float64()), *_RUN,
    ]),
    "sentiment": pa.schema([
        *_PREDICTION, _f("scope", pa.string()), _f("label", pa.string()), _f("score", pa.float64()),
        _f("valence", pa.float64(), True), _f("start_s", pa.float64(), True), _f("end_s", pa.float64(), True),
        *_RUN,
    ]),
    "highlights": pa.schema([
        *_PREDICTION, _f("rank", pa.int32()), *_SEGMENT, _f("importance", pa.float64()),
        _f("keyframe_s", pa.float64()), *_RUN,
    ]),
    "errors": pa.schema([
        _f("video_id", pa.string()), _f("uri", pa.string()), _f("stage", pa.string()),
        _f("error_type", pa.string()), _f("message", pa.string()), _f("model_name", pa.string(), True),
        _f("model_version", pa.string(), True), *_RUN,
    ]),
}  # fmt: skip
TABLES: tuple[str, ...] = tuple(SCHEMAS)
PREDICTION_TABLES = ("classifications", "actions", "sentiment", "highlights")
VIDEO_TABLES = ("videos", "errors")
PREDICTION_KEY = ("video_id", "model_name", "model_version")
VIDEO_KEY = ("video_id",)
SENTIMENT_SCOPES = ("video", "segment")

_JOB_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_PART = re.compile(r"part-(?P<job>[A-Za-z0-9][A-Za-z0-9_.-]*)-(?P<n>\d+)\.parquet")
_PARTITION_DIR = re.compile(rf"{PARTITION}=(?P<date>\d{{4}}-\d{{2}}-\d{{2}})")


class TableError(ValueError):
    """Rows or arguments that do not fit the table contract; the message is one line naming the column."""


def schema(name: str) -> pa.Schema:
    """The schema analysts see for table `name`, `run_date` included."""
    _check_table(name)
    return SCHEMAS[name]


def file_schema(name: str) -> pa.Schema:
    """The schema of the Parquet files of table `name`: `run_date` is in the path, not in the file."""
    full = schema(name)
    return full.remove(full.get_field_index(PARTITION))


def key_columns(name: str) -> tuple[str, ...]:
    """The replacement key of table `name` (see the module docstring)."""
    _check_table(name)
    return PREDICTION_KEY if name in PREDICTION_TABLES else VIDEO_KEY


def validate(name: str, data: pa.Table | pa.RecordBatch, *, job_run_id: str, run_date: dt.date) -> pa.Table:
    """`data` conformed to the file schema of `name`: columns checked and cast, job columns filled in.

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
        if spec.name == "job_run_id" and spec.name not in names:
            columns.append(pa.array([job_run_id] * table.num_rows, pa.string()))
            continue
        if spec.name not in names:
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


def root_uri(tables_uri: str) -> str:
    """The canonical form of a tables location: `s3://bucket/prefix`, or an absolute local path.

    File listings come back in this form, so paths under the root are found by plain prefix.
    """
    if storage.is_s3(tables_uri):
        return "s3://" + tables_uri.split("://", 1)[1].strip("/")
    return storage.fsspec_filesystem(tables_uri)[1].rstrip("/") or "/"


def check_location(tables_uri: str, *, must_exist: bool) -> None:
    """Fail early on a location that cannot hold tables: a missing bucket, or (`must_exist`) folder."""
    if storage.is_s3(tables_uri):
        bucket = "s3://" + tables_uri.split("://", 1)[1].split("/", 1)[0]
        if not storage.exists(bucket):
            raise FileNotFoundError(f"tables {tables_uri}: bucket {bucket} not found")
    elif must_exist and not storage.exists(tables_uri):
        raise FileNotFoundError(f"tables {tables_uri}: no such folder")


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


# --- writing ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommitResult:
    """What a commit published: rows added and earlier rows replaced, per table, and the manifest's URI."""

    job_run_id: str
    run_date: dt.date
    manifest_uri: str
    rows: dict[str, int]
    replaced: dict[str, int]
    files: int


class TableWriter:
    """Stages one run's rows for all tables, then commits them atomically and exactly once.

    >>> writer = TableWriter("s3://bucket/tables", job_run_id="20240501-ab12", run_date="2024-05-01")
    >>> writer.stage("classifications", table)          # any number of times, any tables
    >>> writer.commit({"models": ["c3d@3"], "videos_tagged": 120})

    Staged rows are invisible until `commit`; a run that dies before it leaves only a staging folder that
    the next writer deletes. Rows are written from the calling process (a tag run's aggregated rows are
    small: a few per video), streaming batch by batch, `max_rows_per_file` rows per Parquet file.
    """

    def __init__(
        self,
        tables_uri: str,
        job_run_id: str,
        run_date: str | dt.date,
        *,
        max_rows_per_file: int = 1_000_000,
    ) -> None:
        if not _JOB_RUN_ID.fullmatch(job_run_id or ""):
            raise TableError(
                f"job_run_id {job_run_id!r}: use 1-128 letters, digits, '.', '_', '-'; start alphanumeric"
            )
        if max_rows_per_file < 1:
            raise TableError(f"max_rows_per_file={max_rows_per_file} must be >= 1")
        self.tables_uri = root_uri(tables_uri)
        self.job_run_id = job_run_id
        self.run_date = parse_run_date(run_date)
        self.max_rows_per_file = max_rows_per_file
        check_location(self.tables_uri, must_exist=False)
        if storage.exists(_manifest_uri(self.tables_uri, job_run_id)):
            raise TableError(f"job_run_id {job_run_id!r} is already committed in {self.tables_uri}")
        _remove_quietly(self.staging_uri, recursive=True)  # left by an earlier attempt under the same id
        self._parts: dict[str, list[str]] = {}  # table -> relative paths of staged files
        self._rows: dict[str, int] = {}
        self._next: dict[str, int] = {}
        self._pred_claims: set[tuple[str, str, str]] = set()
        self._video_claims: set[str] = set()
        self._committed = False

    @property
    def staging_uri(self) -> str:
        """Where this run's files wait for the commit."""
        return storage.join_uri(self.tables_uri, STAGING, self.job_run_id)

    def stage(self, name: str, data: pa.Table | pa.RecordBatch | Iterable[pa.Table | pa.RecordBatch]) -> int:
        """Validate and stage rows of table `name`; returns the number of rows staged.

        All or nothing: when a chunk fails validation, nothing of this call stays staged.
        """
        self._check_open()
        _check_table(name)
        chunks = [data] if isinstance(data, (pa.Table, pa.RecordBatch)) else data
        staged = 0
        sinks: list[_PartSink] = []
        pred_claims: set[tuple[str, str, str]] = set()
        video_claims: set[str] = set()
        try:
            for chunk in chunks:
                if not isinstance(chunk, (pa.Table, pa.RecordBatch)):
                    raise TableError(
                        f"table {name}: expected pyarrow Tables or RecordBatches, got {type(chunk).__name__}"
                    )
                table = validate(name, chunk, job_run_id=self.job_run_id, run_date=self.run_date)
                _add_claims(name, table, pred_claims, video_claims)
                offset = 0
                while offset < table.num_rows:
                    if not sinks or sinks[-1].rows >= self.max_rows_per_file:
                        if sinks:
                            sinks[-1].close()
                        sinks.append(self._open_part(name))
                    take = min(table.num_rows - offset, self.max_rows_per_file - sinks[-1].rows)
                    sinks[-1].write(table.slice(offset, take))
                    offset += take
                staged += table.num_rows
            if sinks:
                sinks[-1].close()
        except BaseException:
            for sink in sinks:
                sink.discard()
            raise
        self._parts.setdefault(name, []).extend(sink.relpath for sink in sinks)
        self._rows[name] = self._rows.get(name, 0) + staged
        self._pred_claims |= pred_claims
        self._video_claims |= video_claims
        return staged

    def commit(self, metadata: Mapping[str, Any] | None = None) -> CommitResult:
        """Publish all staged rows at once, replacing what this run supersedes; `metadata` goes on record."""
        self._check_open()
        meta = dict(metadata or {})
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as err:
            raise TableError(f"commit metadata: not JSON-serializable ({err})") from None
        recover(self.tables_uri, keep=self.job_run_id)
        before = _list_commits(self.tables_uri)
        add = {name: list(paths) for name, paths in self._parts.items()}
        remove: dict[str, list[str]] = {}
        replaced: dict[str, int] = {}
        for name in TABLES:
            claims = self._claims_table(name)
            if claims is None:
                continue
            for relpath in _live_parts(self.tables_uri, name, self.run_date):
                kept, n_replaced = self._replace_in(relpath, name, claims)
                if not n_replaced:
                    continue
                remove.setdefault(name, []).append(relpath)
                replaced[name] = replaced.get(name, 0) + n_replaced
                if kept is not None:
                    sink = self._open_part(name)
                    sink.write(kept)
                    sink.close()
                    add.setdefault(name, []).append(sink.relpath)
        if _list_commits(self.tables_uri) != before:
            raise RuntimeError(
                f"tables {self.tables_uri}: another run committed while {self.job_run_id} was committing"
            )
        manifest = {
            "format": FORMAT_VERSION,
            "job_run_id": self.job_run_id,
            "run_date": self.run_date.isoformat(),
            "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "metadata": meta,
            "rows": {name: self._rows.get(name, 0) for name in TABLES if name in self._rows},
            "replaced": replaced,
            "add": add,
            "remove": remove,
        }
        uri = _manifest_uri(self.tables_uri, self.job_run_id)
        # The commit point. write_bytes is atomic: one PUT on S3, a temporary file renamed over it locally.
        storage.write_bytes(uri, json.dumps(manifest, indent=1, sort_keys=True).encode())
        self._committed = True
        _publish(self.tables_uri, manifest)
        return CommitResult(
            job_run_id=self.job_run_id,
            run_date=self.run_date,
            manifest_uri=uri,
            rows=dict(manifest["rows"]),
            replaced=replaced,
            files=sum(len(paths) for paths in add.values()),
        )

    def abort(self) -> None:
        """Drop everything staged (also what the next writer does for a run that never committed)."""
        self._check_open()
        _remove_quietly(self.staging_uri, recursive=True)
        self._parts.clear()
        self._rows.clear()
        self._pred_claims.clear()
        self._video_claims.clear()

    # -- internals --

    def _check_open(self) -> None:
        if self._committed:
            raise TableError(f"job_run_id {self.job_run_id!r}: this writer has already committed")

    def _open_part(self, name: str) -> _PartSink:
        n = self._next.get(name, 0)
        self._next[name] = n + 1
        relpath = _part_relpath(name, self.run_date, self.job_run_id, n)
        return _PartSink(storage.join_uri(self.staging_uri, relpath), relpath, file_schema(name))

    def _claims_table(self, name: str) -> pa.Table | None:
        if name in PREDICTION_TABLES:
            if not self._pred_claims:
                return None
            columns = [pa.array(c, pa.string()) for c in zip(*self._pred_claims, strict=True)]
            return pa.table(dict(zip(PREDICTION_KEY, columns, strict=True)))
        if not self._video_claims:
            return None
        return pa.table({"video_id": pa.array(sorted(self._video_claims), pa.string())})

    def _replace_in(self, relpath: str, name: str, claims: pa.Table) -> tuple[pa.Table | None, int]:
        """(rows of an earlier file to keep, or None when none; rows replaced) under this run's claims."""
        fs, path = storage.arrow_filesystem(storage.join_uri(self.tables_uri, relpath))
        keys = list(claims.column_names)
        old_keys = pq.read_table(path, filesystem=fs, columns=keys)
        hit = old_keys.join(claims, keys=keys, join_type="left semi").num_rows
        if not hit:
            return None, 0
        if hit == old_keys.num_rows:
            return None, hit
        old = pq.read_table(path, filesystem=fs, schema=file_schema(name))
        kept = old.join(claims, keys=keys, join_type="left anti").select(file_schema(name).names)
        return kept.cast(file_schema(name)), hit


def _add_claims(name: str, table: pa.Table, pred: set[tuple[str, str, str]], video: set[str]) -> None:
    """Add the replacement keys of `table`'s rows to the run's claims."""
    if not table.num_rows:
        return
    if name in PREDICTION_TABLES:
        keys = table.select(list(PREDICTION_KEY)).group_by(list(PREDICTION_KEY)).aggregate([])
        pred.update(zip(*(keys.column(k).to_pylist() for k in PREDICTION_KEY), strict=True))
    else:
        video.update(pc.unique(table.column("video_id")).to_pylist())


class _PartSink:
    """One staged Parquet file being written, on any filesystem."""

    def __init__(self, uri: str, relpath: str, file_schema_: pa.Schema) -> None:
        self.uri = uri
        self.relpath = relpath
        self.rows = 0
        storage.makedirs(uri.rsplit("/", 1)[0])
        fs, path = storage.arrow_filesystem(uri)
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(path, file_schema_, filesystem=fs)

    def write(self, table: pa.Table) -> None:
        assert self._writer is not None
        self._writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
        _remove_quietly(self.uri)


# --- commit, publish, recover -------------------------------------------------------------------------


def recover(tables_uri: str, *, keep: str | None = None) -> list[str]:
    """Finish every committed but unpublished run and delete staging left by runs that never committed.

    Idempotent; safe to call any time no writer is mid-commit. `keep` names a staging folder to leave
    alone (the caller's own). Returns the job_run_ids it rolled forward.
    """
    tables_uri = root_uri(tables_uri)
    _, pending = _list_commits(tables_uri)
    rolled = []
    for job in sorted(pending):
        _publish(tables_uri, _read_manifest(tables_uri, job))
        rolled.append(job)
    staging = storage.join_uri(tables_uri, STAGING)
    for job in _staged_runs(staging):
        if job != keep:
            # Every manifest is published by now: what is left in staging never committed.
            _remove_quietly(storage.join_uri(staging, job), recursive=True)
    if not storage.is_s3(tables_uri):  # S3 writes leave no temporary files
        for stale in _stale_temp_files(tables_uri):
            _remove_quietly(stale)
    return rolled


def _publish(tables_uri: str, manifest: Mapping[str, Any]) -> None:
    """Apply a committed manifest: move its files into place, delete what it replaces, mark it done."""
    job = manifest["job_run_id"]
    staging = storage.join_uri(tables_uri, STAGING, job)
    waiting = set(_list(staging))  # one listing instead of a lookup per file
    for paths in manifest["add"].values():
        for relpath in paths:
            final = storage.join_uri(tables_uri, relpath)
            staged = storage.join_uri(staging, relpath)
            if staged in waiting:
                storage.rename(staged, final)
            elif not storage.exists(final):  # else it was moved before a crash
                raise RuntimeError(f"commit {job}: staged file {staged} is missing; the tables need repair")
    for paths in manifest["remove"].values():
        for relpath in paths:
            _remove_quietly(storage.join_uri(tables_uri, relpath))
    storage.write_bytes(_marker_uri(tables_uri, job), b"")
    _remove_quietly(staging, recursive=True)


def _manifest_uri(tables_uri: str, job: str) -> str:
    return storage.join_uri(tables_uri, COMMITS, f"{job}.json")


def _marker_uri(tables_uri: str, job: str) -> str:
    return storage.join_uri(tables_uri, COMMITS, f"{job}.published")


def _list_commits(tables_uri: str) -> tuple[frozenset[str], frozenset[str]]:
    """(job_run_ids with a manifest, those of them not yet published)."""
    names = [uri.rsplit("/", 1)[-1] for uri in _list(storage.join_uri(tables_uri, COMMITS))]
    committed = {n[: -len(".json")] for n in names if n.endswith(".json") and not n.startswith(".")}
    published = {n[: -len(".published")] for n in names if n.endswith(".published")}
    return frozenset(committed), frozenset(committed - published)


def _read_manifest(tables_uri: str, job: str) -> dict[str, Any]:
    uri = _manifest_uri(tables_uri, job)
    try:
        manifest = json.loads(storage.read_bytes(uri))
    except ValueError as err:
        raise RuntimeError(f"commit manifest {uri}: not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise RuntimeError(f"commit manifest {uri}: unknown format {manifest.get('format')!r}")
    return manifest


def _staged_runs(staging_uri: str) -> set[str]:
    prefix = staging_uri.rstrip("/") + "/"
    return {uri[len(prefix) :].split("/", 1)[0] for uri in _list(staging_uri) if uri.startswith(prefix)}


def _stale_temp_files(tables_uri: str) -> list[str]:
    """Temporary files of local writes that a crash interrupted (`storage.write_bytes` names them .tmp-*)."""
    return [uri for uri in _list(storage.join_uri(tables_uri, COMMITS)) if ".tmp-" in uri.rsplit("/", 1)[-1]]


def _list(uri: str, suffix: str | None = None) -> list[str]:
    """Every file under `uri` (recursively); nothing when it does not exist."""
    try:
        return [str(u) for u in storage.list_files(uri, suffix=suffix)]
    except FileNotFoundError:
        return []


def _remove_quietly(uri: str, recursive: bool = False) -> None:
    with contextlib.suppress(FileNotFoundError):
        storage.remove(uri, recursive=recursive)


def _part_relpath(name: str, run_date: dt.date, job: str, n: int) -> str:
    return f"{name}/{PARTITION}={run_date.isoformat()}/part-{job}-{n}.parquet"


def _parse_relpath(name: str, relpath: str) -> tuple[dt.date, str] | None:
    """(run_date, job_run_id) of a table file, or None for a path outside the layout (ignored)."""
    parts = relpath.split("/")
    if len(parts) != 3 or parts[0] != name or any(p.startswith((".", "_")) for p in parts):
        return None
    partition, part = _PARTITION_DIR.fullmatch(parts[1]), _PART.fullmatch(parts[2])
    if partition is None or part is None:
        return None
    try:
        return dt.date.fromisoformat(partition["date"]), part["job"]
    except ValueError:
        return None


def _live_parts(tables_uri: str, name: str, run_date: dt.date) -> list[str]:
    """Relative paths of the published files of one partition (only valid with no commit pending)."""
    folder = storage.join_uri(tables_uri, name, f"{PARTITION}={run_date.isoformat()}")
    prefix = tables_uri.rstrip("/") + "/"
    out = []
    for uri in _list(folder, suffix=".parquet"):
        relpath = uri[len(prefix) :]
        if _parse_relpath(name, relpath) is not None:
            out.append(relpath)
    return sorted(out)


# --- reading ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """The committed state of a tables URI at one moment: per table, the files to read."""

    tables_uri: str
    committed: frozenset[str]
    # table -> ((uri, run_date), ...)
    files: dict[str, tuple[tuple[str, dt.date], ...]] = field(default_factory=dict)

    def uris(self, name: str) -> list[str]:
        _check_table(name)
        return [uri for uri, _ in self.files.get(name, ())]


def read_snapshot(tables_uri: str, tables: Sequence[str] = TABLES, *, attempts: int = 5) -> Snapshot:
    """The files of committed runs only, consistent across `tables` (retried if a commit lands meanwhile)."""
    for name in tables:
        _check_table(name)
    tables_uri = root_uri(tables_uri)
    for _ in range(attempts):
        commits = _list_commits(tables_uri)
        committed, pending = commits
        manifests = [_read_manifest(tables_uri, job) for job in sorted(pending)]
        files = {name: _snapshot_files(tables_uri, name, committed, manifests) for name in tables}
        if _list_commits(tables_uri) == commits:
            return Snapshot(tables_uri, committed, files)
        log.debug("tables %s: a commit landed while listing; listing again", tables_uri)
    raise RuntimeError(f"tables {tables_uri}: commits kept landing while listing; try again")


def _snapshot_files(
    tables_uri: str, name: str, committed: frozenset[str], pending: Sequence[Mapping[str, Any]]
) -> tuple[tuple[str, dt.date], ...]:
    prefix = tables_uri + "/"
    removed = {p for m in pending for p in m["remove"].get(name, ())}
    found: dict[str, dt.date] = {}
    for uri in _list(storage.join_uri(tables_uri, name), suffix=".parquet"):
        relpath = uri[len(prefix) :] if uri.startswith(prefix) else ""
        parsed = _parse_relpath(name, relpath)
        # A file of a run without a manifest is a commit being published after our listing: not ours yet.
        if parsed is not None and parsed[1] in committed and relpath not in removed:
            found[relpath] = parsed[0]
    out = [(storage.join_uri(tables_uri, rel), date) for rel, date in sorted(found.items())]
    for manifest in pending:
        staging = storage.join_uri(tables_uri, STAGING, manifest["job_run_id"])
        for relpath in manifest["add"].get(name, ()):
            parsed = _parse_relpath(name, relpath)
            if relpath not in found and parsed is not None:
                out.append((storage.join_uri(staging, relpath), parsed[0]))
    return tuple(out)


def committed_files(tables_uri: str, name: str) -> list[str]:
    """URIs of the files that hold table `name`'s committed rows right now."""
    return read_snapshot(tables_uri, (name,)).uris(name)


def dataset(tables_uri: str, name: str, snapshot: Snapshot | None = None) -> ds.Dataset:
    """A lazy pyarrow dataset over table `name`'s committed files, `run_date` taken from each file's path.

    DuckDB scans it with projection and filter pushdown; a table with no files is an empty dataset with
    the right schema.
    """
    snap = snapshot if snapshot is not None else read_snapshot(tables_uri, (name,))
    entries = snap.files.get(name, ())
    full = schema(name)
    if not entries:
        return ds.dataset([], schema=full, format="parquet")
    # One filesystem for all files; each file's path is the root's path plus its place under the root.
    fs, root = storage.arrow_filesystem(snap.tables_uri)
    base = snap.tables_uri.rstrip("/")
    paths = [root.rstrip("/") + uri[len(base) :] for uri, _ in entries]
    partitions = [pc.field(PARTITION) == pa.scalar(date, pa.date32()) for _, date in entries]
    return ds.FileSystemDataset.from_paths(
        paths, schema=full, format=ds.ParquetFileFormat(), filesystem=fs, partitions=partitions
    )


def read_table(tables_uri: str, name: str, columns: Sequence[str] | None = None) -> pa.Table:
    """Table `name`'s committed rows, all in memory (for small tables and tests; use `dataset` to scan)."""
    return dataset(tables_uri, name).to_table(columns=list(columns) if columns is not None else None)


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


def tagged_keys(tables_uri: str) -> set[tuple[str, str, str]]:
    """(video_id, model_name, model_version) of every committed prediction, from all prediction tables.

    The tag job skips a video whose key is here for the model version it is about to run.
    """
    snap = read_snapshot(tables_uri, PREDICTION_TABLES)
    out: set[tuple[str, str, str]] = set()
    for name in PREDICTION_TABLES:
        out |= committed_keys(tables_uri, name, PREDICTION_KEY, snap)  # type: ignore[arg-type]
    return out


def iter_manifests(tables_uri: str) -> Iterator[dict[str, Any]]:
    """Every commit manifest (run metadata, rows and replacements per table), oldest commit first."""
    tables_uri = root_uri(tables_uri)
    committed, _ = _list_commits(tables_uri)
    manifests = [_read_manifest(tables_uri, job) for job in committed]
    yield from sorted(manifests, key=lambda m: m["committed_at"])


def _check_table(name: str) -> None:
    if name not in SCHEMAS:
        raise TableError(f"unknown table {name!r}; tables: {', '.join(SCHEMAS)}")
