"""`reelflow tag` end to end: a real S3 server, a real local Ray, a model registered in MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import ODD_KEYS, copy_corpus
from deltalake import DeltaTable

from flows import delta, storage, tables
from flows import labels as flabels
from flows.clips import list_video_rows
from flows.predict import PredictConfig
from jobs import cli, query, tag

DATE = "2024-05-01"
PREDICTION_COLUMNS = (
    "video_id",
    "uri",
    "model_name",
    "model_version",
    "mlflow_run_id",
    "job_run_id",
    "run_date",
)


def _config(corpus: str, tables_uri: str, model: tuple[str, str], **kwargs) -> tag.TagConfig:
    return tag.TagConfig(corpus=corpus, models=(model[0],), tables=tables_uri, date=kwargs.pop("date", DATE),
                         tracking_uri=model[1], **kwargs)  # fmt: skip


def _rows(tables_uri: str, name: str) -> list[dict]:
    """A table's committed rows without the run columns, floats rounded, sorted: comparable across runs."""
    table = tables.read_table(tables_uri, name)
    drop = [c for c in ("job_run_id", "first_seen", "last_seen") if c in table.column_names]
    out = []
    for row in table.drop_columns(drop).to_pylist():
        out.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    return sorted(out, key=lambda r: json.dumps(r, sort_keys=True, default=str))


def _sorted_rows(table: pa.Table) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda r: json.dumps(r, sort_keys=True, default=str))


@pytest.fixture(scope="module")
def s3_run(ray_session, s3_server, small_corpus, tagging_model, tmp_path_factory):
    """8 labelled videos + the 2 broken files uploaded to a fresh bucket, tagged once."""
    import s3fs

    local = copy_corpus(small_corpus, tmp_path_factory.mktemp("s3-corpus") / "c", 8)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    if fs.exists("tag-tests"):
        fs.rm("tag-tests", recursive=True)
    fs.mkdir("tag-tests")
    corpus, tables_uri = "s3://tag-tests/corpus", "s3://tag-tests/tables"
    storage.upload_dir(str(local), corpus)
    summary = tag.main(_config(corpus, tables_uri, tagging_model))
    return {
        "corpus": corpus,
        "tables": tables_uri,
        "local": local,
        "summary": summary,
        "model": tagging_model,
    }


def test_tag_on_s3_writes_every_table_against_labels_and_errors(s3_run):
    corpus, tables_uri, summary = s3_run["corpus"], s3_run["tables"], s3_run["summary"]
    manifest = flabels.read_manifest(storage.join_uri(corpus, flabels.LABELS_FILE))
    listed = list_video_rows(corpus)
    readable = {r.video_id: r for r in listed if flabels.relative_file(r.uri, corpus) in manifest.videos}
    broken = {r.video_id: r for r in listed if r.video_id not in readable}
    assert len(readable) == 8 and len(broken) == 2
    assert (summary.tagged, summary.failed, summary.skipped) == (8, 2, 0)
    assert summary.clips > 0

    videos = tables.read_table(tables_uri, "videos").to_pylist()
    assert {v["video_id"] for v in videos} == set(readable) | set(broken)
    for v in videos:
        if v["video_id"] in readable:
            assert v["status"] == "ok" and v["n_frames"] > 0 and v["width"] == 64 and v["duration_s"] > 5
        else:
            assert v["status"] == "failed"

    errors = tables.read_table(tables_uri, "errors").to_pylist()
    assert {e["video_id"] for e in errors} == set(broken)
    for e in errors:
        assert broken[e["video_id"]].uri.rsplit("/", 1)[-1] in e["message"]
        assert e["stage"] and e["error_type"]

    model_name, model_version = "tagger", "1"
    categories = set(manifest.labels.categories)
    for name in tables.PREDICTION_TABLES:
        table = tables.read_table(tables_uri, name)
        assert table.num_rows > 0, name
        for row in table.to_pylist():
            assert all(row[c] is not None for c in PREDICTION_COLUMNS), (name, row)
            assert (row["model_name"], row["model_version"]) == (model_name, model_version)
            assert row["job_run_id"] == summary.job_run_id and str(row["run_date"]) == DATE
            assert row["video_id"] in readable and row["uri"] == readable[row["video_id"]].uri
    classes = [
        r for r in tables.read_table(tables_uri, "classifications").to_pylist() if r["head"] == "category"
    ]
    for vid in readable:
        mine = sorted((r["rank"], r["label"], r["score"]) for r in classes if r["video_id"] == vid)
        assert [r[0] for r in mine] == list(range(1, min(5, len(categories)) + 1))
        assert {r[1] for r in mine} <= categories
        assert [r[2] for r in mine] == sorted((r[2] for r in mine), reverse=True)
    # The model was fitted on these videos: its top-1 label agrees with the ground truth on most of them.
    top1 = {r["video_id"]: r["label"] for r in classes if r["rank"] == 1}
    truth = {
        vid: manifest.videos[flabels.relative_file(r.uri, corpus)].category for vid, r in readable.items()
    }
    assert sum(top1[v] == truth[v] for v in readable) >= 5

    sentiment = tables.read_table(tables_uri, "sentiment").to_pylist()
    video_rows = [r for r in sentiment if r["scope"] == "video"]
    assert sorted(r["video_id"] for r in video_rows) == sorted(readable)
    assert all(r["start_s"] is None and -1 <= r["valence"] <= 1 for r in video_rows)
    segments = [r for r in sentiment if r["scope"] == "segment"]
    assert segments and all(r["end_s"] > r["start_s"] for r in segments)
    assert {r["label"] for r in sentiment} <= set(manifest.labels.sentiments)

    for r in tables.read_table(tables_uri, "actions").to_pylist():
        assert r["label"] in manifest.labels.actions and r["label"] != flabels.BACKGROUND
        assert 0 <= r["start_s"] < r["end_s"] <= 6.1
    highlights = tables.read_table(tables_uri, "highlights").to_pylist()
    for vid in {h["video_id"] for h in highlights}:
        mine = sorted((h for h in highlights if h["video_id"] == vid), key=lambda h: h["rank"])
        assert [h["rank"] for h in mine] == list(range(1, len(mine) + 1))
        assert all(h["start_s"] <= h["keyframe_s"] <= h["end_s"] for h in mine)
        assert sum(h["end_s"] - h["start_s"] for h in mine) <= 0.15 * 6.0 + 1e-6

    # The MLflow run of the job: its figures and the label-distribution plot.
    from mlflow import MlflowClient

    client = MlflowClient(s3_run["model"][1])
    run = client.get_run(summary.mlflow_run_id)
    assert run.data.metrics["videos_tagged"] == 8 and run.data.metrics["videos_failed"] == 2
    assert run.data.metrics["clips"] == summary.clips and run.info.status == "FINISHED"
    assert "label_distribution.png" in [a.path for a in client.list_artifacts(run.info.run_id)]

    # Delta Lake tables partitioned by run_date, which any Delta reader sees as `reelflow query` does.
    for name in tables.TABLES:
        table = DeltaTable(f"{tables_uri}/{name}", storage_options=delta.storage_options(tables_uri))
        assert all(f"/{name}/run_date={DATE}/part-{summary.job_run_id}-" in f for f in table.file_uris())
        assert _sorted_rows(table.to_pyarrow_table()) == _sorted_rows(tables.read_table(tables_uri, name))
    assert (summary.chunks, summary.rolled_forward) == (1, 0)


def test_tag_again_decodes_nothing_and_adds_no_rows(s3_run):
    before = {name: _rows(s3_run["tables"], name) for name in tables.TABLES}
    summary = tag.main(_config(s3_run["corpus"], s3_run["tables"], s3_run["model"]))
    assert summary.decoded == 0 and summary.skipped == 10 and summary.clips == 0
    assert {name: _rows(s3_run["tables"], name) for name in tables.TABLES} == before


def test_added_videos_are_the_only_ones_decoded(s3_run, small_corpus):
    manifest = flabels.read_manifest(str(small_corpus / flabels.LABELS_FILE))
    new_files = sorted(manifest.videos)[8:10]
    for file in new_files:
        storage.put_file(str(small_corpus / file), storage.join_uri(s3_run["corpus"], file))
    listed = {
        flabels.relative_file(r.uri, s3_run["corpus"]): r.video_id for r in list_video_rows(s3_run["corpus"])
    }
    before = tables.read_table(s3_run["tables"], "classifications").num_rows

    summary = tag.main(_config(s3_run["corpus"], s3_run["tables"], s3_run["model"]))
    videos = tables.read_table(s3_run["tables"], "videos")
    this_run = videos.filter(pc.field("job_run_id") == summary.job_run_id)
    assert summary.decoded == 2
    assert sorted(this_run.column("video_id").to_pylist()) == sorted(listed[f] for f in new_files)
    assert (summary.tagged, summary.failed) == (2, 0)
    videos = tables.read_table(s3_run["tables"], "videos")
    assert videos.num_rows == len(set(videos.column("video_id").to_pylist())) == 12
    classes = tables.read_table(s3_run["tables"], "classifications")
    assert classes.num_rows == before + 2 * (before // 8)
    keys = classes.select(["video_id", "head", "rank"]).to_pylist()
    assert len({tuple(k.values()) for k in keys}) == len(keys)


def test_query_cli_reads_the_tag_output(s3_run):
    sql = "SELECT video_id, label, score FROM classifications WHERE rank = 1 AND head = 'category'"
    out = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "query", sql, "--tables", s3_run["tables"], "--format", "json"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    rows = json.loads(out.stdout)
    expected = [
        r for r in tables.read_table(s3_run["tables"], "classifications").to_pylist()
        if r["rank"] == 1 and r["head"] == "category"
    ]  # fmt: skip
    assert sorted(r["video_id"] for r in rows) == sorted(r["video_id"] for r in expected)
    assert rows and {r["label"] for r in rows} <= {r["label"] for r in expected}


# --- crash, re-run, and readers ----------------------------------------------------------------------


def test_killed_run_then_rerun_equals_a_clean_run(
    ray_session, local_corpus, tagging_model, tmp_path, monkeypatch
):
    clean, crashed = str(tmp_path / "clean"), str(tmp_path / "crashed")
    tag.main(_config(str(local_corpus), clean, tagging_model))

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "jobs.cli", "tag", "--corpus", str(local_corpus), "--model",
           tagging_model[0], "--tables", crashed, "--date", DATE, "--tracking-uri", tagging_model[1],
           "--batch-size", "4"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "chunk 1: tagging" in line:  # inference starts: kill the driver and its local Ray
                break
    finally:
        killed = proc.poll() is None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert killed, "".join(seen)[-2000:]
    assert tables.read_snapshot(crashed).run_id is None  # nothing of the killed night is visible

    # The rerun's chunk goes to two writers (hash partitions of whole videos), the clean run's to one, and
    # its clips to an inference actor pool rather than the decode tasks that predict on CPU by default.
    monkeypatch.setattr("jobs.tag.chunk.VIDEOS_PER_WRITER", 4)
    tag.main(_config(str(local_corpus), crashed, tagging_model, predict=PredictConfig(in_decode_tasks=False)))
    for name in tables.TABLES:
        assert _rows(crashed, name) == _rows(clean, name), name
    scratch = storage.join_uri(crashed, tag.SCRATCH)
    left = storage.list_files(scratch)
    assert left and all("/_scratch/plans/" in f for f in left)  # the killed run's chunk files are gone,
    tag.clean_scratch(scratch, stale_s=0)  # its plan (written before the lease) goes once it is stale
    assert storage.list_files(scratch) == []


def test_reader_sees_the_old_night_or_the_new_one(ray_session, local_corpus, tagging_model, tmp_path):
    tables_uri = str(tmp_path / "tables")
    tag.main(_config(str(local_corpus), tables_uri, tagging_model))
    sql = """SELECT (SELECT min(run_date)::VARCHAR || '/' || max(run_date) || '/' || count(*)
                     FROM classifications)
                    || ' ' || (SELECT min(run_date)::VARCHAR || '/' || count(*) FROM videos) AS state"""
    old = query.run_sql(tables_uri, sql).column("state")[0].as_py()

    seen: set[str] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.add(query.run_sql(tables_uri, sql).column("state")[0].as_py())
            time.sleep(0.02)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        tag.main(_config(str(local_corpus), tables_uri, tagging_model, date="2024-05-02", full=True))
    finally:
        done.set()
        reader.join()
    # The full re-run replaces every row (exactly once per video and model version, across nights).
    new = query.run_sql(tables_uri, sql).column("state")[0].as_py()
    assert old.replace(DATE, "2024-05-02") == new != old
    assert seen <= {old, new} and old in seen


def test_bad_model_uri_and_date_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="models:/NAME/VERSION"):
        tag.TagConfig(corpus=str(tmp_path), models=("tagger",), tables=str(tmp_path), date=DATE)
    with pytest.raises(tables.TableError, match="YYYY-MM-DD"):
        tag.TagConfig(corpus=str(tmp_path), models=("models:/x/1",), tables=str(tmp_path), date="01/05/2024")


def test_aggregate_merges_windows_and_ranks(tmp_path):
    import numpy as np

    from flows.aggregate import AggregateConfig, VideoClips, summarize, table_rows

    heads = {"category": ("a", "b", "c"), "action": ("run", "jump", "none"), "importance": ()}
    probs = {"run": [0.9, 0.05, 0.05], "none": [0.05, 0.05, 0.9]}
    per_clip = ["run", "run", "none", "none"]
    clips = VideoClips(
        start_s=np.array([0.0, 1.0, 2.0, 3.0]),
        end_s=np.array([0.9, 1.9, 2.9, 3.9]),
        outputs={
            "category": np.array([[0.2, 0.7, 0.1]] * 4),
            "action": np.array([probs[p] for p in per_clip]),
            "importance": np.array([0.1, 0.9, 0.2, 0.1]),
        },
        duration_s=4.0,
    )
    summary = summarize(clips, heads, AggregateConfig(smooth_frames=1))
    rows = table_rows(summary, heads, top_k=2)
    assert [(r["label"], r["rank"]) for r in rows["classifications"]] == [("b", 1), ("a", 2)]
    assert [(r["label"], r["start_s"]) for r in rows["actions"]] == [("run", 0.0)]
    assert 1.8 <= rows["actions"][0]["end_s"] <= 2.0
    (best, *_) = rows["highlights"]
    assert (
        best["rank"] == 1
        and best["start_s"] <= best["keyframe_s"] <= best["end_s"]
        and best["start_s"] >= 0.9
    )
    assert pa.Table.from_pylist(rows["highlights"]).num_rows == len(summary.highlights)


def test_models_reading_different_clips_are_refused():
    from models import build

    a = build("cnn_lstm", heads={"action": ["x", "none"]}, clip_len=16, frame_size=[64, 64])
    b = build("cnn_lstm", heads={"action": ["x", "none"]}, clip_len=8, frame_size=[64, 64])
    with pytest.raises(ValueError, match="read different clips \\(clip_len\\)"):
        tag.tagging_clip_config([a.spec, b.spec], None)
    config = tag.tagging_clip_config([a.spec, a.spec], None)
    assert (config.sampling, config.stride, config.clip_len, config.size) == ("sliding", 16, 16, (64, 64))


def test_a_polling_reader_sees_whole_chunks_only(ray_session, local_corpus, tagging_model, tmp_path):
    tables_uri = str(tmp_path / "tables")
    sql = """SELECT (SELECT count(*) FROM videos) AS videos,
                    (SELECT count(DISTINCT video_id) FROM classifications) AS classified,
                    (SELECT count(DISTINCT video_id) FROM sentiment WHERE scope = 'video') AS scored,
                    (SELECT count(DISTINCT video_id) FROM errors) AS failed"""
    seen: set[tuple[int, ...]] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            if storage.exists(tables_uri):  # the run creates the folder
                seen.add(tuple(query.run_sql(tables_uri, sql).to_pylist()[0].values()))
            time.sleep(0.02)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        summary = tag.main(_config(str(local_corpus), tables_uri, tagging_model, commit_every=3))
    finally:
        done.set()
        reader.join()
    assert summary.chunks == 3 and summary.tagged + summary.failed == 8
    final = tuple(query.run_sql(tables_uri, sql).to_pylist()[0].values())
    assert final == (8, 6, 6, 2)
    # Every state a reader saw is a whole number of chunks: the tables agree with each other.
    for videos, classified, scored, failed in seen:
        assert videos == classified + failed and classified == scored, seen
    assert {videos for videos, *_ in seen} <= {0, 3, 6, 8}
    assert {3, 6} & {videos for videos, *_ in seen}, seen  # it did look while the night was running


def test_odd_keys_are_tagged_or_error_rows_and_the_night_completes(
    ray_session, s3_server, small_corpus, tagging_model, tmp_path
):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="odd-keys")
    manifest = flabels.read_manifest(str(small_corpus / flabels.LABELS_FILE))
    video = (small_corpus / sorted(manifest.videos)[0]).read_bytes()
    for key in ODD_KEYS:
        s3.put_object(Bucket="odd-keys", Key=key, Body=video)
    s3.put_object(Bucket="odd-keys", Key="odd/broken .mp4", Body=b"not a video")
    tables_uri = str(tmp_path / "tables")

    summary = tag.main(_config("s3://odd-keys", tables_uri, tagging_model))
    assert (summary.listed, summary.tagged, summary.failed) == (len(ODD_KEYS) + 1, len(ODD_KEYS), 1)
    tagged = query.run_sql(tables_uri, "SELECT DISTINCT uri FROM classifications").column("uri").to_pylist()
    assert sorted(tagged) == sorted(f"s3://odd-keys/{key}" for key in ODD_KEYS)  # each from its own object
    failed = query.run_sql(tables_uri, "SELECT uri FROM errors").column("uri").to_pylist()
    assert failed == ["s3://odd-keys/odd/broken .mp4"]


def _error_rows(tables_uri: str) -> dict[str, dict]:
    rows = tables.read_table(tables_uri, "errors").to_pylist()
    assert len({(r["video_id"], r["model_name"], r["model_version"]) for r in rows}) == len(rows)
    return {r["uri"].rsplit("/", 1)[-1]: r for r in rows}


def test_transient_errors_are_retried_until_they_pass_and_permanent_ones_are_not(
    ray_session, s3_server, small_corpus, tagging_model
):
    """An object made unreadable (archived: the store answers 403) fails transiently: later nights retry
    it, up to --max-attempts, and once it reads again its error row gives way to its predictions. A corrupt
    file fails permanently: no night decodes it again, unless --retry-errors."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="retries")
    manifest = flabels.read_manifest(str(small_corpus / flabels.LABELS_FILE))
    for name in sorted(manifest.videos)[:2]:
        s3.upload_file(str(small_corpus / name), "retries", f"c/{Path(name).name}")
    flaky = Path(sorted(manifest.videos)[0]).name
    s3.put_object(Bucket="retries", Key="c/corrupt.mp4", Body=b"\x00\x00\x00\x18ftypmp42" + b"\x17" * 4096)
    s3.copy_object(Bucket="retries", Key=f"c/{flaky}", CopySource={"Bucket": "retries", "Key": f"c/{flaky}"},
                   StorageClass="GLACIER")  # fmt: skip
    corpus, tables_uri = "s3://retries/c", "s3://retries/tables"
    night = iter(f"2024-06-0{day}" for day in range(1, 10))

    def tag_night(**kwargs) -> tag.TagSummary:
        return tag.main(_config(corpus, tables_uri, tagging_model, date=next(night), **kwargs))

    first = tag_night()
    assert (first.tagged, first.failed) == (1, 2)
    errors = _error_rows(tables_uri)
    assert set(errors) == {flaky, "corrupt.mp4"}
    assert (errors[flaky]["stage"], errors[flaky]["transient"], errors[flaky]["attempts"]) == (
        "read",
        True,
        1,
    )
    message = f"{corpus}/{flaky}: the object is archived (a Glacier storage class); restore it to read it"
    assert errors[flaky]["message"] == message + " (InvalidObjectState)"
    assert (errors["corrupt.mp4"]["transient"], errors["corrupt.mp4"]["attempts"]) == (False, 1)

    second = tag_night(max_attempts=2)  # still unreadable: retried once more, the corrupt file is not
    flaky_id = errors[flaky]["video_id"]
    assert (second.decoded, second.retried, second.failed) == (1, 1, 1)
    again = _error_rows(tables_uri)
    assert again[flaky]["attempts"] == 2
    assert again[flaky]["first_seen"] == errors[flaky]["first_seen"] < again[flaky]["last_seen"]
    assert again["corrupt.mp4"] == errors["corrupt.mp4"]

    assert tag_night(max_attempts=2).decoded == 0  # two failed attempts: no more under --max-attempts 2

    s3.restore_object(Bucket="retries", Key=f"c/{flaky}", RestoreRequest={"Days": 1})
    fourth = tag_night()  # the default of 3 attempts allows one more, and now the object reads
    assert (fourth.decoded, fourth.tagged, fourth.failed) == (1, 1, 0)
    assert set(_error_rows(tables_uri)) == {"corrupt.mp4"}
    status = query.run_sql(tables_uri, f"SELECT status FROM videos WHERE video_id = '{flaky_id}'")
    assert status.column("status").to_pylist() == ["ok"]
    tagged = query.run_sql(tables_uri, "SELECT DISTINCT uri FROM classifications").column("uri").to_pylist()
    assert len(tagged) == 2 and f"{corpus}/{flaky}" in tagged

    args = ["tag", "--corpus", corpus, "--tables", tables_uri, "--model", tagging_model[0],
            "--tracking-uri", tagging_model[1], "--date", next(night)]  # fmt: skip
    assert cli.main([*args, "--retry-errors", "--max-attempts", "1"]) == 0  # through the command line
    assert _error_rows(tables_uri)["corrupt.mp4"]["attempts"] == 2
    assert tag_night().decoded == 0


def test_a_partly_decodable_video_is_tagged_partial_with_its_reason_and_no_error_row(
    ray_session, local_corpus, tagging_model, tmp_path
):
    from jobs.suspect_videos import mid_gop_ts, truncated_mkv

    corpus = copy_corpus(local_corpus, tmp_path / "corpus", 2, broken=False)
    truncated_mkv(corpus)
    mid_gop_ts(corpus)
    tables_uri = str(tmp_path / "tables")
    summary = tag.main(_config(str(corpus), tables_uri, tagging_model))
    assert (summary.tagged, summary.failed) == (4, 0)
    videos = query.run_sql(tables_uri, "SELECT uri, status, status_reason, n_frames FROM videos ORDER BY uri")
    by_name = {Path(v["uri"]).name: v for v in videos.to_pylist()}
    assert by_name["truncated.mkv"]["status"] == "partial"
    assert by_name["truncated.mkv"]["status_reason"].startswith("truncated: the header says 1132.0 s")
    assert by_name["truncated.mkv"]["n_frames"] < 120  # the frames there, not the 27,000 the header implies
    assert (
        by_name["mid_gop.ts"]["status"] == "partial"
        and "cut mid-GOP" in by_name["mid_gop.ts"]["status_reason"]
    )
    assert [v["status"] for name, v in by_name.items() if name.endswith(".mp4")] == ["ok", "ok"]
    assert all(v["status_reason"] is None for name, v in by_name.items() if name.endswith(".mp4"))
    assert query.run_sql(tables_uri, "SELECT count(*) AS n FROM errors").column("n")[0].as_py() == 0
    tagged = query.run_sql(tables_uri, "SELECT DISTINCT uri FROM classifications").column("uri").to_pylist()
    assert {Path(u).name for u in tagged} >= {"truncated.mkv", "mid_gop.ts"}
