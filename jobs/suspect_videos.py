"""Videos whose headers lie, written with PyAV: one per kind the clip dataflow must plan from the stream's
real timeline (`flows.timeline`). The tests check each against a full PyAV decode; `reelflow bench
timeline` times the timeline pass on them.

Each frame shows its own index as a bright bar and a seeded block pattern, so a decoded frame can be told
apart from every other one.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

SIZE = (96, 160)  # (height, width) of the test files; `reelflow bench timeline` writes larger ones
MS = Fraction(1, 1000)
TS_CLOCK = Fraction(1, 90_000)
DETERMINISTIC_X264 = "threads=1:sync-lookahead=0:mbtree=0"


def frame_image(index: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """The picture of frame `index`: coarse seeded blocks and a bar whose place moves with the index."""
    height, width = size
    rng = np.random.default_rng(index)
    image = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    image[:8] = 0
    x = (index * 3) % (width - 6)
    image[:8, x : x + 6] = 255
    return image


def write_video(
    path: Path,
    times_s: Sequence[float],
    *,
    fmt: str,
    codec: str = "libx264",
    time_base: Fraction = MS,
    rate: int | None = None,
    start_s: float = 0.0,
    options: dict[str, str] | None = None,
    size: tuple[int, int] = SIZE,
) -> Path:
    """Encode frames 0..n-1 at the given presentation times (seconds) into `path`, byte for byte the same on
    every run."""
    options = {"threads": "1", **(options or {})}
    if codec == "libx264":  # x264's lookahead thread and macroblock tree make its choices depend on timing
        options["x264-params"] = ":".join(filter(None, [DETERMINISTIC_X264, options.get("x264-params")]))
    with av.open(str(path), "w", format=fmt, container_options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream(codec, rate=rate, options=options)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        stream.time_base = stream.codec_context.time_base = time_base
        for index, t in enumerate(times_s):
            frame = av.VideoFrame.from_ndarray(frame_image(index, size), format="rgb24")
            frame.pts, frame.time_base = round((start_s + t) / time_base), time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def truncated_mkv(folder: Path, size: tuple[int, int] = SIZE) -> Path:
    """The first 8 % (100 KiB at the test size) of a 60 s Matroska file whose header claims 1,132 s (an
    upload cut short)."""
    times = [i / 24 for i in range(24 * 60)]
    whole = write_video(folder / "whole.mkv", times, fmt="matroska", rate=24, size=size)
    data = bytearray(whole.read_bytes()[: 100 * 1024 * size[0] * size[1] // (SIZE[0] * SIZE[1])])
    whole.unlink()
    duration = data.find(b"\x44\x89\x88")  # Segment Info's Duration: an 8-byte float, in milliseconds
    data[duration + 3 : duration + 11] = struct.pack(">d", 1_132_000.0)
    path = folder / "truncated.mkv"
    path.write_bytes(bytes(data))
    return path


def bogus_rate_flv(folder: Path, size: tuple[int, int] = SIZE) -> Path:
    """An FLV remux whose metadata gives its 1 kHz time base as the frame rate (1000 fps; really 25)."""
    path = write_video(folder / "bogus_rate.flv", [i / 25 for i in range(80)], fmt="flv", rate=25, size=size)
    data = bytearray(path.read_bytes())
    rate = data.find(b"framerate")  # onMetaData's AMF number: a type byte, then a big-endian double
    data[rate + 10 : rate + 18] = struct.pack(">d", 1000.0)
    path.write_bytes(bytes(data))
    return path


def rateless_asf(folder: Path, size: tuple[int, int] = SIZE) -> Path:
    """An ASF file with no average frame rate and real gaps of 40 to 800 ms between frames."""
    gaps = np.random.default_rng(1).choice([0.04, 0.1, 0.3, 0.8], size=149)
    times = np.concatenate([[0.0], np.cumsum(gaps)])
    return write_video(
        folder / "rateless.asf", times.tolist(), fmt="asf", codec="wmv2", options={"g": "30"}, size=size
    )


def mid_gop_ts(folder: Path, size: tuple[int, int] = SIZE) -> Path:
    """A piece of an MPEG-TS broadcast starting at ~116 s, cut mid-GOP: it starts with frames whose keyframe
    is in the part cut away, and its first packet is a P-frame shown after the B-frames that follow it (so
    FFmpeg's `start_time`, the first packet's, is later than the stream's earliest timestamp)."""
    whole = write_video(
        folder / "whole.ts", [i / 25 for i in range(25 * 12)], fmt="mpegts", time_base=TS_CLOCK, rate=25,
        start_s=110.0, options={"g": "100", "bf": "2", "x264-params": "scenecut=0"}, size=size,
    )  # fmt: skip
    data = whole.read_bytes()
    whole.unlink()
    path = folder / "mid_gop.ts"
    cut = len(data) * 55 // 100 // 188 * 188  # on a TS packet boundary
    while True:
        path.write_bytes(data[cut : cut + len(data) // 5])
        if _starts_reordered(path):
            return path
        cut += 188


def _starts_reordered(path: Path) -> bool:
    """Whether the file's first video packet is shown after the second one (a reference frame before its
    B-frames in decode order)."""
    with av.open(str(path)) as container:
        first, second = [p.pts for p, _ in zip(container.demux(video=0), range(2), strict=False)]
    return first is not None and second is not None and first > second


def extreme_vfr_mp4(folder: Path, size: tuple[int, int] = SIZE) -> Path:
    """An MP4 whose frame gaps run from 8 ms to 5 s (bursts at 120, 60 and 30 fps between long pauses)."""
    gaps = np.concatenate(
        [np.full(40, 1 / 120), np.full(10, 2.0), np.full(40, 1 / 30), [5.0], np.full(30, 1 / 60)]
    )
    times = np.concatenate([[0.0], np.cumsum(gaps)])
    return write_video(
        folder / "extreme_vfr.mp4",
        times.tolist(),
        fmt="mp4",
        time_base=TS_CLOCK,
        options={"g": "30"},
        size=size,
    )


SUSPECT_VIDEOS: dict[str, Callable[[Path, tuple[int, int]], Path]] = {
    "truncated_mkv": truncated_mkv,
    "bogus_rate_flv": bogus_rate_flv,
    "rateless_asf": rateless_asf,
    "mid_gop_ts": mid_gop_ts,
    "extreme_vfr_mp4": extreme_vfr_mp4,
}


def write_all(folder: Path, size: tuple[int, int] = SIZE) -> dict[str, Path]:
    """Every suspect video, written into `folder` with frames of `size` (height, width)."""
    folder.mkdir(parents=True, exist_ok=True)
    return {name: make(folder, size) for name, make in SUSPECT_VIDEOS.items()}
