"""probe() on the real clips of ../shared/videos, against MANIFEST.tsv, and on unreadable input."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from flows.media import VideoError
from flows.probe import probe

BROKEN = {"moviepy/result.webm": "EmptyFile", "file-type/fixture-corrupt.mkv": "InvalidData"}


def readable(manifest: list[dict[str, str]]) -> list[dict[str, str]]:
    return [row for row in manifest if row["decode_status"] != "open_failed"]


def test_every_readable_clip_probes_as_the_manifest_says(
    shared_videos: Path, manifest: list[dict[str, str]]
) -> None:
    rows = readable(manifest)
    assert len(rows) >= 25
    for row in rows:
        info = probe(str(shared_videos / row["file"]))
        where = row["file"]
        assert (info.width, info.height) == (int(row["width"]), int(row["height"])), where
        assert info.rotation == int(row["rotation"]), where
        assert math.isclose(info.fps, float(row["fps"]), rel_tol=1e-3), where
        assert math.isclose(info.duration_s, float(row["duration_s"]), abs_tol=2e-3), where
        assert info.has_audio == (row["has_audio"] == "yes"), where
        assert info.has_audio == (info.audio_sample_rate is not None), where
        header = int(row["nb_frames_header"])
        if header > 0:
            assert info.frames_from_header and info.n_frames == header, where
        else:
            # No count in the header: estimated from the stream's duration, within a frame of the truth.
            assert not info.frames_from_header and abs(info.n_frames - int(row["n_frames"])) <= 1, where


def test_probe_reports_streams_interlacing_and_start_time(shared_videos: Path) -> None:
    mts = probe(str(shared_videos / "file-type/fixture-raw.mts"))
    assert mts.interlaced and mts.container == "mpegts" and mts.video_codec == "h264"
    assert mts.start_s == pytest.approx(1.433, abs=1e-3)
    assert mts.audio_sample_rate == 48_000

    assert probe(str(shared_videos / "torchcodec/nasa_13013.mp4")).n_video_streams == 2
    assert probe(str(shared_videos / "mediabunny/hevc.ts")).start_s == pytest.approx(1.483, abs=1e-3)
    assert probe(str(shared_videos / "media/sample_fragmented.mp4")).start_s == pytest.approx(2002 / 30000)

    plain = probe(str(shared_videos / "mmaction2/test.mp4"))
    assert not plain.interlaced and plain.n_video_streams == 1 and plain.start_s == 0.0
    assert plain.pix_fmt == "yuv420p" and plain.container.startswith("mov,mp4")
    assert probe(str(shared_videos / "media/sample_av1.mp4")).video_codec == "av1"


def assert_one_line_error(path: Path, error_type: str) -> VideoError:
    with pytest.raises(VideoError) as caught:
        probe(str(path))
    err = caught.value
    assert (err.stage, err.error_type) == ("probe", error_type)
    assert str(path) in err.message and "\n" not in err.message
    return err


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_clips_raise_a_reason(shared_videos: Path, name: str) -> None:
    assert_one_line_error(shared_videos / name, BROKEN[name])


def test_missing_file_and_non_video_files(tmp_path: Path) -> None:
    assert_one_line_error(tmp_path / "nope.mp4", "FileNotFound")

    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    assert_one_line_error(text, "InvalidData")

    image = tmp_path / "still.png"
    with av.open(str(image), "w", format="image2") as out:
        stream = out.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = 16, 16, "rgb24"
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    assert_one_line_error(image, "NotAVideo")


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "tone.m4a"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16_000)
        samples = np.sin(np.arange(16_000) / 10).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16_000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    assert_one_line_error(path, "NoVideoStream")


def test_unknown_codec_is_unsupported(shared_videos: Path, tmp_path: Path) -> None:
    # A real AVI whose codec tag no FFmpeg decoder knows (as from an exotic capture card).
    data = bytearray((shared_videos / "mmaction2/test.avi").read_bytes())
    for tag in (b"XVID", b"xvid"):
        start = data.find(tag)
        assert start > 0
        data[start : start + 4] = b"QQQQ"
    path = tmp_path / "unknown_codec.avi"
    path.write_bytes(bytes(data))
    assert_one_line_error(path, "UnsupportedCodec")


def test_probe_accepts_path_objects_and_leaves_the_file_alone(shared_videos: Path, tmp_path: Path) -> None:
    copy = tmp_path / "clip.mov"
    shutil.copy(shared_videos / "decord/video_90.mov", copy)
    before = copy.read_bytes()
    info = probe(copy)  # type: ignore[arg-type]
    assert info.rotation == -90 and (info.width, info.height) == (568, 320)
    assert copy.read_bytes() == before


def test_the_probe_without_ffmpegs_analysis_decoding_finds_the_same_facts(
    shared_videos: Path, manifest: list[dict[str, str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The probe opens files without the frames FFmpeg decodes to analyze them (40 ms at 1080p); what
    it reports must not change for that, on every real clip and every kind of lying header."""
    from flows import probe as probe_module
    from jobs.suspect_videos import write_all

    files = [shared_videos / row["file"] for row in readable(manifest)]
    files += list(write_all(tmp_path, (48, 64)).values())
    fast = {str(f): probe(str(f)) for f in files}
    opened = probe_module.open_input
    monkeypatch.setattr(
        probe_module, "open_input", lambda path, stage, **_: opened(path, stage, decode_to_analyze=True)
    )
    assert {str(f): probe(str(f)) for f in files} == fast
