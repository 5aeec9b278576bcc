"""Clip planning and clip assembly.

The planners are pure functions from (frame count, fps, spec) to `ClipPlan`s, after PyTorchVideo's clip
samplers: `uniform_clips` (a constant number of evenly spaced clips), `center_clip`, `sliding_windows`
(a stride, covering the whole video) and `random_clips` (seeded, for training). They keep no state:
the same arguments always give the same plans. `window_frames` finds the frames inside a labelled window
(Kinetics' time_start-time_end), over which a video is then planned.

Every planner first lays an output frame grid at `target_fps` (default: the video's own rate) over the
source frames, so a 60 fps video planned at 15 fps takes every 4th source frame; a clip is `clip_len`
consecutive grid frames. A video shorter than one clip is padded by repeating its last frame
(indices 0, 1, 2, 2, 2), never dropped. Given `times` (each frame's presentation time, from the stream's
real timeline), the grid is laid in seconds instead and takes the frame nearest each grid time, so a
variable-rate video planned at 15 fps gets a frame every 1/15 s of real time, held through its gaps.

`assemble_clips` turns a decoder's ascending frame stream into clips as they complete, holding only
the frames that clips still waiting need.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from flows.media import DecodedFrame

# Slack for float rounding in the grid size ((n-1)·target_fps/fps may land a hair under an integer).
_EPS = 1e-6


@dataclass(frozen=True)
class ClipPlan:
    """One clip to cut: source frame indices (non-decreasing) and nominal times of its first/last frame.

    `start_s`/`end_s` are `index / fps`, or the frames' `times` when planned over them; the dataflow replaces
    them with the decoded timestamps.
    """

    clip_index: int
    frame_indices: tuple[int, ...]
    start_s: float
    end_s: float


# --- planners ---------------------------------------------------------------------------------------


def uniform_clips(
    n_frames: int,
    fps: float,
    clip_len: int,
    num_clips: int,
    target_fps: float | None = None,
    *,
    times: Sequence[float] | None = None,
) -> list[ClipPlan]:
    """`num_clips` clips spread evenly over the video (the centres of `num_clips` equal segments).

    Exactly `num_clips` plans, always: when the video holds fewer distinct clip starts than that,
    some clips repeat.
    """
    grid = _Grid.of(n_frames, fps, clip_len, target_fps, times)
    _check_int("num_clips", num_clips, 1)
    starts = [(grid.n_starts * (2 * j + 1)) // (2 * num_clips) for j in range(num_clips)]
    return grid.plans(starts)


def center_clip(
    n_frames: int,
    fps: float,
    clip_len: int,
    target_fps: float | None = None,
    *,
    times: Sequence[float] | None = None,
) -> list[ClipPlan]:
    """The one clip in the middle of the video (a list, like every planner)."""
    return uniform_clips(n_frames, fps, clip_len, 1, target_fps, times=times)


def sliding_windows(
    n_frames: int,
    fps: float,
    clip_len: int,
    stride: int,
    target_fps: float | None = None,
    *,
    times: Sequence[float] | None = None,
) -> list[ClipPlan]:
    """Windows every `stride` output frames from frame 0, the last one aligned to the video's end.

    Every output frame lies in some window (so `stride` may not exceed `clip_len`), and no window
    repeats. A video shorter than one clip gives one padded window.
    """
    grid = _Grid.of(n_frames, fps, clip_len, target_fps, times)
    _check_int("stride", stride, 1)
    if stride > clip_len:
        raise ValueError(f"stride: must be <= clip_len ({clip_len}) so windows cover the video, got {stride}")
    last = grid.n_starts - 1
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return grid.plans(starts)


def random_clips(
    n_frames: int,
    fps: float,
    clip_len: int,
    num_clips: int,
    seed: int,
    target_fps: float | None = None,
    *,
    times: Sequence[float] | None = None,
) -> list[ClipPlan]:
    """`num_clips` clips at random starts drawn from `seed` alone, numbered in time order.

    Starts are distinct while the video has enough of them, else drawn with replacement. Use
    `video_seed(seed, key)` to give every video its own stream from one run seed.
    """
    grid = _Grid.of(n_frames, fps, clip_len, target_fps, times)
    _check_int("num_clips", num_clips, 1)
    _check_int("seed", seed, 0)
    rng = np.random.default_rng(int(seed))
    if num_clips <= grid.n_starts:
        starts = rng.choice(grid.n_starts, size=num_clips, replace=False)
    else:
        starts = rng.integers(0, grid.n_starts, size=num_clips)
    return grid.plans(sorted(int(s) for s in starts))


def window_frames(times: Sequence[float], window_s: tuple[float, float]) -> tuple[int, int] | None:
    """(first, stop) indices of the frames whose times lie in the (start, end) window, up to rounding of
    stored times; None when no frame does. Planning over `times[first:stop]` draws clips inside it."""
    seconds = np.asarray(times, dtype=np.float64)
    start, end = window_s
    inside = np.flatnonzero((seconds >= start - _EPS) & (seconds <= end + _EPS))
    return (int(inside[0]), int(inside[-1]) + 1) if inside.size else None


def video_seed(seed: int, key: str) -> int:
    """A per-video seed from a run seed and a stable video key (same inputs, same seed, any process)."""
    digest = hashlib.sha256(f"{int(seed)}\n{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def needed_frames(plans: Iterable[ClipPlan]) -> list[int]:
    """Sorted unique source indices the plans read: what to decode, in one ascending pass."""
    return sorted({i for plan in plans for i in plan.frame_indices})


def grid_frames(
    n_frames: int, fps: float, target_fps: float | None = None, *, times: Sequence[float] | None = None
) -> int:
    """How many output frames the video has at the target rate (fewer than a clip's: its clip is padded)."""
    return _Grid.of(n_frames, fps, 1, target_fps, times).n_out


def shifted(plans: Iterable[ClipPlan], offset: int) -> list[ClipPlan]:
    """The plans with every source index moved by `offset`: plans made over a timeline's frames from
    `offset` on (the frames before it cannot decode) as indices of the whole stream."""
    _check_int("offset", offset, 0)
    return [
        ClipPlan(p.clip_index, tuple(i + offset for i in p.frame_indices), p.start_s, p.end_s) for p in plans
    ]


@dataclass(frozen=True)
class _Grid:
    """The output frame grid of one video at the target rate."""

    n_frames: int
    fps: float
    clip_len: int
    step: float  # source frames per output frame (without times)
    n_out: int  # output frames on the grid
    times: np.ndarray | None = None  # each source frame's presentation time, when planned in real time
    target_fps: float | None = None

    @classmethod
    def of(
        cls,
        n_frames: int,
        fps: float,
        clip_len: int,
        target_fps: float | None,
        times: Sequence[float] | None = None,
    ) -> _Grid:
        _check_int("n_frames", n_frames, 1)
        _check_rate("fps", fps)
        _check_int("clip_len", clip_len, 1)
        if target_fps is not None:
            _check_rate("target_fps", target_fps)
        if times is not None:
            seconds = _check_times(times, int(n_frames))
            if target_fps is None:  # every frame, whatever its spacing
                return cls(int(n_frames), float(fps), int(clip_len), 1.0, int(n_frames), seconds, None)
            n_out = math.floor((seconds[-1] - seconds[0]) * float(target_fps) + _EPS) + 1
            return cls(int(n_frames), float(fps), int(clip_len), 1.0, n_out, seconds, float(target_fps))
        rate = float(target_fps) if target_fps is not None else float(fps)
        step = float(fps) / rate
        n_out = math.floor((int(n_frames) - 1) / step + _EPS) + 1
        return cls(int(n_frames), float(fps), int(clip_len), step, n_out)

    @property
    def n_starts(self) -> int:
        """How many clip starts fit (at least one: a short video gets one padded clip)."""
        return max(1, self.n_out - self.clip_len + 1)

    def plans(self, starts: Sequence[int]) -> list[ClipPlan]:
        out = []
        for clip_index, start in enumerate(starts):
            grid = np.minimum(np.arange(start, start + self.clip_len), self.n_out - 1)
            indices = tuple(int(i) for i in self._sources(grid))
            if self.times is None:
                first_s, last_s = indices[0] / self.fps, indices[-1] / self.fps
            else:
                first_s, last_s = float(self.times[indices[0]]), float(self.times[indices[-1]])
            out.append(ClipPlan(clip_index, indices, first_s, last_s))
        return out

    def _sources(self, grid: np.ndarray) -> np.ndarray:
        """The nearest source frame to each grid point: 29.97 → 15 fps takes every 2nd frame."""
        if self.times is None:
            return np.minimum(np.floor(grid * self.step + 0.5).astype(np.int64), self.n_frames - 1)
        if self.target_fps is None:
            return grid
        wanted = self.times[0] + grid / self.target_fps
        after = np.minimum(np.searchsorted(self.times, wanted), self.n_frames - 1)
        before = np.maximum(after - 1, 0)
        closer_before = (wanted - self.times[before]) <= (self.times[after] - wanted)
        return np.where(closer_before, before, after)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")


def _check_times(times: Sequence[float], n_frames: int) -> np.ndarray:
    seconds = np.asarray(times, dtype=np.float64)
    if seconds.shape != (n_frames,):
        raise ValueError(f"times: must hold one time per frame ({n_frames}), got shape {seconds.shape}")
    if not np.all(np.isfinite(seconds)) or np.any(np.diff(seconds) <= 0):
        raise ValueError("times: must be finite and strictly increasing")
    return seconds


def _check_rate(name: str, value: object) -> None:
    is_number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    if not (is_number and math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")


# --- assembly ---------------------------------------------------------------------------------------


class AssembledClip(NamedTuple):
    """A decoded clip: its plan, frames uint8 [T, H, W, 3] and each frame's time in seconds [T]."""

    plan: ClipPlan
    frames: np.ndarray
    times_s: np.ndarray


class ClipAssembly:
    """Iterator of `AssembledClip`s cut from an ascending stream of decoded frames.

    A clip is yielded as soon as the stream has passed its last frame, so clips come in order of their
    last frame index (ties by clip_index); for the plans made here that is clip_index order. Only
    frames that a clip still waiting needs are held. Frames missing from the stream (skipped corrupt
    packets, a truncated file) are filled within their clip by the previous decoded frame of the clip
    (the first one, for leading gaps); a clip none of whose frames arrived is not yielded.

    After iteration, `decoded_frames` of `planned_frames` tells how complete the video was.
    """

    def __init__(self, plans: Iterable[ClipPlan], frames: Iterable[DecodedFrame]) -> None:
        self.plans = list(plans)
        for plan in self.plans:
            if not isinstance(plan, ClipPlan) or not plan.frame_indices:
                raise ValueError(f"plans: expected ClipPlans with at least one frame, got {plan!r}")
        self.planned_frames = len(needed_frames(self.plans))
        self.decoded_frames = 0
        self._buffer: dict[int, DecodedFrame] = {}
        self._run = self._assemble(iter(frames))

    @property
    def buffered_indices(self) -> list[int]:
        """Source indices of the frames held right now."""
        return sorted(self._buffer)

    @property
    def complete(self) -> bool:
        """Whether every planned frame arrived (meaningful once iteration has finished)."""
        return self.decoded_frames == self.planned_frames

    def __iter__(self) -> ClipAssembly:
        return self

    def __next__(self) -> AssembledClip:
        return next(self._run)

    def _assemble(self, frames: Iterator[DecodedFrame]) -> Iterator[AssembledClip]:
        order = sorted(self.plans, key=lambda p: (max(p.frame_indices), p.clip_index))
        users: dict[int, int] = {}  # index -> clips still waiting that read it
        for plan in order:
            for i in set(plan.frame_indices):
                users[i] = users.get(i, 0) + 1
        done = 0
        previous = -1
        for frame in frames:
            index = int(frame.index)
            if index <= previous:
                raise ValueError(f"frames: index {index} came after {previous}; frames must be ascending")
            previous = index
            if index in users:
                self._buffer[index] = frame
                self.decoded_frames += 1
            while done < len(order) and max(order[done].frame_indices) <= index:
                clip = self._take(order[done], users)
                done += 1
                if clip is not None:
                    yield clip
        # The stream ended: clips still waiting get what arrived, padded.
        for plan in order[done:]:
            clip = self._take(plan, users)
            if clip is not None:
                yield clip

    def _take(self, plan: ClipPlan, users: dict[int, int]) -> AssembledClip | None:
        """Build one clip from the buffer, then release the frames no waiting clip needs."""
        got = [self._buffer.get(i) for i in plan.frame_indices]
        clip = None
        first = next((f for f in got if f is not None), None)
        if first is not None:
            filled, last = [], first
            for frame in got:
                last = frame if frame is not None else last
                filled.append(last)
            clip = AssembledClip(
                plan,
                np.stack([f.image for f in filled]),
                np.array([f.time_s for f in filled], dtype=np.float64),
            )
        for i in set(plan.frame_indices):
            users[i] -= 1
            if users[i] == 0:
                del users[i]
                self._buffer.pop(i, None)
        return clip


def assemble_clips(plans: Iterable[ClipPlan], frames: Iterable[DecodedFrame]) -> ClipAssembly:
    """Clips from a decoder's frames (ascending indices); see `ClipAssembly` for order and padding."""
    return ClipAssembly(plans, frames)
