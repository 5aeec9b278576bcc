"""The decoding policy: which backend reads a video, with fallbacks, and frames that come out upright.

decord is about 1.4× faster than PyAV where it is right, but returns wrong frames without raising on
several kinds of real file. So it is used only for videos a PyAV probe clears (`choose_decoder`) and
whose packet layout keeps its seeks exact; PyAV, the reference, reads everything else and takes over
whenever decord fails to open, miscounts the frames, or raises part way (never yielding an index twice).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from flows import decord_decoder, pyav_decoder
from flows.media import DecodedFrame, VideoError, VideoInfo
from flows.probe import count_doubt, quarter_turns
from flows.pyav_decoder import FrameTable, validate_indices, validate_size

log = logging.getLogger(__name__)

DECODERS = ("auto", "decord", "pyav")
# Containers with a frame index that decord reads right (MPEG-TS is not one: it shifts HEVC frames
# and over-counts a stream cut mid-GOP).
DECORD_CONTAINERS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi"})
# Codecs whose decord frames matched PyAV's frame for frame on the real and generated test files.
# VVC is left out: decord's random access is off by several frames on it.
DECORD_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "h263", "mjpeg"})
DECORD_PIX_FMTS = frozenset(
    {
        "yuv420p",
        "yuvj420p",
        "yuv422p",
        "yuvj422p",
        "yuv444p",
        "yuvj444p",
        "yuv420p10le",
        "yuv422p10le",
        "yuv444p10le",
        "nv12",
    }
)


def choose_decoder(info: VideoInfo) -> tuple[str, str]:
    """("decord" | "pyav", why) for a probed video, from its stream facts alone."""
    if info.container not in DECORD_CONTAINERS:
        return "pyav", f"container {info.container} is not MP4/MOV/MKV/WebM/AVI"
    if info.n_video_streams != 1:
        return "pyav", f"{info.n_video_streams} video streams (decord may read another one)"
    if info.interlaced:
        return "pyav", "interlaced (decord returns each field as a frame)"
    if info.video_codec not in DECORD_CODECS:
        return "pyav", f"codec {info.video_codec} not verified with decord"
    if info.pix_fmt and info.pix_fmt not in DECORD_PIX_FMTS:
        return "pyav", f"pixel format {info.pix_fmt} not verified with decord"
    if info.n_frames < 1 or info.fps <= 0 or info.duration_s <= 0:
        return "pyav", "no usable frame count, frame rate or duration"
    if info.frames_from_header:
        doubt = count_doubt(info.n_frames, info.fps, info.duration_s)
        if doubt:
            return "pyav", doubt
        return "decord", "cleared by probe (header frame count consistent)"
    # No header count (Matroska, fragmented MP4): decord counts packets when it opens the file, and
    # that count must agree with the duration × fps estimate (`_decord_count_problem`).
    return "decord", "cleared by probe (frame count estimated, checked against decord's count)"


def iter_frames(
    path: str,
    info: VideoInfo,
    indices: Iterable[int],
    size: Sequence[int] | None = None,
    decoder: str = "auto",
    threads: int = 1,
    *,
    table: FrameTable | None = None,
) -> Iterator[DecodedFrame]:
    """Read the requested frames of a local file upright, resized in the decoder, in one sorted pass.

    `size` is the (height, width) of the upright output. `decoder="auto"` applies the routing policy;
    "pyav" or "decord" force a backend, but a forced decord still hands over to PyAV when it cannot
    open the file, miscounts its frames or fails part way, since a video must never be lost.
    `threads` is the backend's decoder threads (0: one per core). `table` is the file's scan when the
    caller already has it (frame indices are positions in it).
    """
    wanted = validate_indices(indices)
    out_size = validate_size(size)
    if decoder not in DECODERS:
        raise ValueError(f"decoder: must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if threads < 0:
        raise ValueError(f"threads: must be >= 0, got {threads}")
    return _iter_upright(path, info, wanted, out_size, decoder, threads, table)


def _iter_upright(
    path: str,
    info: VideoInfo,
    wanted: list[int],
    size: tuple[int, int] | None,
    decoder: str,
    threads: int,
    table: FrameTable | None,
) -> Iterator[DecodedFrame]:
    quarter = quarter_turns(info.rotation)
    # The backends decode as coded: for a quarter turn they produce the transposed size.
    coded = size if size is None or quarter % 2 == 0 else (size[1], size[0])
    if decoder == "auto":
        backend, reason = choose_decoder(info)
    else:
        backend, reason = decoder, "forced"
    log.debug("%s: decoding with %s: %s", path, backend, reason)
    if not wanted:
        return
    if backend == "decord":
        if table is None:
            table = pyav_decoder.scan(path, info)
        frames = _decord_with_fallback(path, info, wanted, coded, decoder == "auto", threads, table)
    else:
        frames = pyav_decoder.iter_frames(path, wanted, coded, info, table=table, threads=threads)
    for frame in frames:
        if quarter:
            frame = frame._replace(image=np.ascontiguousarray(np.rot90(frame.image, quarter)))
        yield frame


def _decord_with_fallback(
    path: str,
    info: VideoInfo,
    wanted: list[int],
    size: tuple[int, int] | None,
    check_seeks: bool,
    threads: int,
    table: FrameTable,
) -> Iterator[DecodedFrame]:
    if check_seeks and not table.closed_gops and wanted != list(range(len(wanted))):
        # decord indexes keyframes by decode order: with open GOPs its seeks land a frame off.
        log.debug("%s: switching to pyav: open GOPs and a sparse read (decord would seek)", path)
        yield from pyav_decoder.iter_frames(path, wanted, size, info, table=table, threads=threads)
        return
    try:
        reader = decord_decoder.open_reader(path, size, info.rotation, threads)
        problem = _decord_count_problem(len(reader), info, table)
        if not problem and info.header_doubt:  # planned over the stream's timeline: decord must see the same
            problem = _decord_time_problem(reader, table)
    except VideoError as err:
        problem = err.message
    if problem:
        log.debug("%s: switching to pyav before any frame: %s", path, problem)
        yield from pyav_decoder.iter_frames(path, wanted, size, info, table=table, threads=threads)
        return
    done = -1
    try:
        for frame in decord_decoder.iter_frames(path, wanted, size, info, reader=reader):
            yield frame
            done = frame.index
    except VideoError as err:
        rest = [i for i in wanted if i > done]
        log.debug("%s: pyav resumes at frame %s: %s", path, rest[0] if rest else "-", err.message)
        yield from pyav_decoder.iter_frames(path, rest, size, info, table=table, threads=threads)


def _decord_time_problem(reader: decord_decoder.decord.VideoReader, table: FrameTable) -> str | None:
    """Why decord's frame times differ from the scanned timeline's (by half a frame or more), or None."""
    if table.pts is None or len(table.pts) != len(reader) or len(reader) < 2:
        return None
    theirs = decord_decoder.frame_times(reader)
    ours = table.times_s()
    off = float(np.abs((theirs - theirs[0]) - ours).max())
    if off >= float(np.median(np.diff(ours))) / 2:
        return f"decord's frame times differ from the stream's by up to {off * 1000:.0f} ms"
    return None


def _decord_count_problem(n_decord: int, info: VideoInfo, table: FrameTable) -> str | None:
    """Why decord's frame count cannot be trusted for this file, or None when it agrees."""
    if n_decord != table.n_packets:
        return f"decord counts {n_decord} frames, the file holds {table.n_packets} video packets"
    if info.frames_from_header and n_decord != info.n_frames:
        return f"decord counts {n_decord} frames, the header says {info.n_frames}"
    if abs(n_decord - info.n_frames) > max(2, 0.01 * info.n_frames):
        return f"decord counts {n_decord} frames, duration × fps says about {info.n_frames}"
    return None
