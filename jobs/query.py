"""`reelflow query` and `reelflow report`: SQL and the morning reports over the committed tables.

Each table is a DuckDB view named after it (`videos, classifications, actions, sentiment, highlights,
errors`) over the pyarrow dataset of that Delta table at the version of the last complete chunk in the run
log (`flows.tables.read_snapshot`), so a query never sees half of a chunk across tables. DuckDB scans the
datasets lazily, with projection and filter pushdown (`WHERE run_date = ...` reads one partition). S3 goes
through deltalake's own object store client, never through DuckDB's httpfs or delta extensions (which
download themselves at run time).

    reelflow query "SELECT label, count(*) FROM classifications WHERE rank = 1 GROUP BY 1" --tables s3://b/t
    reelflow report daily --date 2024-05-01 --plot daily.png
    reelflow report trend --label cooking --plot trend.png
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
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from flows import runs, storage, tables

T = TypeVar("T")
Format = Literal["table", "csv", "json", "parquet"]
FORMATS: tuple[str, ...] = ("table", "csv", "json", "parquet")
# Where `reelflow demo` keeps its tables; REELFLOW_TABLES points the reports elsewhere.
DEFAULT_TABLES = os.environ.get("REELFLOW_TABLES", "reelflow-demo/tables")

out_console = Console()


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


@dataclass(frozen=True)
class DailyReportConfig:
    """The morning report for one night (`date`; the latest night with data when None)."""

    tables: str = DEFAULT_TABLES
    date: str | None = None
    plot: str | None = None
    top: int = 3

    def __post_init__(self) -> None:
        if self.date is not None:
            tables.parse_run_date(self.date)
        if self.top < 1:
            raise ValueError(f"report daily: top={self.top} must be >= 1")


@dataclass(frozen=True)
class TrendReportConfig:
    """Per night: videos whose top-1 label is `label`, and action segments with that label."""

    label: str
    tables: str = DEFAULT_TABLES
    plot: str | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if not self.label.strip():
            raise ValueError("report trend: label is empty")


# --- the query layer ---------------------------------------------------------------------------------


def connect(
    tables_uri: str, snapshot: tables.Snapshot | None = None, memory_limit: str | None = None
) -> duckdb.DuckDBPyConnection:
    """A sandboxed in-memory DuckDB connection: a view per table, every table at the `snapshot`'s version
    (the last complete chunk's by default), the schema `current`, and no access to files or settings."""
    if snapshot is None:
        check_tables_uri(tables_uri)
        snapshot = tables.read_snapshot(tables_uri)
    con = duckdb.connect()
    for name in tables.TABLES:
        con.register(name, tables.dataset(tables_uri, name, snapshot))
    _add_current_views(con, tables_uri)
    if memory_limit:
        con.execute(f"SET memory_limit = '{memory_limit.strip()}'")
    # The views are Arrow datasets that deltalake scans; SQL itself reaches no file, extension or setting
    # (`COPY … TO`, `read_csv('/etc/passwd')`, `ATTACH`, `INSTALL`, `SET …` are refused).
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def _add_current_views(con: duckdb.DuckDBPyConnection, tables_uri: str) -> None:
    """`current.<table>`: per URI, only the rows of its newest content (a re-uploaded object has a new
    video_id; its newest is the one whose `videos` row came last, by night and then commit order)."""
    log_table = runs.read_log(tables.root_uri(tables_uri)) if storage.exists(tables_uri) else None
    order = pa.table({"job_run_id": pa.array([], pa.string()), "token": pa.array([], pa.int64())})
    if log_table is not None:
        committed = log_table.filter(pc.equal(log_table.column("status"), runs.COMMITTED))
        order = committed.group_by("run_id").aggregate([("token", "min")])
        order = order.rename_columns(["job_run_id", "token"])
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
    check_tables_uri(tables_uri)
    con = connect(tables_uri, tables.read_snapshot(tables_uri, as_of=read.as_of), read.memory_limit)
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
    Console(width=max(need, out_console.width)).print(table)


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


# --- reports -----------------------------------------------------------------------------------------

_MODEL = "model_name || ' v' || model_version"
LATEST_SQL = "SELECT max(run_date) FROM (SELECT run_date FROM videos UNION ALL SELECT run_date FROM errors)"

DAILY_SQL = {
    "videos by status": """
        SELECT status, count(*) AS videos FROM videos WHERE run_date = $d
        GROUP BY ALL ORDER BY videos DESC""",
    "label counts (top-1)": f"""
        SELECT {_MODEL} AS model, head, label, count(DISTINCT video_id) AS videos, avg(score) AS mean_score
        FROM classifications WHERE run_date = $d AND rank = 1
        GROUP BY ALL ORDER BY model, head, videos DESC, label""",
    "top videos per label": f"""
        SELECT model, head, label, n AS "#", video_id, uri, score FROM (
            SELECT {_MODEL} AS model, head, label, video_id, uri, score, row_number() OVER (
                PARTITION BY model_name, model_version, head, label ORDER BY score DESC, video_id) AS n
            FROM classifications WHERE run_date = $d AND rank = 1)
        WHERE n <= $top ORDER BY model, head, label, n""",
    "sentiment mix (per video)": f"""
        SELECT {_MODEL} AS model, label, count(*) AS videos,
               round(100.0 * count(*) / sum(count(*)) OVER (PARTITION BY model_name, model_version), 1)
                   AS pct,
               avg(valence) AS mean_valence
        FROM sentiment WHERE run_date = $d AND scope = 'video'
        GROUP BY model_name, model_version, label ORDER BY model, label""",
    "errors by type": """
        SELECT stage, error_type, count(*) AS errors, count(DISTINCT video_id) AS videos,
               min(message) AS example
        FROM errors WHERE run_date = $d GROUP BY ALL ORDER BY errors DESC, stage, error_type""",
}


@dataclass(frozen=True)
class DailyReport:
    """The sections of the daily report, in order, each an Arrow table."""

    run_date: dt.date
    sections: dict[str, pa.Table]


def daily_report(config: DailyReportConfig) -> DailyReport:
    """Compute, print and (with `plot`) chart the report of one night."""

    def work(con: duckdb.DuckDBPyConnection) -> DailyReport:
        if config.date is not None:
            run_date = tables.parse_run_date(config.date)
        else:
            ((run_date,),) = con.sql(LATEST_SQL).fetchall()
            if run_date is None:
                raise ValueError(f"report daily: no night in {config.tables} yet; run `reelflow tag` first")
        sections = {}
        for title, sql in DAILY_SQL.items():
            params: dict[str, Any] = {"d": run_date}
            if "$top" in sql:
                params["top"] = config.top
            sections[title] = con.sql(sql, params=params).to_arrow_table()
        return DailyReport(run_date, sections)

    report = on_snapshot(config.tables, work)
    out_console.rule(f"[bold]reelflow daily report — {report.run_date.isoformat()}")
    for title, section in report.sections.items():
        show(rich_table(section, title=title))
    if config.plot:
        plot_daily(report, config.plot)
        out_console.print(f"chart written to {config.plot}")
    return report


TREND_SQL = """
WITH nights AS (
    SELECT DISTINCT run_date FROM videos
    UNION SELECT DISTINCT run_date FROM classifications WHERE $model IS NULL OR model_name = $model
),
classified AS (
    SELECT run_date, count(DISTINCT video_id) AS n FROM classifications
    WHERE rank = 1 AND ($model IS NULL OR model_name = $model) GROUP BY ALL
),
top1 AS (
    SELECT run_date, count(DISTINCT video_id) AS n FROM classifications
    WHERE rank = 1 AND label = $label AND ($model IS NULL OR model_name = $model) GROUP BY ALL
),
segments AS (
    SELECT run_date, count(*) AS n, count(DISTINCT video_id) AS v FROM actions
    WHERE label = $label AND ($model IS NULL OR model_name = $model) GROUP BY ALL
)
SELECT nights.run_date,
       coalesce(top1.n, 0) AS top1_videos,
       round(100.0 * coalesce(top1.n, 0) / nullif(classified.n, 0), 1) AS top1_pct,
       coalesce(segments.n, 0) AS action_segments,
       coalesce(segments.v, 0) AS action_videos
FROM nights
LEFT JOIN classified USING (run_date) LEFT JOIN top1 USING (run_date) LEFT JOIN segments USING (run_date)
ORDER BY nights.run_date
"""

LABELS_SQL = """
SELECT DISTINCT label FROM (SELECT label FROM classifications UNION ALL SELECT label FROM actions)
ORDER BY label
"""


def trend_report(config: TrendReportConfig) -> pa.Table:
    """Compute, print and (with `plot`) chart one label's counts per night."""

    def work(con: duckdb.DuckDBPyConnection) -> pa.Table:
        labels = [row[0] for row in con.sql(LABELS_SQL).fetchall()]
        if config.label not in labels:
            known = ", ".join(labels[:20]) + (" …" if len(labels) > 20 else "") if labels else "none yet"
            raise ValueError(f"report trend: label {config.label!r} is in no table; known labels: {known}")
        return con.sql(TREND_SQL, params={"label": config.label, "model": config.model}).to_arrow_table()

    result = on_snapshot(config.tables, work)
    scope = f" ({config.model})" if config.model else ""
    show(rich_table(result, title=f"'{config.label}' per night{scope}"))
    if config.plot:
        plot_trend(result, config.label, config.plot)
        out_console.print(f"chart written to {config.plot}")
    return result


# --- charts ------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on a server or in CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, uri: str) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    storage.write_bytes(uri, buffer.getvalue())


def plot_daily(report: DailyReport, uri: str) -> None:
    """A PNG of the daily report: top-1 label counts, sentiment mix, errors by type."""
    plt = _pyplot()
    labels = report.sections["label counts (top-1)"].to_pylist()
    sentiment = report.sections["sentiment mix (per video)"].to_pylist()
    errors = report.sections["errors by type"].to_pylist()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [1.4, 1, 1]})
    fig.suptitle(f"reelflow daily report — {report.run_date.isoformat()}", fontweight="bold")

    _grouped_barh(
        axes[0],
        [(f"{r['model']} · {r['head']}", r["label"], r["videos"]) for r in labels],
        "videos (top-1 label)",
        "label counts",
    )
    _sentiment_bars(axes[1], sentiment)
    _grouped_barh(
        axes[2], [("errors", f"{r['stage']}: {r['error_type']}", r["errors"]) for r in errors], "errors",
        "errors by type", empty="no errors", color="#c0504d",
    )  # fmt: skip
    fig.tight_layout()
    _save(fig, uri)
    plt.close(fig)


SENTIMENT_COLORS = {"negative": "#c0504d", "neutral": "#a6a6a6", "positive": "#4f9a59"}


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _sentiment_bars(ax: Any, rows: list[dict[str, Any]]) -> None:
    """One 100% stacked bar per model: the share of videos per sentiment label."""
    ax.set_title("sentiment mix (videos)")
    if not rows:
        _no_data(ax, "no sentiment")
        return
    models = list(dict.fromkeys(r["model"] for r in rows))
    labels = [x for x in SENTIMENT_COLORS if any(r["label"] == x for r in rows)]
    labels += sorted({r["label"] for r in rows} - set(labels))
    left = [0.0] * len(models)
    for label in labels:
        counts = {r["model"]: (r["pct"], r["videos"]) for r in rows if r["label"] == label}
        widths = [counts.get(m, (0.0, 0))[0] for m in models]
        bars = ax.barh(models, widths, left=left, color=SENTIMENT_COLORS.get(label), label=label, height=0.5)
        texts = [f"{counts[m][1]}" if counts.get(m, (0, 0))[0] >= 6 else "" for m in models]
        ax.bar_label(bars, labels=texts, label_type="center", color="white", fontsize=9)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of videos (numbers: videos)")
    ax.set_ylim(max(len(models), 3) - 0.5, -0.5)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(labels), frameon=False)


def _grouped_barh(
    ax: Any,
    rows: list[tuple[str, str, int]],
    xlabel: str,
    title: str,
    empty: str = "no data",
    color: str | None = None,
) -> None:
    """Horizontal bars: one row per category, one colored bar per series (a legend when there are several)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    if not rows:
        _no_data(ax, empty)
        return
    series = list(dict.fromkeys(r[0] for r in rows))
    categories = list(dict.fromkeys(r[1] for r in rows))
    values = {(r[0], r[1]): r[2] for r in rows}
    height = 0.8 / len(series)
    for i, name in enumerate(series):
        ys = [c + (i - (len(series) - 1) / 2) * height for c in range(len(categories))]
        xs = [values.get((name, cat), 0) for cat in categories]
        bars = ax.barh(ys, xs, height=height, label=name, color=color if len(series) == 1 else None)
        ax.bar_label(bars, padding=2, fontsize=8)
    ax.set_yticks(range(len(categories)), categories)
    # Top to bottom; room for three rows at least, or a lone bar would fill the panel.
    ax.set_ylim(max(len(categories), 3) - 0.5, -0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.margins(x=0.15)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="lower right")


def plot_trend(result: pa.Table, label: str, uri: str) -> None:
    """A PNG of one label's counts per night."""
    plt = _pyplot()
    rows = result.to_pylist()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ax.set_title(f"'{label}' per night", fontweight="bold")
    if rows:
        import matplotlib.dates as mdates
        from matplotlib.ticker import MaxNLocator

        dates = [dt.datetime.combine(r["run_date"], dt.time()) for r in rows]
        lines = {"top1_videos": ("o", "videos, top-1 label"), "action_segments": ("s", "action segments")}
        # A line that is zero every night (a category label has no action segments) is only noise.
        shown = [k for k in lines if any(r[k] for r in rows)] or ["top1_videos"]
        for key in shown:
            marker, text = lines[key]
            ax.plot(dates, [r[key] for r in rows], marker=marker, label=text)
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
        if len(dates) <= 14:
            ax.set_xticks(dates)
        ax.set_xlim(dates[0] - dt.timedelta(hours=12), dates[-1] + dt.timedelta(hours=12))
        ax.legend()
        fig.autofmt_xdate()
    else:
        ax.text(0.5, 0.5, "no nights yet", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xlabel("run date")
    ax.set_ylabel("count")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, uri)
    plt.close(fig)
