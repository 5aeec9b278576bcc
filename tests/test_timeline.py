"""Videos whose headers lie (`jobs.suspect_videos`): clips are planned over the stream's real timeline, and
checked frame for frame, and second for second, against a full PyAV decode."""

from __future__ import annotations

import re
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Reference:
    """A plain PyAV decode of a whole file. Times are seconds from the stream's earliest timestamp: that
    origin, not FFmpeg's `start_time` (the first packet's time, later when a cut stream starts on a reordered
    frame), is the one clip times count from."""

    times: np.ndarray  # of every frame that decoded whole (no concealed damage)
    images: np.ndarray
    packet_times: np.ndarray  # of every video packet, in presentation order, decodable or not

    def planned(self) -> np.ndarray:
        """The times clips are planned over: every packet from the first frame that decodes."""
        return self.packet_times[self.packet_times >= self.times[0] - 1e-6]


def pyav_reference(path: Path) -> Reference:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        pts = np.sort([p.pts for p in container.demux(stream) if p.pts is not None and p.size])
        packet_times = (pts - pts[0]).astype(np.float64) * float(stream.time_base)
    times, images = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            if frame.is_corrupt:
                continue
            times.append(float((frame.pts - pts[0]) * stream.time_base))
            small = frame.reformat(width=SIZE[1], height=SIZE[0], format="rgb24", interpolation="BICUBIC")
            images.append(small.to_ndarray())
    return Reference(np.array(times), np.stack(images).astype(np.int16), packet_times)


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


def grid_start(clip: _Clip, config: ClipConfig, n_grid: int) -> int:
    """The grid frame a sliding window starts at: every clip_len frames, the last one aligned to the end."""
    return min(clip.clip_index * config.clip_len, max(0, n_grid - config.clip_len))


@pytest.mark.parametrize("decoder", ["auto", "decord"])
@pytest.mark.parametrize("name", sorted(SUSPECT_VIDEOS))
def test_clips_are_pyavs_frames_at_their_real_times(
    suspect: dict[str, Path], name: str, decoder: str
) -> None:
    ref = pyav_reference(suspect[name])
    times = ref.times
    for config in (UNIFORM, SLIDING):
        config = ClipConfig(**{**config.__dict__, "decoder": decoder})
        clips = clips_of(suspect[name], config)
        assert len(clips) >= (4 if config is UNIFORM else 1), (name, config.sampling)
        for clip in clips:
            at = reference_positions(clip, ref.images)
            assert clip.start_s == pytest.approx(times[at[0]], abs=1e-3), (name, clip.clip_index)
            assert clip.end_s == pytest.approx(times[at[-1]], abs=1e-3), (name, clip.clip_index)
            if config.target_fps is None:  # consecutive frames, whatever their spacing
                assert at == list(range(at[0], at[0] + config.clip_len)), (name, clip.clip_index)
        if config.target_fps is not None:  # a frame every 1/10 s of real time, nearest to its grid time
            planned = ref.planned()
            n_grid = int((planned[-1] - planned[0]) * config.target_fps + 1e-9) + 1
            for clip in clips:
                start = grid_start(clip, config, n_grid)
                grid = np.minimum(start + np.arange(config.clip_len), n_grid - 1)
                wanted = planned[0] + grid / config.target_fps
                nearest = np.abs(planned[None, :] - wanted[:, None]).min(axis=1)
                for k, position in enumerate(reference_positions(clip, ref.images)):
                    # A planned frame that did not decode is filled by the clip's frame before it.
                    lost = not np.isin(planned[np.abs(planned - wanted[k]) <= nearest[k] + 1e-6], times).all()
                    if lost and k and np.array_equal(clip.frames[k], clip.frames[k - 1]):
                        continue
                    assert abs(times[position] - wanted[k]) == pytest.approx(nearest[k], abs=1e-3), (
                        name,
                        clip.clip_index,
                        k,
                    )


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
    times = pyav_reference(suspect[name]).times
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
