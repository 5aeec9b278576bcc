"""Writing the tables: data files written anywhere, committed per chunk, exactly once, under the lease.

One run is one `TableWriter`, used while the run holds the tables' lease (`writing` takes it):

1. `open` creates what is missing (the `_runs` log first, then the six tables), adds columns a newer schema
   has, and fences: an empty commit into every table carrying this run's fencing token. From then on no
   commit of an earlier lease epoch can land anywhere. Then it rolls forward every chunk that an earlier run
   logged as pending and did not log as committed (its commits were cut off part way).
2. `write_files` (flows.table_files) validates rows and writes them as Parquet data files into the table's
   folder, where they stay invisible until committed. Any process can write them.
3. `commit_chunk` logs the chunk as pending in `_runs` with its file actions (the write-ahead record that
   roll-forward needs), commits each table in one Delta transaction (the chunk's files, and with `remove`
   the removal of earlier rows under given keys, rewriting a file whose other rows stay), then logs the
   chunk committed with the version of every table: the point readers pin.
4. `finish` logs the run's end.

Fencing: every commit carries the Delta app transaction (APP_ID, epoch × 10^6 + sequence), the sequence
being 0 for the fence and growing with each chunk, log entry and operation of the holder. Before
committing, a table whose latest token has a newer epoch refuses the commit (LeaseLost); a concurrent commit
with the same app id makes Delta itself refuse ours (CommitFailedError), and the check runs again. A chunk
whose files a table already holds is not committed to it again, so a retried chunk lands once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from flows import delta, runs, storage, tables
from flows.lease import DEFAULT_TTL_S, Lease, LeaseLost
from flows.table_files import (
    DataFile,
    RemovedFile,
    TableChange,
    key_schema,
    replaced_keys,
    union_keys,
    write_files,
    write_parquet,
)

if TYPE_CHECKING:
    from deltalake import DeltaTable

log = logging.getLogger(__name__)
T = TypeVar("T")

APP_ID = "reelflow"
SEQUENCE_SPAN = 1_000_000  # fencing token = epoch * SEQUENCE_SPAN + sequence
COMMIT_ATTEMPTS = 8
_JOB_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_job_run_id(job_run_id: str) -> None:
    """Refuse a run id that cannot name files and log rows."""
    if not _JOB_RUN_ID.fullmatch(job_run_id or ""):
        raise tables.TableError(
            f"job_run_id {job_run_id!r}: use 1-128 letters, digits, '.', '_', '-'; start alphanumeric"
        )


def _step(name: str) -> None:
    """A point in the commit protocol (tests stop the process at each one)."""
    log.debug("tables: %s", name)


# --- the writer ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkResult:
    """A committed chunk: rows added and replaced per table, and every table's version after it."""

    run_id: str
    chunk: int
    rows: dict[str, int]
    replaced: dict[str, int]
    versions: dict[str, int]


class TableWriter:
    """Commits one run's chunks to the tables of `tables_uri`, while the run holds their `lease`."""

    def __init__(
        self,
        tables_uri: str,
        job_run_id: str,
        run_date: str | dt.date,
        *,
        lease: Lease,
        models: Sequence[str] = (),
    ) -> None:
        check_job_run_id(job_run_id)
        self.tables_uri = tables.root_uri(tables_uri)
        self.job_run_id = job_run_id
        self.run_date = tables.parse_run_date(run_date)
        self.models = tuple(models)
        self.lease = lease
        self.chunks = 0
        self.recovered: list[runs.PendingChunk] = []
        self.commit_seconds = 0.0  # time spent in the commit protocol (the bench reports it)
        self.outcome: str | None = None  # what the run did, in a line: logged with its end
        self._sequence = 0
        self._started = dt.datetime.now(dt.timezone.utc)
        self._handles: dict[str, DeltaTable] = {}

    @property
    def epoch(self) -> int:
        return self.lease.epoch

    def open(self) -> list[runs.PendingChunk]:
        """Create and fence the tables, then roll interrupted chunks forward; returns those chunks."""
        started = time.perf_counter()
        for name in (tables.RUNS, *tables.TABLES):  # the log first: tables without one are not ours
            self._ensure(name)
        fence = self._token()
        for name in (tables.RUNS, *tables.TABLES):
            self._commit(name, TableChange(), fence, operation="fence")
        _step("fenced")
        self.recovered = self._roll_forward()
        self.commit_seconds += time.perf_counter() - started
        return self.recovered

    def write_files(self, name: str, data: pa.Table) -> list[DataFile]:
        """Validate and write rows of table `name` for this run's night (uncommitted until `commit_chunk`)."""
        return write_files(self.tables_uri, name, data, job_run_id=self.job_run_id, run_date=self.run_date)

    def write_chunk(
        self,
        rows: Mapping[str, pa.Table],
        *,
        replace: bool = False,
        remove: Mapping[str, pa.Table] | None = None,
    ) -> ChunkResult | None:
        """Write and commit one chunk of rows; with `replace`, earlier rows under the same keys go, and so do
        the rows under `remove`'s keys (table → key columns, as in `commit_chunk`)."""
        files = {name: self.write_files(name, data) for name, data in rows.items()}
        removal = replaced_keys(rows) if replace else {}
        for name, keys in (remove or {}).items():
            removal[name] = union_keys(removal[name], keys) if name in removal else keys
        return self.commit_chunk(files, removal or None)

    def commit_chunk(
        self,
        files: Mapping[str, Sequence[DataFile]],
        remove: Mapping[str, pa.Table] | None = None,
        *,
        run_id: str | None = None,
        night: dt.date | None = None,
        models: Sequence[str] | None = None,
    ) -> ChunkResult | None:
        """Commit the files of one chunk to every table exactly once; None when there is nothing to commit.

        `remove` maps a table to key columns (string values): its committed rows with those values go in the
        same commit (a file holding other rows too is rewritten without them).

        `run_id`, `night` and `models` log the chunk as another run's (its only chunk), as a migration does.
        """
        _step("files written")
        for name in files:
            tables.schema(name)
        self.lease.check()
        started = time.perf_counter()
        changes: dict[str, TableChange] = {}
        for name in tables.TABLES:
            change = TableChange(list(files.get(name, ())), rows=sum(f.rows for f in files.get(name, ())))
            keys = (remove or {}).get(name)
            if keys is not None and keys.num_rows:
                self._plan_removal(name, keys, change)
            if change.adds or change.removes:
                changes[name] = change
        if not changes:
            return None
        if run_id is None:
            self.chunks += 1
        chunk, token = (self.chunks if run_id is None else 1), self._token()
        origin = {"run_id": run_id, "night": night, "models": models}
        actions = json.dumps({name: change.to_json() for name, change in changes.items()})
        self._log(runs.PENDING, chunk, token, actions=actions, **origin)
        _step("pending")
        for name, change in changes.items():
            self.lease.check()
            self._commit(name, change, token, operation=f"{run_id or self.job_run_id} chunk {chunk}")
            _step(f"committed {name}")
        result = self._log_committed(
            run_id or self.job_run_id, chunk, token, changes, night=night, models=models
        )
        _step("chunk committed")
        self.commit_seconds += time.perf_counter() - started
        return result

    def finish(
        self,
        status: str = runs.FINISHED,
        message: str | None = None,
        *,
        run_id: str | None = None,
        night: dt.date | None = None,
    ) -> None:
        """Log the end of the run (`finished`, or `failed` with a message), or of another run (`run_id`)."""
        started = time.perf_counter()
        self._log(status, 0, self._token(), message=message, run_id=run_id, night=night)
        _step(status)
        self.commit_seconds += time.perf_counter() - started

    def fenced(self, name: str, operation: str, action: Callable[[DeltaTable, Any], T]) -> T:
        """Run a deltalake operation that commits (optimize, vacuum, repair) on table `name` (or `_runs`)
        as this run's: `action(table, commit_properties)` must pass the properties to its commit."""
        self.lease.check()
        uri = tables.table_uri(self.tables_uri, name)
        properties = self._properties(self._token(), operation)
        table = self._latest(name)
        self._check_fence(table, uri)
        with delta.delta_errors(uri):
            result = action(table, properties)
        self._check_fence(self._latest(name), uri)
        return result

    def commit_point(self, message: str) -> ChunkResult:
        """Log the tables' current versions as a complete chunk of this run (after `fenced` operations),
        so that readers move on to them."""
        self.chunks += 1
        return self._log_committed(self.job_run_id, self.chunks, self._token(), {}, message=message)

    # -- internals --

    def _token(self) -> int:
        token = self.epoch * SEQUENCE_SPAN + self._sequence
        self._sequence += 1
        if self._sequence >= SEQUENCE_SPAN:
            raise RuntimeError(f"tables {self.tables_uri}: more than {SEQUENCE_SPAN} commits under one lease")
        return token

    def _ensure(self, name: str) -> None:
        """Create the table when absent; add the columns of the current schema that it lacks. The handle
        stays open for the writer's commits (`_latest`)."""
        from deltalake import DeltaTable
        from deltalake import Field as DeltaField

        target = runs.SCHEMA if name == tables.RUNS else tables.schema(name)
        uri = tables.table_uri(self.tables_uri, name)
        table = tables.open_table(self.tables_uri, name)
        with delta.delta_errors(uri):
            if table is None:
                partition = None if name == tables.RUNS else [tables.PARTITION]
                self._handles[name] = DeltaTable.create(
                    uri, target, mode="ignore", partition_by=partition,
                    configuration=tables.TABLE_CONFIGURATION, storage_options=delta.storage_options(uri),
                )  # fmt: skip
                return
            self._handles[name] = table
            present = set(pa.schema(table.schema()).names)
            missing = [f.with_nullable(True) for f in target if f.name not in present]
            if missing:
                table.alter.add_columns([DeltaField.from_arrow(f) for f in missing])

    def _properties(self, token: int, operation: str) -> Any:
        """A commit's properties: the fencing token as an app transaction, and who committed what."""
        from deltalake import CommitProperties, Transaction

        return CommitProperties(
            app_transactions=[Transaction(APP_ID, token)],
            custom_metadata={"reelflow.run": self.job_run_id, "reelflow.epoch": self.epoch,
                             "reelflow.operation": operation},
        )  # fmt: skip

    def _commit(self, name: str, change: TableChange, token: int, *, operation: str) -> int:
        """Commit one table's change with the fencing token; returns the table's version holding it."""
        from deltalake.exceptions import CommitFailedError

        uri = tables.table_uri(self.tables_uri, name)
        schema = runs.SCHEMA if name == tables.RUNS else tables.schema(name)
        partition = [] if name == tables.RUNS else [tables.PARTITION]
        actions = [f.add_action() for f in change.adds] + [f.remove_action() for f in change.removes]
        properties = self._properties(token, operation)
        for _ in range(COMMIT_ATTEMPTS):
            table = self._latest(name)
            self._check_fence(table, uri)
            if (change.adds or change.removes) and _holds(table, change):
                return table.version()  # a retried chunk: this table has it already
            try:
                with delta.delta_errors(uri):
                    table.create_write_transaction(actions, "append", schema, partition,
                                                   commit_properties=properties)  # fmt: skip
            except CommitFailedError as err:
                log.info("tables: %s: commit conflicted (%s); checking the fence again", uri, err)
                continue
            table.update_incremental()
            self._check_fence(table, uri)
            return table.version()
        raise RuntimeError(f"{uri}: the commit kept conflicting after {COMMIT_ATTEMPTS} attempts")

    def _check_fence(self, table: DeltaTable, uri: str) -> None:
        seen = table.transaction_version(APP_ID)
        if seen is not None and seen // SEQUENCE_SPAN > self.epoch:
            raise LeaseLost(
                f"{uri}: a run holding lease epoch {seen // SEQUENCE_SPAN} has committed since this run took "
                f"epoch {self.epoch}; this run lost the lease and commits nothing more"
            )

    def _latest(self, name: str) -> DeltaTable:
        """Table `name` at its latest version: opened once, then brought up to date from new log entries."""
        table = self._handles.get(name)
        if table is not None:
            with delta.delta_errors(tables.table_uri(self.tables_uri, name)):
                table.update_incremental()
            return table
        table = tables.open_table(self.tables_uri, name)
        if table is None:
            raise FileNotFoundError(f"{tables.table_uri(self.tables_uri, name)}: the table has disappeared")
        self._handles[name] = table
        return table

    def _versions(self) -> dict[str, int]:
        return {name: self._latest(name).version() for name in tables.TABLES}

    def _log(
        self,
        status: str,
        chunk: int,
        token: int,
        *,
        run_id: str | None = None,
        night: dt.date | None = None,
        models: Sequence[str] | None = None,
        **fields: Any,
    ) -> None:
        entry = runs.row(
            run_id=run_id or self.job_run_id, chunk=chunk, status=status, epoch=self.epoch, token=token,
            night=night or self.run_date, models=self.models if models is None else models,
            started_at=self._started, host=socket.gethostname(), pid=os.getpid(), **fields,
        )  # fmt: skip
        file = write_parquet(tables.table_uri(self.tables_uri, tables.RUNS), entry, None, self.job_run_id)
        self._commit(tables.RUNS, TableChange([file], rows=1), token, operation=f"log {status}")

    def _log_committed(
        self, run_id: str, chunk: int, token: int, changes: Mapping[str, TableChange], **fields: Any
    ) -> ChunkResult:
        versions = self._versions()
        rows = {name: change.rows for name, change in changes.items() if change.rows}
        replaced = {name: change.replaced for name, change in changes.items() if change.replaced}
        self._log(runs.COMMITTED, chunk, token, run_id=run_id, versions=versions, rows=rows,
                  replaced=replaced, **fields)  # fmt: skip
        return ChunkResult(run_id, chunk, rows, replaced, versions)

    def _roll_forward(self) -> list[runs.PendingChunk]:
        """Finish every chunk logged as pending and never as committed, in commit order."""
        log_table = runs.read_log(self.tables_uri)
        pending = runs.pending_chunks(log_table) if log_table is not None else []
        for chunk in pending:
            token = self._token()
            changes = {name: TableChange.from_json(data) for name, data in chunk.actions.items()}
            for name, change in changes.items():
                self._commit(
                    name, change, token, operation=f"roll forward {chunk.run_id} chunk {chunk.chunk}"
                )
            self._log_committed(chunk.run_id, chunk.chunk, token, changes, night=chunk.night,
                                models=chunk.models, recovered_by=self.job_run_id)  # fmt: skip
            log.warning("tables: rolled forward chunk %d of run %s (it was cut off mid-commit)",
                        chunk.chunk, chunk.run_id)  # fmt: skip
            _step("rolled forward")
        return pending

    def _plan_removal(self, name: str, keys: pa.Table, change: TableChange) -> None:
        """Add to `change` the removal of every committed file holding rows under `keys`, and a rewrite of
        the rows of such a file that stay."""
        table = self._latest(name)
        folder = tables.table_uri(self.tables_uri, name)
        files = pa.table(table.get_add_actions(flatten=True))
        file_schema = tables.file_schema(name)
        columns = list(keys.column_names)
        keys = keys.cast(key_schema(columns))
        for entry in files.select(["path", "size_bytes", f"partition.{tables.PARTITION}"]).to_pylist():
            run_date = entry[f"partition.{tables.PARTITION}"]
            run_date = run_date.isoformat() if run_date is not None else None
            fs, path = storage.arrow_filesystem(storage.join_uri(folder, entry["path"]))
            old_keys = pq.read_table(path, filesystem=fs, columns=columns).cast(key_schema(columns))
            hit = old_keys.join(keys, keys=columns, join_type="left semi").num_rows
            if not hit:
                continue
            change.removes.append(RemovedFile(entry["path"], int(entry["size_bytes"]), run_date))
            change.replaced += hit
            if hit < old_keys.num_rows:
                old = pq.read_table(path, filesystem=fs, schema=file_schema)
                kept = old.join(keys, keys=columns, join_type="left anti").select(file_schema.names)
                change.adds.append(write_parquet(folder, kept.cast(file_schema), run_date, self.job_run_id))


def _holds(table: DeltaTable, change: TableChange) -> bool:
    """Whether `table` already has `change` applied (a Delta commit applies all of it or none)."""
    active = set(pa.table(table.get_add_actions(flatten=True)).column("path").to_pylist())
    if change.adds:
        return all(f.path in active for f in change.adds)
    return not any(f.path in active for f in change.removes)


@contextlib.contextmanager
def writing(
    tables_uri: str,
    job_run_id: str,
    run_date: str | dt.date,
    *,
    models: Sequence[str] = (),
    lease_ttl_s: float = DEFAULT_TTL_S,
    lease_wait_s: float | None = None,
) -> Iterator[TableWriter]:
    """Hold the tables' lease (waiting up to `lease_wait_s`), open a writer, and log the run's end.

    Raises flows.lease.LeaseHeld when a live run keeps the lease past the wait.
    """
    root = tables.root_uri(tables_uri)
    check_job_run_id(job_run_id)
    tables.parse_run_date(run_date)
    tables.check_location(root, must_exist=False)
    tables.check_format(root)
    started = time.perf_counter()
    lease = Lease.acquire(root, job_run_id, ttl_s=lease_ttl_s, wait_s=lease_wait_s)
    _step("leased")
    try:
        writer = TableWriter(root, job_run_id, run_date, lease=lease, models=models)
        writer.commit_seconds += time.perf_counter() - started  # taking the lease (and any wait for it)
        writer.open()
        try:
            yield writer
        except Exception as err:  # an interrupt, or a lost lease, ends a run "interrupted", with no word
            if not isinstance(err, LeaseLost):
                with contextlib.suppress(Exception):
                    writer.finish(
                        runs.FAILED, message=f"{type(err).__name__}: {storage.redact(str(err))[:500]}"
                    )
            raise
        writer.finish(message=writer.outcome)
    finally:
        lease.release()
