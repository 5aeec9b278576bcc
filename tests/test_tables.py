"""flows.tables: schemas, the stage → commit → publish protocol, replacement, crashes, outside readers."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

from flows import storage, tables
from flows.tables import TableError, TableWriter

NIGHT = dt.date(2024, 5, 1)
NEXT = dt.date(2024, 5, 2)
MODEL = ("c3d_small", "3")


def night(
    videos: Sequence[str],
    model: tuple[str, str] = MODEL,
    actions_for: Sequence[str] | None = None,
    failed: Sequence[str] = (),
    label: str = "cooking",
) -> dict[str, pa.Table]:
    """One run's rows for every table: each video classified and scored, `failed` ones as errors."""
    n = len(videos)
    ids = {"video_id": list(videos), "uri": [f"s3://corpus/{v}.mp4" for v in videos]}
    pred = {**ids, "model_name": [model[0]] * n, "model_version": [model[1]] * n}
    pred["mlflow_run_id"] = ["run-1"] * n
    acted = list(videos if actions_for is None else actions_for)
    out = {
        "videos": pa.table({
            "video_id": [*videos, *failed], "uri": [f"s3://corpus/{v}.mp4" for v in [*videos, *failed]],
            "size_bytes": [1000] * (n + len(failed)), "etag": ["e"] * (n + len(failed)),
            "duration_s": [6.0] * (n + len(failed)), "fps": [15.0] * (n + len(failed)),
            "n_frames": [90] * (n + len(failed)), "width": [128] * (n + len(failed)),
            "height": [128] * (n + len(failed)), "codec": ["h264"] * (n + len(failed)),
            "has_audio": [True] * (n + len(failed)), "status": ["tagged"] * n + ["failed"] * len(failed),
        }),
        "classifications": pa.table({
            **{k: v * 2 for k, v in pred.items()}, "head": ["category"] * 2 * n,
            "label": [label] * n + ["nature"] * n, "score": [0.9] * n + [0.1] * n, "rank": [1] * n + [2] * n,
        }),
        "actions": pa.table({
            "video_id": acted, "uri": [f"s3://corpus/{v}.mp4" for v in acted],
            "model_name": [model[0]] * len(acted), "model_version": [model[1]] * len(acted),
            "mlflow_run_id": ["run-1"] * len(acted), "label": ["spin"] * len(acted),
            "start_s": [1.0] * len(acted), "end_s": [2.5] * len(acted), "score": [0.7] * len(acted),
        }),
        "sentiment": pa.table({
            **pred, "scope": ["video"] * n, "label": ["positive"] * n, "score": [0.8] * n,
            "valence": [0.4] * n, "start_s": [0.0] * n, "end_s": [6.0] * n,
        }),
        "highlights": pa.table({
            **pred, "rank": [1] * n, "start_s": [2.0] * n, "end_s": [4.0] * n, "importance": [0.6] * n,
            "keyframe_s": [3.0] * n,
        }),
        "errors": pa.table({
            "video_id": list(failed), "uri": [f"s3://corpus/{v}.mp4" for v in failed],
            "stage": ["probe"] * len(failed), "error_type": ["InvalidData"] * len(failed),
            "message": [f"{v}.mp4: invalid data" for v in failed],
            "model_name": pa.nulls(len(failed), pa.string()),
            "model_version": pa.nulls(len(failed), pa.string()),
        }),
    }  # fmt: skip
    return out


def replace(table: pa.Table, column: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(column), column, values)


def stage_night(writer: TableWriter, rows: dict[str, pa.Table]) -> None:
    for name, table in rows.items():
        writer.stage(name, table)


def write_night(uri: str, job: str, rows: dict[str, pa.Table], date: dt.date = NIGHT) -> tables.CommitResult:
    writer = TableWriter(uri, job, date)
    stage_night(writer, rows)
    return writer.commit({"models": ["c3d_small/3"]})


def rows_of(uri: str, name: str, *columns: str) -> list[tuple]:
    table = tables.read_table(uri, name, columns or None)
    return sorted(tuple(r.values()) for r in table.to_pylist())


@pytest.fixture(params=["local", "s3"])
def tables_uri(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A tables location: a local folder, or a prefix in a fresh bucket on the S3 protocol server."""
    if request.param == "local":
        yield str(tmp_path / "tables")
    else:
        yield request.getfixturevalue("s3_bucket") + "/warehouse/tables"


# --- schemas and validation ---------------------------------------------------------------------------


def test_every_prediction_table_carries_the_common_columns() -> None:
    common = ["video_id", "uri", "model_name", "model_version", "mlflow_run_id", "job_run_id", "run_date"]
    for name in tables.PREDICTION_TABLES:
        assert set(common) <= set(tables.schema(name).names), name
        assert "run_date" not in tables.file_schema(name).names, name
    for name in ("videos", "errors"):
        assert {"video_id", "uri", "job_run_id", "run_date"} <= set(tables.schema(name).names)
    assert tables.schema("classifications").field("run_date").type == pa.date32()


@pytest.mark.parametrize(
    ("change", "column"),
    [
        (lambda t: t.drop_columns(["score"]), "score"),
        (lambda t: replace(t, "rank", pa.array(["x"] * t.num_rows)), "rank"),
        (lambda t: replace(t, "label", pa.nulls(t.num_rows, pa.string())), "label"),
        (lambda t: t.append_column("colour", pa.array(["red"] * t.num_rows)), "colour"),
        (lambda t: t.append_column("run_date", pa.array([dt.date(2023, 1, 1)] * t.num_rows)), "run_date"),
    ],
    ids=["missing", "wrong-type", "null", "unknown", "other-date"],
)  # fmt: skip
def test_bad_rows_get_a_one_line_error_naming_table_and_column(tmp_path: Path, change, column: str) -> None:
    writer = TableWriter(str(tmp_path), "job-1", NIGHT)
    bad = change(night(["a", "b"])["classifications"])
    with pytest.raises(TableError) as err:
        writer.stage("classifications", bad)
    message = str(err.value)
    assert "\n" not in message
    assert "table classifications" in message and f"'{column}'" in message
    writer.commit()
    assert tables.read_table(str(tmp_path), "classifications").num_rows == 0  # nothing of it was staged


def test_a_failing_chunk_leaves_nothing_of_its_call_staged(tmp_path: Path) -> None:
    good = night(["a", "b"])["sentiment"]
    bad = good.set_column(good.schema.get_field_index("scope"), "scope", pa.array(["film"] * 2))
    writer = TableWriter(str(tmp_path), "job-1", NIGHT, max_rows_per_file=1)
    with pytest.raises(TableError, match="column 'scope' has 'film'"):
        writer.stage("sentiment", iter([good.to_batches()[0], bad]))
    writer.stage("sentiment", good)
    writer.commit()
    assert rows_of(str(tmp_path), "sentiment", "video_id") == [("a",), ("b",)]


def test_bad_names_are_refused_up_front(tmp_path: Path) -> None:
    with pytest.raises(TableError, match="job_run_id 'a/b'"):
        TableWriter(str(tmp_path), "a/b", NIGHT)
    with pytest.raises(TableError, match="run_date '2024-13-01'"):
        TableWriter(str(tmp_path), "job", "2024-13-01")
    with pytest.raises(TableError, match="unknown table 'labels'"):
        TableWriter(str(tmp_path), "job", NIGHT).stage("labels", pa.table({"x": [1]}))


# --- commit and read back ---------------------------------------------------------------------------


def test_a_committed_night_reads_back_from_every_table(tables_uri: str) -> None:
    result = write_night(tables_uri, "job-1", night(["a", "b", "c"], failed=["x"]))
    assert result.rows == {"videos": 4, "classifications": 6, "actions": 3, "sentiment": 3, "highlights": 3,
                           "errors": 1}  # fmt: skip
    assert result.replaced == {}
    files = tables.committed_files(tables_uri, "classifications")
    assert files == [f"{tables_uri}/classifications/run_date=2024-05-01/part-job-1-0.parquet"]
    top = tables.read_table(tables_uri, "classifications").filter(pc.field("rank") == 1)
    assert sorted(top.column("video_id").to_pylist()) == ["a", "b", "c"]
    assert set(top.column("run_date").to_pylist()) == {NIGHT}
    assert set(top.column("job_run_id").to_pylist()) == {"job-1"}
    assert rows_of(tables_uri, "errors", "video_id", "error_type") == [("x", "InvalidData")]
    # Nothing is left of the staging folder, and the manifest is marked published.
    assert not storage.exists(f"{tables_uri}/_staging/job-1")
    assert storage.exists(f"{tables_uri}/_commits/job-1.published")
    with pytest.raises(TableError, match="already committed"):
        TableWriter(tables_uri, "job-1", NIGHT)


def test_large_stages_roll_over_into_several_files(tmp_path: Path) -> None:
    uri = str(tmp_path)
    writer = TableWriter(uri, "job-1", NIGHT, max_rows_per_file=2)
    rows = night([f"v{i}" for i in range(5)])["sentiment"]
    assert writer.stage("sentiment", rows.to_batches(max_chunksize=3)) == 5
    writer.commit()
    assert len(tables.committed_files(uri, "sentiment")) == 3
    assert tables.read_table(uri, "sentiment").num_rows == 5


def test_external_readers_see_exactly_the_committed_rows(tmp_path: Path) -> None:
    uri = str(tmp_path)
    write_night(uri, "job-1", night(["a", "b"]))
    write_night(uri, "job-2", night(["c"]), date=NEXT)
    # A run in progress: its files sit in _staging and the manifest folder is beside the tables.
    stage_night(TableWriter(uri, "job-3", dt.date(2024, 5, 3)), night(["d", "e"]))

    hive = ds.partitioning(pa.schema([("run_date", pa.date32())]), flavor="hive")
    seen = ds.dataset(f"{uri}/classifications", format="parquet", partitioning=hive).to_table()
    assert seen.num_rows == 6
    assert sorted(set(seen.column("video_id").to_pylist())) == ["a", "b", "c"]
    assert set(seen.column("run_date").to_pylist()) == {NIGHT, NEXT}
    # The whole folder, as Spark or Athena would crawl it: `_staging` and `_commits` are skipped.
    everything = ds.dataset(uri, format="parquet", partitioning="hive", exclude_invalid_files=True)
    assert not any("/_" in path.removeprefix(uri) for path in everything.files)
    con = duckdb.connect()
    count = con.sql(
        f"SELECT count(*) FROM read_parquet('{uri}/sentiment/*/*.parquet', hive_partitioning = true)"
    ).fetchall()
    assert count == [(3,)]


# --- atomicity and crashes ----------------------------------------------------------------------------


def test_staged_rows_are_invisible_until_the_commit(tables_uri: str) -> None:
    write_night(tables_uri, "job-1", night(["a", "b"]))
    writer = TableWriter(tables_uri, "job-2", NIGHT)
    stage_night(writer, night(["a", "b", "c"], label="music"))
    # A reader during the run sees the old night whole.
    assert rows_of(tables_uri, "classifications", "video_id", "label", "rank") == [
        ("a", "cooking", 1), ("a", "nature", 2), ("b", "cooking", 1), ("b", "nature", 2)
    ]  # fmt: skip
    writer.commit()
    assert rows_of(tables_uri, "classifications", "video_id", "label", "rank") == [
        ("a", "music", 1), ("a", "nature", 2), ("b", "music", 1), ("b", "nature", 2),
        ("c", "music", 1), ("c", "nature", 2),
    ]  # fmt: skip


def test_a_run_that_dies_before_its_commit_leaves_nothing(tables_uri: str) -> None:
    stage_night(TableWriter(tables_uri, "dead-run", NIGHT), night(["a", "b"]))
    assert storage.exists(f"{tables_uri}/_staging/dead-run")
    for name in tables.TABLES:
        assert tables.committed_files(tables_uri, name) == [], name
    # The next run garbage-collects the dead staging when it commits.
    write_night(tables_uri, "next-run", night(["c"]))
    assert not storage.exists(f"{tables_uri}/_staging/dead-run")
    assert rows_of(tables_uri, "videos", "video_id", "job_run_id") == [("c", "next-run")]


class Crash(RuntimeError):
    pass


def crash_after_moves(monkeypatch: pytest.MonkeyPatch, moves: int) -> None:
    """Let `moves` file moves of a publish happen, then die as a killed driver would."""
    real = storage.rename
    done = []

    def rename(src: str, dst: str) -> None:
        if len(done) >= moves:
            raise Crash("driver killed")
        real(src, dst)
        done.append(dst)

    monkeypatch.setattr(storage, "rename", rename)


def test_a_crash_while_publishing_is_rolled_forward(tables_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    write_night(tables_uri, "job-1", night(["a", "b"], failed=["x"]))
    crash_after_moves(monkeypatch, moves=3)
    writer = TableWriter(tables_uri, "job-2", NIGHT)
    stage_night(writer, night(["a", "b", "c"], actions_for=["c"], label="music"))
    with pytest.raises(Crash):
        writer.commit()
    monkeypatch.undo()

    # Committed but half moved: readers already see the whole new night, and nothing of what it replaced.
    assert storage.exists(f"{tables_uri}/_commits/job-2.json")
    assert not storage.exists(f"{tables_uri}/_commits/job-2.published")
    files = [u for name in tables.TABLES for u in tables.committed_files(tables_uri, name)]
    assert any("/_staging/" in u for u in files) and any("/_staging/" not in u for u in files)
    expected = {
        "classifications": [("a", "music", 1), ("a", "nature", 2), ("b", "music", 1), ("b", "nature", 2),
                            ("c", "music", 1), ("c", "nature", 2)],
        "actions": [("c", "spin")],
        "errors": [("x",)],  # `x` was not part of the re-run: its rows stay
        "videos": [("a", "job-2"), ("b", "job-2"), ("c", "job-2"), ("x", "job-1")],
    }  # fmt: skip
    columns = {"classifications": ("video_id", "label", "rank"), "actions": ("video_id", "label"),
               "errors": ("video_id",), "videos": ("video_id", "job_run_id")}  # fmt: skip
    for name, rows in expected.items():
        assert rows_of(tables_uri, name, *columns[name]) == rows, name

    # The next writer rolls the publish forward first: every file in place, exactly one copy of each row.
    assert tables.recover(tables_uri) == ["job-2"]
    assert tables.recover(tables_uri) == []  # idempotent
    for name, rows in expected.items():
        assert rows_of(tables_uri, name, *columns[name]) == rows, name
    for name in tables.TABLES:
        assert all("/_staging/" not in u for u in tables.committed_files(tables_uri, name)), name
    fs, path = storage.arrow_filesystem(f"{tables_uri}/classifications")
    outside = ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()
    assert outside.num_rows == 6


def test_the_next_commit_finishes_a_crashed_publish_before_its_own(
    tables_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    crash_after_moves(monkeypatch, moves=1)
    writer = TableWriter(tables_uri, "job-1", NIGHT)
    stage_night(writer, night(["a", "b"]))
    with pytest.raises(Crash):
        writer.commit()
    monkeypatch.undo()
    write_night(tables_uri, "job-2", night(["c"]), date=NEXT)
    assert storage.exists(f"{tables_uri}/_commits/job-1.published")
    assert rows_of(tables_uri, "videos", "video_id", "run_date") == [
        ("a", NIGHT), ("b", NIGHT), ("c", NEXT)
    ]  # fmt: skip


def test_files_of_a_run_without_a_manifest_are_not_read(tmp_path: Path) -> None:
    uri = str(tmp_path)
    write_night(uri, "job-1", night(["a"]))
    # As if a publish began after a reader listed the manifests: a file of a run the reader does not know.
    src = tables.committed_files(uri, "videos")[0]
    ghost = src.replace("part-job-1-0", "part-job-9-0")
    Path(ghost).write_bytes(Path(src).read_bytes())
    assert tables.committed_files(uri, "videos") == [src]
    assert rows_of(uri, "videos", "video_id") == [("a",)]


# --- replacement and incremental runs -----------------------------------------------------------------


def test_rerunning_a_night_in_full_leaves_one_copy_of_each_row(tables_uri: str) -> None:
    write_night(tables_uri, "job-1", night(["a", "b"], failed=["x"]))
    # The full re-run of the same night: `a` now has no action segment, `x` decodes this time.
    result = write_night(tables_uri, "job-2", night(["a", "b", "x"], actions_for=["b", "x"]))
    assert result.replaced == {
        "videos": 3, "classifications": 4, "actions": 2, "sentiment": 2, "highlights": 2, "errors": 1
    }  # fmt: skip
    assert rows_of(tables_uri, "actions", "video_id", "job_run_id") == [("b", "job-2"), ("x", "job-2")]
    assert rows_of(tables_uri, "errors") == []
    assert rows_of(tables_uri, "videos", "video_id", "status") == [
        ("a", "tagged"), ("b", "tagged"), ("x", "tagged")
    ]  # fmt: skip
    for name in tables.PREDICTION_TABLES:
        keys = rows_of(tables_uri, name, "video_id", "model_name", "model_version", "job_run_id")
        assert {k[-1] for k in keys} == {"job-2"}, name
    # And once more: still exactly one copy.
    write_night(tables_uri, "job-3", night(["a", "b", "x"], actions_for=["b", "x"]))
    assert tables.read_table(tables_uri, "classifications").num_rows == 6


def test_a_partial_rerun_keeps_the_rows_it_does_not_redo(tmp_path: Path) -> None:
    uri = str(tmp_path)
    write_night(uri, "job-1", night(["a", "b", "c"]))
    write_night(uri, "job-2", night(["b"], label="music"))
    assert rows_of(uri, "classifications", "video_id", "label", "job_run_id", "rank") == [
        ("a", "cooking", "job-1", 1), ("a", "nature", "job-1", 2),
        ("b", "music", "job-2", 1), ("b", "nature", "job-2", 2),
        ("c", "cooking", "job-1", 1), ("c", "nature", "job-1", 2),
    ]  # fmt: skip


def test_other_models_and_other_nights_are_never_replaced(tmp_path: Path) -> None:
    uri = str(tmp_path)
    write_night(uri, "job-1", night(["a"]))
    write_night(uri, "job-2", night(["a"], model=("lstm_small", "1")))
    write_night(uri, "job-3", night(["a"]), date=NEXT)
    assert rows_of(uri, "sentiment", "run_date", "model_name", "job_run_id") == [
        (NIGHT, "c3d_small", "job-1"), (NIGHT, "lstm_small", "job-2"), (NEXT, "c3d_small", "job-3")
    ]  # fmt: skip
    # One videos row per video and night: the latest run that saw it.
    assert rows_of(uri, "videos", "run_date", "job_run_id") == [(NIGHT, "job-2"), (NEXT, "job-3")]


def test_tagged_keys_tell_the_tag_job_what_to_skip(tables_uri: str) -> None:
    assert tables.tagged_keys(tables_uri) == set()
    write_night(tables_uri, "job-1", night(["a", "b"], failed=["x"]))
    write_night(tables_uri, "job-2", night(["c"], model=("lstm_small", "1")), date=NEXT)
    stage_night(TableWriter(tables_uri, "job-3", dt.date(2024, 5, 3)), night(["d"]))  # not committed
    assert tables.tagged_keys(tables_uri) == {
        ("a", "c3d_small", "3"), ("b", "c3d_small", "3"), ("c", "lstm_small", "1")
    }  # fmt: skip
    assert tables.committed_keys(tables_uri, "videos", ["video_id", "status"]) == {
        ("a", "tagged"), ("b", "tagged"), ("x", "failed"), ("c", "tagged")
    }  # fmt: skip
    with pytest.raises(TableError, match="unknown column 'colour'"):
        tables.committed_keys(tables_uri, "videos", ["colour"])


def test_manifests_record_each_run(tmp_path: Path) -> None:
    uri = str(tmp_path)
    write_night(uri, "job-1", night(["a"]))
    write_night(uri, "job-2", night(["a"]))
    runs = list(tables.iter_manifests(uri))
    assert [m["job_run_id"] for m in runs] == ["job-1", "job-2"]
    assert runs[1]["metadata"] == {"models": ["c3d_small/3"]}
    assert runs[1]["remove"]["videos"] == ["videos/run_date=2024-05-01/part-job-1-0.parquet"]
    with pytest.raises(TableError, match="not JSON-serializable"):
        TableWriter(uri, "job-3", NIGHT).commit({"when": object()})


def test_any_spelling_of_a_location_names_the_same_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_server: str
) -> None:
    monkeypatch.chdir(tmp_path)
    write_night("tables", "job-1", night(["a"]))
    write_night(f"file://{tmp_path}/tables/", "job-2", night(["a"]))
    assert rows_of("./tables", "videos", "video_id", "job_run_id") == [("a", "job-2")]
    with pytest.raises(FileNotFoundError, match="bucket s3://no-such-bucket not found"):
        TableWriter("s3://no-such-bucket/tables", "job-1", NIGHT)
