"""Plain types shared by the data plane: what a probe reports, a decoded frame, and a video error."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np


class VideoError(Exception):
    """A video that cannot be (fully) read; the dataflow turns it into an errors-table row.

    `stage` is where it failed (list, probe, decode, audio, subtitles), `error_type` a short stable
    CamelCase name analysts can group by, and the message one line naming the file.
    """

    def __init__(self, stage: str, error_type: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.error_type = error_type
        self.message = " ".join(str(message).split())

    def __reduce__(self) -> tuple[Any, ...]:
        return (VideoError, (self.stage, self.error_type, self.message))

    def as_row(self) -> dict[str, str]:
        return {"stage": self.stage, "error_type": self.error_type, "message": self.message}


# Failures of the machine or the store rather than of the video, which a later attempt may not meet: an I/O
# error reading the object (permission, connection, full disk), a decoder process killed (out of memory) or
# out of time. Everything else (undecodable, empty, unsupported codec) fails the same way every time.
TRANSIENT_STAGES = frozenset({"read"})
TRANSIENT_ERROR_TYPES = frozenset({
    "DecoderCrashed", "DecoderTimeout", "MemoryError", "OSError", "PermissionError", "TimeoutError",
    "ConnectionError", "ConnectionResetError", "ConnectionAbortedError", "ConnectionRefusedError",
    "BrokenPipeError",
})  # fmt: skip


def is_transient(stage: str, error_type: str) -> bool:
    """Whether a video error of this stage and type may go away on a later attempt (worth retrying)."""
    return stage in TRANSIENT_STAGES or error_type in TRANSIENT_ERROR_TYPES


@dataclass(frozen=True)
class VideoInfo:
    """Stream facts from a PyAV probe (no full decode).

    width/height are as stored in the stream (before rotation); rotation is degrees from the display
    matrix; fps is the average frame rate; n_frames comes from the container header when it has one,
    else from duration × fps (`frames_from_header` says which). `header_doubt` says why these facts are not
    to be trusted ("" when nothing is wrong with them): the clip dataflow then plans from the real timeline
    (`flows.timeline`) and replaces fps, n_frames and duration_s with what the stream really holds.
    """

    container: str
    video_codec: str
    width: int
    height: int
    rotation: int
    fps: float
    n_frames: int
    duration_s: float
    has_audio: bool
    audio_sample_rate: int | None
    pix_fmt: str = ""
    n_video_streams: int = 1
    interlaced: bool = False
    start_s: float = 0.0
    frames_from_header: bool = True
    header_doubt: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class DecodedFrame(NamedTuple):
    """One decoded frame: stream index, seconds from the first frame, RGB uint8 image [H, W, 3]."""

    index: int
    time_s: float
    image: np.ndarray
