"""A stream's real timeline, from the demux pass every decode makes anyway (`pyav_decoder.scan`): which
frames are there, when, and which of them can decode; and where the header's claims disagree with it.

A header can lie (no or a bogus frame rate, a duration the bytes cannot hold, a frame count of the file
it was cut from); the packets cannot. A video whose header is doubted, or disagrees with its packets, or
runs at an irregular rate is planned over this timeline (`planned_times`) instead of duration × fps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from flows.media import VideoInfo
from flows.pyav_decoder import FrameTable

# The packets may hold this many frames, or this fraction, more or fewer than the header says (rounding,
# an edit list dropping a frame) before the header's count is called wrong.
COUNT_TOLERANCE = 2
COUNT_TOLERANCE_FRACTION = 0.02
# A stream ends this much (seconds, or fraction of the claim) before its header's duration: truncated.
# Audio outlasting the video accounts for the slack.
TRUNCATION_SLACK_S = 2.0
TRUNCATION_SLACK_FRACTION = 0.1
# A gap between frames this many times the typical (median) gap, or a gap this much shorter: the rate
# is variable enough that planning by frame count would put clips at the wrong seconds.
IRREGULAR_GAP_RATIO = 3.0
# The probe's first frame time is a float of the same timestamp: far under any frame gap.
FIRST_FRAME_SLACK_S = 1e-4


@dataclass(frozen=True)
class Timeline:
    """Every frame's presentation time in index order, in seconds from the stream's first timestamp (the
    origin of every clip's `start_s`), and the index of the first frame that can decode: a stream cut
    mid-GOP starts with frames whose keyframe is missing. That is the first frame the probe decoded, not
    the first packet flagged a keyframe: the flags miss frames that do decode (VVC's leading pictures)."""

    times_s: np.ndarray
    first: int
    origin_s: float  # the stream's first timestamp, in the stream's own clock

    @classmethod
    def of(cls, table: FrameTable, info: VideoInfo) -> Timeline | None:
        """The timeline of a scanned stream; None when its frames are counted, not timed (AVI, interlaced)."""
        if table.pts is None or not len(table.pts):
            return None
        origin_s = float(table.pts[0] * table.time_base)
        times = table.times_s()
        # info.start_s: the time of the first frame the probe decoded, on the stream's clock.
        first = int(np.searchsorted(times, info.start_s - origin_s - FIRST_FRAME_SLACK_S))
        return cls(times, min(first, len(times) - 1), origin_s)

    @property
    def planned_times(self) -> np.ndarray:
        """The times of the frames that can decode, the ones clips are planned over."""
        return self.times_s[self.first :]

    @property
    def n_frames(self) -> int:
        return len(self.times_s) - self.first

    @property
    def typical_gap_s(self) -> float:
        gaps = np.diff(self.planned_times)
        return float(np.median(gaps)) if len(gaps) else 0.0

    @property
    def fps(self) -> float:
        """The typical frame rate (of the median gap: a few long pauses do not slow it), 0 for one frame."""
        gap = self.typical_gap_s
        return 1.0 / gap if gap > 0 else 0.0

    @property
    def duration_s(self) -> float:
        """From the first decodable frame to the end of the last one (shown for a typical gap)."""
        times = self.planned_times
        return float(times[-1] - times[0]) + self.typical_gap_s

    def irregularity(self) -> str:
        """Why the frame rate is too variable to plan by frame count, or ""."""
        gaps = np.diff(self.planned_times)
        gap = self.typical_gap_s
        if gap <= 0 or (gaps.max() <= IRREGULAR_GAP_RATIO * gap and gaps.min() >= gap / IRREGULAR_GAP_RATIO):
            return ""
        return f"variable frame rate: gaps of {gaps.min() * 1000:.0f} to {gaps.max() * 1000:.0f} ms"

    def disagreements(self, info: VideoInfo) -> list[str]:
        """Where the probed header's frame count or rate disagrees with the packets ([] when they agree);
        what is missing from the stream is `losses`."""
        out = []
        tolerance = max(COUNT_TOLERANCE, COUNT_TOLERANCE_FRACTION * self.n_frames)
        if abs(info.n_frames - self.n_frames) > tolerance:
            out.append(f"the header says {info.n_frames} frames, the stream holds {self.n_frames}")
        irregular = self.irregularity()
        if irregular:
            out.append(irregular)
        return out

    def losses(self, info: VideoInfo) -> list[str]:
        """What of the video is not there to decode: why its status is partial ([] when nothing is lost)."""
        out = []
        if self.first:
            out.append(f"cut mid-GOP: the {self.first} frames before its first keyframe cannot decode")
        claimed = info.duration_s
        if claimed - self.duration_s > max(TRUNCATION_SLACK_S, TRUNCATION_SLACK_FRACTION * claimed):
            held = self.duration_s
            out.append(f"truncated: the header says {claimed:.1f} s, the stream holds {held:.1f} s")
        return out

    def corrected(self, info: VideoInfo, doubts: list[str]) -> VideoInfo:
        """The probe facts with frame count, rate and duration as the stream really has them."""
        return replace(
            info,
            n_frames=self.n_frames,
            fps=self.fps or info.fps,
            duration_s=self.duration_s,
            frames_from_header=False,
            start_s=self.origin_s,  # clip times count from here, and so must the audio
            header_doubt="; ".join(doubts),
        )
