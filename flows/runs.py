"""The run log `TABLES/_runs`: a small Delta table with one row per event of a run's chunks.

A chunk is logged twice: `pending` before any table commit, with the chunk's file actions (a write-ahead
record that lets the next holder of the lease roll an interrupted chunk forward), then `committed` with the
version of every table once all of them hold it. A run ends with a `finished` or `failed` row (chunk 0).
Readers pin the tables at the versions of the last `committed` row in commit order (its `token`).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from flows import storage
from flows.delta import TIMESTAMP, delta_errors, open_delta

FOLDER = "_runs"  # under the tables location
PENDING, COMMITTED, FINISHED, FAILED = "pending", "committed", "finished", "failed"
STATUSES = (PENDING, COMMITTED, FINISHED, FAILED)
_VERSIONS = pa.map_(pa.string(), pa.int64())

SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("chunk", pa.int32(), nullable=False),  # 1, 2, … within the run; 0 on run-level rows
    pa.field("status", pa.string(), nullable=False),
    pa.field("epoch", pa.int64(), nullable=False),  # the lease epoch of the writer of this row
    pa.field("token", pa.int64(), nullable=False),  # the fencing token of the chunk's commits: commit order
    pa.field("night", pa.date32(), nullable=False),
    pa.field("models", pa.list_(pa.string())),
    pa.field("versions", _VERSIONS),  # committed: every table's version once the chunk is in all of them
    pa.field("rows", _VERSIONS),  # committed: rows the chunk added per table
    pa.field("replaced", _VERSIONS),  # committed: earlier rows the chunk replaced per table
    pa.field("actions", pa.string()),  # pending: the chunk's file actions per table, as JSON
    pa.field("recovered_by", pa.string()),  # committed by another run's roll-forward
    pa.field("message", pa.string()),
    pa.field("host", pa.string()),
    pa.field("pid", pa.int64()),
    pa.field("started_at", TIMESTAMP),  # when the run began
    pa.field("at", TIMESTAMP, nullable=False),  # when this row was written
])  # fmt: skip


def row(
    *,
    run_id: str,
    chunk: int,
    status: str,
    epoch: int,
    token: int,
    night: dt.date,
    models: Sequence[str] = (),
    started_at: dt.datetime | None = None,
    versions: Mapping[str, int] | None = None,
    rows: Mapping[str, int] | None = None,
    replaced: Mapping[str, int] | None = None,
    actions: str | None = None,
    recovered_by: str | None = None,
    message: str | None = None,
    host: str | None = None,
    pid: int | None = None,
) -> pa.Table:
    """One row of the run log."""
    if status not in STATUSES:
        raise ValueError(f"run log: status {status!r} is not one of {', '.join(STATUSES)}")

    def mapping(values: Mapping[str, int] | None) -> list[tuple[str, int]] | None:
        return None if values is None else sorted(values.items())

    return pa.Table.from_pylist(
        [{
            "run_id": run_id, "chunk": chunk, "status": status, "epoch": epoch, "token": token,
            "night": night, "models": list(models), "versions": mapping(versions), "rows": mapping(rows),
            "replaced": mapping(replaced), "actions": actions, "recovered_by": recovered_by,
            "message": message, "host": host, "pid": pid, "started_at": started_at,
            "at": dt.datetime.now(dt.timezone.utc),
        }],
        schema=SCHEMA,
    )  # fmt: skip


def read_log(tables_uri: str, version: int | None = None) -> pa.Table | None:
    """The whole run log (it holds a few rows per chunk), or None where no run has written one."""
    uri = storage.join_uri(tables_uri, FOLDER)
    table = open_delta(uri, version)
    if table is None:
        return None
    with delta_errors(uri):
        return table.to_pyarrow_dataset(schema=SCHEMA).to_table()


@dataclass(frozen=True)
class SnapshotPoint:
    """A complete chunk: the versions every table had once it was in all of them."""

    run_id: str
    chunk: int
    token: int
    night: dt.date
    versions: dict[str, int]


def commit_order(log: pa.Table | None) -> pa.Table:
    """(job_run_id, token): each run with a complete chunk and the token of its first one (commit order)."""
    if log is None:
        return pa.table({"job_run_id": pa.array([], pa.string()), "token": pa.array([], pa.int64())})
    committed = log.filter(pc.equal(log.column("status"), COMMITTED))
    order = committed.group_by("run_id").aggregate([("token", "min")])
    return order.select(["run_id", "token_min"]).rename_columns(["job_run_id", "token"])


def snapshot_point(log: pa.Table, as_of: str | dt.date | None = None) -> SnapshotPoint | None:
    """The last complete chunk in commit order; with `as_of`, the last one of that run id, or of the last
    run whose night is on or before that date. None when there is none."""
    committed = log.filter(pc.equal(log.column("status"), COMMITTED))
    if isinstance(as_of, str):
        try:
            as_of = dt.date.fromisoformat(as_of)
        except ValueError:
            committed = committed.filter(pc.equal(committed.column("run_id"), as_of))
    if isinstance(as_of, dt.date):
        committed = committed.filter(pc.less_equal(committed.column("night"), pa.scalar(as_of, pa.date32())))
    if not committed.num_rows:
        return None
    last = committed.take([pc.index(committed.column("token"), pc.max(committed.column("token"))).as_py()])
    (entry,) = last.to_pylist()
    return SnapshotPoint(
        entry["run_id"], entry["chunk"], entry["token"], entry["night"], dict(entry["versions"])
    )


@dataclass(frozen=True)
class PendingChunk:
    """A chunk logged as pending and never logged as committed: its commits may be half done."""

    run_id: str
    chunk: int
    night: dt.date
    models: tuple[str, ...]
    actions: dict[str, Any]


def pending_chunks(log: pa.Table) -> list[PendingChunk]:
    """Chunks whose commit was interrupted, oldest first."""
    entries = log.select(["run_id", "chunk", "status", "token", "night", "models", "actions"]).to_pylist()
    done = {(e["run_id"], e["chunk"]) for e in entries if e["status"] == COMMITTED}
    pending = sorted(
        (e for e in entries if e["status"] == PENDING and (e["run_id"], e["chunk"]) not in done),
        key=lambda e: e["token"],
    )
    return [
        PendingChunk(e["run_id"], e["chunk"], e["night"], tuple(e["models"] or ()), json.loads(e["actions"]))
        for e in pending
    ]
