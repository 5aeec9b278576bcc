"""PyAV decoding, the reference and the fallback: exact frame indices, corrupt packets skipped.

A frame's index is its place in presentation order among the video stream's packets, found from
one demux pass over the file (`scan`, no decoding). Knowing every frame's timestamp up front is what
makes keyframe seeks exact, variable frame rates come out right, and a corrupt packet cost one
index rather than shifting every later one. Files whose timestamps cannot carry that (AVI, whose
timestamps are frame counters that B-frames scramble, and interlaced streams, one packet per field)
are decoded straight through and frames are counted.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from flows.media import DecodedFrame, VideoError, VideoInfo
from flows.probe import av_error_type, first_line, open_input, primary_video_stream, probe

log = logging.getLogger(__name__)

# Seek only when it skips decoding at least this many frames: a seek flushes the decoder and its
# frame threads, which costs about as much as decoding a dozen small frames.
SEEK_MIN_GAP = 16
# A seek that lands after the keyframe it aimed for is retried this many keyframes earlier.
SEEK_RETRIES = 3
# Containers with a keyframe index, where av_seek_frame lands on the keyframe asked for.
SEEKABLE_CONTAINERS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"})
# AVI stores no presentation timestamps, only frame counters (B-frames scramble them): frames are
# counted in decode-output order and timed by the frame rate.
COUNTED_CONTAINERS = frozenset({"avi"})
_NO_TS = -(2**63)  # a packet without a timestamp, in the int64 arrays of `scan`


@dataclass(frozen=True)
class FrameTable:
    """Every video packet's place, from one demux pass (no decoding).

    `pts` holds the presentation timestamps of the frames in index order when frames are indexed
    by timestamp, else None (frames are counted as they decode). `key_index[i]` is the frame index
    of the i-th keyframe and `key_seek_ts[i]` the timestamp that seeks to it. `closed_gops` says
    that every keyframe's position in decode order equals its frame index, which decord's seeks
    assume (an open GOP puts leading B-frames after the keyframe in decode order).
    """

    n_packets: int
    pts: np.ndarray | None
    key_index: np.ndarray
    key_seek_ts: np.ndarray
    time_base: Fraction
    seekable: bool
    closed_gops: bool

    def index_of(self, pts: int | None) -> int | None:
        """The frame index of a decoded frame's timestamp; None when no packet has it."""
        if pts is None or self.pts is None:
            return None
        i = int(np.searchsorted(self.pts, pts))
        return i if i < len(self.pts) and self.pts[i] == pts else None

    def times_s(self) -> np.ndarray | None:
        """Every frame's time in seconds from the first timestamp, in index order (the `time_s` of the
        frames this module yields); None when frames are counted, not timed."""
        if self.pts is None:
            return None
        return (self.pts - self.pts[0]).astype(np.float64) * float(self.time_base)


def scan(path: str, info: VideoInfo) -> FrameTable:
    """Read the video packets' timestamps and keyframe flags (demux only, no decoding)."""
    pts, dts, keys = array("q"), array("q"), array("b")
    with open_input(path, "decode", decode_to_analyze=False) as container:
        stream = primary_video_stream(container)
        if stream is None:
            raise VideoError("decode", "NoVideoStream", f"{path}: no video stream")
        time_base = Fraction(stream.time_base or Fraction(1, 1))
        for packet in _demuxed(path, container.demux(stream)):
            if packet.size and not packet.is_discard:
                pts.append(_NO_TS if packet.pts is None else packet.pts)
                dts.append(_NO_TS if packet.dts is None else packet.dts)
                keys.append(packet.is_keyframe)
    pts_arr, dts_arr = np.frombuffer(pts, dtype=np.int64), np.frombuffer(dts, dtype=np.int64)
    sorted_pts = np.sort(pts_arr)
    unique = bool(len(pts_arr)) and sorted_pts[0] != _NO_TS and bool(np.all(np.diff(sorted_pts) > 0))
    closed = False
    key_index = key_seek_ts = np.zeros(0, dtype=np.int64)
    if unique:
        positions = np.flatnonzero(np.frombuffer(keys, dtype=np.int8))
        ranks = np.searchsorted(sorted_pts, pts_arr[positions])
        closed = bool(np.array_equal(ranks, positions))
        order = np.argsort(ranks)
        key_index = ranks[order]
        seek_ts = np.where(dts_arr[positions] != _NO_TS, dts_arr[positions], pts_arr[positions])
        key_seek_ts = seek_ts[order]
    by_pts = unique and info.container not in COUNTED_CONTAINERS and not info.interlaced
    empty = np.zeros(0, dtype=np.int64)
    return FrameTable(
        n_packets=len(pts_arr),
        pts=sorted_pts if by_pts else None,
        key_index=key_index if by_pts else empty,
        key_seek_ts=key_seek_ts if by_pts else empty,
        time_base=time_base,
        seekable=by_pts and info.container in SEEKABLE_CONTAINERS and len(key_index) > 0,
        closed_gops=closed,
    )


def _demuxed(path: str, packets: Iterable[av.Packet], stage: str = "decode") -> Iterator[av.Packet]:
    """Packets, with a container that breaks part way turned into a VideoError naming the file."""
    iterator = iter(packets)
    while True:
        try:
            packet = next(iterator)
        except StopIteration:
            return
        except av.FFmpegError as exc:
            raise VideoError(
                stage, av_error_type(exc), f"{path}: reading packets failed: {first_line(exc)}"
            ) from None
        yield packet


def validate_indices(indices: Iterable[int]) -> list[int]:
    """Frame indices as a list of ints, checked to be non-negative, sorted and unique."""
    out = [int(i) for i in indices]
    if out and out[0] < 0:
        raise ValueError(f"indices: must be >= 0, got {out[0]}")
    for a, b in itertools.pairwise(out):
        if b <= a:
            raise ValueError(f"indices: must be sorted and unique, got {a} before {b}")
    return out


def validate_size(size: Sequence[int] | None) -> tuple[int, int] | None:
    """(height, width) of the decoded frames, or None for the stored size."""
    if size is None:
        return None
    if len(size) != 2 or min(int(s) for s in size) < 1:
        raise ValueError(f"size: must be (height, width) with both >= 1, got {size!r}")
    return int(size[0]), int(size[1])


def iter_frames(
    path: str,
    indices: Iterable[int],
    size: Sequence[int] | None = None,
    info: VideoInfo | None = None,
    *,
    table: FrameTable | None = None,
    threads: int = 1,
) -> Iterator[DecodedFrame]:
    """Decode the requested frames in one sorted pass, resized in the decoder, as coded (not rotated).

    Yields each requested index that exists once, in ascending order; `time_s` is seconds from the
    video's first frame. Corrupt packets are skipped (their frames are not yielded). `threads` is the
    codec's thread count (0: one per core).
    """
    wanted = validate_indices(indices)
    out_size = validate_size(size)
    return _generate(path, wanted, out_size, info, table, threads)


def _generate(
    path: str,
    wanted: list[int],
    size: tuple[int, int] | None,
    info: VideoInfo | None,
    table: FrameTable | None,
    threads: int,
) -> Iterator[DecodedFrame]:
    if not wanted:
        return
    info = info or probe(path)
    table = table or scan(path, info)
    reader = _Reader(path, info, table, size, threads)
    try:
        yield from reader.read(wanted)
    finally:
        reader.close()


class _Reader:
    """One decode pass over a file: a container, its position, and the frame-index bookkeeping."""

    def __init__(
        self, path: str, info: VideoInfo, table: FrameTable, size: tuple[int, int] | None, threads: int
    ) -> None:
        self.path = path
        self.info = info
        self.table = table
        self.size = size
        self.threads = threads
        self.reformatter = VideoReformatter()
        self.stack = ExitStack()
        self.container: av.container.InputContainer
        self.stream: av.video.stream.VideoStream
        self.bad_packets = 0
        self._open()

    def _open(self) -> None:
        self.stack.close()
        self.container = self.stack.enter_context(open_input(self.path, "decode", decode_to_analyze=False))
        stream = primary_video_stream(self.container)
        if stream is None:
            raise VideoError("decode", "NoVideoStream", f"{self.path}: no video stream")
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = self.threads
        self.stream = stream

    def close(self) -> None:
        self.stack.close()
        if self.bad_packets:
            log.debug("%s: skipped %d undecodable packets", self.path, self.bad_packets)

    def read(self, wanted: list[int]) -> Iterator[DecodedFrame]:
        if self.table.pts is None:
            return self._read_counted(wanted)
        return self._read_indexed(wanted)

    def _decoded(self, packets: Iterable[av.Packet]) -> Iterator[av.VideoFrame]:
        for packet in _demuxed(self.path, packets):
            try:
                frames = packet.decode()
            except av.FFmpegError as exc:
                # A corrupt packet loses its frame, not the video.
                self.bad_packets += 1
                log.debug("%s: packet at pts %s: %s", self.path, packet.pts, first_line(exc))
                continue
            for frame in frames:
                if frame.is_corrupt:
                    # Concealed damage (a packet cut short): the picture is partly invented, and differs
                    # with the decoder's threading. Lost, as its packet would be.
                    self.bad_packets += 1
                    log.debug("%s: frame at pts %s decoded with errors", self.path, frame.pts)
                    continue
                yield frame

    def _image(self, frame: av.VideoFrame) -> np.ndarray:
        if self.size is None:
            return self.reformatter.reformat(frame, format="rgb24").to_ndarray()
        height, width = self.size
        # Bicubic is what decord's scaler uses, so both backends give the same pixels.
        out = self.reformatter.reformat(
            frame, width=width, height=height, format="rgb24", interpolation="BICUBIC"
        )
        return out.to_ndarray()

    def _read_indexed(self, wanted: list[int]) -> Iterator[DecodedFrame]:
        table = self.table
        assert table.pts is not None
        first_pts = int(table.pts[0])
        targets = deque(wanted)
        frames = self._decoded(self.container.demux(self.stream))
        floor = 0  # after a seek, frames before the landing keyframe are leading frames: untrusted
        position = -1  # index of the last frame the decoder produced
        last_seek_key = -1
        can_seek = table.seekable
        while targets:
            target = targets[0]
            if can_seek:
                key = bisect.bisect_right(table.key_index, target) - 1
                if key > last_seek_key and key >= 0 and table.key_index[key] - position > SEEK_MIN_GAP:
                    last_seek_key = key
                    frames.close()
                    landed = self._seek(key)
                    if landed is None:
                        # No seek landed where it should: decode from the start, without seeking.
                        log.debug("%s: keyframe seeks unreliable, decoding through", self.path)
                        self._open()
                        can_seek, floor, position = False, 0, -1
                        frames = self._decoded(self.container.demux(self.stream))
                    else:
                        frames, floor = landed
                        position = floor - 1
            for frame in frames:
                index = table.index_of(frame.pts)
                if index is None:
                    continue
                position = max(position, index)
                if index < floor or index < target:
                    continue
                while targets and targets[0] < index:
                    targets.popleft()  # that frame's packet did not decode
                if targets and targets[0] == index:
                    targets.popleft()
                    time_s = float((int(frame.pts) - first_pts) * table.time_base)
                    yield DecodedFrame(index, time_s, self._image(frame))
                break
            else:
                return  # end of stream: the remaining indices do not exist

    def _seek(self, key: int) -> tuple[Iterator[av.VideoFrame], int] | None:
        """Seek to keyframe `key` (or an earlier one); (frames from there, landing index) or None."""
        table = self.table
        aim = int(table.key_index[key])
        for attempt in range(key, max(-1, key - SEEK_RETRIES - 1), -1):
            try:
                self.container.seek(int(table.key_seek_ts[attempt]), backward=True, stream=self.stream)
            except av.FFmpegError as exc:
                log.debug("%s: seek failed: %s", self.path, first_line(exc))
                return None
            packets = _demuxed(self.path, self.container.demux(self.stream))
            first = next((p for p in packets if p.size), None)
            if first is None:
                continue
            landed = table.index_of(first.pts) if first.is_keyframe else None
            if landed is not None and landed <= aim:
                log.debug("%s: seek for frame %d landed on keyframe %d", self.path, aim, landed)
                return self._decoded(itertools.chain([first], packets)), landed
            log.debug(
                "%s: seek for frame %d landed on %s, retrying a keyframe earlier", self.path, aim, landed
            )
        return None

    def _read_counted(self, wanted: list[int]) -> Iterator[DecodedFrame]:
        fps = self.info.fps or 1.0
        by_rate = self.info.container in COUNTED_CONTAINERS
        targets = deque(wanted)
        first_time: float | None = None
        for index, frame in enumerate(self._decoded(self.container.demux(self.stream))):
            if first_time is None:
                first_time = frame.time
            if index != targets[0]:
                continue
            targets.popleft()
            if by_rate or frame.time is None or first_time is None:
                time_s = index / fps
            else:
                time_s = frame.time - first_time
            yield DecodedFrame(index, float(time_s), self._image(frame))
            if not targets:
                return


def read_audio(
    path: str, start_s: float, end_s: float, sample_rate: int = 16_000, info: VideoInfo | None = None
) -> np.ndarray:
    """Mono float32 samples at `sample_rate` for [start_s, end_s), in seconds from the first video frame.

    Returns exactly round((end_s - start_s) * sample_rate) samples, zero where the audio track does not
    reach; an empty array when the file has no audio stream.
    """
    if not 0 <= start_s <= end_s:
        raise ValueError(f"audio span: need 0 <= start_s <= end_s, got {start_s}..{end_s}")
    if sample_rate < 1:
        raise ValueError(f"sample_rate: must be >= 1, got {sample_rate}")
    n_out = round((end_s - start_s) * sample_rate)
    with open_input(path, "audio") as container:
        if not container.streams.audio:
            return np.zeros(0, dtype=np.float32)
        stream = container.streams.audio[0]
        stream.thread_type = "AUTO"
        video = primary_video_stream(container)
        if info is not None:
            origin = info.start_s
        elif video is not None and video.start_time is not None:
            origin = float(video.start_time * video.time_base)
        else:
            origin = 0.0
        begin, end = origin + start_s, origin + end_s
        if begin > 1.0:
            # Land a little early: audio seeks snap to packet boundaries. A failed seek leaves the
            # position at the start, which only costs time.
            with contextlib.suppress(av.FFmpegError):
                container.seek(int(max(0.0, begin - 0.5) / stream.time_base), backward=True, stream=stream)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks: list[np.ndarray] = []
        track_start: float | None = None
        last_time: float | None = None
        for packet in _demuxed(path, container.demux(stream), "audio"):
            try:
                frames = packet.decode()
            except av.FFmpegError as exc:
                log.debug("%s: audio packet at pts %s: %s", path, packet.pts, first_line(exc))
                continue
            for frame in frames:
                if track_start is None:
                    if frame.time is None:
                        continue
                    track_start = float(frame.time)
                last_time = frame.time if frame.time is not None else last_time
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            if last_time is not None and last_time > end:
                break
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    result = np.zeros(n_out, dtype=np.float32)
    if track_start is None or not chunks:
        return result
    track = np.concatenate(chunks).astype(np.float32, copy=False)
    offset = round((begin - track_start) * sample_rate)
    src_lo, dst_lo = max(0, offset), max(0, -offset)
    n = max(0, min(n_out - dst_lo, len(track) - src_lo))
    result[dst_lo : dst_lo + n] = track[src_lo : src_lo + n]
    return result
