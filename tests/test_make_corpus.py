"""The synthetic corpus: real decodable files, a labels manifest, determinism, broken files, and labels
that are visible in the pixels and audible in the sound where they say they are."""

from __future__ import annotations

import dataclasses
import io
import itertools
import re
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows import storage
from flows.subtitles import parse_srt
from jobs.make_corpus import (
    ACTIONS,
    BROKEN_KINDS,
    CATEGORIES,
    SENTIMENTS,
    SUBTITLE_OPENERS,
    SUBTITLE_WORDS,
    VALENCE_RANGES,
    CorpusConfig,
    main,
    plan_video,
    render_frames,
)

SEED = 3
N_VIDEOS = 15  # one block: every category × sentiment exactly once
N_BROKEN = len(BROKEN_KINDS)


def corpus_config(out: Path | str, **overrides) -> CorpusConfig:
    return CorpusConfig(out=str(out), **{"videos": N_VIDEOS, "seed": SEED, "progress": False, **overrides})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    labels_uri = main(corpus_config(out, broken=N_BROKEN, workers=2))  # rendered by two processes
    assert labels_uri == str(out / "labels.parquet")
    return out


@pytest.fixture(scope="module")
def labels(corpus: Path) -> list[dict]:
    return pq.read_table(corpus / "labels.parquet").to_pylist()


@pytest.fixture(scope="module")
def decoded(corpus: Path, labels: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """file → (frames uint8 [T,H,W,3], mono audio float32) as PyAV decodes them."""
    out = {}
    for row in labels:
        with av.open(str(corpus / row["file"])) as container:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        with av.open(str(corpus / row["file"])) as container:
            audio = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
        out[row["file"]] = (frames, audio)
    return out


def frame_times(row: dict) -> np.ndarray:
    return np.arange(row["n_frames"]) / row["fps"]


def inside(times: np.ndarray, segments: list[dict]) -> np.ndarray:
    mask = np.zeros(len(times), bool)
    for seg in segments:
        mask |= (times >= seg["start_s"] - 1e-6) & (times <= seg["end_s"] + 1e-6)
    return mask


def widened(segments: list[dict], by_s: float) -> list[dict]:
    return [{"start_s": s["start_s"] - by_s, "end_s": s["end_s"] + by_s} for s in segments]


def luma(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def global_shift(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Translation (dx, dy) in pixels from image a to image b, by phase correlation."""
    cross = np.conj(np.fft.fft2(a - a.mean())) * np.fft.fft2(b - b.mean())
    corr = np.fft.ifft2(cross / (np.abs(cross) + 1e-9)).real
    dy, dx = np.unravel_index(np.argmax(corr), corr.shape)
    h, w = corr.shape
    return int(dx - w if dx > w // 2 else dx), int(dy - h if dy > h // 2 else dy)


def root_frequency(audio: np.ndarray, rate: int) -> float:
    """The lowest strong spectral peak: the root of the chord."""
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    freqs = np.fft.rfftfreq(len(audio), 1 / rate)
    return float(freqs[np.argmax(spectrum > 0.5 * spectrum.max())])


# --- files and manifest -------------------------------------------------------------------------------


def test_videos_are_h264_aac_mp4_with_the_configured_geometry(corpus: Path, labels: list[dict]) -> None:
    for row in labels:
        path = corpus / row["file"]
        assert 20_000 < path.stat().st_size < 200_000, row["file"]
        with av.open(str(path)) as container:
            video, audio = container.streams.video[0], container.streams.audio[0]
            assert (video.codec_context.name, video.codec_context.pix_fmt) == ("h264", "yuv420p")
            assert (video.width, video.height, video.average_rate) == (128, 128, 15)
            assert (audio.codec_context.name, audio.sample_rate) == ("aac", 16000)
            assert sum(1 for _ in container.decode(video=0)) == row["n_frames"] == 90
            assert container.duration / 1e6 == pytest.approx(6.0, abs=0.1)
        assert (row["width"], row["height"], row["fps"], row["duration_s"]) == (128, 128, 15.0, 6.0)
        assert row["has_audio"]


def test_size_duration_fps_and_audio_options(tmp_path: Path) -> None:
    options = {"size": 64, "duration_s": 4.0, "fps": 10, "audio": False, "subtitle_fraction": 1.0}
    main(corpus_config(tmp_path, videos=2, **options))
    rows = pq.read_table(tmp_path / "labels.parquet").to_pylist()
    for row in rows:
        assert (row["width"], row["fps"], row["n_frames"], row["has_audio"], row["has_subtitles"]) == (
            64, 10.0, 40, False, True)
        assert all(seg["end_s"] <= 3.9 for seg in row["actions"] + row["highlights"])
        with av.open(str(tmp_path / row["file"])) as container:
            assert not container.streams.audio
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            assert container.streams.video[0].average_rate == 10
        assert len(frames) == 40 and frames[0].shape == (64, 64, 3)


def test_labels_manifest_schema_and_values(corpus: Path, labels: list[dict]) -> None:
    table = pq.read_table(corpus / "labels.parquet")
    assert table.num_rows == N_VIDEOS
    assert table.schema.field("actions").type == pa.list_(
        pa.struct([("label", pa.string()), ("start_s", pa.float64()), ("end_s", pa.float64())])
    )
    assert table.schema.field("highlights").type == pa.list_(
        pa.struct([("start_s", pa.float64()), ("end_s", pa.float64())])
    )
    for name in ("file", "category", "sentiment"):
        assert table.schema.field(name).type == pa.string()
    assert table.schema.field("valence").type == pa.float64()

    assert sorted(row["file"] for row in labels) == sorted(p.name for p in corpus.glob("video_*.mp4"))
    # A balanced block: each category × sentiment once.
    assert sorted((r["category"], r["sentiment"]) for r in labels) == sorted(
        (c, s) for c in CATEGORIES for s in SENTIMENTS
    )
    for row in labels:
        low, high = VALENCE_RANGES[row["sentiment"]]
        assert low <= row["valence"] <= high
        assert (row["valence"] < -1 / 3) == (row["sentiment"] == "negative")
        assert (row["valence"] > 1 / 3) == (row["sentiment"] == "positive")
        last = (row["n_frames"] - 1) / row["fps"]
        for segments, min_length in ((row["actions"], 1.5), (row["highlights"], 0.9)):
            assert 1 <= len(segments) <= 3
            for seg in segments:
                assert 0 < seg["start_s"] < seg["end_s"] <= last
                assert seg["end_s"] - seg["start_s"] >= min_length
            for before, after in itertools.pairwise(segments):
                assert after["start_s"] - before["end_s"] >= 0.45  # gaps between segments
    meta = table.schema.metadata[b"reelflow.corpus"].decode()
    assert all(name in meta for name in CATEGORIES)


# --- determinism --------------------------------------------------------------------------------------


def test_same_seed_gives_identical_files_whatever_the_count_and_the_processes(
    corpus: Path, labels: list[dict], tmp_path: Path
) -> None:
    small = tmp_path / "small"
    main(corpus_config(small, videos=4, workers=1))
    rows = pq.read_table(small / "labels.parquet").to_pylist()
    assert rows == labels[:4]
    for row in rows:
        assert (small / row["file"]).read_bytes() == (corpus / row["file"]).read_bytes()
        if srt := row["subtitle_file"]:
            assert (small / srt).read_bytes() == (corpus / srt).read_bytes()

    # A rerun with fewer videos into the same folder leaves nothing that the labels do not describe.
    main(corpus_config(small, videos=2))
    assert sorted(p.name for p in small.glob("video_*")) == sorted(
        name for row in rows[:2] for name in (row["file"], row["subtitle_file"]) if name
    )
    assert pq.read_table(small / "labels.parquet").num_rows == 2


def test_another_seed_gives_another_corpus(labels: list[dict], decoded, tmp_path: Path) -> None:
    other = tmp_path / "other"
    main(corpus_config(other, videos=3, seed=SEED + 1))
    rows = pq.read_table(other / "labels.parquet").to_pylist()
    assert [r["valence"] for r in rows] != [r["valence"] for r in labels[:3]]
    with av.open(str(other / rows[0]["file"])) as container:
        first = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert np.abs(first.astype(int) - decoded[labels[0]["file"]][0][0]).mean() > 5


# --- broken files -------------------------------------------------------------------------------------


def decodes_a_video_frame(path: Path) -> bool:
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return False
            for packet in container.demux(video=0):
                try:
                    if packet.decode():
                        return True
                except av.FFmpegError:
                    continue
    except av.FFmpegError:
        return False
    return False


def test_broken_files_are_of_every_kind_and_unreadable(corpus: Path, labels: list[dict]) -> None:
    broken = pq.read_table(corpus / "broken.parquet").to_pylist()
    assert len(broken) == N_BROKEN
    assert sorted(row["kind"] for row in broken) == sorted(BROKEN_KINDS)
    assert sorted(row["file"] for row in broken) == sorted(p.name for p in corpus.glob("broken_*"))
    assert {row["file"] for row in broken}.isdisjoint(row["file"] for row in labels)
    for row in broken:
        path = corpus / row["file"]
        assert path.stat().st_size == row["size_bytes"]
        assert not decodes_a_video_frame(path), row
    extensions = {Path(row["file"]).suffix for row in broken}
    assert extensions == {".mp4", ".mkv"}


# --- subtitles ----------------------------------------------------------------------------------------


def test_subtitle_sidecars_agree_with_the_sentiment(corpus: Path, labels: list[dict]) -> None:
    with_subtitles = [row for row in labels if row["has_subtitles"]]
    assert abs(len(with_subtitles) - 0.5 * N_VIDEOS) <= 1.5
    assert sorted(p.name for p in corpus.glob("*.srt")) == sorted(r["subtitle_file"] for r in with_subtitles)
    filler = {w for opener in SUBTITLE_OPENERS for w in opener.split()} | {"and"}
    for row in with_subtitles:
        assert row["subtitle_file"] == row["file"].replace(".mp4", ".srt")
        cues = parse_srt((corpus / row["subtitle_file"]).read_text(encoding="utf-8"), row["subtitle_file"])
        assert len(cues) >= 2
        assert all(0 <= c.start_s < c.end_s <= row["duration_s"] for c in cues)
        words = [w for c in cues for w in re.findall(r"[a-z]+", c.text.lower()) if w not in filler]
        assert words and set(words) <= set(SUBTITLE_WORDS[row["sentiment"]]), (row["sentiment"], words)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_subtitle_fraction_holds_for_any_prefix(fraction: float) -> None:
    config = CorpusConfig(out="unused", videos=200, subtitle_fraction=fraction)
    flags = [bool(plan_video(config, i).cues) for i in range(200)]
    for n in (10, 50, 200):
        assert abs(sum(flags[:n]) - fraction * n) <= 2


# --- the labels are in the pixels and the sound ---------------------------------------------------------


def test_motion_happens_inside_action_segments_and_nowhere_else(labels: list[dict], decoded) -> None:
    for row in labels:
        frames = decoded[row["file"]][0].astype(np.float32)
        energy = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))  # pair k: frames k and k+1
        times = frame_times(row)
        acting = inside(times, row["actions"])
        highlighted = inside(times, row["highlights"])
        steady = highlighted[:-1] == highlighted[1:]  # the highlight overlay neither appears nor goes
        moving = acting[:-1] & acting[1:] & steady
        still = ~acting[:-1] & ~acting[1:] & steady
        assert energy[moving].mean() > 4 * max(energy[still].mean(), 0.2), row["file"]


def outer_over_centre_motion(gray: np.ndarray, pairs: list[int]) -> float:
    """How much more the picture moves near its edge than near its centre (≈1 for a shift, ≫1 for a roll).

    Motion per region is the normal-flow magnitude: temporal change over spatial gradient.
    """
    size = gray.shape[1]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5 - size / 2
    radius = np.hypot(xx, yy) / size
    change = np.abs(np.stack([gray[k + 1] - gray[k] for k in pairs]))
    gy, gx = np.gradient(np.stack([gray[k + 1] + gray[k] for k in pairs]) / 2, axis=(1, 2))
    gradient = np.hypot(gx, gy)

    def flow(region: np.ndarray) -> float:
        return change[:, region].mean() / (gradient[:, region].mean() + 1e-6)

    return flow((radius > 0.34) & (radius < 0.48)) / flow(radius < 0.16)


def test_each_action_moves_the_picture_its_own_way(labels: list[dict], decoded) -> None:
    """slide: steady sideways shifts; bounce: up and down; shake: both, reversing every few frames;
    spin: a roll, fast at the edges and still at the centre."""
    seen = set()
    for row in labels:
        gray = luma(decoded[row["file"]][0])
        times = frame_times(row)
        highlighted = inside(times, row["highlights"])
        for seg in row["actions"]:
            frames = set(np.flatnonzero(inside(times, [seg]) & ~highlighted))
            pairs = [k for k in sorted(frames) if k + 1 in frames]
            if len(pairs) < 6:
                continue
            shifts = np.array([global_shift(gray[k], gray[k + 1]) for k in pairs])
            dx, dy = np.abs(shifts).T
            reversals = np.mean((shifts[1:] * shifts[:-1]).sum(axis=1) < 0)  # turns of more than 90°
            roll = outer_over_centre_motion(gray, pairs)
            label, where = seg["label"], (row["file"], seg)
            assert (roll > 2.2) == (label == "spin"), (roll, where)
            if label == "slide":
                assert np.median(dx) >= 2 and np.median(dy) <= 1 and reversals <= 0.25, where
            elif label == "bounce":
                assert np.median(dy) >= 2 and np.median(dx) <= 1, where
            elif label == "shake":
                assert np.median(dx + dy) >= 2 and reversals >= 0.4, where
            seen.add(label)
    assert seen == set(ACTIONS)


def test_picture_brightness_and_audio_pitch_follow_valence(corpus: Path, labels: list[dict], decoded) -> None:
    for category in CATEGORIES:
        rows = sorted((r for r in labels if r["category"] == category), key=lambda r: r["valence"])
        assert [r["sentiment"] for r in rows] == list(SENTIMENTS)
        brightness = [luma(decoded[r["file"]][0]).mean() for r in rows]
        assert brightness == sorted(brightness), (category, brightness)
    for row in labels:
        audio = decoded[row["file"]][1]
        times = np.arange(len(audio)) / 16000
        quiet = ~inside(times, widened(row["highlights"], 0.1)) & (times > 0.2)
        root = root_frequency(audio[quiet][:16000], 16000)
        assert root == pytest.approx(220 * 2 ** row["valence"], rel=0.05), row["file"]


def test_highlights_show_and_sound(corpus: Path, labels: list[dict], decoded) -> None:
    config = corpus_config(corpus)
    for row in labels:
        frames, audio = decoded[row["file"]]
        plan = plan_video(config, row["index"])
        plain = np.stack(list(render_frames(dataclasses.replace(plan, highlights=()), config)))
        # The overlay is the only difference from the same video rendered without highlights.
        overlaid = (np.abs(luma(frames) - luma(plain)) > 25).mean(axis=(1, 2))
        highlighted = inside(frame_times(row), row["highlights"])
        assert overlaid[highlighted].min() > 0.02 and overlaid[~highlighted].max() < 0.01, row["file"]

        times = np.arange(len(audio)) / 16000
        loud = inside(times, widened(row["highlights"], -0.1))
        calm = ~inside(times, widened(row["highlights"], 0.1))
        rms = [np.sqrt(np.mean(audio[mask] ** 2)) for mask in (loud, calm)]
        assert rms[0] > 1.8 * rms[1], row["file"]


# --- configuration and storage ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("videos", -1), ("videos", 2.5), ("seed", -5), ("broken", -1), ("size", 31), ("size", 16),
     ("duration_s", 1.0), ("fps", 0), ("audio", "yes"), ("subtitle_fraction", 1.5), ("audio_rate", 12345),
     ("preset", "placebo"), ("workers", 0), ("out", "gs://bucket/x"), ("out", "")],
)
def test_bad_config_is_a_one_line_error_naming_the_field(field: str, value) -> None:
    kwargs = {"out": "corpus", field: value}
    with pytest.raises(ValueError, match=rf"^{field}: [^\n]+$"):
        CorpusConfig(**kwargs)


def test_output_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(ValueError, match=r"^out: .*taken is a file"):
        main(corpus_config(tmp_path / "taken", videos=1))


def test_corpus_written_to_s3_matches_the_local_one(corpus: Path, s3_bucket: str) -> None:
    out = f"{s3_bucket}/demo/corpus"
    labels_uri = main(corpus_config(out, videos=2, broken=2))
    assert labels_uri == f"{out}/labels.parquet"
    names = {uri.rsplit("/", 1)[1] for uri in storage.list_files(out)}
    rows = pq.read_table(io.BytesIO(storage.read_bytes(labels_uri))).to_pylist()
    expected = {r["file"] for r in rows} | {r["subtitle_file"] for r in rows if r["subtitle_file"]}
    assert names == expected | {"labels.parquet", "broken.parquet", "broken_000.mp4", "broken_001.mp4"}
    for row in rows:
        assert storage.read_bytes(f"{out}/{row['file']}") == (corpus / row["file"]).read_bytes()
