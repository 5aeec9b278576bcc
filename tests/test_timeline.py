"""Videos whose headers lie (`jobs.suspect_videos`): clips are planned over the stream's real timeline, and
checked frame for frame, and second for second, against a full PyAV decode."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.clips import ClipConfig, VideoResult, VideoRow, _Clip, decode_video, iter_video_clips
from flows.probe import probe
from jobs.suspect_videos import SUSPECT_VIDEOS, write_all

SIZE = (48, 80)
UNIFORM = ClipConfig(clip_len=8, size=SIZE, clips_per_video=4)
SLIDING = ClipConfig(clip_len=8, size=SIZE, sampling="sliding", target_fps=10.0)


@pytest.fixture(scope="module")
def suspect(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_all(tmp_path_factory.mktemp("suspect"))


def pyav_reference(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every frame a plain PyAV decode gives: times in seconds from the stream's start time, and images."""
    times, images = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        origin = float(stream.start_time * stream.time_base)
        for frame in container.decode(stream):
            times.append(float(frame.pts * stream.time_base) - origin)
            small = frame.reformat(width=SIZE[1], height=SIZE[0], format="rgb24", interpolation="BICUBIC")
            images.append(small.to_ndarray())
    return np.array(times), np.stack(images).astype(np.int16)


def clips_of(path: Path, config: ClipConfig) -> list[_Clip]:
    return [item for item in decode_video(str(path), path.name, config) if isinstance(item, _Clip)]


# decord's scaler differs from PyAV's by a few grey levels on these sharp-edged pictures; two different
# frames differ by about 80.
SAME_FRAME = 8.0


def reference_positions(clip: _Clip, images: np.ndarray) -> list[int]:
    """Which reference frame each of the clip's frames is (by content; each frame's picture is unique)."""
    positions = []
    for image in clip.frames.astype(np.int16):
        distances = np.abs(images - image).mean(axis=(1, 2, 3))
        best = int(distances.argmin())
        assert distances[best] < SAME_FRAME, (
            f"frame matches no PyAV frame (closest differs by {distances[best]:.1f})"
        )
        positions.append(best)
    return positions


@pytest.mark.parametrize("decoder", ["auto", "decord"])
@pytest.mark.parametrize("name", sorted(SUSPECT_VIDEOS))
def test_clips_are_pyavs_frames_at_their_real_times(
    suspect: dict[str, Path], name: str, decoder: str
) -> None:
    times, images = pyav_reference(suspect[name])
    for config in (UNIFORM, SLIDING):
        config = ClipConfig(**{**config.__dict__, "decoder": decoder})
        clips = clips_of(suspect[name], config)
        assert len(clips) >= (4 if config is UNIFORM else 1), (name, config.sampling)
        for clip in clips:
            at = reference_positions(clip, images)
            assert clip.start_s == pytest.approx(times[at[0]], abs=1e-3), (name, clip.clip_index)
            assert clip.end_s == pytest.approx(times[at[-1]], abs=1e-3), (name, clip.clip_index)
            if config.target_fps is None:  # consecutive frames, whatever their spacing
                assert at == list(range(at[0], at[0] + config.clip_len)), (name, clip.clip_index)
        if config.target_fps is not None:  # a frame every 1/10 s of real time, nearest to its grid time
            grid = times[0] + np.arange(len(clips) * config.clip_len) / config.target_fps
            for clip in clips[:-1]:  # windows every clip_len grid frames; the last one is end-aligned
                expected = grid[clip.clip_index * config.clip_len + np.arange(config.clip_len)]
                nearest = np.abs(times[None, :] - expected[:, None]).min(axis=1)
                got = np.array([times[i] for i in reference_positions(clip, images)])
                assert np.allclose(np.abs(got - expected), nearest, atol=1e-3), (name, clip.clip_index)
            assert clips[-1].end_s == pytest.approx(times[-1], abs=1.0 / config.target_fps)


@pytest.mark.parametrize(
    ("name", "doubt"),
    [
        ("truncated_mkv", "bytes cannot hold the 1132.0 s"),
        ("bogus_rate_flv", "implausible frame rate 1000 fps"),
        ("rateless_asf", "no average frame rate"),
        ("mid_gop_ts", "does not start on a keyframe"),
    ],
)
def test_the_probe_says_why_it_doubts_a_header(suspect: dict[str, Path], name: str, doubt: str) -> None:
    assert doubt in probe(str(suspect[name])).header_doubt


def decoded(path: Path, config: ClipConfig = UNIFORM) -> VideoResult:
    result = VideoResult(VideoRow(path.name, str(path), path.stat().st_size, "etag"))
    for _ in iter_video_clips(result.row, config, result):
        pass
    return result


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        # How much of the cut files is left depends on the encoder's bytes: a few frames either way.
        ("truncated_mkv", r"truncated: the header says 1132\.0 s, the stream holds \d\.\d s"),
        ("mid_gop_ts", r"cut mid-GOP: the \d\d frames before its first keyframe cannot decode"),
        ("bogus_rate_flv", None),
        ("rateless_asf", None),
        ("extreme_vfr_mp4", None),
    ],
)
def test_the_video_facts_are_the_streams_and_lost_parts_make_it_partial(
    suspect: dict[str, Path], name: str, reason: str | None
) -> None:
    times, _ = pyav_reference(suspect[name])
    result = decoded(suspect[name])
    assert (result.status_reason is None) if reason is None else re.fullmatch(reason, result.status_reason)
    assert result.info is not None and result.info.header_doubt  # planned over the timeline
    # A truncated file's last packet in presentation order may not decode: within a frame.
    assert abs(result.info.n_frames - len(times)) <= 1
    assert result.info.duration_s == pytest.approx(times[-1] - times[0], abs=0.1 * result.info.duration_s)
    assert result.info.fps == pytest.approx(1 / np.median(np.diff(times)), rel=0.01)


def test_extreme_vfr_is_found_in_the_packets_not_the_header(suspect: dict[str, Path]) -> None:
    assert probe(str(suspect["extreme_vfr_mp4"])).header_doubt == ""
    info = decoded(suspect["extreme_vfr_mp4"]).info
    assert info is not None and "variable frame rate: gaps of 8 to 5000 ms" in info.header_doubt


def test_a_video_shorter_than_a_clip_is_padded_and_partial(suspect: dict[str, Path]) -> None:
    result = decoded(suspect["bogus_rate_flv"], ClipConfig(clip_len=100, size=SIZE, clips_per_video=1))
    assert result.clips == 1
    assert result.status_reason == "shorter than a clip: 80 of 100 frames, the last one repeated"


def test_honest_real_files_are_planned_from_their_header(
    shared_videos: Path, manifest: list[dict[str, str]]
) -> None:
    """The real clips whose headers tell the truth keep today's plans: nothing doubted, nothing partial."""
    honest = [r["file"] for r in manifest if r["decode_status"] == "ok" and r["container"] != "mpegts"]
    doubted = {}
    for file in honest:
        info = probe(str(shared_videos / file))
        if info.header_doubt:
            doubted[file] = info.header_doubt
    assert doubted == {
        "media/dolbyVision-hdr.MOV": "header says 5 frames, duration × fps says 3.2",
        "file-type/fixture.mpg": "mpegvideo has no frame index",
        "mediabunny/annex-b.mp4": "the header's streams need 1312972 bytes, the file has 100000",
    }


def test_clips_command_lists_partial_videos_and_errors_only_videos_without_a_clip(
    ray_session: None, suspect: dict[str, Path], shared_videos: Path, tmp_path: Path
) -> None:
    from jobs.clips import ClipsJobConfig
    from jobs.clips import main as clips_main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in suspect.values():
        (corpus / path.name).write_bytes(path.read_bytes())
    (corpus / "empty.mp4").write_bytes(b"")
    summary = clips_main(ClipsJobConfig(str(corpus), str(tmp_path / "out"), UNIFORM))
    rows: dict[str, Any] = {
        part: pq.read_table(tmp_path / "out" / part).to_pylist() for part in ("clips", "errors", "partial")
    }
    assert {Path(r["uri"]).name for r in rows["clips"]} == {p.name for p in suspect.values()}
    assert [Path(r["uri"]).name for r in rows["errors"]] == ["empty.mp4"]
    partial = {Path(r["uri"]).name: r["status_reason"] for r in rows["partial"]}
    assert sorted(partial) == ["mid_gop.ts", "truncated.mkv"]
    assert partial["truncated.mkv"].startswith("truncated:") and (summary.errors, summary.partial) == (1, 2)


def test_bench_timeline_times_every_kind_of_lying_header_and_an_honest_file(tmp_path: Path) -> None:
    from jobs import bench_timeline

    rows = bench_timeline.main(bench_timeline.BenchTimelineConfig(size=(64, 96), repeats=1, record=False))
    assert [name for name, _, _ in rows] == [*SUSPECT_VIDEOS, "honest_mp4"]
    assert all(ratio > 0 and limit == bench_timeline.LIMIT for _, ratio, limit in rows)
