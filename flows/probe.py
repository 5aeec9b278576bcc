"""Cheap PyAV probe of a local video file: stream facts without decoding more than its first frame."""

from __future__ import annotations

import logging
import os

import av

from flows.media import VideoError, VideoInfo

log = logging.getLogger(__name__)

# Field orders of FFmpeg's AVFieldOrder that mean interlaced content (TT, BB, TB, BT).
_INTERLACED_FIELD_ORDERS = {2, 3, 4, 5}
# The display matrix is only exposed on decoded frames; a broken start of stream gets this many
# packets to produce a first frame before the probe gives up on rotation and start time.
_FIRST_FRAME_MAX_PACKETS = 256


def av_error_type(exc: BaseException) -> str:
    """A stable CamelCase error type for an exception raised while opening or reading a file."""
    if isinstance(exc, FileNotFoundError):
        return "FileNotFound"
    if isinstance(exc, PermissionError):
        return "PermissionDenied"
    if isinstance(exc, av.error.InvalidDataError):
        return "InvalidData"
    if isinstance(exc, av.error.DecoderNotFoundError):
        return "UnsupportedCodec"
    return type(exc).__name__


def open_input(path: str, stage: str) -> av.container.InputContainer:
    """av.open for reading, with failures turned into a one-line VideoError naming the file."""
    try:
        return av.open(path, mode="r")
    except (av.FFmpegError, OSError) as exc:
        raise VideoError(stage, av_error_type(exc), f"{path}: cannot open: {first_line(exc)}") from None


def primary_video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream | None:
    """The video stream every reader of this project decodes: the first one that is not cover art."""
    streams = [s for s in container.streams.video if not _is_attached_picture(s)]
    return streams[0] if streams else None


def probe(path: str) -> VideoInfo:
    """Stream facts of a local video file; VideoError(stage="probe") when it is not a readable video."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoError("probe", "FileNotFound", f"{path}: no such file")
    if not os.path.isfile(path):
        raise VideoError("probe", "InvalidData", f"{path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoError("probe", "EmptyFile", f"{path}: file is empty (0 bytes)")
    with open_input(path, "probe") as container:
        try:
            return _probe_open(path, container)
        except av.FFmpegError as exc:
            raise VideoError("probe", av_error_type(exc), f"{path}: {first_line(exc)}") from None


def _probe_open(path: str, container: av.container.InputContainer) -> VideoInfo:
    """The probe of an opened container (av errors are mapped by the caller)."""
    fmt = container.format.name
    if fmt.endswith("_pipe") or fmt == "image2":
        raise VideoError("probe", "NotAVideo", f"{path}: a still image ({fmt}), not a video")
    stream = primary_video_stream(container)
    if stream is None:
        raise VideoError("probe", "NoVideoStream", f"{path}: no video stream ({fmt})")
    ctx = stream.codec_context
    if ctx is None:
        raise VideoError("probe", "UnsupportedCodec", f"{path}: no decoder for its video codec")
    fps = _frame_rate(stream)
    duration = _container_duration(container, stream)
    video_duration = _video_duration(stream) or duration
    first = _first_frame(container, stream)
    n_frames, from_header = _frame_count(path, stream, fps, video_duration)
    audio = container.streams.audio
    start = first.time if first is not None and first.time is not None else _stream_start(stream)
    return VideoInfo(
        container=fmt,
        video_codec=ctx.codec.canonical_name,
        width=int(ctx.width),
        height=int(ctx.height),
        rotation=normalize_rotation(first.rotation if first is not None else 0),
        fps=fps,
        n_frames=n_frames,
        duration_s=duration,
        has_audio=bool(audio),
        audio_sample_rate=int(audio[0].rate) if audio and audio[0].rate else None,
        pix_fmt=str(ctx.pix_fmt or (first.format.name if first is not None else "")),
        n_video_streams=len(container.streams.video),
        interlaced=ctx.field_order in _INTERLACED_FIELD_ORDERS
        or bool(first is not None and first.interlaced_frame),
        start_s=float(start),
        frames_from_header=from_header,
    )


def normalize_rotation(degrees: float) -> int:
    """Display rotation as one of 0, 90, 180, -90 (counter-clockwise degrees, as PyAV reports them)."""
    quarter = round(degrees / 90) % 4
    return (0, 90, 180, -90)[quarter]


def quarter_turns(rotation: int) -> int:
    """Counter-clockwise quarter turns (np.rot90's k) that make a coded frame upright."""
    return round(rotation / 90) % 4


def _is_attached_picture(stream: av.stream.Stream) -> bool:
    return bool(stream.disposition & av.stream.Disposition.attached_pic)


def _frame_rate(stream: av.video.stream.VideoStream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    return 0.0


def _container_duration(container: av.container.InputContainer, stream: av.stream.Stream) -> float:
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return _video_duration(stream) or 0.0


def _video_duration(stream: av.stream.Stream) -> float | None:
    """The video stream's own duration: its header field, else Matroska's per-track DURATION tag."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    if tag:
        try:
            hours, minutes, seconds = tag.split(":")
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
        except ValueError:
            return None
    return None


def _stream_start(stream: av.stream.Stream) -> float:
    if stream.start_time is not None and stream.time_base:
        return float(stream.start_time * stream.time_base)
    return 0.0


def _frame_count(path: str, stream: av.stream.Stream, fps: float, duration: float) -> tuple[int, bool]:
    if stream.frames and stream.frames > 0:
        return int(stream.frames), True
    estimate = round(duration * fps)
    if estimate >= 1:
        return estimate, False
    # No header count and no usable duration (raw elementary streams): count packets, which
    # reads the file but decodes nothing.
    with open_input(path, "probe") as container:
        video = primary_video_stream(container)
        return sum(1 for p in container.demux(video) if p.size and not p.is_discard), False


def _first_frame(container: av.container.InputContainer, stream: av.stream.Stream) -> av.VideoFrame | None:
    """The first decodable frame (rotation and interlacing are only exposed on frames); None if none soon."""
    for n, packet in enumerate(container.demux(stream)):
        if n >= _FIRST_FRAME_MAX_PACKETS:
            break
        try:
            frames = packet.decode()
        except av.FFmpegError:
            continue
        if frames:
            return frames[0]
    return None


def first_line(exc: BaseException) -> str:
    strerror = getattr(exc, "strerror", None)
    if strerror:
        return str(strerror)
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
