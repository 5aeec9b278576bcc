"""jobs.query: SQL over the committed tables (local and S3), output formats, and the daily/trend reports."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import Killed
from deltalake import DeltaTable

from flows import delta, table_writer, tables
from jobs import query
from jobs import report as reports

D1, D2, D3 = dt.date(2024, 5, 1), dt.date(2024, 5, 2), dt.date(2024, 5, 3)
MODEL = {"model_name": "c3d_small", "model_version": "2", "mlflow_run_id": "abc123"}


def tag_night(
    uri: str,
    job: str,
    date: dt.date,
    videos: dict[str, tuple[str, float, str]],
    errors: Sequence[tuple[str, str, str]] = (),
    actions: Sequence[tuple[str, str]] = (),
    replace: bool = False,
) -> None:
    """Commit one hand-built night: video_id → (top-1 label, its score, sentiment label); failed videos as
    (video_id, stage, error_type); action segments as (video_id, label). `replace`: a full re-run."""
    ids = list(videos)

    def pred(rows: list[dict]) -> pa.Table:
        return pa.Table.from_pylist([{**MODEL, "uri": f"s3://corpus/{r['video_id']}.mp4", **r} for r in rows])

    rows = {
        "videos": pa.Table.from_pylist([
            {"video_id": v, "uri": f"s3://corpus/{v}.mp4", "size_bytes": 10_000, "etag": "e",
             "duration_s": 6.0, "fps": 15.0, "n_frames": 90, "width": 128, "height": 128, "codec": "h264",
             "has_audio": True,
             "status": "failed" if v in {e[0] for e in errors} else "tagged"}
            for v in ids + [e[0] for e in errors]
        ]),
        "classifications": pred(
            [{"video_id": v, "head": "category", "label": lab, "score": s, "rank": 1}
             for v, (lab, s, _) in videos.items()]
            + [{"video_id": v, "head": "category", "label": "other", "score": 1 - s, "rank": 2}
               for v, (_, s, _) in videos.items()]
        ),
        "sentiment": pred(
            [{"video_id": v, "scope": "video", "label": sent, "score": 0.8, "valence": 0.5, "start_s": 0.0,
              "end_s": 6.0} for v, (_, _, sent) in videos.items()]
            + [{"video_id": v, "scope": "segment", "label": "neutral", "score": 0.6, "valence": 0.0,
                "start_s": 0.0, "end_s": 2.0} for v in ids]
        ),
        "actions": pred([{"video_id": v, "label": lab, "start_s": 1.0, "end_s": 3.0, "score": 0.7}
                         for v, lab in actions]) if actions else tables.file_schema("actions").empty_table(),
        "errors": pa.Table.from_pylist(
            [{"video_id": v, "uri": f"s3://corpus/{v}.mp4", "stage": st, "error_type": et,
              "message": f"{v}: {et}", "model_name": MODEL["model_name"],
              "model_version": MODEL["model_version"]}
             for v, st, et in errors],
            schema=tables.file_schema("errors").remove(tables.file_schema("errors").get_field_index("job_run_id")),
        ),
    }  # fmt: skip
    with table_writer.writing(uri, job, date) as writer:
        writer.write_chunk({name: t for name, t in rows.items() if t.num_rows}, replace=replace)


@pytest.fixture
def catalog(tmp_path: Path) -> str:
    """Three nights: six videos and a broken file on the first, a re-run of it, then two more nights."""
    uri = str(tmp_path / "tables")
    first = {"v1": ("cooking", 0.9, "positive"), "v2": ("cooking", 0.7, "neutral"),
             "v3": ("nature", 0.8, "positive"), "v4": ("cooking", 0.95, "negative"),
             "v5": ("traffic", 0.6, "positive"), "v6": ("nature", 0.99, "positive")}  # fmt: skip
    spins = [("v1", "spin"), ("v3", "spin")]
    tag_night(uri, "n1", D1, first, [("bad1", "probe", "InvalidData"), ("bad2", "decode", "Timeout")], spins)
    # The same night again in full: one broken file now fails differently.
    again = [("bad1", "probe", "InvalidData"), ("bad2", "probe", "EmptyFile")]
    tag_night(uri, "n1-full", D1, first, again, spins, replace=True)
    tag_night(uri, "n2", D2, {"v7": ("nature", 0.9, "negative")})
    tag_night(uri, "n3", D3, {"v8": ("cooking", 0.9, "positive"), "v9": ("cooking", 0.5, "positive")},
              actions=[("v8", "spin"), ("v8", "bounce")])  # fmt: skip
    return uri


# --- query ------------------------------------------------------------------------------------------


def test_query_prints_a_json_array_of_rows(tables_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    tag_night(tables_uri, "n1", D1, {"v1": ("cooking", 0.9, "positive"), "v2": ("nature", 0.8, "negative")})
    sql = "SELECT video_id, label, score, run_date FROM classifications WHERE rank = 1 ORDER BY video_id"
    query.main(query.QueryConfig(sql, tables_uri, format="json"))
    rows = json.loads(capsys.readouterr().out)
    assert rows == [
        {"video_id": "v1", "label": "cooking", "score": 0.9, "run_date": "2024-05-01"},
        {"video_id": "v2", "label": "nature", "score": 0.8, "run_date": "2024-05-01"},
    ]


def test_every_table_is_a_view_even_on_a_fresh_catalog(tmp_path: Path) -> None:
    for name in tables.TABLES:
        result = query.run_sql(str(tmp_path), f"SELECT * FROM {name}")
        assert result.num_rows == 0
        assert result.column_names == tables.schema(name).names, name
    described = query.run_sql(str(tmp_path), "DESCRIBE classifications").to_pylist()
    assert {r["column_name"]: r["column_type"] for r in described}["run_date"] == "DATE"


def test_csv_and_parquet_outputs(catalog: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sql = "SELECT run_date, label, count() AS n FROM classifications WHERE rank = 1 GROUP BY ALL ORDER BY ALL"
    query.main(query.QueryConfig(sql, catalog, format="csv"))
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == {"run_date": "2024-05-01", "label": "cooking", "n": "3"}
    assert len(rows) == 5

    out = tmp_path / "result.parquet"
    query.main(query.QueryConfig(sql, catalog, format="parquet", out=str(out)))
    back = pq.read_table(out)
    assert back.num_rows == 5 and back.schema.field("run_date").type == pa.date32()

    query.main(query.QueryConfig("SELECT video_id, uri FROM videos WHERE video_id = 'v1'", catalog))
    assert "s3://corpus/v1.mp4" in capsys.readouterr().out  # the table view prints whole values, not cut
    with pytest.raises(ValueError, match="needs --out"):
        query.QueryConfig(sql, catalog, format="parquet")


def test_errors_are_one_line(tmp_path: Path, catalog: str) -> None:
    with pytest.raises(FileNotFoundError, match="no such folder") as err:
        query.run_sql(str(tmp_path / "nope"), "SELECT 1")
    assert "\n" not in str(err.value)
    with pytest.raises(query.QueryError) as err:
        query.run_sql(catalog, "SELECT colour FROM videos")
    assert "colour" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(query.QueryError, match="syntax error"):
        query.run_sql(catalog, "SELEC 1")


def test_missing_bucket_is_named(s3_server: str) -> None:
    with pytest.raises(FileNotFoundError, match="bucket s3://no-such-bucket not found"):
        query.run_sql("s3://no-such-bucket/tables", "SELECT 1")


def test_a_reader_sees_only_complete_chunks(tables_uri: str, cut_off_at) -> None:
    old = {f"v{i}": ("cooking", 0.9, "positive") for i in range(4)}
    new = {f"v{i}": ("nature", 0.9, "positive") for i in range(4, 10)}
    tag_night(tables_uri, "n1", D1, old)
    count = "SELECT label, count(*) AS n FROM classifications WHERE rank = 1 GROUP BY ALL ORDER BY ALL"
    joined = "SELECT count(*) AS n FROM classifications c JOIN videos v USING (video_id) WHERE c.rank = 1"

    # The next night's commit is cut off after the classifications (and the tables before them) took it.
    cut_off_at("committed classifications")
    with pytest.raises(Killed):
        tag_night(tables_uri, "n2", D2, new)
    cut_off_at(None)
    latest = DeltaTable(f"{tables_uri}/classifications", storage_options=delta.storage_options(tables_uri))
    assert latest.to_pyarrow_table().num_rows == 20  # the table alone already holds the cut-off chunk
    assert query.run_sql(tables_uri, count).to_pylist() == [{"label": "cooking", "n": 4}]
    assert query.run_sql(tables_uri, joined).to_pylist() == [{"n": 4}]

    # The next run rolls the chunk forward: readers then see all of it, across tables.
    tag_night(tables_uri, "n3", D3, {})
    assert query.run_sql(tables_uri, count).to_pylist() == [
        {"label": "cooking", "n": 4},
        {"label": "nature", "n": 6},
    ]
    assert query.run_sql(tables_uri, joined).to_pylist() == [{"n": 10}]


# --- reports ----------------------------------------------------------------------------------------


def png_pixels(path: Path) -> np.ndarray:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(str(path))


def test_daily_report(catalog: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "daily.png"
    config = reports.DailyReportConfig(tables=catalog, date="2024-05-01", plot=str(plot), top=2)
    report = reports.daily_report(config)
    printed = capsys.readouterr().out
    assert "daily report — 2024-05-01" in printed and "EmptyFile" in printed and "v4" in printed
    s = {title: section.to_pylist() for title, section in report.sections.items()}
    assert s["videos by status"] == [{"status": "tagged", "videos": 6}, {"status": "failed", "videos": 2}]
    assert [(r["label"], r["videos"]) for r in s["label counts (top-1)"]] == [
        ("cooking", 3), ("nature", 2), ("traffic", 1)
    ]  # fmt: skip
    top = [(r["label"], r["video_id"]) for r in s["top videos per label"]]
    assert top == [
        ("cooking", "v4"), ("cooking", "v1"), ("nature", "v6"), ("nature", "v3"), ("traffic", "v5")
    ]  # fmt: skip
    assert {r["label"]: (r["videos"], r["pct"]) for r in s["sentiment mix (per video)"]} == {
        "negative": (1, 16.7), "neutral": (1, 16.7), "positive": (4, 66.7)
    }  # fmt: skip
    # The full re-run replaced the first run's errors: one copy each, as the re-run saw them.
    assert [(r["stage"], r["error_type"], r["errors"]) for r in s["errors by type"]] == [
        ("probe", "EmptyFile", 1), ("probe", "InvalidData", 1)
    ]  # fmt: skip

    pixels = png_pixels(plot)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 1000
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50  # bars, text and legends, not a blank canvas


def test_daily_report_defaults_to_the_latest_night(catalog: str) -> None:
    report = reports.daily_report(reports.DailyReportConfig(tables=catalog))
    assert report.run_date == D3
    assert report.sections["errors by type"].num_rows == 0


def test_trend_report(catalog: str, tmp_path: Path) -> None:
    plot = tmp_path / "trend.png"
    result = reports.trend_report(reports.TrendReportConfig(label="cooking", tables=catalog, plot=str(plot)))
    assert [(r["run_date"], r["top1_videos"], r["top1_pct"]) for r in result.to_pylist()] == [
        (D1, 3, 50.0), (D2, 0, 0.0), (D3, 2, 100.0)
    ]  # fmt: skip
    spins = reports.trend_report(reports.TrendReportConfig(label="spin", tables=catalog)).to_pylist()
    assert [(r["action_segments"], r["action_videos"]) for r in spins] == [(2, 2), (0, 0), (1, 1)]
    assert len(np.unique(png_pixels(plot).reshape(-1, 4), axis=0)) > 20
    with pytest.raises(ValueError, match="label 'cookin' is in no table; known labels: bounce, cooking"):
        reports.trend_report(reports.TrendReportConfig(label="cookin", tables=catalog))


def test_reports_on_a_fresh_catalog_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no night in .* yet; run `reelflow tag` first"):
        reports.daily_report(reports.DailyReportConfig(tables=str(tmp_path)))
    with pytest.raises(ValueError, match="known labels: none yet"):
        reports.trend_report(reports.TrendReportConfig(label="cooking", tables=str(tmp_path)))


def test_a_night_filter_reads_only_that_partition(catalog: str) -> None:
    # Break the files of one night: a query about another night does not open them, one about it fails
    # with a one-line error naming the file.
    for uri in DeltaTable(f"{catalog}/classifications").file_uris():
        if "run_date=2024-05-02" in uri:
            Path(uri).write_bytes(b"not parquet")
    sql = "SELECT count(*) AS n FROM classifications WHERE run_date = DATE '2024-05-03'"
    assert query.run_sql(catalog, sql).to_pylist() == [{"n": 4}]
    with pytest.raises(query.QueryError, match=r"run_date=2024-05-02/part-n2-\w+\.parquet") as err:
        query.run_sql(catalog, "SELECT count(*) FROM classifications")
    assert "\n" not in str(err.value)
