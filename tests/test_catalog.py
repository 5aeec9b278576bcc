"""Operating the catalog: time travel, history, optimize and vacuum, check and repair, purge, the `current`
views, and the query sandbox — through `reelflow query` and `reelflow tables` as an operator runs them."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import Killed
from deltalake import DeltaTable

from flows import storage, table_files, table_maintenance, table_writer, tables
from jobs import catalog, cli, query

D1, D2, D3 = dt.date(2024, 5, 1), dt.date(2024, 5, 2), dt.date(2024, 5, 3)


def rows_for(videos: dict[str, str], label: str = "cooking", model_version: str = "1") -> dict[str, pa.Table]:
    """Rows of `videos` (video_id → uri) in `videos`, `classifications` and `sentiment`."""
    ids, uris = list(videos), list(videos.values())
    n = len(ids)
    pred = {"video_id": ids, "uri": uris, "model_name": ["m"] * n, "model_version": [model_version] * n,
            "mlflow_run_id": ["r"] * n}  # fmt: skip
    return {
        "videos": pa.table({"video_id": ids, "uri": uris, "size_bytes": [1] * n, "etag": ["e"] * n,
                            "duration_s": [6.0] * n, "fps": [15.0] * n, "n_frames": [90] * n,
                            "width": pa.array([64] * n, pa.int32()), "height": pa.array([64] * n, pa.int32()),
                            "codec": ["h264"] * n, "has_audio": [True] * n, "status": ["ok"] * n}),
        "classifications": pa.table({**pred, "head": ["category"] * n, "label": [label] * n,
                                     "score": [0.9] * n, "rank": pa.array([1] * n, pa.int32())}),
        "sentiment": pa.table({**pred, "scope": ["video"] * n, "label": ["positive"] * n, "score": [0.8] * n,
                               "valence": [0.5] * n, "start_s": [None] * n, "end_s": [None] * n}),
    }  # fmt: skip


def commit(uri: str, run: str, night: dt.date, *chunks: dict[str, pa.Table], replace: bool = False) -> None:
    with table_writer.writing(uri, run, night, models=["models:/m/1"]) as writer:
        for rows in chunks:
            writer.write_chunk(rows, replace=replace)


def corpus(*names: str) -> dict[str, str]:
    return {name: f"s3://videos/{name}.mp4" for name in names}


def sql(uri: str, text: str, *args: str) -> list[dict]:
    """`reelflow query … --format json` as a list of rows."""
    out = query.run_sql(uri, text, read=query.ReadOptions(*args) if args else None)
    return json.loads(query.encode(out, "json"))


def tables_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = cli.main(["tables", *argv])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


@pytest.fixture
def three_nights(tables_uri: str) -> str:
    """Night 1 tags a and b (two chunks), night 2 tags c, night 3 re-tags a in full with a new label."""
    commit(tables_uri, "n1", D1, rows_for(corpus("a")), rows_for(corpus("b")))
    commit(tables_uri, "n2", D2, rows_for(corpus("c")))
    commit(tables_uri, "n3", D3, rows_for(corpus("a"), label="music"), replace=True)
    return tables_uri


# --- time travel and history ----------------------------------------------------------------------------


def test_as_of_reads_every_table_as_an_earlier_run_left_it(three_nights: str) -> None:
    top = "SELECT video_id, label FROM classifications ORDER BY 1"
    assert sql(three_nights, top) == [
        {"video_id": "a", "label": "music"}, {"video_id": "b", "label": "cooking"},
        {"video_id": "c", "label": "cooking"},
    ]  # fmt: skip
    # As of run n2, or of the night 2024-05-02: before the full re-run, in every table.
    for as_of in ("n2", "2024-05-02"):
        assert sql(three_nights, top, as_of)[0] == {"video_id": "a", "label": "cooking"}
        joined = "SELECT count(*) AS n FROM videos JOIN sentiment USING (video_id)"
        assert sql(three_nights, joined, as_of) == [{"n": 3}]
    assert [r["video_id"] for r in sql(three_nights, "SELECT video_id FROM videos ORDER BY 1", "n1")] == [
        "a",
        "b",
    ]
    with pytest.raises(tables.TableError, match="no complete run matches as-of 2024-04-30"):
        sql(three_nights, top, "2024-04-30")


def test_history_lists_every_run_with_its_chunks_rows_and_status(
    three_nights: str, capsys: pytest.CaptureFixture[str], cut_off_at
) -> None:
    # A fourth run dies after committing one chunk of two: interrupted.
    cut_off_at("chunk committed")
    with pytest.raises(Killed):
        commit(three_nights, "n4", dt.date(2024, 5, 4), rows_for(corpus("d")), rows_for(corpus("e")))
    cut_off_at(None)

    status, out = tables_cli(capsys, "history", three_nights, "--format", "json")
    assert status == 0
    listed = {r["run_id"]: r for r in json.loads(out)}
    assert list(listed) == ["n1", "n2", "n3", "n4"]
    assert (listed["n1"]["chunks"], listed["n1"]["rows_videos"], listed["n1"]["status"]) == (2, 2, "finished")
    assert (listed["n3"]["night"], listed["n3"]["rows_classifications"]) == ("2024-05-03", 1)
    assert listed["n3"]["models"] == "models:/m/1" and listed["n3"]["ended_at"] >= listed["n3"]["started_at"]
    assert (listed["n4"]["chunks"], listed["n4"]["status"], listed["n4"]["ended_at"]) == (
        1,
        "interrupted",
        None,
    )
    status, out = tables_cli(capsys, "history", three_nights)
    assert status == 0 and "interrupted" in out and "n3" in out


# --- optimize and vacuum --------------------------------------------------------------------------------


def test_optimize_and_vacuum_keep_results_and_a_pinned_reader(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = str(tmp_path / "tables")
    commit(uri, "n1", D1, *(rows_for(corpus(f"v{i}")) for i in range(6)))  # six small files per table
    commit(uri, "n2", D2, *(rows_for(corpus(f"w{i}")) for i in range(3)))
    everything = "SELECT * FROM classifications ORDER BY video_id"
    before = sql(uri, everything)
    pinned = tables.read_snapshot(uri)
    assert len(DeltaTable(f"{uri}/classifications").file_uris()) == 9

    status, out = tables_cli(capsys, "optimize", uri)
    assert status == 0 and "classifications: compacted 9 files into 2" in out  # one file per night
    assert len(DeltaTable(f"{uri}/classifications").file_uris()) == 2
    assert sql(uri, everything) == before
    assert tables.read_table(uri, "classifications", snapshot=pinned).num_rows == 9  # pinned reader reads

    # Files of a run that died before committing them are vacuumed too (once older than the retention).
    table_files.write_files(uri, "classifications", rows_for(corpus("x"))["classifications"],
                             job_run_id="dead", run_date=D3)  # fmt: skip
    status, out = tables_cli(capsys, "vacuum", uri)  # default: keep 7 days
    assert status == 0 and out.startswith("deleted 0 files")
    assert tables.read_table(uri, "classifications", snapshot=pinned).num_rows == 9
    status, out = tables_cli(capsys, "vacuum", uri, "--retain", "0h")
    assert status == 0 and "classifications" in out
    assert len(list((tmp_path / "tables" / "classifications").rglob("*.parquet"))) == 2  # orphans gone
    assert sql(uri, everything) == before
    operations = [r["run_id"].split("-")[0] for r in catalog.history(uri).to_pylist()]
    assert operations == ["n1", "n2", "optimize", "vacuum", "vacuum"]
    status, out = tables_cli(capsys, "vacuum", uri, "--retain", "7 weeks")
    assert status == 2 and "retain '7 weeks': expected a duration such as 7d" in out


def test_the_log_is_checkpointed_so_opening_stays_fast(tmp_path: Path) -> None:
    uri = str(tmp_path / "tables")
    for night in range(tables.CHECKPOINT_INTERVAL // 2 + 1):  # two commits a night: the fence and a chunk
        commit(uri, f"n{night}", D1 + dt.timedelta(days=night), rows_for(corpus(f"v{night}")))
    log_dir = tmp_path / "tables" / "classifications" / "_delta_log"
    assert list(log_dir.glob("*.checkpoint.parquet")) and (log_dir / "_last_checkpoint").exists()


# --- check and repair -----------------------------------------------------------------------------------


def test_check_finds_a_half_committed_chunk_and_repair_finishes_it(
    tables_uri: str, capsys: pytest.CaptureFixture[str], cut_off_at
) -> None:
    commit(tables_uri, "n1", D1, rows_for(corpus("a")))
    cut_off_at("committed classifications")
    with pytest.raises(Killed):
        commit(tables_uri, "n2", D2, rows_for(corpus("b")))
    cut_off_at(None)
    status, out = tables_cli(capsys, "check", tables_uri)
    assert status == 1 and out.strip() == "_runs: chunk 1 of run n2 is committed to some tables only"

    status, out = tables_cli(capsys, "repair", tables_uri)
    assert status == 0 and "finished committing chunk 1 of run n2" in out
    assert tables_cli(capsys, "check", tables_uri) == (
        0,
        f"tables {tables.root_uri(tables_uri)}: consistent\n",
    )
    assert sql(tables_uri, "SELECT count(*) AS n FROM videos JOIN sentiment USING (video_id)") == [{"n": 2}]


def test_check_finds_duplicated_keys_and_repair_keeps_the_first_runs_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = str(tmp_path / "tables")
    commit(uri, "n1", D1, rows_for(corpus("a", "b")))
    commit(uri, "n2", D2, rows_for(corpus("b", "c"), label="music"))  # b again, as a broken writer would
    status, out = tables_cli(capsys, "check", uri)
    assert status == 1
    assert "videos: 1 key(s) have rows of more than one run, e.g. (b)" in out
    assert "classifications: 1 key(s) have rows of more than one run, e.g. (b, m, 1)" in out

    status, out = tables_cli(capsys, "repair", uri)
    assert status == 0 and "classifications: removed 1 row(s) that repeated an earlier run's" in out
    assert tables_cli(capsys, "check", uri)[0] == 0
    assert sql(uri, "SELECT video_id, label, job_run_id FROM classifications ORDER BY 1") == [
        {"video_id": "a", "label": "cooking", "job_run_id": "n1"},
        {"video_id": "b", "label": "cooking", "job_run_id": "n1"},
        {"video_id": "c", "label": "music", "job_run_id": "n2"},
    ]  # fmt: skip


def test_check_finds_a_missing_data_file_and_repair_drops_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = str(tmp_path / "tables")
    commit(uri, "n1", D1, rows_for(corpus("a")), rows_for(corpus("b")))
    lost = DeltaTable(f"{uri}/sentiment").file_uris()[0]
    Path(lost).unlink()
    status, out = tables_cli(capsys, "check", uri)
    assert status == 1 and "sentiment: 1 data file(s) in the log are missing from storage" in out
    status, out = tables_cli(capsys, "repair", uri)
    assert status == 0 and "sentiment: dropped 1 missing data file(s)" in out
    assert tables_cli(capsys, "check", uri)[0] == 0
    assert sql(uri, "SELECT count(*) AS n FROM sentiment") == [{"n": 1}]


# --- changed and deleted sources --------------------------------------------------------------------------


def test_current_shows_only_the_newest_content_of_each_uri(tables_uri: str) -> None:
    commit(tables_uri, "n1", D1, rows_for({"old-id": "s3://videos/a.mp4", "b": "s3://videos/b.mp4"}))
    # The object at a.mp4 is uploaded again: new content, a new video_id, tagged the next night.
    commit(tables_uri, "n2", D2, rows_for({"new-id": "s3://videos/a.mp4"}, label="music"))
    everything = "SELECT video_id, label FROM classifications ORDER BY 1"
    assert [r["video_id"] for r in sql(tables_uri, everything)] == ["b", "new-id", "old-id"]
    assert sql(tables_uri, "SELECT video_id, label FROM current.classifications ORDER BY 1") == [
        {"video_id": "b", "label": "cooking"}, {"video_id": "new-id", "label": "music"}
    ]  # fmt: skip
    assert sql(tables_uri, "SELECT count(*) AS n FROM current.videos") == [{"n": 2}]


def test_purge_removes_a_sources_rows_from_every_table(
    tables_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    commit(tables_uri, "n1", D1, rows_for(corpus("keep", "takedown-1", "takedown-2")))
    status, out = tables_cli(capsys, "purge", tables_uri, "--uri", "s3://videos/takedown-*")
    assert (
        status == 0
        and out.strip() == "purged s3://videos/takedown-*: classifications 2, sentiment 2, videos 2"
    )
    for name in ("videos", "classifications", "sentiment"):
        assert sql(tables_uri, f"SELECT DISTINCT uri FROM {name}") == [{"uri": "s3://videos/keep.mp4"}], name
    # Recorded in history; nothing matches a second time.
    assert catalog.history(tables_uri).column("run_id").to_pylist()[-1].startswith("purge-")
    assert tables_cli(capsys, "purge", tables_uri, "--uri", "s3://videos/takedown-*")[1].endswith(
        "no rows matched\n"
    )
    assert tables_cli(capsys, "check", tables_uri)[0] == 0


# --- the query sandbox --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["SELECT * FROM read_csv('/etc/passwd')", "COPY (SELECT * FROM videos) TO '/tmp/reelflow-leak.csv'",
     "SET enable_external_access = true", "INSTALL httpfs"],
)  # fmt: skip
def test_the_query_sandbox_refuses_files_settings_and_extensions(
    three_nights: str, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["query", text, "--tables", three_nights]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("reelflow query: error: ") and "\n" not in message
    assert "file system operations are disabled" in message or "configuration has been locked" in message
    assert not Path("/tmp/reelflow-leak.csv").exists()


def test_a_query_past_its_timeout_is_cancelled_and_a_bad_limit_is_named(three_nights: str) -> None:
    slow = "SELECT count(*) FROM range(1000000000) a, range(1000000000) b"
    with pytest.raises(query.QueryError, match=r"cancelled after 0.5 s \(--timeout\)"):
        sql(three_nights, slow, None, None, 0.5)
    assert sql(three_nights, "SELECT count(*) AS n FROM videos", None, "256MB", 30) == [{"n": 3}]
    with pytest.raises(ValueError, match="memory_limit='lots'"):
        query.ReadOptions(memory_limit="lots")


def test_bad_operations_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["tables", "check", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="retain"):
        table_maintenance.parse_duration_hours("soon")
    assert storage.exists(str(tmp_path))
