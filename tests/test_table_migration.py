"""`reelflow tables migrate`: tables of the previous format (plain Parquet + commit manifests) become Delta
Lake tables in place, with every committed row; until then every reader and writer says how to migrate."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from flows import delta, runs, storage, table_writer, tables
from jobs import cli, query

D1, D2, D3 = dt.date(2024, 5, 1), dt.date(2024, 5, 2), dt.date(2024, 5, 3)
LEGACY_ERRORS = pa.schema(
    [pa.field(n, pa.string(), nullable=n in ("model_name", "model_version")) for n in
     ("video_id", "uri", "stage", "error_type", "message", "model_name", "model_version", "job_run_id")]
)  # fmt: skip

# The previous format's videos files had no status_reason.
LEGACY_VIDEOS = tables.file_schema("videos").remove(
    tables.file_schema("videos").get_field_index("status_reason")
)


def legacy_rows(job: str, videos: list[str], failed: list[str]) -> dict[str, pa.Table]:
    """One run's files as the previous format wrote them (`run_date` in the path, not in the file)."""
    n, seen = len(videos), videos + failed
    uris = [f"s3://c/{v}.mp4" for v in seen]
    classifications = {
        "video_id": videos, "uri": uris[:n], "model_name": ["m"] * n, "model_version": ["1"] * n,
        "mlflow_run_id": ["r"] * n, "job_run_id": [job] * n, "head": ["category"] * n,
        "label": ["cooking"] * n, "score": [0.9] * n, "rank": [1] * n,
    }  # fmt: skip
    video_rows = {
        "video_id": seen, "uri": uris, "size_bytes": [1] * len(seen), "etag": ["e"] * len(seen),
        "duration_s": [6.0] * len(seen), "fps": [15.0] * len(seen), "n_frames": [90] * len(seen),
        "width": [64] * len(seen), "height": [64] * len(seen), "codec": ["h264"] * len(seen),
        "has_audio": [True] * len(seen), "status": ["ok"] * n + ["failed"] * len(failed),
        "job_run_id": [job] * len(seen),
    }  # fmt: skip
    errors = [
        {"video_id": v, "uri": f"s3://c/{v}.mp4", "stage": "probe", "error_type": "InvalidData",
         "message": "bad", "model_name": "m", "model_version": "1", "job_run_id": job}
        for v in failed
    ]  # fmt: skip
    return {
        "videos": pa.Table.from_pydict(video_rows, schema=LEGACY_VIDEOS),
        "classifications": pa.Table.from_pydict(
            classifications, schema=tables.file_schema("classifications")
        ),
        "errors": pa.Table.from_pylist(errors, schema=LEGACY_ERRORS),
    }


def legacy_run(root: str, job: str, night: dt.date, videos: list[str], failed: list[str] = (), *,
               published: bool = True, manifest: bool = True) -> None:  # fmt: skip
    """A run of the previous format: files in place (or still in `_staging` when not yet published), and
    its commit manifest (none for a run that died before committing)."""
    add: dict[str, list[str]] = {}
    for name, table in legacy_rows(job, videos, list(failed)).items():
        if not table.num_rows:
            continue
        relpath = f"{name}/run_date={night.isoformat()}/part-{job}-0.parquet"
        where = relpath if published else f"_staging/{job}/{relpath}"
        fs, path = storage.arrow_filesystem(storage.join_uri(root, where))
        storage.makedirs(storage.join_uri(root, where).rsplit("/", 1)[0])
        pq.write_table(table, path, filesystem=fs)
        add[name] = [relpath]
    if manifest:
        body = {
            "format": 1, "job_run_id": job, "run_date": night.isoformat(), "metadata": {"models": ["m/1"]},
            "committed_at": f"{night.isoformat()}T03:00:00+00:00", "rows": {}, "replaced": {}, "add": add,
            "remove": {},
        }  # fmt: skip
        storage.write_bytes(storage.join_uri(root, f"_commits/{job}.json"), json.dumps(body).encode())
        if published:
            storage.write_bytes(storage.join_uri(root, f"_commits/{job}.published"), b"")


@pytest.fixture(params=["local", "s3"])
def legacy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Three committed nights (the last one cut off while publishing) and the files of a run that died."""
    root = (
        str(tmp_path / "tables") if request.param == "local" else request.getfixturevalue("s3_bucket") + "/t"
    )
    legacy_run(root, "n1", D1, ["a", "b"], ["x"])
    legacy_run(root, "n2", D2, ["c"])
    legacy_run(root, "n3", D3, ["d"], published=False)
    legacy_run(root, "dead", D3, ["e"], manifest=False)
    yield root


def test_previous_format_gets_one_line_naming_the_migration(legacy: str) -> None:
    expected = f"convert them in place with `reelflow tables migrate {legacy}`"
    with pytest.raises(tables.LegacyTablesError, match=expected) as err:
        query.run_sql(legacy, "SELECT count(*) FROM videos")
    assert "\n" not in str(err.value)
    with pytest.raises(tables.LegacyTablesError, match=expected), table_writer.writing(legacy, "tag-1", D3):
        pass


def test_migrate_converts_in_place_and_keeps_every_committed_row(
    legacy: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["tables", "migrate", legacy]) == 0
    assert "migrated 3 runs" in capsys.readouterr().out
    for name in ("_commits", "_staging"):
        assert not storage.exists(storage.join_uri(legacy, name))
    options = delta.storage_options(legacy)
    videos = DeltaTable(f"{legacy}/videos", storage_options=options).to_pyarrow_table()
    pairs = zip(videos.column("video_id").to_pylist(), videos.column("job_run_id").to_pylist(), strict=True)
    assert sorted(pairs) == [
        ("a", "n1"), ("b", "n1"), ("c", "n2"), ("d", "n3"), ("x", "n1")
    ]  # fmt: skip
    got = query.run_sql(legacy, "SELECT video_id, run_date FROM classifications ORDER BY 1").to_pylist()
    assert got == [{"video_id": v, "run_date": d} for v, d in [("a", D1), ("b", D1), ("c", D2), ("d", D3)]]
    errors = query.run_sql(legacy, "SELECT video_id, error_type, attempts FROM errors").to_pylist()
    assert errors == [{"video_id": "x", "error_type": "InvalidData", "attempts": None}]
    # Each previous run is in the run log, in commit order: time travel works across the migration.
    assert tables.read_snapshot(legacy).run_id == "n3"
    early = tables.read_table(legacy, "videos", ["video_id"], tables.read_snapshot(legacy, "n1"))
    assert sorted(early.column("video_id").to_pylist()) == ["a", "b", "x"]
    committed = [e["run_id"] for e in runs.read_log(legacy).to_pylist() if e["status"] == runs.COMMITTED]
    assert sorted(committed) == ["n1", "n2", "n3"]
    # The next night writes to the converted tables; a second migration has nothing to do.
    with table_writer.writing(legacy, "tag-4", dt.date(2024, 5, 4)) as writer:
        writer.write_chunk({"videos": legacy_rows("tag-4", ["f"], [])["videos"].drop_columns(["job_run_id"])})
    assert query.run_sql(legacy, "SELECT count(*) AS n FROM videos").to_pylist() == [{"n": 6}]
    assert cli.main(["tables", "migrate", legacy]) == 0
    assert "nothing to migrate" in capsys.readouterr().out
