"""flows.tables and flows.table_writer: the schema contract, chunk commits to Delta Lake tables, replacement,
fencing, interrupted chunks, consistent reads, and what outside readers see."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import Killed
from deltalake import DeltaTable

from flows import delta, runs, storage, table_files, table_writer, tables
from flows.lease import Lease, LeaseLost
from flows.table_writer import TableWriter
from flows.tables import TableError
from jobs import catalog

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
    seen = [*videos, *failed]
    out = {
        "videos": pa.table({
            "video_id": seen, "uri": [f"s3://corpus/{v}.mp4" for v in seen],
            "size_bytes": [1000] * len(seen), "etag": ["e"] * len(seen), "duration_s": [6.0] * len(seen),
            "fps": [15.0] * len(seen), "n_frames": [90] * len(seen), "width": [128] * len(seen),
            "height": [128] * len(seen), "codec": ["h264"] * len(seen), "has_audio": [True] * len(seen),
            "status": ["ok"] * n + ["failed"] * len(failed),
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
            "model_name": [model[0]] * len(failed), "model_version": [model[1]] * len(failed),
        }),
    }  # fmt: skip
    return out


def replace(table: pa.Table, column: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(column), column, values)


def write_night(
    uri: str, job: str, rows: dict[str, pa.Table], date: dt.date = NIGHT, replace: bool = False
) -> table_writer.ChunkResult | None:
    """One run committing `rows` as one chunk, holding the lease as the tag job does."""
    with table_writer.writing(uri, job, date, models=[f"{MODEL[0]}/{MODEL[1]}"]) as writer:
        return writer.write_chunk(rows, replace=replace)


def rows_of(uri: str, name: str, *columns: str) -> list[tuple]:
    table = tables.read_table(uri, name, columns or None)
    return sorted(tuple(r.values()) for r in table.to_pylist())


def writer_holding(uri: str, job: str, *, ttl_s: float = 60.0, date: dt.date = NIGHT) -> TableWriter:
    """A writer on a fresh lease (no heartbeat), opened: tables fenced, cut-off chunks rolled forward."""
    lease = Lease.acquire(uri, job, ttl_s=ttl_s, wait_s=ttl_s * 2, heartbeat=False)
    writer = TableWriter(uri, job, date, lease=lease)
    writer.open()
    return writer


# --- schemas and validation ---------------------------------------------------------------------------


def test_every_prediction_table_carries_the_common_columns() -> None:
    common = ["video_id", "uri", "model_name", "model_version", "mlflow_run_id", "job_run_id", "run_date"]
    for name in tables.PREDICTION_TABLES:
        assert set(common) <= set(tables.schema(name).names), name
        assert "run_date" not in tables.file_schema(name).names, name
    for name in ("videos", "errors"):
        assert {"video_id", "uri", "job_run_id", "run_date"} <= set(tables.schema(name).names)
    assert {"stage", "error_type", "message", "transient", "attempts", "first_seen", "last_seen"} <= set(
        tables.schema("errors").names
    )
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
    uri = str(tmp_path)
    bad = change(night(["a", "b"])["classifications"])
    with pytest.raises(TableError) as err, table_writer.writing(uri, "job-1", NIGHT) as writer:
        writer.write_chunk({"videos": night(["a", "b"])["videos"], "classifications": bad})
    message = str(err.value)
    assert "\n" not in message
    assert "table classifications" in message and f"'{column}'" in message
    for name in tables.TABLES:  # nothing of the chunk was committed
        assert tables.read_table(uri, name).num_rows == 0, name
    (run,) = catalog.history(uri).to_pylist()  # the run is on record as failed, and why
    assert run["status"] == "failed" and run["message"] == f"TableError: {message}"


def test_bad_names_are_refused_up_front(tmp_path: Path) -> None:
    with (
        pytest.raises(TableError, match="job_run_id 'a/b'"),
        table_writer.writing(str(tmp_path), "a/b", NIGHT),
    ):
        pass
    with (
        pytest.raises(TableError, match="run_date '2024-13-01'"),
        table_writer.writing(str(tmp_path), "j", "2024-13-01"),
    ):
        pass
    with (
        pytest.raises(TableError, match="unknown table 'labels'"),
        table_writer.writing(str(tmp_path), "j", NIGHT) as w,
    ):
        w.write_chunk({"labels": pa.table({"x": [1]})})
    assert not storage.exists(str(tmp_path / "_lease")) or tables.read_snapshot(str(tmp_path)).run_id is None


# --- commit and read back ---------------------------------------------------------------------------


def test_a_committed_night_reads_back_from_every_table(tables_uri: str) -> None:
    result = write_night(tables_uri, "job-1", night(["a", "b", "c"], failed=["x"]))
    assert result is not None and result.chunk == 1
    assert result.rows == {"videos": 4, "classifications": 6, "actions": 3, "sentiment": 3, "highlights": 3,
                           "errors": 1}  # fmt: skip
    assert result.replaced == {}
    top = tables.read_table(tables_uri, "classifications").filter(pc.field("rank") == 1)
    assert sorted(top.column("video_id").to_pylist()) == ["a", "b", "c"]
    assert set(top.column("run_date").to_pylist()) == {NIGHT}
    assert set(top.column("job_run_id").to_pylist()) == {"job-1"}
    assert rows_of(tables_uri, "errors", "video_id", "error_type") == [("x", "InvalidData")]
    # Each table is a Delta table partitioned by run_date, which deltalake reads as `reelflow query` does.
    for name in tables.TABLES:
        table = DeltaTable(f"{tables_uri}/{name}", storage_options=delta.storage_options(tables_uri))
        assert table.metadata().partition_columns == ["run_date"], name
        assert (
            table.to_pyarrow_table()
            .sort_by("video_id")
            .equals(tables.read_table(tables_uri, name).sort_by("video_id"))
        ), name
    log = runs.read_log(tables_uri)
    assert log is not None
    events = sorted((e["run_id"], e["chunk"], e["status"]) for e in log.to_pylist())
    assert events == [("job-1", 0, "finished"), ("job-1", 1, "committed"), ("job-1", 1, "pending")]
    assert tables.read_snapshot(tables_uri).run_id == "job-1"


def test_large_writes_roll_over_into_several_files(tmp_path: Path) -> None:
    uri = str(tmp_path)
    rows = night([f"v{i}" for i in range(5)])["sentiment"]
    files = table_files.write_files(
        uri, "sentiment", rows, job_run_id="job-1", run_date=NIGHT, max_rows_per_file=2
    )
    assert [f.rows for f in files] == [2, 2, 1]
    assert all(f.path.startswith("run_date=2024-05-01/part-job-1-") for f in files)
    with table_writer.writing(uri, "job-1", NIGHT) as writer:
        writer.commit_chunk({"sentiment": files})
    assert len(DeltaTable(f"{uri}/sentiment").file_uris()) == 3
    assert tables.read_table(uri, "sentiment").num_rows == 5


def test_files_written_but_not_committed_are_invisible_to_every_reader(tmp_path: Path) -> None:
    import polars as pl

    uri = str(tmp_path)
    write_night(uri, "job-1", night(["a", "b"]))
    # A run that wrote its files and died before committing them.
    table_files.write_files(
        uri, "classifications", night(["c"])["classifications"], job_run_id="dead", run_date=NEXT
    )
    assert rows_of(uri, "classifications", "video_id", "rank") == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    assert DeltaTable(f"{uri}/classifications").to_pyarrow_table().num_rows == 4
    assert pl.read_delta(f"{uri}/classifications").height == 4


def test_wrong_credentials_are_one_line_naming_the_bucket_never_the_secret(
    strict_s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", strict_s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unknown-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-right-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(PermissionError) as err:
        tables.read_snapshot("s3://analytics/tables")
    message = str(err.value)
    assert "\n" not in message and "\x1b" not in message
    assert message.startswith("s3://analytics/tables/_runs: access denied to bucket analytics; check")
    assert "not-the-right-secret" not in message


# --- replacement -------------------------------------------------------------------------------------


def test_rerunning_in_full_leaves_one_copy_of_each_row(tables_uri: str) -> None:
    write_night(tables_uri, "job-1", night(["a", "b"], failed=["x"]))
    # The full re-run: `a` now has no action segment, `x` decodes this time.
    result = write_night(tables_uri, "job-2", night(["a", "b", "x"], actions_for=["b", "x"]), replace=True)
    assert result is not None
    assert result.replaced == {
        "videos": 3, "classifications": 4, "actions": 2, "sentiment": 2, "highlights": 2, "errors": 1
    }  # fmt: skip
    assert rows_of(tables_uri, "actions", "video_id", "job_run_id") == [("b", "job-2"), ("x", "job-2")]
    assert rows_of(tables_uri, "errors") == []
    assert rows_of(tables_uri, "videos", "video_id", "status") == [("a", "ok"), ("b", "ok"), ("x", "ok")]
    for name in tables.PREDICTION_TABLES:
        keys = rows_of(tables_uri, name, "video_id", "model_name", "model_version", "job_run_id")
        assert {k[-1] for k in keys} == {"job-2"}, name
    # And once more, on another night: still exactly one copy, now under the later night.
    write_night(tables_uri, "job-3", night(["a", "b", "x"], actions_for=["b", "x"]), date=NEXT, replace=True)
    assert tables.read_table(tables_uri, "classifications").num_rows == 6
    assert set(tables.read_table(tables_uri, "classifications").column("run_date").to_pylist()) == {NEXT}


def test_a_partial_rerun_keeps_the_rows_it_does_not_redo(tmp_path: Path) -> None:
    uri = str(tmp_path)
    write_night(uri, "job-1", night(["a", "b", "c"]))
    write_night(uri, "job-2", night(["b"], label="music"), replace=True)
    assert rows_of(uri, "classifications", "video_id", "label", "job_run_id", "rank") == [
        ("a", "cooking", "job-1", 1), ("a", "nature", "job-1", 2),
        ("b", "music", "job-2", 1), ("b", "nature", "job-2", 2),
        ("c", "cooking", "job-1", 1), ("c", "nature", "job-1", 2),
    ]  # fmt: skip


def test_other_model_versions_are_never_replaced(tmp_path: Path) -> None:
    uri = str(tmp_path)
    write_night(uri, "job-1", night(["a"]))
    no_videos = {k: v for k, v in night(["a"], model=("c3d_small", "4")).items() if k != "videos"}
    write_night(uri, "job-2", no_videos, date=NEXT, replace=True)
    assert rows_of(uri, "sentiment", "run_date", "model_version", "job_run_id") == [
        (NIGHT, "3", "job-1"), (NEXT, "4", "job-2")
    ]  # fmt: skip
    assert rows_of(uri, "videos", "video_id", "job_run_id") == [("a", "job-1")]


def test_tagged_keys_tell_the_tag_job_what_to_skip(tables_uri: str) -> None:
    assert tables.tagged_keys(tables_uri) == set()
    write_night(tables_uri, "job-1", night(["a", "b"], failed=["x"]))
    write_night(tables_uri, "job-2", night(["c"], model=("lstm_small", "1")), date=NEXT)
    assert tables.tagged_keys(tables_uri) == {
        ("a", "c3d_small", "3"), ("b", "c3d_small", "3"), ("c", "lstm_small", "1")
    }  # fmt: skip
    assert tables.committed_keys(tables_uri, "videos", ["video_id", "status"]) == {
        ("a", "ok"), ("b", "ok"), ("x", "failed"), ("c", "ok")
    }  # fmt: skip
    with pytest.raises(TableError, match="unknown column 'colour'"):
        tables.committed_keys(tables_uri, "videos", ["colour"])


def test_any_spelling_of_a_location_names_the_same_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_server: str
) -> None:
    monkeypatch.chdir(tmp_path)
    write_night("tables", "job-1", night(["a"]))
    write_night(f"file://{tmp_path}/tables/", "job-2", night(["a"]), replace=True)
    assert rows_of("./tables", "videos", "video_id", "job_run_id") == [("a", "job-2")]
    with pytest.raises(FileNotFoundError, match="bucket s3://no-such-bucket not found"):
        write_night("s3://no-such-bucket/tables", "job-1", night(["a"]))


# --- fencing ----------------------------------------------------------------------------------------------


def test_a_holder_that_lost_its_lease_commits_nothing(tables_uri: str) -> None:
    stale = writer_holding(tables_uri, "paused", ttl_s=0.5)
    files = {name: stale.write_files(name, rows) for name, rows in night(["a", "b"]).items()}
    time.sleep(0.7)  # paused past its TTL: the next run takes the tables over and tags the same videos
    fresh = writer_holding(tables_uri, "retry")
    assert fresh.epoch == stale.epoch + 1
    fresh.write_chunk(night(["a", "b"]))
    with pytest.raises(LeaseLost, match="taken over by run retry"):
        stale.commit_chunk(files)
    # A holder whose lease check says nothing (it does not know yet) is refused by the tables' fence.
    stale.lease.check = lambda: None  # type: ignore[method-assign]
    with pytest.raises(LeaseLost, match=f"lease epoch {fresh.epoch} has committed"):
        stale.commit_chunk(files)
    for name in tables.TABLES:
        assert tables.read_table(tables_uri, name).num_rows == night(["a", "b"])[name].num_rows, name
    assert {e["run_id"] for e in runs.read_log(tables_uri).to_pylist()} == {"retry"}


def test_a_commit_raced_by_the_new_holders_fence_is_refused_by_delta(tmp_path: Path) -> None:
    uri = str(tmp_path)
    stale = writer_holding(uri, "paused", ttl_s=0.5)
    stale.lease.check = lambda: None  # type: ignore[method-assign]
    before = {name: tables.open_table(uri, name) for name in (tables.RUNS, *tables.TABLES)}
    time.sleep(0.7)
    writer_holding(uri, "retry")  # fences every table after the stale writer read them
    # The stale writer commits against what it read before the fence: Delta sees the same app id committed
    # meanwhile and refuses; checked again, the fence names the newer epoch.
    real, served = stale._latest, set()

    def latest(name: str) -> DeltaTable:
        if name not in served:
            served.add(name)
            return before[name]
        return real(name)

    stale._latest = latest  # type: ignore[method-assign]
    with pytest.raises(LeaseLost, match="has committed since"):
        stale.write_chunk(night(["a"]))
    assert all(tables.read_table(uri, name).num_rows == 0 for name in tables.TABLES)


# --- interrupted chunks --------------------------------------------------------------------------------


STEPS = ["pending", *(f"committed {name}" for name in tables.TABLES), "chunk committed"]


@pytest.mark.parametrize("step", STEPS)
def test_a_chunk_cut_off_at_any_step_is_rolled_forward_exactly_once(
    tmp_path: Path, cut_off_at, step: str
) -> None:
    uri, clean = str(tmp_path / "tables"), str(tmp_path / "clean")
    write_night(clean, "job-1", night(["a", "b"], failed=["x"]))
    write_night(clean, "job-2", night(["c"], failed=["y"]), date=NEXT)

    write_night(uri, "job-1", night(["a", "b"], failed=["x"]))
    cut_off_at(step)
    dying = writer_holding(uri, "job-2", ttl_s=0.5, date=NEXT)
    with pytest.raises(Killed):
        dying.write_chunk(night(["c"], failed=["y"]))
    cut_off_at(None)
    # Readers still see the last complete chunk, whatever the cut-off chunk left in single tables.
    if step != "chunk committed":
        assert rows_of(uri, "videos", "video_id") == [("a",), ("b",), ("x",)]
        assert tables.read_snapshot(uri).run_id == "job-1"

    time.sleep(0.6)  # the dead run's lease expires
    recovering = writer_holding(uri, "job-3")
    rolled = [(c.run_id, c.chunk) for c in recovering.recovered]
    assert rolled == ([] if step == "chunk committed" else [("job-2", 1)])
    recovering.finish()
    recovering.lease.release()
    for name in tables.TABLES:
        columns = [c for c in tables.schema(name).names if c not in ("job_run_id", "first_seen", "last_seen")]
        assert rows_of(uri, name, *columns) == rows_of(clean, name, *columns), name
    committed = [e for e in runs.read_log(uri).to_pylist() if e["status"] == runs.COMMITTED]
    assert sorted((e["run_id"], e["chunk"]) for e in committed) == [("job-1", 1), ("job-2", 1)]
    if rolled:
        assert next(e for e in committed if e["run_id"] == "job-2")["recovered_by"] == "job-3"


# --- time travel -------------------------------------------------------------------------------------


def test_an_earlier_run_reads_back_as_it_was(tables_uri: str) -> None:
    write_night(tables_uri, "job-1", night(["a"]))
    write_night(tables_uri, "job-2", night(["b"]), date=NEXT)
    write_night(tables_uri, "job-3", night(["a"], label="music"), date=NEXT, replace=True)
    for as_of, expected in [("job-1", ["a"]), ("job-2", ["a", "b"]), (NIGHT, ["a"]), (None, ["a", "b"])]:
        snap = tables.read_snapshot(tables_uri, as_of=as_of)
        seen = tables.read_table(tables_uri, "videos", ["video_id"], snapshot=snap).column("video_id")
        assert sorted(seen.to_pylist()) == expected, as_of
    labels = tables.read_table(
        tables_uri, "classifications", snapshot=tables.read_snapshot(tables_uri, "job-2")
    )
    assert "music" not in labels.column("label").to_pylist()
    with pytest.raises(TableError, match="no complete run matches as-of no-such-run"):
        tables.read_snapshot(tables_uri, as_of="no-such-run")
