"""decord (from the decord2 wheel): the fast path, for videos the router has cleared.

It always opens a local file path, never bytes in memory (decord segfaults on a truncated file
read from memory). decord2 applies the display rotation itself and takes width/height as the size
of the rotated picture; this backend undoes that rotation so that, like the PyAV backend, it yields
frames as coded and the router rotates both the same way.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence

# PyAV before decord: decord loads its library with RTLD_GLOBAL, and a PyAV imported after it then runs on
# decord's bundled FFmpeg (another build: libavformat 62.12.101 under PyAV's 62.12.102) instead of its own.
import av  # noqa: F401
import decord
import numpy as np

from flows.media import DecodedFrame, VideoError, VideoInfo
from flows.probe import first_line, probe, quarter_turns
from flows.pyav_decoder import COUNTED_CONTAINERS, validate_indices, validate_size

log = logging.getLogger(__name__)

# get_batch holds a whole chunk in memory: at most this many frames and this many bytes at once.
CHUNK_FRAMES = 64
CHUNK_BYTES = 128 * 1024 * 1024


def open_reader(
    path: str, size: tuple[int, int] | None, rotation: int, threads: int = 1
) -> decord.VideoReader:
    """A decord reader of a local file decoding to `size` (height, width as coded) with `threads` decoder
    threads (0: one per core); VideoError if it fails."""
    if not os.path.isfile(path):
        raise VideoError("decode", "FileNotFound", f"{path}: decord reads local files only")
    kwargs = {}
    if size is not None:
        height, width = size
        if rotation in (90, -90):
            height, width = width, height  # decord sizes the rotated picture
        kwargs = {"width": width, "height": height}
    try:
        return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads, **kwargs)
    except Exception as exc:  # decord raises its own DECORDError and plain RuntimeErrors
        raise VideoError("decode", "DecordError", f"{path}: decord cannot open: {first_line(exc)}") from None


def frame_times(reader: decord.VideoReader) -> np.ndarray:
    """Every frame's time in seconds as decord indexes the file; VideoError if it cannot tell."""
    try:
        return reader.get_frame_timestamp(list(range(len(reader))))[:, 0].astype(np.float64)
    except Exception as exc:  # decord raises its own DECORDError
        message = f"decord cannot give its frame times: {first_line(exc)}"
        raise VideoError("decode", "DecordError", message) from None


def iter_frames(
    path: str,
    indices: Iterable[int],
    size: Sequence[int] | None = None,
    info: VideoInfo | None = None,
    *,
    reader: decord.VideoReader | None = None,
    threads: int = 1,
) -> Iterator[DecodedFrame]:
    """Decode the requested frames with decord, in sorted chunks, resized in the decoder, as coded.

    Same contract as `flows.pyav_decoder.iter_frames`: each existing requested index once, ascending,
    `time_s` from the first frame. Raises VideoError(error_type="DecordError") when decord fails or
    returns frames of the wrong shape. `reader` reuses a reader from `open_reader` with the same size;
    otherwise one opens with `threads` decoder threads.
    """
    wanted = validate_indices(indices)
    out_size = validate_size(size)
    return _generate(path, wanted, out_size, info, reader, threads)


def _generate(
    path: str,
    wanted: list[int],
    out_size: tuple[int, int] | None,
    info: VideoInfo | None,
    reader: decord.VideoReader | None,
    threads: int,
) -> Iterator[DecodedFrame]:
    if not wanted:
        return
    info = info or probe(path)
    quarter = quarter_turns(info.rotation)
    vr = reader if reader is not None else open_reader(path, out_size, info.rotation, threads)
    n_frames = len(vr)
    wanted = [i for i in wanted if i < n_frames]
    if not wanted:
        return
    coded = out_size or (info.height, info.width)
    upright = (coded[1], coded[0]) if quarter % 2 else coded
    t0 = float(vr.get_frame_timestamp([0])[0][0])
    # decord's timestamps are float32 seconds from the stream's start time, which AVI lacks (decord
    # then reports about -3.7e17 for every frame): time those frames by the frame rate, as PyAV does.
    by_rate = info.container in COUNTED_CONTAINERS or not math.isfinite(t0) or abs(t0) > 1e9
    per_chunk = max(1, min(CHUNK_FRAMES, CHUNK_BYTES // (coded[0] * coded[1] * 3)))
    for start in range(0, len(wanted), per_chunk):
        chunk = wanted[start : start + per_chunk]
        try:
            batch = vr.get_batch(chunk).asnumpy()
            times = vr.get_frame_timestamp(chunk)[:, 0]
        except Exception as exc:
            raise VideoError(
                "decode", "DecordError", f"{path}: decord failed at frame {chunk[0]}: {first_line(exc)}"
            ) from None
        if batch.shape != (len(chunk), *upright, 3) or batch.dtype != np.uint8:
            # decord2 3.4 pads rows for some widths (16, 24, 48, 72 px seen): get_batch raises on them,
            # and were it to return, the padding would show up as extra "channels".
            raise VideoError(
                "decode",
                "DecordError",
                f"{path}: decord returned frames of shape {batch.shape[1:]}, expected {(*upright, 3)}",
            )
        for index, time_s, image in zip(chunk, times, batch, strict=True):
            if quarter:
                image = np.rot90(image, -quarter)
            seconds = index / (info.fps or 1.0) if by_rate else float(time_s) - t0
            yield DecodedFrame(index, seconds, np.array(image, order="C"))
