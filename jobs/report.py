"""`reelflow report`: the morning reports over the committed tables, printed and charted.

    reelflow report daily --date 2024-05-01 --plot daily.png
    reelflow report trend --label cooking --plot trend.png

Each report is a few SQL queries through the query layer (`jobs.query`: the tables as of the last complete
chunk, in DuckDB's sandbox), printed as tables and, with `--plot`, drawn as one PNG chart.
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from flows import storage, tables
from jobs.query import DEFAULT_TABLES, on_snapshot, out_console, rich_table, show


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
