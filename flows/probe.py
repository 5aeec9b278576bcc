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
# Containers with no frame index: their frame counts and durations are estimates from a rate and the
# first and last timestamps, and a file cut out of a longer stream starts wherever the cut fell.
INDEXLESS_CONTAINERS = frozenset({"mpegts", "mpeg", "mpegvideo", "h264", "hevc", "flv"})
# Frame rates outside this range come from a broken header (FLV remuxes report their 1 kHz time base).
PLAUSIBLE_FPS = (0.5, 300.0)
# A header frame count may exceed duration × fps by rounding only; it may fall short by the audio that
# outlasts the video (up to this many seconds, or this fraction of the duration).
COUNT_SLACK_S = 2.0
COUNT_SLACK_FRACTION = 0.05
# Fewer bits per second than this per pixel of the picture (and never fewer than the floor) cannot be a
# video of the length the header claims: the file was cut short (a 100 KiB upload claiming 19 minutes).
MIN_BITS_PER_PIXEL_SECOND = 0.002
MIN_BITS_PER_SECOND = 1_000
# A header whose streams need more bytes than this times the file's size describes a longer file.
TRUNCATED_FRACTION = 1.25


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


def open_input(path: str, stage: str, *, decode_to_analyze: bool = True) -> av.container.InputContainer:
    """av.open for reading, with failures turned into a one-line VideoError naming the file.

    FFmpeg decodes a few frames of every stream while opening, to learn what the header leaves out (pixel
    format, decoder delay): 40 ms at 1080p, as much as the probe and the scan together otherwise cost.
    `decode_to_analyze=False` skips that for readers that need only packets, the header's facts, or frames
    they decode themselves (their decoders are opened anew and do decode). A format that shows its
    streams only while analyzing is opened as usual.
    """
    try:
        if not decode_to_analyze:
            try:
                return av.open(path, mode="r", stream_options=_SKIP_ANALYSIS_DECODING)
            except ValueError:  # no streams before analysis (MPEG-PS): per-stream options cannot apply
                pass
        return av.open(path, mode="r")
    except (av.FFmpegError, OSError) as exc:
        raise VideoError(stage, av_error_type(exc), f"{path}: cannot open: {first_line(exc)}") from None


# Per-stream options for the first streams of a file (streams past these are analyzed as usual).
_SKIP_ANALYSIS_DECODING = [{"skip_frame": "all"}] * 64


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
    # The header and the first decoded frame tell all the probe reads, mostly: analysis decoding only where
    # they leave the picture size or the rate unknown.
    for decode_to_analyze in (False, True):
        with open_input(path, "probe", decode_to_analyze=decode_to_analyze) as container:
            try:
                if decode_to_analyze or _header_complete(container):
                    return _probe_open(path, container)
            except av.FFmpegError as exc:
                raise VideoError("probe", av_error_type(exc), f"{path}: {first_line(exc)}") from None
    raise AssertionError("unreachable: the second open always probes")


def _header_complete(container: av.container.InputContainer) -> bool:
    """Whether the container, opened without analysis decoding, gives the video's size and frame rate."""
    stream = primary_video_stream(container)
    if stream is None or stream.codec_context is None:
        return True  # the probe's own error, either way
    ctx = stream.codec_context
    return bool(ctx.width and ctx.height and stream.average_rate)


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
    first, starts_on_key = _first_frame(container, stream)
    n_frames, from_header = _frame_count(path, stream, fps, video_duration)
    audio = container.streams.audio
    start = first.time if first is not None and first.time is not None else _stream_start(stream)
    doubts = [
        f"{fmt} has no frame index" if fmt in INDEXLESS_CONTAINERS else "",
        "" if stream.average_rate else "no average frame rate",
        "" if PLAUSIBLE_FPS[0] <= fps <= PLAUSIBLE_FPS[1] else f"implausible frame rate {fps:g} fps",
        count_doubt(n_frames, fps, duration) if from_header else "",
        _size_doubt(container, os.path.getsize(path), duration, int(ctx.width) * int(ctx.height)),
        "" if starts_on_key else "the stream does not start on a keyframe",
    ]
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
        header_doubt="; ".join(d for d in doubts if d),
    )


def count_doubt(n_frames: int, fps: float, duration_s: float) -> str:
    """Why a header frame count disagrees with duration × fps, or "" when it agrees."""
    expected = duration_s * fps
    slack = max(COUNT_SLACK_S * fps, COUNT_SLACK_FRACTION * expected)
    if expected - slack - 1 <= n_frames <= expected + 1:
        return ""
    return f"header says {n_frames} frames, duration × fps says {expected:.1f}"


def _size_doubt(
    container: av.container.InputContainer, size_bytes: int, duration_s: float, pixels: int
) -> str:
    """Why the file is too small for what its header claims, or "": the streams' bit rates (MP4 derives them
    from its sample table) add up to more bytes than the file has, or too few bits per second remain."""
    needed = sum(
        s.bit_rate * float(s.duration * s.time_base) / 8
        for s in (*container.streams.video, *container.streams.audio)
        if s.bit_rate and s.duration and s.time_base
    )
    if needed > TRUNCATED_FRACTION * size_bytes + 16 * 1024:
        return f"the header's streams need {needed:.0f} bytes, the file has {size_bytes}"
    if duration_s <= 0:
        return ""
    bits_per_s = 8 * size_bytes / duration_s
    if bits_per_s >= max(MIN_BITS_PER_SECOND, MIN_BITS_PER_PIXEL_SECOND * pixels):
        return ""
    return f"{size_bytes} bytes cannot hold the {duration_s:.1f} s the header claims"


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
    """The video stream's own duration: Matroska's per-track DURATION tag, else its header field.

    The tag first: a Matroska track has no duration field, and FFmpeg fills one in from the container's
    when it opens without decoding (`open_input`), which can be a frame longer.
    """
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    if tag:
        try:
            hours, minutes, seconds = tag.split(":")
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
        except ValueError:
            pass
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
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


def _first_frame(
    container: av.container.InputContainer, stream: av.stream.Stream
) -> tuple[av.VideoFrame | None, bool]:
    """The first decodable frame (rotation and interlacing are only exposed on frames), None if none soon;
    and whether the stream's first packet is a keyframe."""
    starts_on_key = True
    for n, packet in enumerate(container.demux(stream)):
        if n >= _FIRST_FRAME_MAX_PACKETS:
            break
        if n == 0 and packet.size:
            starts_on_key = bool(packet.is_keyframe)
        try:
            frames = packet.decode()
        except av.FFmpegError:
            continue
        if frames:
            return frames[0], starts_on_key
    return None, starts_on_key


def first_line(exc: BaseException) -> str:
    strerror = getattr(exc, "strerror", None)
    if strerror:
        return str(strerror)
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
