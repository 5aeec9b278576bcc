"""Operating the tables: compaction, vacuum, purging a source, and checking and repairing consistency.

Every operation that changes the tables holds their lease, is fenced like a tag run's commits, rolls
forward a chunk an earlier run left half committed (as every writer does on taking the lease), and is
logged in `_runs` as a run of its own, so `reelflow tables history` lists it and readers move to the
versions it leaves. Data files that an operation replaces stay on storage until `vacuum` removes them
after the retention period, so a reader pinned to a version within it keeps working.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from flows import runs, storage, table_writer, tables
from flows.table_writer import TableWriter

if TYPE_CHECKING:
    from deltalake import DeltaTable

log = logging.getLogger(__name__)

DEFAULT_RETAIN_HOURS = 7 * 24
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([dhm])")


def parse_duration_hours(text: str) -> float:
    """Hours in a duration such as '7d', '36h' or '90m'."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"retain {text!r}: expected a duration such as 7d, 36h or 90m")
    return float(match[1]) * {"d": 24.0, "h": 1.0, "m": 1 / 60}[match[2]]


@contextmanager
def operating(tables_uri: str, operation: str, *, lease_wait_s: float | None = None) -> Iterator[TableWriter]:
    """A writer for a maintenance run named `<operation>-<id>`, dated with the night of the tables' state."""
    root = tables.root_uri(tables_uri)
    tables.check_location(root, must_exist=True)
    log_table = runs.read_log(root)
    point = runs.snapshot_point(log_table) if log_table is not None else None
    night = point.night if point is not None else dt.datetime.now(dt.timezone.utc).date()
    run_id = f"{operation}-{uuid.uuid4().hex[:8]}"
    with table_writer.writing(root, run_id, night, lease_wait_s=lease_wait_s) as writer:
        yield writer


# --- compaction and vacuum ------------------------------------------------------------------------------


def optimize(
    tables_uri: str, *, target_size_mb: int | None = None, lease_wait_s: float | None = None
) -> dict[str, tuple[int, int]]:
    """Compact each night's small files into larger ones; returns (files removed, files added) per table."""
    target = None if target_size_mb is None else target_size_mb * 1024 * 1024
    out: dict[str, tuple[int, int]] = {}
    with operating(tables_uri, "optimize", lease_wait_s=lease_wait_s) as writer:
        for name in (*tables.TABLES, tables.RUNS):  # the run log gains a few small files every chunk
            metrics = writer.fenced(
                name, "optimize", lambda t, p: t.optimize.compact(target_size=target, commit_properties=p)
            )
            out[name] = (int(metrics.get("numFilesRemoved", 0)), int(metrics.get("numFilesAdded", 0)))
        removed, added = sum(r for r, _ in out.values()), sum(a for _, a in out.values())
        writer.commit_point(f"compacted {removed} files into {added}")
        writer.outcome = f"compacted {removed} files into {added}"
    return out


def vacuum(
    tables_uri: str, *, retain_hours: float = DEFAULT_RETAIN_HOURS, lease_wait_s: float | None = None
) -> dict[str, int]:
    """Delete data files no version within `retain_hours` reads (and files no commit ever referenced, such
    as those of runs that died before committing); returns the files deleted per table."""
    if retain_hours < 0:
        raise ValueError(f"vacuum: retain={retain_hours} hours must be >= 0")
    out: dict[str, int] = {}
    with operating(tables_uri, "vacuum", lease_wait_s=lease_wait_s) as writer:
        pinned = tables.read_snapshot(writer.tables_uri).versions  # what `reelflow query` reads now
        for name in (*tables.TABLES, tables.RUNS):
            keep = [pinned[name]] if pinned.get(name) is not None else None
            deleted = writer.fenced(
                name, "vacuum",
                lambda t, p, keep=keep: t.vacuum(
                    retention_hours=int(retain_hours), dry_run=False, enforce_retention_duration=False,
                    full=True, keep_versions=keep, commit_properties=p,
                ),
            )  # fmt: skip
            out[name] = len(deleted)
        writer.outcome = f"deleted {sum(out.values())} files older than {retain_hours:g} h"
    return out


# --- purging a source -----------------------------------------------------------------------------------


def purge(tables_uri: str, uri_pattern: str, *, lease_wait_s: float | None = None) -> dict[str, int]:
    """Delete every row of the sources whose URI matches `uri_pattern` (exact, or a glob with * and ?)
    from every table, in one chunk; returns the rows removed per table."""
    if not uri_pattern.strip():
        raise ValueError("purge: --uri is empty")
    like = _glob_to_like(uri_pattern)
    with operating(tables_uri, "purge", lease_wait_s=lease_wait_s) as writer:
        snapshot = tables.read_snapshot(writer.tables_uri)
        ids: set[str] = set()
        for name in tables.TABLES:
            found = tables.dataset(writer.tables_uri, name, snapshot).to_table(
                columns=["video_id"], filter=pc.match_like(pc.field("uri"), like)
            )
            ids.update(found.column("video_id").to_pylist())
        if not ids:
            writer.outcome = f"no rows of a source matching {uri_pattern}"
            return {}
        keys = pa.table({"video_id": sorted(ids)})
        result = writer.commit_chunk({}, remove=dict.fromkeys(tables.TABLES, keys))
        removed = result.replaced if result is not None else {}
        writer.outcome = f"purged {len(ids)} videos matching {uri_pattern}"
    return removed


def _glob_to_like(pattern: str) -> str:
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


# --- check and repair -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """An inconsistency `check` found: where, what, and whether `repair` mends it."""

    table: str
    kind: str
    message: str
    repairable: bool

    def __str__(self) -> str:
        return f"{self.table}: {self.message}" + ("" if self.repairable else " (repair cannot mend this)")


def check(tables_uri: str) -> list[Problem]:
    """Every table opens, every data file it lists exists, every version the run log pins can still be
    read, no chunk is half committed, and no key has rows of two runs."""
    root = tables.root_uri(tables_uri)
    tables.check_location(root, must_exist=True)
    tables.check_format(root)
    problems: list[Problem] = []
    log_table = runs.read_log(root)
    if log_table is None:
        return problems
    for chunk in runs.pending_chunks(log_table):
        problems.append(Problem(tables.RUNS, "interrupted chunk",
                                f"chunk {chunk.chunk} of run {chunk.run_id} is committed to some tables only",
                                repairable=True))  # fmt: skip
    latest: dict[str, int | None] = {}
    for name in tables.TABLES:
        try:
            table = tables.open_table(root, name)
        except OSError as err:
            problems.append(Problem(name, "unreadable", f"does not open ({err})", repairable=False))
            continue
        if table is None:
            problems.append(Problem(name, "missing", "the table is missing (repair creates it empty)", True))
            latest[name] = None
            continue
        latest[name] = table.version()
        problems += _missing_files(root, name, table)
        problems += _lost_versions(root, name, log_table, table.version())
    snapshot = tables.Snapshot(root, latest)
    unreadable = {p.table for p in problems if p.kind == "missing file"}  # scanning them would fail
    for name in tables.TABLES:
        if latest.get(name) is not None and name not in unreadable:
            duplicated = _duplicated(root, name, snapshot)
            if duplicated.num_rows:
                example = ", ".join(str(v) for v in duplicated.slice(0, 1).to_pylist()[0].values())
                message = f"{duplicated.num_rows} key(s) have rows of more than one run, e.g. ({example})"
                problems.append(Problem(name, "duplicate", message, repairable=True))
    return problems


def repair(tables_uri: str, *, lease_wait_s: float | None = None) -> list[str]:
    """Mend what `check` reports that can be mended; returns what was done, one line each."""
    done: list[str] = []
    with operating(tables_uri, "repair", lease_wait_s=lease_wait_s) as writer:
        done += [f"finished committing chunk {c.chunk} of run {c.run_id}" for c in writer.recovered]
        problems = check(writer.tables_uri)
        for problem in problems:
            if problem.kind == "missing file":
                report = writer.fenced(
                    problem.table, "repair", lambda t, p: t.repair(dry_run=False, commit_properties=p)
                )
                done.append(f"{problem.table}: dropped {len(report.get('files_removed', []))} missing data "
                            "file(s) from the table; their rows are lost")  # fmt: skip
        duplicates = [p.table for p in problems if p.kind == "duplicate"]
        if duplicates:
            ranked = runs.commit_order(runs.read_log(writer.tables_uri)).to_pylist()
            order = {entry["job_run_id"]: entry["token"] for entry in ranked}
            latest = tables.Snapshot(writer.tables_uri, {n: tables.open_table(writer.tables_uri, n).version()
                                                         for n in tables.TABLES})  # fmt: skip
            remove = {name: _later_copies(writer.tables_uri, name, latest, order) for name in duplicates}
            result = writer.commit_chunk({}, remove=remove)
            for name, n in (result.replaced if result else {}).items():
                done.append(f"{name}: removed {n} row(s) that repeated an earlier run's")
        elif any(p.kind == "missing file" for p in problems):
            writer.commit_point("repaired")
        writer.outcome = "; ".join(done) or "nothing to repair"
    return done


def _missing_files(root: str, name: str, table: DeltaTable) -> list[Problem]:
    folder = tables.table_uri(root, name)
    listed = {uri[len(folder) + 1 :] for uri in storage.list_files(folder, suffix=".parquet")}
    active = pa.table(table.get_add_actions(flatten=True)).column("path").to_pylist()
    missing = [path for path in active if path not in listed]
    if not missing:
        return []
    message = f"{len(missing)} data file(s) in the log are missing from storage, e.g. {missing[0]}"
    return [Problem(name, "missing file", message, repairable=True)]


def _lost_versions(root: str, name: str, log_table: pa.Table, latest: int) -> list[Problem]:
    """Versions that complete chunks pinned and that can no longer be loaded (their log entries expired)."""
    earliest = _earliest_version(root, name)
    lost = []
    for entry in log_table.filter(pc.equal(log_table.column("status"), runs.COMMITTED)).to_pylist():
        version = dict(entry["versions"] or ()).get(name)
        if version is not None and not earliest <= version <= latest:
            lost.append((entry["run_id"], entry["chunk"], version))
    if not lost:
        return []
    run_id, chunk, version = lost[0]
    message = (f"{len(lost)} version(s) pinned by the run log can no longer be read (time travel to them is "
               f"gone), e.g. version {version} of run {run_id} chunk {chunk}")  # fmt: skip
    return [Problem(name, "lost version", message, repairable=False)]


def _earliest_version(root: str, name: str) -> int:
    """The oldest version the table's log can still rebuild: 0, or its oldest checkpoint once older
    commits are cleaned up."""
    names = [uri.rsplit("/", 1)[-1] for uri in storage.list_files(storage.join_uri(root, name, "_delta_log"))]
    commits = sorted(int(n[:20]) for n in names if re.fullmatch(r"\d{20}\.json", n))
    checkpoints = sorted(int(n[:20]) for n in names if re.fullmatch(r"\d{20}\.checkpoint(\..*)?\.parquet", n))
    if not commits or commits[0] == 0:
        return 0
    usable = [c for c in checkpoints if c >= commits[0] - 1]
    return usable[0] if usable else commits[0]


def _duplicated(root: str, name: str, snapshot: tables.Snapshot) -> pa.Table:
    """Keys of table `name` whose rows come from more than one run (for `videos`: more than one row)."""
    key = list(tables.key_columns(name))
    data = tables.dataset(root, name, snapshot).to_table(columns=[*key, "job_run_id"])
    if name == "videos":
        counts = data.group_by(key).aggregate([("job_run_id", "count")])
        return counts.filter(pc.greater(counts.column("job_run_id_count"), 1)).select(key)
    counts = data.group_by(key).aggregate([("job_run_id", "count_distinct")])
    return counts.filter(pc.greater(counts.column("job_run_id_count_distinct"), 1)).select(key)


def _later_copies(root: str, name: str, snapshot: tables.Snapshot, order: dict[str, int]) -> pa.Table:
    """(key…, job_run_id) of the rows to drop so that each duplicated key keeps the first run's rows."""
    key = list(tables.key_columns(name))
    duplicated = _duplicated(root, name, snapshot)
    data = tables.dataset(root, name, snapshot).to_table(columns=[*key, "job_run_id"])
    rows = data.join(duplicated, keys=key, join_type="left semi").group_by([*key, "job_run_id"]).aggregate([])
    first: dict[tuple, tuple[int, str]] = {}
    for row in rows.to_pylist():
        k = tuple(row[c] for c in key)
        rank = (order.get(row["job_run_id"], 2**62), row["job_run_id"])
        first[k] = min(first.get(k, rank), rank)
    drop = [row for row in rows.to_pylist() if row["job_run_id"] != first[tuple(row[c] for c in key)][1]]
    schema = pa.schema([pa.field(c, pa.string()) for c in [*key, "job_run_id"]])
    return pa.Table.from_pylist(drop, schema=schema)
