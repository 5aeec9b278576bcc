"""Data files of the tables, as the Delta log records them: written by any process, committed by the writer.

`write_files` validates rows against a table's schema and writes them as Parquet files into the table's
folder (partition `run_date=…/`), returning `DataFile`s: what a Delta add action needs (path, size, rows,
partition, statistics). They stay invisible to every reader until `flows.table_writer` commits them.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flows import storage, tables

MAX_ROWS_PER_FILE = 1_000_000


@dataclass(frozen=True)
class DataFile:
    """A Parquet file in a table's folder (`path` relative to it): what its Delta add action records."""

    path: str
    size: int
    rows: int
    run_date: str | None
    modification_time: int
    stats: str

    def add_action(self) -> Any:
        from deltalake.transaction import AddAction

        partition = {tables.PARTITION: self.run_date} if self.run_date is not None else {}
        return AddAction(self.path, self.size, partition, self.modification_time, True, self.stats)


@dataclass(frozen=True)
class RemovedFile:
    """A committed file that a chunk removes (its rows are replaced)."""

    path: str
    size: int
    run_date: str | None

    def remove_action(self) -> Any:
        from deltalake.transaction import RemoveAction

        partition = {tables.PARTITION: self.run_date} if self.run_date is not None else None
        return RemoveAction(self.path, True, int(time.time() * 1000), self.size, partition)


@dataclass
class TableChange:
    """One table's part of a chunk: files to add (`rows` new rows) and files to remove (`replaced` rows)."""

    adds: list[DataFile] = field(default_factory=list)
    removes: list[RemovedFile] = field(default_factory=list)
    rows: int = 0
    replaced: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"add": [asdict(f) for f in self.adds], "remove": [asdict(f) for f in self.removes],
                "rows": self.rows, "replaced": self.replaced}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TableChange:
        return cls([DataFile(**f) for f in data["add"]], [RemovedFile(**f) for f in data["remove"]],
                   int(data["rows"]), int(data["replaced"]))  # fmt: skip


def write_files(
    tables_uri: str,
    name: str,
    data: pa.Table,
    *,
    job_run_id: str,
    run_date: dt.date,
    max_rows_per_file: int = MAX_ROWS_PER_FILE,
) -> list[DataFile]:
    """Validate `data` against table `name` and write it as uncommitted data files of partition `run_date`."""
    table = tables.validate(name, data, job_run_id=job_run_id, run_date=run_date)
    if max_rows_per_file < 1:
        raise tables.TableError(f"max_rows_per_file={max_rows_per_file} must be >= 1")
    out = []
    for offset in range(0, table.num_rows, max_rows_per_file):
        out.append(write_parquet(tables.table_uri(tables_uri, name), table.slice(offset, max_rows_per_file),
                                  run_date.isoformat(), job_run_id))  # fmt: skip
    return out


def write_parquet(folder_uri: str, table: pa.Table, run_date: str | None, tag: str) -> DataFile:
    """Write `table` as one Parquet file under `folder_uri` (in partition `run_date`, when given)."""
    partition = f"{tables.PARTITION}={run_date}/" if run_date is not None else ""
    relpath = f"{partition}part-{tag}-{uuid.uuid4().hex[:12]}.parquet"
    uri = storage.join_uri(folder_uri, relpath)
    storage.makedirs(uri.rsplit("/", 1)[0])
    fs, path = storage.arrow_filesystem(uri)
    pq.write_table(table, path, filesystem=fs, compression="zstd")
    size = fs.get_file_info(path).size
    return DataFile(relpath, int(size), table.num_rows, run_date, int(time.time() * 1000), file_stats(table))


def file_stats(table: pa.Table) -> str:
    """Delta file statistics: row count, and per flat column its nulls, minimum and maximum."""
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    for column, spec in zip(table.columns, table.schema, strict=True):
        if pa.types.is_nested(spec.type):
            continue
        nulls[spec.name] = column.null_count
        if not table.num_rows or column.null_count == table.num_rows:
            continue
        low, high = (v.as_py() for v in pc.min_max(column).values())
        if isinstance(low, str) and max(len(low), len(high)) > 64:
            continue  # a truncated maximum would be wrong; skipping a statistic is always allowed
        if isinstance(low, float) and (math.isnan(low) or math.isnan(high)):
            continue
        mins[spec.name], maxs[spec.name] = _stat_value(low), _stat_value(high)
    stats = {"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls}
    return json.dumps(stats)


def _stat_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


# --- replacement ----------------------------------------------------------------------------------------


def replaced_keys(rows: Mapping[str, pa.Table]) -> dict[str, pa.Table]:
    """Per table, the keys whose earlier rows a chunk of `rows` replaces: (video, model, version) in the
    prediction tables and `errors`, taken from all of them (a video re-tagged with no row in some table
    still loses its earlier rows there), and the video ids in `videos`."""
    keyed = [t.select(list(tables.PREDICTION_KEY)) for n, t in rows.items() if n != "videos" and t.num_rows]
    predictions = _distinct(
        pa.concat_tables([k.cast(key_schema(tables.PREDICTION_KEY)) for k in keyed])
        if keyed
        else key_schema(tables.PREDICTION_KEY).empty_table()
    )
    out = {name: predictions for name in tables.TABLES if name != "videos"}
    if "videos" in rows:
        out["videos"] = _distinct(rows["videos"].select(list(tables.VIDEO_KEY)))
    return out


def union_keys(first: pa.Table, second: pa.Table) -> pa.Table:
    """The distinct keys of both tables (same key columns)."""
    schema = key_schema(first.column_names)
    return _distinct(pa.concat_tables([first.cast(schema), second.select(schema.names).cast(schema)]))


def key_schema(columns: Sequence[str]) -> pa.Schema:
    """Key columns as strings, the type removals join on."""
    return pa.schema([pa.field(c, pa.string()) for c in columns])


def _distinct(keys: pa.Table) -> pa.Table:
    keys = keys.cast(key_schema(keys.column_names))
    return keys.group_by(keys.column_names).aggregate([]).select(keys.column_names)
