"""`reelflow query`: SQL over the committed tables, and the query layer the reports and tools share.

Each table is a DuckDB view named after it (`videos, classifications, actions, sentiment, highlights,
errors`) over the pyarrow dataset of that Delta table at the version of the last complete chunk in the run
log (`flows.tables.read_snapshot`), so a query never sees half of a chunk across tables. DuckDB scans the
datasets lazily, with projection and filter pushdown (`WHERE run_date = ...` reads one partition). S3 goes
through deltalake's own object store client, never through DuckDB's httpfs or delta extensions (which
download themselves at run time).

    reelflow query "SELECT label, count(*) FROM classifications WHERE rank = 1 GROUP BY 1" --tables s3://b/t
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import io
import json
import math
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from flows import runs, storage, tables
from jobs.output import JobConsole, job_console

T = TypeVar("T")
Format = Literal["table", "csv", "json", "parquet"]
FORMATS: tuple[str, ...] = ("table", "csv", "json", "parquet")
# Where `reelflow demo` keeps its tables; REELFLOW_TABLES points the reports elsewhere.
DEFAULT_TABLES = os.environ.get("REELFLOW_TABLES", "reelflow-demo/tables")

out_console = job_console(stderr=False)


class QueryError(ValueError):
    """A query that cannot run (bad SQL, unknown column); the message is DuckDB's first line."""


@dataclass(frozen=True)
class ReadOptions:
    """How a query reads the tables: as of an earlier run or night (`as_of`: a run id or YYYY-MM-DD), and
    the limits a service identity runs under (DuckDB's `memory_limit`, e.g. '4GB'; `timeout_s`)."""

    as_of: str | None = None
    memory_limit: str | None = None
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.as_of is not None and not self.as_of.strip():
            raise ValueError("query: --as-of is empty; give a run id or a date YYYY-MM-DD")
        if self.memory_limit is not None and not _MEMORY.fullmatch(self.memory_limit.strip()):
            raise ValueError(f"query: memory_limit={self.memory_limit!r}: expected a size like 512MB or 4GB")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"query: timeout={self.timeout_s} must be > 0 seconds")


_MEMORY = re.compile(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", re.IGNORECASE)


@dataclass(frozen=True)
class QueryConfig:
    """One SQL query over the tables at `tables`, printed (or written to `out`) in `format`."""

    sql: str
    tables: str
    format: Format = "table"
    out: str | None = None
    read: ReadOptions = field(default_factory=ReadOptions)

    def __post_init__(self) -> None:
        if not self.sql.strip():
            raise ValueError("query: the SQL text is empty")
        if self.format not in FORMATS:
            raise ValueError(f"query: format={self.format!r} must be one of {', '.join(FORMATS)}")
        if self.format == "parquet" and not self.out:
            raise ValueError("query: format=parquet needs --out FILE (Parquet is binary)")


# --- the query layer ---------------------------------------------------------------------------------


def connect(
    tables_uri: str, as_of: str | None = None, memory_limit: str | None = None
) -> duckdb.DuckDBPyConnection:
    """A sandboxed in-memory DuckDB connection: a view per table, every table at the versions of the last
    complete chunk (or as of `as_of`), the schema `current`, and no access to files or settings."""
    check_tables_uri(tables_uri)
    log = runs.read_log(tables.root_uri(tables_uri))  # read once: for the snapshot and for `current`
    snapshot = tables.read_snapshot(tables_uri, as_of=as_of, log=log)
    con = duckdb.connect()
    for name in tables.TABLES:
        con.register(name, tables.dataset(tables_uri, name, snapshot))
    _add_current_views(con, runs.commit_order(log))
    if memory_limit:
        con.execute(f"SET memory_limit = '{memory_limit.strip()}'")
    # The views are Arrow datasets that deltalake scans; SQL itself reaches no file, extension or setting
    # (`COPY … TO`, `read_csv('/etc/passwd')`, `ATTACH`, `INSTALL`, `SET …` are refused).
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def _add_current_views(con: duckdb.DuckDBPyConnection, order: pa.Table) -> None:
    """`current.<table>`: per URI, only the rows of its newest content (a re-uploaded object has a new
    video_id; its newest is the one whose `videos` row came last, by night and then commit `order`)."""
    con.register("_run_order", order)
    con.execute("CREATE SCHEMA current")
    newest = """SELECT video_id FROM (
        SELECT v.video_id, row_number() OVER (
            PARTITION BY v.uri ORDER BY v.run_date DESC, o.token DESC NULLS LAST, v.video_id DESC) AS n
        FROM main.videos v LEFT JOIN _run_order o USING (job_run_id)) WHERE n = 1"""
    for name in tables.TABLES:
        con.execute(f"CREATE VIEW current.{name} AS SELECT * FROM main.{name} WHERE video_id IN ({newest})")


def run_sql(
    tables_uri: str, sql: str, params: Mapping[str, Any] | None = None, read: ReadOptions | None = None
) -> pa.Table:
    """The result of one SQL text (the last statement's rows; empty when it returns none) as Arrow."""

    def work(con: duckdb.DuckDBPyConnection) -> pa.Table:
        relation = con.sql(sql, params=dict(params)) if params else con.sql(sql)
        return relation.to_arrow_table() if relation is not None else pa.table({})

    return on_snapshot(tables_uri, work, read)


def on_snapshot(
    tables_uri: str, work: Callable[[duckdb.DuckDBPyConnection], T], read: ReadOptions | None = None
) -> T:
    """`work` on a connection over the tables as of the last complete chunk (or `read.as_of`)."""
    read = read or ReadOptions()
    con = connect(tables_uri, read.as_of, read.memory_limit)
    timer = threading.Timer(read.timeout_s, con.interrupt) if read.timeout_s else None
    if timer is not None:
        timer.start()
    try:
        return work(con)
    except duckdb.InterruptException:
        raise QueryError(f"query: cancelled after {read.timeout_s:g} s (--timeout)") from None
    except duckdb.PermissionException as err:
        raise QueryError(f"query: only the tables can be read here ({_first_line(err)})") from None
    except duckdb.Error as err:
        raise QueryError(_first_line(err)) from None
    finally:
        if timer is not None:
            timer.cancel()
        con.close()


def check_tables_uri(tables_uri: str) -> None:
    """Fail early on a tables location that does not exist (a typo, a missing bucket)."""
    tables.check_location(tables_uri, must_exist=True)


def main(config: QueryConfig) -> pa.Table:
    """Run the query and print or write its result; returns the result."""
    result = run_sql(config.tables, config.sql, read=config.read)
    if config.format == "table":
        if config.out:
            storage.write_bytes(config.out, render_text(result).encode())
        else:
            show(rich_table(result))
        return result
    data = encode(result, config.format)
    if config.out:
        storage.write_bytes(config.out, data)
    else:
        out_console.file.write(data.decode())
        out_console.file.write("\n")
        out_console.file.flush()
    return result


def encode(result: pa.Table, fmt: Format) -> bytes:
    """`result` as CSV, a JSON array of row objects, or Parquet bytes."""
    if fmt == "json":
        rows = [{k: _json_value(v) for k, v in row.items()} for row in result.to_pylist()]
        return json.dumps(rows, ensure_ascii=False).encode()
    if fmt == "csv":
        sink = io.BytesIO()
        try:
            pacsv.write_csv(result, sink, pacsv.WriteOptions(quoting_style="needed"))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise QueryError(f"query: the result does not fit CSV ({_first_line(err)}); use json") from None
        return sink.getvalue()
    if fmt == "parquet":
        sink = io.BytesIO()
        pq.write_table(result, sink)
        return sink.getvalue()
    raise ValueError(f"query: no byte encoding for format {fmt!r}")


def _json_value(value: Any) -> Any:
    """A JSON-ready value: dates as ISO text, NaN as null, bytes as base64."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, (dt.date, dt.datetime, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def rich_table(result: pa.Table, title: str | None = None) -> Table:
    """A rich table of an Arrow result (numbers right-aligned, floats to 3 decimals)."""
    table = Table(title=title, title_justify="left", header_style="bold")
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in result.schema]
    for column, right in zip(result.schema, numeric, strict=True):
        table.add_column(column.name, justify="right" if right else "left")
    for row in result.to_pylist():
        table.add_row(*(_cell(v) for v in row.values()))
    if not result.num_rows:
        table.caption = "(no rows)"
    return table


def show(table: Table) -> None:
    """Print a rich table to stdout; piped or redirected, at its full width instead of cut to 80 columns."""
    if out_console.is_terminal:
        out_console.print(table)
        return
    need = Measurement.get(out_console, out_console.options.update_width(10_000), table).maximum
    JobConsole(width=max(need, out_console.width)).print(table)


def render_text(result: pa.Table, title: str | None = None) -> str:
    """A rich table as plain text, at its full width."""
    table = rich_table(result, title)
    sink = io.StringIO()
    probe = Console(file=sink, color_system=None)
    width = Measurement.get(probe, probe.options.update_width(10_000), table).maximum
    Console(file=sink, color_system=None, width=width).print(table)
    return sink.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        text = f"{value:.3f}".rstrip("0").rstrip(".")
        return "0" if text == "-0" else text
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    return str(value)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
