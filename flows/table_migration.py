"""`reelflow tables migrate`: tables of the previous format converted in place to Delta Lake, every row kept.

The previous format kept plain hive-partitioned Parquet (`<table>/run_date=D/part-<run>-<n>.parquet`), a
JSON manifest per committed run in `_commits/`, and a run's files in `_staging/<run>/` until published.
Its files already sit where a Delta table partitioned by `run_date` keeps them, so they stay in place: a run
whose publish was cut off is finished first (its staged files moved in, the files it replaced deleted),
files of runs that never committed are deleted, and each committed run's files are committed to the Delta
tables as one chunk logged under that run's id, in the order the runs committed. `_commits/` and `_staging/`
go last; a migration that is cut off can be run again.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from flows import runs, storage, table_files, table_writer, tables
from flows.lease import DEFAULT_TTL_S, Lease
from flows.table_files import DataFile

log = logging.getLogger(__name__)

COMMITS, STAGING = "_commits", "_staging"
_PART = re.compile(r"part-(?P<run>[A-Za-z0-9][A-Za-z0-9_.-]*)-\d+\.parquet")
_PARTITION_DIR = re.compile(rf"{tables.PARTITION}=(\d{{4}}-\d{{2}}-\d{{2}})")


@dataclass(frozen=True)
class MigrationResult:
    """What a migration converted: runs, and rows per table."""

    runs: int
    rows: dict[str, int]
    files_dropped: int  # files of runs that never committed (no reader ever saw them)


def needs_migration(tables_uri: str) -> bool:
    """Whether `tables_uri` holds tables of the previous format."""
    try:
        tables.check_format(tables_uri)
    except tables.LegacyTablesError:
        return True
    return False


def migrate(tables_uri: str, *, lease_wait_s: float | None = None) -> MigrationResult:
    """Convert the tables at `tables_uri` in place, holding their lease (a no-op once converted)."""
    root = tables.root_uri(tables_uri)
    tables.check_location(root, must_exist=True)
    migration_id = f"migrate-{uuid.uuid4().hex[:8]}"
    with Lease.acquire(root, migration_id, ttl_s=DEFAULT_TTL_S, wait_s=lease_wait_s) as lease:
        manifests = _manifests(root)
        for manifest in manifests:
            if not storage.exists(_marker(root, manifest["job_run_id"])):
                _publish(root, manifest)
        committed = {m["job_run_id"] for m in manifests}
        by_run, dropped = _files_by_run(root, committed)
        writer = table_writer.TableWriter(root, migration_id, dt.date.today(), lease=lease)
        writer.open()
        done = _migrated_runs(root)
        rows: dict[str, int] = {}
        for manifest in sorted(manifests, key=lambda m: m["committed_at"]):
            run = manifest["job_run_id"]
            if run in done or run not in by_run:
                continue
            night = dt.date.fromisoformat(manifest["run_date"])
            models = [str(m) for m in manifest.get("metadata", {}).get("models", [])]
            result = writer.commit_chunk(by_run[run], run_id=run, night=night, models=models)
            writer.finish(runs.FINISHED, message=f"migrated by {migration_id}", run_id=run, night=night)
            for name, n in (result.rows if result else {}).items():
                rows[name] = rows.get(name, 0) + n
        for name in (COMMITS, STAGING):
            storage.remove(storage.join_uri(root, name), recursive=True)
    return MigrationResult(len(by_run), rows, dropped)


def _manifests(root: str) -> list[dict[str, Any]]:
    out = []
    for uri in _list(storage.join_uri(root, COMMITS)):
        name = uri.rsplit("/", 1)[-1]
        if name.endswith(".json") and not name.startswith("."):
            try:
                out.append(json.loads(storage.read_bytes(uri)))
            except ValueError as err:
                raise tables.TableError(f"commit manifest {uri}: not valid JSON ({err})") from None
    return out


def _marker(root: str, run: str) -> str:
    return storage.join_uri(root, COMMITS, f"{run}.published")


def _publish(root: str, manifest: Mapping[str, Any]) -> None:
    """Finish a publish the previous format cut off: staged files into place, replaced files deleted."""
    run = manifest["job_run_id"]
    staging = storage.join_uri(root, STAGING, run)
    for paths in manifest["add"].values():
        for relpath in paths:
            staged = storage.join_uri(staging, relpath)
            if storage.exists(staged):
                storage.rename(staged, storage.join_uri(root, relpath))
    for paths in manifest["remove"].values():
        for relpath in paths:
            storage.remove(storage.join_uri(root, relpath))
    storage.write_bytes(_marker(root, run), b"")


def _files_by_run(root: str, committed: set[str]) -> tuple[dict[str, dict[str, list[DataFile]]], int]:
    """run → table → its files as Delta add actions; files of runs that never committed are deleted."""
    by_run: dict[str, dict[str, list[DataFile]]] = {}
    dropped = 0
    for name in tables.TABLES:
        folder = storage.join_uri(root, name)
        for uri in _list(folder):
            relpath = uri[len(folder) + 1 :]
            parts = relpath.split("/")
            if len(parts) != 2 or parts[0].startswith(("_", ".")):
                continue  # the Delta log of a table converted by an earlier attempt, or a stray file
            partition, part = _PARTITION_DIR.fullmatch(parts[0]), _PART.fullmatch(parts[1])
            if partition is None or part is None:
                continue
            if part["run"] not in committed:
                storage.remove(uri)
                dropped += 1
                continue
            by_run.setdefault(part["run"], {}).setdefault(name, []).append(
                _data_file(uri, relpath, partition[1])
            )
    return by_run, dropped


def _data_file(uri: str, relpath: str, run_date: str) -> DataFile:
    fs, path = storage.arrow_filesystem(uri)
    table = pq.read_table(path, filesystem=fs)
    size = int(fs.get_file_info(path).size)
    return DataFile(relpath, size, table.num_rows, run_date, int(dt.datetime.now().timestamp() * 1000),
                    table_files.file_stats(table))  # fmt: skip


def _migrated_runs(root: str) -> set[str]:
    log_table = runs.read_log(root)
    if log_table is None:
        return set()
    return {
        e["run_id"]
        for e in log_table.select(["run_id", "status"]).to_pylist()
        if e["status"] == runs.COMMITTED
    }


def _list(uri: str) -> list[str]:
    try:
        return storage.list_files(uri)
    except FileNotFoundError:
        return []
