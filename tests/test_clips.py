"""The clip dataflow on real Ray: real videos in, clip rows and error rows out."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import av
import cloudpickle
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle

from flows import storage
from flows.clips import (
    ClipConfig,
    VideoRow,
    _Clip,
    clip_dataset,
    corpus_clips,
    decode_video,
    iter_video_clips,
    list_video_rows,
    video_dataset,
)
from flows.side_outputs import PARTIAL_SCHEMA, read_errors
from flows.tensor_parquet import binary_to_tensors
from flows.video_rows import block_sizes
from jobs import make_corpus

# The fault-injecting decoder below runs on Ray workers (pickled by Ray's vendored cloudpickle) and in the
# isolated decoder process (pickled by cloudpickle), where this test module cannot be imported.
for _pickler in (cloudpickle, ray.cloudpickle):
    _pickler.register_pickle_by_value(sys.modules[__name__])

SMALL = ClipConfig(clip_len=4, size=(32, 32), clips_per_video=2)
BROKEN_IN_SHARED = {"moviepy/result.webm", "file-type/fixture-corrupt.mkv"}
# Clips from what is there, and why it is partial: the first 100,000 bytes of a 35 s recording, and a
# 3-frame phone clip shorter than one 4-frame clip.
PARTIAL_IN_SHARED = {
    "mediabunny/annex-b.mp4": (
        "truncated: the header says 35.2 s, the stream holds 0.5 s; 1 of 6 planned frames did not decode"
    ),
    "decord/video_90.mov": "shorter than a clip: 3 of 4 frames, the last one repeated",
}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated corpus: 6 labelled videos and 3 broken files of different kinds."""
    out = tmp_path_factory.mktemp("corpus")
    make_corpus.main(
        make_corpus.CorpusConfig(out=str(out), videos=6, seed=3, broken=3, size=64, duration_s=3.0)
    )
    return out


def collect(dataset: Any) -> list[dict[str, Any]]:
    rows = [
        row for batch in dataset.iter_batches(batch_size=None, batch_format="pandas") for row in _rows(batch)
    ]
    return sorted(rows, key=lambda r: (r["uri"], r["clip_index"]))


def _rows(frame: Any) -> Iterator[dict[str, Any]]:
    yield from frame.to_dict("records")


def test_shared_videos_give_clips_or_error_rows(
    ray_session: None, shared_videos: Path, tmp_path: Path
) -> None:
    clips, videos = corpus_clips(
        str(shared_videos), SMALL, str(tmp_path / "errors"), str(tmp_path / "partial")
    )
    rows = collect(clips)
    errors = read_errors(str(tmp_path / "errors")).to_pylist()

    failed = {Path(e["uri"]).relative_to(shared_videos).as_posix(): e for e in errors}
    assert set(failed) == BROKEN_IN_SHARED
    partial = read_errors(str(tmp_path / "partial"), PARTIAL_SCHEMA).to_pylist()
    reasons = {Path(p["uri"]).relative_to(shared_videos).as_posix(): p["status_reason"] for p in partial}
    assert reasons == PARTIAL_IN_SHARED
    assert all(e["message"].startswith(e["uri"]) and e["error_type"] for e in errors)
    assert failed["moviepy/result.webm"]["error_type"] == "EmptyFile"

    per_video: dict[str, int] = {}
    for row in rows:
        per_video[row["uri"]] = per_video.get(row["uri"], 0) + 1
        assert np.asarray(row["frames"]).shape == (4, 32, 32, 3)
        assert 0 <= row["start_s"] <= row["end_s"]
    good = {v.uri for v in videos} - {e["uri"] for e in errors}
    assert per_video == dict.fromkeys(good, 2)


def test_local_and_s3_corpora_give_the_same_clips(ray_session: None, corpus: Path, s3_bucket: str) -> None:
    storage.upload_dir(str(corpus), f"{s3_bucket}/corpus")
    results = {}
    for name, uri in (("local", str(corpus)), ("s3", f"{s3_bucket}/corpus")):
        errors_uri = (
            storage.join_uri(str(corpus.parent), f"errors-{name}") if name == "local" else f"{s3_bucket}/e"
        )
        clips, _ = corpus_clips(uri, SMALL, errors_uri)
        rows = collect(clips)
        results[name] = (
            {(Path(r["uri"]).name, r["clip_index"]): np.asarray(r["frames"]) for r in rows},
            sorted(Path(e["uri"]).name for e in read_errors(errors_uri).to_pylist()),
        )
    local_clips, local_errors = results["local"]
    s3_clips, s3_errors = results["s3"]
    assert local_errors == s3_errors and len(local_errors) == 3
    assert local_clips.keys() == s3_clips.keys() and len(local_clips) == 6 * 2
    for key, frames in local_clips.items():
        np.testing.assert_array_equal(frames, s3_clips[key])


def test_broken_files_become_error_rows_and_good_videos_keep_all_clips(
    ray_session: None, corpus: Path, tmp_path: Path
) -> None:
    config = ClipConfig(clip_len=8, size=(48, 48), sampling="sliding", stride=8, audio=True, subtitles=True)
    clips, _ = corpus_clips(str(corpus), config, str(tmp_path / "errors"))
    rows = collect(clips)
    errors = read_errors(str(tmp_path / "errors")).to_pylist()
    labels = pq.read_table(corpus / "labels.parquet").to_pylist()

    assert len(errors) == 3 and len({e["error_type"] for e in errors}) >= 2
    assert {Path(e["uri"]).name for e in errors}.isdisjoint(label["file"] for label in labels)
    by_video: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_video.setdefault(Path(row["uri"]).name, []).append(row)
    assert set(by_video) == {Path(label["file"]).name for label in labels}
    for label in labels:
        video_rows = by_video[Path(label["file"]).name]
        # sliding windows cover the whole video: first frame at 0 s, last window ends on the last frame
        assert video_rows[0]["start_s"] == 0.0
        assert video_rows[-1]["end_s"] == pytest.approx(label["duration_s"] - 1 / label["fps"], abs=1e-3)
        assert all(len(r["audio"]) == round(16000 * 8 / label["fps"]) for r in video_rows)
        assert (
            np.abs(np.concatenate([r["audio"] for r in video_rows])).max() > 0.01
        )  # real sound, not padding
        if label["has_subtitles"]:
            assert any(r["text"] for r in video_rows)
        else:
            assert not any(r["text"] for r in video_rows)


def test_variable_frame_rate_clip_times_match_frame_timestamps(
    ray_session: None, shared_videos: Path
) -> None:
    path = shared_videos / "media" / "sample_android_slow_motion.mp4"
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        pts = [float(f.pts * stream.time_base) for f in container.decode(stream)]
    times = [t - pts[0] for t in pts]
    config = ClipConfig(clip_len=2, size=(32, 32), sampling="sliding", stride=2)
    rows = collect(clip_dataset(video_dataset(list_video_rows(str(path))), config, "/nonexistent-unused"))
    assert len(rows) == 4  # 7 frames → windows at 0, 2, 4 and one aligned to the end
    for row in rows:
        first = times.index(min(times, key=lambda t: abs(t - row["start_s"])))
        assert row["start_s"] == pytest.approx(times[first], abs=1e-6)
        assert row["end_s"] == pytest.approx(times[first + 1], abs=1e-6)
    gaps = np.diff(times)
    assert gaps.max() > 3 * gaps.min()  # the file really is variable frame rate


def faulty_decoder(
    path: str, video_key: str, config: ClipConfig, sidecar: list | None = None
) -> Iterator[Any]:
    """Decodes normally, except that files named *crash* segfault and files named *hang* never return."""
    name = os.path.basename(path)
    if "crash" in name:
        os.kill(os.getpid(), signal.SIGSEGV)
    if "hang" in name:
        time.sleep(3600)
    yield from decode_video(path, video_key, config, sidecar)


def test_decoder_crash_and_hang_become_error_rows(
    ray_session: None, shared_videos: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "videos"
    folder.mkdir()
    source = shared_videos / "mmaction2" / "test.mp4"
    for name in ("a-good.mp4", "b-crash.mp4", "c-hang.mp4", "d-good.mp4"):
        shutil.copy(source, folder / name)
    config = ClipConfig(clip_len=4, size=(32, 32), clips_per_video=2, timeout_s=60, idle_timeout_s=5)
    errors_uri = str(tmp_path / "errors")
    rows = collect(
        clip_dataset(
            video_dataset(list_video_rows(str(folder))), config, errors_uri, decode_fn=faulty_decoder
        )
    )
    errors = {Path(e["uri"]).name: e for e in read_errors(errors_uri).to_pylist()}
    assert errors["b-crash.mp4"]["error_type"] == "DecoderCrashed"
    assert errors["c-hang.mp4"]["error_type"] == "DecoderTimeout"
    assert sorted({Path(r["uri"]).name for r in rows}) == ["a-good.mp4", "d-good.mp4"]
    assert len(rows) == 4


def test_clips_command_writes_clips_and_errors(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "clips", str(corpus), "--out", str(out), "--clip-len", "4",
         "--size", "32", "--clips-per-video", "3", "--decoder", "pyav"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    clips = pq.read_table(out / "clips")
    assert clips.num_rows == 6 * 3
    assert set(clips.column_names) >= {"video_id", "uri", "clip_index", "start_s", "end_s", "frames"}
    assert pq.read_table(out / "errors").num_rows == 3
    assert "6 videos" not in done.stderr and "9 videos, 18 clips, 3 errors" in done.stderr
    # Frames are stored one binary value per clip and read back as the decoder's clips, shape and all.
    assert clips.schema.field("frames").metadata[b"reelflow.shape"] == b"[4, 32, 32, 3]"
    first = binary_to_tensors(clips).sort_by([("uri", "ascending"), ("clip_index", "ascending")]).slice(0, 3)
    config = ClipConfig(clip_len=4, size=(32, 32), clips_per_video=3, decoder="pyav")
    uri = first.column("uri")[0].as_py()
    expected = [c.frames for c in decode_video(uri, "v", config) if isinstance(c, _Clip)]
    np.testing.assert_array_equal(first.column("frames").chunk(0).to_numpy(), np.stack(expected))


def test_probe_command_reports_every_uri(shared_videos: Path) -> None:
    uris = [
        shared_videos / "mmaction2" / "test.avi",
        shared_videos / "moviepy" / "result.webm",
        "/no/such.mp4",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "probe", *map(str, uris)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["ok"] for r in rows] == [True, False, False]
    good = rows[0]
    assert (good["width"], good["height"], good["fps"], good["has_audio"]) == (320, 240, 25.0, True)
    assert good["video_codec"] == "mpeg4" and good["n_frames"] == 164
    assert set(good) >= {"uri", "ok", "error", "container", "rotation", "duration_s", "audio_sample_rate"}
    assert "empty" in rows[1]["error"].lower() and rows[2]["error"]


def test_clip_rows_can_carry_the_videos_probe_facts(shared_videos: Path) -> None:
    (row,) = list_video_rows(str(shared_videos / "decord" / "video_90.mov"))
    config = ClipConfig(clip_len=2, size=(32, 32), clips_per_video=1, video_info=True)
    (clip,) = iter_video_clips(row, config)
    facts = {k: clip[k] for k in ("width", "height", "rotation", "fps", "n_frames", "codec", "has_audio")}
    expected = {"width": 568, "height": 320, "rotation": -90, "fps": 30.0, "n_frames": 3, "codec": "h264"}
    assert facts == {**expected, "has_audio": False}
    assert clip["frames"].shape == (2, 32, 32, 3)
    assert "duration_s" not in next(
        iter_video_clips(row, ClipConfig(clip_len=2, size=(32, 32), clips_per_video=1))
    )


def test_a_labelled_window_bounds_every_clip_and_the_dataflow_carries_it(
    shared_videos: Path, ray_session, tmp_path: Path
) -> None:
    # A Kinetics-style label holds for 4-6 s of a 10 s video: clips come from there only, and the audio too.
    (row,) = list_video_rows(str(shared_videos / "testdata" / "Big_Buck_Bunny_180_10s.webm"))
    config = ClipConfig(clip_len=8, size=(32, 32), sampling="random", clips_per_video=6, target_fps=10.0)
    whole = list(iter_video_clips(row, config))
    assert min(c["start_s"] for c in whole) < 4.0 or max(c["end_s"] for c in whole) > 6.0
    windowed = replace(row, window_s=(4.0, 6.0))
    clips = list(iter_video_clips(windowed, config))
    assert len(clips) == 6
    assert all(4.0 - 1e-6 <= c["start_s"] <= c["end_s"] <= 6.0 + 1e-6 for c in clips)

    # Through Ray Data, the window travels in the video rows to the decode tasks.
    (other,) = list_video_rows(str(shared_videos / "mmaction2" / "test.mp4"))
    ds = clip_dataset(video_dataset([windowed, other]), config, str(tmp_path / "errors"))
    rows = ds.select_columns(["uri", "start_s", "end_s"]).take_all()
    bunny = [r for r in rows if r["uri"] == windowed.uri]
    assert len(bunny) == 6 and all(4.0 - 1e-6 <= r["start_s"] <= r["end_s"] <= 6.0 + 1e-6 for r in bunny)
    assert len(rows) == 12


@pytest.mark.parametrize(
    ("field", "value"),
    [("clip_len", 0), ("size", (4, 32)), ("sampling", "dense"), ("stride", 17), ("decoder", "ffmpeg"),
     ("decoder_threads", -1), ("audio_rate", 800), ("timeout_s", 0)],
)  # fmt: skip
def test_a_bad_clip_config_names_its_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"^clip config: {field}="):
        ClipConfig(**{field: value})


def test_clip_datasets_pass_on_small_blocks_and_leave_the_context(corpus: Path, ray_session: None) -> None:
    """A decode task's first clips reach the next stage once 8 MiB of them are decoded, not 128 MiB; other
    datasets of the job keep Ray's block size."""
    import ray.data

    from flows.video_rows import CLIP_BLOCK_BYTES

    default = ray.data.DataContext.get_current().target_max_block_size
    clips = clip_dataset(video_dataset(list_video_rows(str(corpus))), ClipConfig(), "/nonexistent-unused")
    assert clips.context.target_max_block_size == CLIP_BLOCK_BYTES < default
    assert ray.data.DataContext.get_current().target_max_block_size == default


@pytest.mark.parametrize(("videos", "slots"), [(64, 4), (3, 4), (10_000, 128), (5, 1), (17, 2)])
def test_decode_tasks_shrink_towards_the_end(videos: int, slots: int) -> None:
    """Blocks take every video once, largest first and at most 16, so the last tasks are short (the cores
    finish together) and every slot has a task of a single video at the end."""
    sizes = block_sizes(videos, slots)
    assert sum(sizes) == videos
    assert sizes == sorted(sizes, reverse=True) and max(sizes) <= 16
    assert sizes[-min(slots, videos) :] == [1] * min(slots, videos) or slots == 1
    assert len(sizes) < videos or videos <= slots


def test_block_sizes_grow_to_stay_under_the_block_limit_and_refuse_bad_counts() -> None:
    sizes = block_sizes(100_000, 4, blocks=1000)
    assert sum(sizes) == 100_000 and len(sizes) <= 1000 and max(sizes) > 16
    assert block_sizes(0, 4) == []
    with pytest.raises(ValueError, match="slots=0"):
        block_sizes(10, 0)


def test_video_dataset_keeps_the_rows_in_order_in_shrinking_blocks(ray_session: None) -> None:
    videos = [VideoRow(f"id{i:02d}", f"s3://b/{i}.mp4", 100 + i, "" if i % 2 else f"e{i}") for i in range(20)]
    windowed = [*videos[:19], replace(videos[19], window_s=(1.0, 2.5))]
    dataset = video_dataset(videos)
    blocks = [bundle.num_rows() for bundle in dataset.iter_internal_ref_bundles()]
    assert blocks == block_sizes(20, 2 * 2)  # two decode tasks per CPU of the 2-CPU test cluster at a time
    assert [r["video_id"] for r in dataset.take_all()] == [v.video_id for v in videos]
    rows = video_dataset(windowed).take_all()
    assert rows[19]["window_start_s"] == 1.0 and rows[19]["window_end_s"] == 2.5
    assert np.isnan(rows[0]["window_start_s"]) and rows[0]["etag"] == "e0" and rows[1]["etag"] == ""


def test_jobs_have_ray_data_take_task_outputs_in_its_loop_unless_the_user_chose(
    ray_session: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With outputs taken on Ray Data's background thread, each decode task's core idled 0.15-0.25 s before
    the next task; a user's own RAY_DATA_METADATA_PREFETCH_ON_THREAD still wins."""
    from ray.data._internal.execution import metadata_fetcher

    from jobs import runtime

    monkeypatch.setattr(metadata_fetcher, "_PREFETCH_ON_THREAD", True)
    monkeypatch.setenv(runtime._METADATA_FETCH_ENV, "1")  # restored after the test, whatever it was
    monkeypatch.delenv(runtime._METADATA_FETCH_ENV)
    runtime.init_ray()
    assert isinstance(metadata_fetcher.make_metadata_fetcher(), metadata_fetcher.InlineMetadataFetcher)

    monkeypatch.setenv(runtime._METADATA_FETCH_ENV, "1")
    runtime.init_ray()
    assert isinstance(metadata_fetcher.make_metadata_fetcher(), metadata_fetcher.ThreadedMetadataFetcher)
