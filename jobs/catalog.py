"""`reelflow tables`: operate the catalog — history, check, repair, optimize, vacuum, purge, migrate.

    reelflow tables history s3://analytics/tables             # one row per run: night, models, rows, status
    reelflow tables check s3://analytics/tables               # exit 1 and one line per problem
    reelflow tables vacuum s3://analytics/tables --retain 7d  # files no version of the last 7 days reads
    reelflow tables purge s3://analytics/tables --uri 's3://videos/takedown/*'

Writers (repair, optimize, vacuum, purge, migrate) take the tables' lease like a tag run, waiting up to
`--lease-wait` seconds for one that holds it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa

from flows import delta, lease, runs, table_maintenance, table_migration, tables
from jobs import query

Operation = Literal["history", "check", "repair", "optimize", "vacuum", "purge", "migrate"]
OPERATIONS: tuple[str, ...] = ("history", "check", "repair", "optimize", "vacuum", "purge", "migrate")


@dataclass(frozen=True)
class CatalogConfig:
    """One `reelflow tables` operation on the tables at `tables`."""

    operation: Operation
    tables: str
    lease_wait_s: float | None = None
    retain: str = "7d"
    target_size_mb: int | None = None
    uri_pattern: str | None = None
    format: query.Format = "table"

    def __post_init__(self) -> None:
        if self.operation not in OPERATIONS:
            raise ValueError(f"tables: operation {self.operation!r} is not one of {', '.join(OPERATIONS)}")
        if self.operation == "purge" and not (self.uri_pattern or "").strip():
            raise ValueError("tables purge: --uri is required (a source URI, or a glob with * and ?)")
        if self.operation == "vacuum":
            table_maintenance.parse_duration_hours(self.retain)
        if self.target_size_mb is not None and self.target_size_mb < 1:
            raise ValueError(f"tables optimize: target_size_mb={self.target_size_mb} must be >= 1")
        if self.format == "parquet":
            raise ValueError("tables: format parquet is not offered here; use table, csv or json")


def main(config: CatalogConfig) -> int:
    """Run the operation, print what it found or did; returns the exit status."""
    uri, wait = config.tables, config.lease_wait_s
    if config.operation == "migrate":
        if not table_migration.needs_migration(uri):
            print(f"tables {uri}: already Delta Lake tables; nothing to migrate")
            return 0
        result = table_migration.migrate(uri, lease_wait_s=wait)
        rows = _counts(result.rows) or "no rows"
        print(f"migrated {result.runs} runs to Delta Lake tables in place ({rows})")
        return 0
    if config.operation == "history":
        print_table(history(uri), config.format, title=f"runs of {tables.root_uri(uri)}")
        return 0
    if config.operation == "check":
        problems = table_maintenance.check(uri)
        for problem in problems:
            print(problem)
        if not problems:
            print(f"tables {tables.root_uri(uri)}: consistent")
        return 1 if problems else 0
    if config.operation == "repair":
        for line in table_maintenance.repair(uri, lease_wait_s=wait) or ["nothing to repair"]:
            print(line)
        remaining = table_maintenance.check(uri)
        for problem in remaining:
            print(f"still: {problem}", file=sys.stderr)
        return 1 if remaining else 0
    if config.operation == "optimize":
        done = table_maintenance.optimize(uri, target_size_mb=config.target_size_mb, lease_wait_s=wait)
        for name, (removed, added) in done.items():
            print(f"{name}: compacted {removed} files into {added}")
        return 0
    if config.operation == "vacuum":
        hours = table_maintenance.parse_duration_hours(config.retain)
        deleted = table_maintenance.vacuum(uri, retain_hours=hours, lease_wait_s=wait)
        print(f"deleted {sum(deleted.values())} files no version of the last {config.retain} reads "
              f"({_counts(deleted) or 'none'})")  # fmt: skip
        return 0
    assert config.uri_pattern is not None
    removed = table_maintenance.purge(uri, config.uri_pattern, lease_wait_s=wait)
    print(f"purged {config.uri_pattern}: {_counts(removed) or 'no rows matched'}")
    return 0


def history(tables_uri: str) -> pa.Table:
    """The runs of the tables, oldest first (see `run_history`)."""
    root = tables.root_uri(tables_uri)
    tables.check_location(root, must_exist=True)
    log_table = runs.read_log(root)
    if log_table is None:
        tables.check_format(root)
        return HISTORY_SCHEMA.empty_table()
    holder = lease.holder(root)
    running = holder.owner if holder is not None and not holder.dead(time.time()) else None
    return run_history(log_table, running)


HISTORY_SCHEMA = pa.schema([
    pa.field("run_id", pa.string()), pa.field("night", pa.date32()), pa.field("models", pa.string()),
    pa.field("chunks", pa.int64()), *(pa.field(f"rows_{name}", pa.int64()) for name in tables.TABLES),
    pa.field("started_at", delta.TIMESTAMP), pa.field("ended_at", delta.TIMESTAMP),
    pa.field("status", pa.string()), pa.field("message", pa.string()),
])  # fmt: skip


def run_history(log: pa.Table, running: str | None = None) -> pa.Table:
    """One row per run in the order runs began committing: its night, models, complete chunks, rows added
    per table, start, end and status (`finished`, `failed`, `running` for the run named by `running`, which
    holds the lease, else `interrupted`)."""
    by_run: dict[str, list[dict[str, Any]]] = {}
    for entry in sorted(log.drop_columns(["actions"]).to_pylist(), key=lambda e: (e["token"], e["at"])):
        by_run.setdefault(entry["run_id"], []).append(entry)
    out = []
    for run_id, entries in by_run.items():
        chunks = [e for e in entries if e["status"] == runs.COMMITTED and e["chunk"] > 0]
        ends = [e for e in entries if e["status"] in (runs.FINISHED, runs.FAILED)]
        added: dict[str, int] = {}
        for chunk in chunks:
            for name, n in chunk["rows"] or ():
                added[name] = added.get(name, 0) + n
        if ends:
            status, message, ended = ends[-1]["status"], ends[-1]["message"], ends[-1]["at"]
        else:
            status, ended = ("running" if run_id == running else "interrupted"), None
            helpers = sorted({e["recovered_by"] for e in chunks if e["recovered_by"]})
            message = f"chunks finished by {', '.join(helpers)}" if helpers else None
        starts = [e["started_at"] for e in entries if e["started_at"] is not None]
        out.append({
            "run_id": run_id, "night": entries[0]["night"], "models": ", ".join(entries[0]["models"] or ()),
            "chunks": len({e["chunk"] for e in chunks}),
            **{f"rows_{name}": added.get(name, 0) for name in tables.TABLES},
            "started_at": min(starts) if starts else None, "ended_at": ended, "status": status,
            "message": message,
        })  # fmt: skip
    return pa.Table.from_pylist(out, schema=HISTORY_SCHEMA)


def print_table(result: pa.Table, fmt: query.Format, title: str) -> None:
    """`result` as a table on screen, or as CSV or JSON on stdout."""
    if fmt == "table":
        query.show(query.rich_table(result, title=title))
    else:
        sys.stdout.write(query.encode(result, fmt).decode() + "\n")


def _counts(per_table: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(per_table.items()) if n)
