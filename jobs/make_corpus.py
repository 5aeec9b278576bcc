"""Generate a synthetic labelled video corpus: H.264 + AAC MP4 files, sidecar subtitles and `labels.parquet`.

Every label is drawn from a numpy Generator seeded by (seed, video index), so video i is the same file
whatever the number of videos or of the processes rendering them, and the labels are rendered into the
pixels and the sound so that small models can learn them:

- category: the scene — background texture and colours, and the shape of the one object in it;
- actions: timed segments in which the camera slides sideways, bounces up and down, spins (rolls back
  and forth) or shakes, with motion blur; the picture is still outside them;
- sentiment / valence: the grade of the whole picture (dark, cold and grey → bright, warm and vivid) and
  the pitch and harmony of a sustained chord (low dissonant cluster → high major triad);
- highlights: still sparkles and a thin gold frame over the picture, and a louder chord with a high chime.

Usage: `main(CorpusConfig(out="corpus/", videos=200, seed=0, broken=6))`. Videos render in spawned
processes, so a script that calls it needs the usual `if __name__ == "__main__":` guard (or `workers=1`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flows import storage
from flows.labels import ACTION_TYPE, HIGHLIGHT_TYPE
from jobs.output import console, stage

CATEGORIES = ("ball_sports", "traffic", "nature", "cooking", "music")
SENTIMENTS = ("negative", "neutral", "positive")
ACTIONS = ("slide", "bounce", "spin", "shake")
BROKEN_KINDS = (
    "zero_bytes", "garbage_bytes", "truncated_mp4", "text_as_mkv", "garbage_packets", "audio_only",
)

# Valence is drawn inside each class with a margin from the ±1/3 boundaries so that the label is unambiguous.
VALENCE_RANGES = {"negative": (-0.95, -0.45), "neutral": (-0.2, 0.2), "positive": (0.45, 0.95)}
SUBTITLE_WORDS = {
    "positive": ("great", "wonderful", "happy", "love", "amazing", "beautiful", "fantastic", "delightful",
                 "excellent", "joyful", "brilliant", "perfect"),
    "negative": ("terrible", "awful", "sad", "hate", "horrible", "ugly", "miserable", "disappointing",
                 "dreadful", "angry", "worst", "painful"),
    "neutral": ("ordinary", "normal", "usual", "plain", "average", "typical", "regular", "standard",
                "moderate", "routine"),
}
SUBTITLE_OPENERS = (
    "this looks", "the scene is", "it feels", "honestly it is", "today it was", "so far it is",
)

# (frequency ratio to the root, level): a major triad, a bare octave, and a cluster with a minor second
# and a tritone; the root is 220 Hz · 2^valence, so pitch alone already orders the videos by valence.
HARMONY = {
    "positive": ((1.0, 1.0), (5 / 4, 0.8), (3 / 2, 0.8)),
    "neutral": ((1.0, 1.0), (2.0, 0.5)),
    "negative": ((1.0, 1.0), (16 / 15, 0.9), (45 / 32, 0.8)),
}

# The object's colour belongs to the category (a red ball, a blue car, ...), not to chance, so that it
# does not blur the sentiment grade of the picture.
OBJECT_COLORS = {
    "ball_sports": (225, 60, 50), "traffic": (40, 90, 220), "nature": (30, 110, 40),
    "cooking": (190, 190, 200), "music": (240, 190, 40),
}

LABELS_FILE = "labels.parquet"
BROKEN_FILE = "broken.parquet"
GENERATOR_VERSION = 1

MIN_ACTION_S, MAX_ACTION_S, MIN_ACTION_GAP_S, EDGE_S = 1.8, 2.8, 1.0, 0.3
SHUTTER_SAMPLES = 4
AAC_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium")
# Videos per rendering process at least, by default: a process takes about a second to start.
VIDEOS_PER_WORKER = 4
MIN_HIGHLIGHT_S, MAX_HIGHLIGHT_S, MIN_HIGHLIGHT_GAP_S = 1.0, 1.6, 0.5


@dataclass(frozen=True)
class CorpusConfig:
    """What to generate. `out` is a local folder, `file://` URI or `s3://bucket/prefix`."""

    out: str
    videos: int = 24
    seed: int = 0
    broken: int = 0
    size: int = 128
    duration_s: float = 6.0
    fps: int = 15
    audio: bool = True
    subtitle_fraction: float = 0.5
    audio_rate: int = 16000
    crf: int = 23
    preset: str = "veryfast"
    workers: int | None = None  # rendering processes; None: one per core, at most one per 4 videos
    progress: bool = True

    def __post_init__(self) -> None:
        def whole(value: object, low: int, high: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

        def number(value: object, low: float, high: float) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high

        checks = {
            "videos": (whole(self.videos, 0, 1_000_000), "a whole number from 0 to 1000000"),
            "seed": (whole(self.seed, 0, 2**63 - 1), "a non-negative whole number"),
            "broken": (whole(self.broken, 0, 100_000), "a whole number from 0 to 100000"),
            "size": (whole(self.size, 32, 1080) and self.size % 2 == 0, "an even pixel count, 32 to 1080"),
            "duration_s": (number(self.duration_s, 3.0, 600.0), "3 to 600 seconds (room for an action)"),
            "fps": (whole(self.fps, 5, 60), "a whole number from 5 to 60"),
            "audio": (isinstance(self.audio, bool), "true or false"),
            "subtitle_fraction": (number(self.subtitle_fraction, 0.0, 1.0), "a fraction from 0 to 1"),
            "audio_rate": (self.audio_rate in AAC_RATES, f"an AAC sample rate, one of {AAC_RATES}"),
            "crf": (whole(self.crf, 0, 51), "an x264 quality from 0 to 51"),
            "preset": (self.preset in X264_PRESETS, f"an x264 preset, one of {X264_PRESETS}"),
            "workers": (self.workers is None or whole(self.workers, 1, 1024), "a whole number, 1 to 1024"),
        }
        try:
            storage.canonical_uri(self.out)
        except ValueError as err:
            raise ValueError(f"out: {err}") from None
        for name, (ok, must_be) in checks.items():
            if not ok:
                raise ValueError(f"{name}: must be {must_be}, got {getattr(self, name)!r}")
        if self.videos + self.broken == 0:
            raise ValueError("videos: nothing to generate (videos and broken are both 0)")

    @property
    def n_frames(self) -> int:
        return round(self.duration_s * self.fps)

    @property
    def processes(self) -> int:
        """Processes that render the videos (this one alone when there are few)."""
        wanted = self.workers or min(os.cpu_count() or 1, self.videos // VIDEOS_PER_WORKER)
        return max(1, min(wanted, self.videos))


@dataclass(frozen=True)
class Segment:
    """A labelled time span in seconds, both ends on frame times (frame k is at k / fps)."""

    start_s: float
    end_s: float
    label: str = ""


@dataclass(frozen=True)
class Move:
    """How the camera moves during one action segment.

    slide / bounce / spin: a triangle wave (constant speed) of `amplitude` px or rad with `cycles` half
    periods; shake: two fast sines (`freq` Hz in x, 1.21 × that in y) of `amplitude` px.
    """

    amplitude: float
    cycles: int = 1
    sign: int = 1
    freq: float = 0.0
    phase: float = 0.0


@dataclass(frozen=True)
class Cue:
    start_s: float
    end_s: float
    text: str


@dataclass(frozen=True)
class VideoPlan:
    """Everything about one video: its labels and the nuisance parameters that render them."""

    index: int
    file: str
    category: str
    sentiment: str
    valence: float
    actions: tuple[Segment, ...]
    highlights: tuple[Segment, ...]
    cues: tuple[Cue, ...]
    # Nuisance: where the object stands, how big, its colour, the scene's layout, how the camera moves.
    center: tuple[float, float]
    radius: float
    color: tuple[float, float, float]
    moves: tuple[Move, ...]  # one per action segment
    scene: dict[str, float]  # layout parameters in 0..1 (stripe period, lane positions, ...)

    @property
    def subtitle_file(self) -> str | None:
        return str(Path(self.file).with_suffix(".srt")) if self.cues else None


def video_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """A generator that depends only on (seed, index, stream), so video i does not depend on N."""
    return np.random.default_rng([seed, stream, index])


def frame_time(k: int, fps: int) -> float:
    return round(k / fps, 6)


def place_segments(
    rng: np.random.Generator, n_frames: int, fps: int, n: int, min_s: float, max_s: float,
    min_gap_s: float, edge_s: float,
) -> list[tuple[int, int]]:
    """Up to n non-overlapping segments as (first, last) frame indices, with gaps between them."""
    last = (n_frames - 1) / fps
    while n > 0 and n * min_s + (n - 1) * min_gap_s + 2 * edge_s > last:
        n -= 1
    if n == 0:
        return []
    lengths = rng.uniform(min_s, max_s, size=n)
    budget = last - 2 * edge_s - (n - 1) * min_gap_s
    if lengths.sum() > budget:
        lengths = min_s + (lengths - min_s) * (budget - n * min_s) / (lengths.sum() - n * min_s)
    slack = budget - lengths.sum()
    gaps = rng.dirichlet(np.ones(n + 1)) * slack
    spans, t = [], edge_s + gaps[0]
    for i in range(n):
        first = math.ceil(t * fps - 1e-9)
        end = min(first + max(1, math.floor(lengths[i] * fps)), n_frames - 1)
        spans.append((first, end))
        t = end / fps + min_gap_s + gaps[i + 1]
    return spans


def plan_video(config: CorpusConfig, index: int) -> VideoPlan:
    """Draw the labels and rendering parameters of video `index` (a pure function of seed and index)."""
    # Category × sentiment is balanced within each block of 15 consecutive videos.
    block_rng = video_rng(config.seed, index // 15, stream=1)
    combo = int(block_rng.permutation(15)[index % 15])
    category, sentiment = CATEGORIES[combo % 5], SENTIMENTS[combo // 5]
    rng = video_rng(config.seed, index)
    valence = round(float(rng.uniform(*VALENCE_RANGES[sentiment])), 4)
    fps, size = config.fps, config.size

    spans = place_segments(rng, config.n_frames, fps, int(rng.integers(1, 4)), MIN_ACTION_S, MAX_ACTION_S,
                           MIN_ACTION_GAP_S, EDGE_S)
    labels = [ACTIONS[int(i)] for i in rng.integers(0, len(ACTIONS), size=len(spans))]
    actions = tuple(
        Segment(frame_time(a, fps), frame_time(b, fps), label)
        for (a, b), label in zip(spans, labels, strict=True)
    )
    moves = []
    for seg in actions:
        if seg.label == "shake":  # a jitter that changes direction every two or three frames
            moves.append(Move(float(rng.uniform(0.025, 0.035) * size), freq=float(rng.uniform(2.8, 3.4)),
                              phase=float(rng.uniform(0, 2 * math.pi))))
            continue
        # Constant speed, turning back ~1.6 times a second, so that every 16-frame window inside a segment
        # sees fast, motion-blurred movement; the amplitude follows from the speed.
        length = seg.end_s - seg.start_s
        cycles = max(1, round(length * rng.uniform(1.4, 1.9)))
        speed = {"slide": 0.6 * size, "bounce": 0.6 * size, "spin": 1.8}[seg.label]  # px/s or rad/s
        amplitude = speed * rng.uniform(0.85, 1.15) * length / (2 * cycles)
        sign = int(rng.choice([-1, 1])) if seg.label != "bounce" else 1
        moves.append(Move(float(amplitude), cycles, sign))

    n_high = int(rng.integers(1, 3))
    highlights = tuple(
        Segment(frame_time(a, fps), frame_time(b, fps))
        for a, b in place_segments(rng, config.n_frames, fps, n_high, MIN_HIGHLIGHT_S, MAX_HIGHLIGHT_S,
                                   MIN_HIGHLIGHT_GAP_S, 0.2)
    )

    radius = float(rng.uniform(0.16, 0.21) * size)
    cx, cy = (float(c) for c in rng.uniform(radius * 1.15, size - radius * 1.15, size=2))
    color = tuple(float(c) for c in np.clip(np.add(OBJECT_COLORS[category], rng.uniform(-15, 15, 3)), 0, 255))
    scene = {k: float(v) for k, v in zip("abcdef", rng.uniform(0, 1, size=6), strict=True)}

    # Golden-ratio sequence: any prefix of N videos holds subtitles for N·fraction of them (±1), and video
    # i's choice does not depend on N.
    offset = video_rng(config.seed, 0, stream=2).uniform()
    has_subtitles = (offset + index * 0.6180339887498949) % 1.0 < config.subtitle_fraction
    cues = plan_cues(rng, sentiment, config.duration_s) if has_subtitles else ()
    return VideoPlan(
        index=index, file=f"video_{index:05d}.mp4", category=category, sentiment=sentiment, valence=valence,
        actions=actions, highlights=highlights, cues=cues, center=(cx, cy), radius=radius, color=color,
        moves=tuple(moves), scene=scene,
    )


def plan_cues(rng: np.random.Generator, sentiment: str, duration_s: float) -> tuple[Cue, ...]:
    """A few subtitle cues spread over the video, each with two words of the sentiment's vocabulary."""
    n = max(1, min(4, int(duration_s // 2)))
    slot = duration_s / n
    cues = []
    for i in range(n):
        length = rng.uniform(0.5, 0.85) * slot
        start = i * slot + rng.uniform(0, slot - length)
        words = rng.choice(SUBTITLE_WORDS[sentiment], size=2, replace=False)
        opener = SUBTITLE_OPENERS[int(rng.integers(len(SUBTITLE_OPENERS)))]
        cues.append(Cue(round(start, 3), round(start + length, 3), f"{opener} {words[0]} and {words[1]}"))
    return tuple(cues)


# --- pictures ----------------------------------------------------------------------------------------------


def render_scene(
    plan: VideoPlan, u: np.ndarray, v: np.ndarray, noise: np.ndarray, mottle: np.ndarray,
) -> np.ndarray:
    """The category's scene at scene coordinates (u right, v down, 0..1 across the frame at rest).

    Float32 RGB in 0..255, before the sentiment grade. Every texture is a function of (u, v), so the
    camera can pan, tilt, roll and shake over it without running out of picture.
    """
    s = plan.scene
    img = np.empty((*u.shape, 3), np.float32)
    if plan.category == "ball_sports":  # mowed pitch: light/dark bands and white lines
        period = 0.14 + 0.1 * s["a"]
        band = ((v / period + s["b"]) % 1.0 < 0.5).astype(np.float32)
        img[:] = np.array([45, 135, 50], np.float32) + band[..., None] * np.array([20, 35, 15], np.float32)
        line = (np.abs(u - (0.2 + 0.6 * s["c"])) < 0.012) | (np.abs(v - (0.1 + 0.8 * s["d"])) < 0.012)
        img[line] = 235
    elif plan.category == "traffic":  # asphalt with dashed yellow lane markings
        img[:] = 85 + 10 * s["a"]
        for lane in (0.25 + 0.2 * s["b"], 0.65 + 0.2 * s["c"]):
            dash = (np.abs(v - lane) < 0.02) & (((u + s["d"]) / 0.16) % 1.0 < 0.55)
            img[dash] = (230, 200, 40)
        img[np.abs(v - 0.04) < 0.015] = 225
    elif plan.category == "nature":  # sky gradient over grass, a low sun
        horizon = 0.5 + 0.25 * s["a"]
        sky = np.array([120, 175, 235], np.float32) - 60 * np.clip(v, 0, 1)[..., None] * np.array(
            [1, 0.6, 0.2], np.float32)
        grass = np.array([55, 140, 55], np.float32) + 25 * np.sin(40 * u + 7 * v)[..., None]
        img[:] = np.where((v < horizon)[..., None], sky, grass)
        sun = (u - (0.15 + 0.7 * s["b"])) ** 2 + (v - 0.12) ** 2 < 0.006
        img[sun] = (250, 240, 170)
    elif plan.category == "cooking":  # checkerboard tiles
        tile = 0.1 + 0.08 * s["a"]
        checker = ((np.floor(u / tile + s["b"]) + np.floor(v / tile + s["c"])) % 2).astype(np.float32)
        img[:] = np.array([225, 210, 170], np.float32) + checker[..., None] * np.array([-60, -110, -105])
    else:  # music: dark stage with equalizer bars along the bottom
        img[:] = (55, 25, 80)
        n_bars = 8 + int(6 * s["a"])
        bar = np.floor(u * n_bars)
        heights = 0.15 + 0.35 * np.abs(np.sin(bar * 2.3 + 10 * s["b"]))
        on = ((1 - v) < heights) & ((u * n_bars) % 1.0 < 0.7)
        img[on] = (230, 60, 200)
    img += np.array([s["e"], s["f"], s["a"]], np.float32) * 10 - 5
    # The object, two-tone (the half at x > 0 darker) with a dark rim, so that a roll shows on any shape.
    size = noise.shape[0]
    x = (u * size - plan.center[0]) / plan.radius
    y = (plan.center[1] - v * size) / plan.radius
    inside = shape_mask(plan.category, x, y)
    img[shape_mask(plan.category, x / 1.15, y / 1.15) & ~inside] = (20, 20, 20)
    img[inside & (x <= 0)] = plan.color
    img[inside & (x > 0)] = np.array(plan.color, np.float32) * 0.5
    # Grain and a coarse mottling fixed to the scene: texture everywhere, so that the camera's motion shows
    # over the whole picture and not only where the scene has edges.
    img += noise[np.floor(v * size).astype(np.int64) % size, np.floor(u * size).astype(np.int64) % size]
    img += bilinear_wrap(mottle, u, v)[..., None]
    return img


def bilinear_wrap(grid: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sample a small periodic grid at (u, v) in 0..1 (wrapping) with bilinear interpolation."""
    n = grid.shape[0]
    gu, gv = u * n, v * n
    i0, j0 = np.floor(gv).astype(np.int64), np.floor(gu).astype(np.int64)
    fv, fu = (gv - i0).astype(np.float32), (gu - j0).astype(np.float32)
    i0, j0 = i0 % n, j0 % n
    i1, j1 = (i0 + 1) % n, (j0 + 1) % n
    top = grid[i0, j0] * (1 - fu) + grid[i0, j1] * fu
    bottom = grid[i1, j0] * (1 - fu) + grid[i1, j1] * fu
    return top * (1 - fv) + bottom * fv


def shape_mask(category: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Inside test for the category's object in local coordinates (unit radius, y up)."""
    if category == "ball_sports":  # ball
        return x * x + y * y <= 1.0
    if category == "traffic":  # car body
        return (np.abs(x) <= 1.0) & (np.abs(y) <= 0.55)
    if category == "nature":  # tree: triangle pointing up
        return (y >= -0.5) & (y <= 1.0 - 1.73 * np.abs(x))
    if category == "cooking":  # pot: a thick ring
        r2 = x * x + y * y
        return (r2 <= 1.0) & (r2 >= 0.3)
    theta = np.arctan2(y, x)  # music: five-pointed star
    return np.sqrt(x * x + y * y) <= 0.55 + 0.45 * np.cos(5 * theta) ** 2


def camera_pose(plan: VideoPlan, t: float) -> tuple[float, float, float]:
    """Shift x, y (px) and roll (rad) of the camera at time t; (0, 0, 0) outside action segments."""
    dx = dy = angle = 0.0
    for seg, move in zip(plan.actions, plan.moves, strict=True):
        length = seg.end_s - seg.start_s
        tau = t - seg.start_s
        if not 0.0 < tau < length:
            continue
        if seg.label == "shake":
            # Quick ramps in and out, so the shake starts and stops without a jump.
            ramp = move.amplitude * min(1.0, tau / 0.1, (length - tau) / 0.1)
            dx += ramp * math.sin(2 * math.pi * move.freq * tau + move.phase)
            dy += ramp * math.sin(2 * math.pi * 1.21 * move.freq * tau + 2 * move.phase)
            continue
        # A triangle wave: constant speed, and back at rest at the segment's end, so nothing jumps.
        triangle = 2 / math.pi * math.asin(math.sin(math.pi * move.cycles * tau / length))
        wave = move.sign * move.amplitude * triangle
        if seg.label == "slide":
            dx += wave
        elif seg.label == "bounce":
            dy -= abs(wave)
        else:
            angle += wave
    return dx, dy, angle


def grade(img: np.ndarray, valence: float, gain_jitter: float) -> np.ndarray:
    """The sentiment grade: negative is dark, cold and grey, positive bright, warm and vivid."""
    gray = img.mean(axis=2, keepdims=True)
    saturation = 0.75 + 0.3 * valence
    gain = 0.7 + 0.3 * valence + gain_jitter
    warm = 36.0 * valence
    out = gain * (gray + saturation * (img - gray))
    out += np.array([warm, 0.3 * warm, -warm], np.float32)
    return out


def render_frames(plan: VideoPlan, config: CorpusConfig) -> Iterator[np.ndarray]:
    """Yield the video's RGB uint8 frames one at a time (memory stays one frame whatever the length)."""
    size, fps = config.size, config.fps
    rng = video_rng(config.seed, plan.index, stream=3)
    noise = rng.normal(0, 4, size=(size, size, 3)).astype(np.float32)
    mottle = rng.uniform(-14, 14, size=(10, 10)).astype(np.float32)
    gain_jitter = float(rng.uniform(-0.02, 0.02))
    py, px = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5 - size / 2
    sparkle_r = max(1, round(size / 64))
    offsets = np.array([(dy, dx) for dy in range(-2 * sparkle_r, 2 * sparkle_r + 1)
                        for dx in range(-2 * sparkle_r, 2 * sparkle_r + 1)
                        if abs(dy) <= sparkle_r // 2 or abs(dx) <= sparkle_r // 2])
    # Highlight overlay: sparkles that hold still for the segment (so they are not mistaken for an action)
    # and a thin gold frame.
    sparkles = []
    for _ in plan.highlights:
        pts = (rng.integers(0, size, size=(24, 2))[:, None, :] + offsets[None]).reshape(-1, 2)
        sparkles.append(pts[(pts >= 0).all(axis=1) & (pts < size).all(axis=1)])
    width = max(1, size // 100)
    border = np.zeros((size, size), bool)
    border[:width] = border[-width:] = border[:, :width] = border[:, -width:] = True
    # The scene is rendered once on a canvas wide enough for every camera move (a roll shows corners 0.21
    # frame widths out, a pan moves 0.25 at most), then each frame samples it through the camera transform.
    pad = round(0.5 * size)
    cv, cu = (np.mgrid[0:size + 2 * pad, 0:size + 2 * pad].astype(np.float32) + 0.5 - pad) / size
    canvas = render_scene(plan, cu, cv, noise, mottle)
    rest = (0.0, 0.0, 0.0)
    still = None
    for k in range(config.n_frames):
        t = k / fps
        # An open shutter: the frame averages the scene over its whole interval, so a moving camera blurs
        # along its motion (a cue a per-frame CNN sees too), and a still one renders once.
        poses = [camera_pose(plan, t + (j + 0.5 - SHUTTER_SAMPLES / 2) / (SHUTTER_SAMPLES * fps))
                 for j in range(SHUTTER_SAMPLES)]
        if all(pose == rest for pose in poses) and still is not None:
            img = still.copy()
        else:
            img = np.zeros((size, size, 3), np.float32)
            for dx, dy, angle in poses:
                # Inverse camera transform: which canvas pixel each output pixel sees.
                qx, qy = px - dx, py - dy
                ca, sa = math.cos(angle), math.sin(angle)
                col = np.floor(ca * qx + sa * qy + size / 2 + pad).astype(np.int64)
                row = np.floor(-sa * qx + ca * qy + size / 2 + pad).astype(np.int64)
                img += canvas[np.clip(row, 0, len(canvas) - 1), np.clip(col, 0, len(canvas) - 1)]
            img /= SHUTTER_SAMPLES
            if all(pose == rest for pose in poses):
                still = img.copy()
        for h, pts in zip(plan.highlights, sparkles, strict=True):
            if h.start_s - 1e-6 <= t <= h.end_s + 1e-6:
                img[pts[:, 0], pts[:, 1]] = (255, 250, 190)
                img[border] = (255, 215, 60)
        # The grade goes over everything, highlights included, so no part of a frame contradicts its mood.
        yield np.clip(grade(img, plan.valence, gain_jitter), 0, 255).astype(np.uint8)


# --- sound -------------------------------------------------------------------------------------------------


def render_audio(plan: VideoPlan, config: CorpusConfig) -> np.ndarray:
    """Mono float32 samples: a chord whose pitch rises with valence, louder with a chime during highlights."""
    rng = video_rng(config.seed, plan.index, stream=4)
    sr = config.audio_rate
    t = np.arange(round(config.duration_s * sr), dtype=np.float64) / sr
    f0 = 220.0 * 2.0 ** plan.valence * rng.uniform(0.98, 1.02)
    tone = sum(
        level * np.sin(2 * np.pi * f0 * ratio * t + rng.uniform(0, 2 * np.pi))
        for ratio, level in HARMONY[plan.sentiment]
    )
    tone *= 0.12 * rng.uniform(0.9, 1.1)
    gain = np.ones_like(t)
    for h in plan.highlights:
        gain = np.maximum(gain, 1 + 1.5 * np.clip(np.minimum(t - h.start_s, h.end_s - t) / 0.03 + 0.5, 0, 1))
    high = gain > 1.0
    chime = np.sin(2 * np.pi * rng.uniform(2200, 2600) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 6 * t))
    samples = tone * gain + 0.08 * chime * (gain - 1) / 1.5 * high
    samples += rng.normal(0, 0.004, size=t.shape)
    return np.clip(samples, -1, 1).astype(np.float32)


# --- files -------------------------------------------------------------------------------------------------


def encode_mp4(
    target: str | io.BytesIO,
    frames: Iterable[np.ndarray] | None,
    audio: np.ndarray | None,
    config: CorpusConfig,
    size: int | None = None,
) -> None:
    """Encode RGB frames (and mono audio) to H.264 yuv420p + AAC in MP4, single-threaded so bytes repeat."""
    size = size or config.size
    with av.open(target, "w", format="mp4") as container:
        video = None
        if frames is not None:
            video = container.add_stream(
                "libx264", rate=config.fps,
                options={"crf": str(config.crf), "preset": config.preset, "g": str(2 * config.fps)},
            )
            video.width = video.height = size
            video.pix_fmt = "yuv420p"
            video.codec_context.thread_count = 1
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=config.audio_rate, layout="mono")
            sound.bit_rate = 32000
        if video is not None:
            for k, image in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = k
                container.mux(video.encode(frame))
            container.mux(video.encode())
        if sound is not None:
            chunk = 1024
            for start in range(0, len(audio), chunk):
                samples = audio[None, start:start + chunk]
                frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
                frame.sample_rate = config.audio_rate
                frame.pts = start
                container.mux(sound.encode(frame))
            container.mux(sound.encode())


def srt_text(cues: tuple[Cue, ...]) -> str:
    """SubRip text for the cues."""

    def stamp(s: float) -> str:
        ms = round(s * 1000)
        return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"

    blocks = (f"{i}\n{stamp(c.start_s)} --> {stamp(c.end_s)}\n{c.text}\n" for i, c in enumerate(cues, 1))
    return "\n".join(blocks)


def broken_bytes(config: CorpusConfig, k: int) -> tuple[str, str, bytes]:
    """The k-th unreadable file: (kind, extension, content); kinds cycle through BROKEN_KINDS."""
    kind = BROKEN_KINDS[k % len(BROKEN_KINDS)]
    rng = video_rng(config.seed, k, stream=5)
    small = CorpusConfig(out="-", size=64, duration_s=3.0, fps=config.fps, audio_rate=config.audio_rate)

    def valid_mp4(with_video: bool = True) -> bytes:
        buf = io.BytesIO()
        frames = (rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(small.n_frames))
        audio = (0.1 * np.sin(np.arange(3 * small.audio_rate) * 0.05)).astype(np.float32)
        encode_mp4(buf, frames if with_video else None, audio, small, size=64)
        return buf.getvalue()

    if kind == "zero_bytes":
        return kind, ".mp4", b""
    if kind == "garbage_bytes":
        return kind, ".mp4", rng.bytes(int(rng.integers(20_000, 60_000)))
    if kind == "truncated_mp4":  # the moov atom sits after mdat, so cutting mid-file loses it
        data = valid_mp4()
        return kind, ".mp4", data[: data.rfind(b"moov") // 2]
    if kind == "text_as_mkv":
        return kind, ".mkv", b"This is not a video. It is a text file with a video extension.\n" * 20
    if kind == "garbage_packets":  # a valid container whose media payload is noise
        data = bytearray(valid_mp4())
        start = data.find(b"mdat") + 4
        end = data.rfind(b"moov") - 4
        data[start:end] = rng.bytes(end - start)
        return kind, ".mp4", bytes(data)
    return kind, ".mp4", valid_mp4(with_video=False)  # audio_only: no video stream at all


LABELS_SCHEMA = pa.schema([
    ("file", pa.string()),
    ("category", pa.string()),
    ("sentiment", pa.string()),
    ("valence", pa.float64()),
    ("actions", ACTION_TYPE),
    ("highlights", HIGHLIGHT_TYPE),
    ("duration_s", pa.float64()),
    ("fps", pa.float64()),
    ("n_frames", pa.int32()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("has_audio", pa.bool_()),
    ("has_subtitles", pa.bool_()),
    ("subtitle_file", pa.string()),
    ("index", pa.int32()),
    ("seed", pa.int64()),
])
BROKEN_SCHEMA = pa.schema([("file", pa.string()), ("kind", pa.string()), ("size_bytes", pa.int64())])


def labels_table(plans: list[VideoPlan], config: CorpusConfig) -> pa.Table:
    rows = [
        {
            "file": p.file, "category": p.category, "sentiment": p.sentiment, "valence": p.valence,
            "actions": [{"label": s.label, "start_s": s.start_s, "end_s": s.end_s} for s in p.actions],
            "highlights": [{"start_s": s.start_s, "end_s": s.end_s} for s in p.highlights],
            "duration_s": config.n_frames / config.fps, "fps": float(config.fps), "n_frames": config.n_frames,
            "width": config.size, "height": config.size, "has_audio": config.audio,
            "has_subtitles": bool(p.cues), "subtitle_file": p.subtitle_file,
            "index": p.index, "seed": config.seed,
        }
        for p in plans
    ]
    # The class lists travel with the labels so that a model's class indices do not depend on which
    # classes a small corpus happens to contain.
    meta = {
        "categories": CATEGORIES, "sentiments": SENTIMENTS, "actions": ACTIONS,
        "generator_version": GENERATOR_VERSION,
        "config": {k: v for k, v in asdict(config).items() if k not in ("out", "progress", "workers")},
    }
    schema = LABELS_SCHEMA.with_metadata({"reelflow.corpus": json.dumps(meta)})
    return pa.Table.from_pylist(rows, schema=schema)


STALE_NAME = re.compile(r"^(video_\d{5,}\.(mp4|srt)|broken_\d{3,}\.\w+)$")


def remove_stale(out: str, keep: set[str]) -> None:
    """Delete files an earlier, larger run of this generator left in `out` (only names it writes).

    Otherwise a rerun with fewer videos, or another seed, would leave videos that labels.parquet does
    not describe, or sidecar subtitles beside the wrong video.
    """
    for uri in storage.list_files(out):
        name = uri[len(out) + 1:]
        if STALE_NAME.match(name) and name not in keep:
            storage.remove(uri)


def write_video(plan: VideoPlan, config: CorpusConfig, folder: str) -> list[str]:
    """Render and encode one planned video (and its subtitle sidecar) into `folder`; the names written."""
    audio = render_audio(plan, config) if config.audio else None
    encode_mp4(os.path.join(folder, plan.file), render_frames(plan, config), audio, config)
    if not plan.subtitle_file:
        return [plan.file]
    Path(folder, plan.subtitle_file).write_text(srt_text(plan.cues), encoding="utf-8")
    return [plan.file, plan.subtitle_file]


def main(config: CorpusConfig) -> str:
    """Generate the corpus into `config.out` and return the URI of its labels.parquet."""
    out = storage.canonical_uri(config.out)
    remote = storage.is_s3(out)
    if not remote and os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out: {out} is a file, not a folder")
    # S3 gets a finished local tree in one upload; a local folder is written in place.
    staging = Path(tempfile.mkdtemp(prefix="reelflow-corpus-") if remote else out)
    staging.mkdir(parents=True, exist_ok=True)
    plans = [plan_video(config, i) for i in range(config.videos)]
    written = {LABELS_FILE, BROKEN_FILE}
    broken_rows = []
    try:
        with stage("make-corpus", total=config.videos + config.broken, quiet=not config.progress) as progress:
            write = functools.partial(write_video, config=config, folder=str(staging))
            with contextlib.ExitStack() as stack:
                if config.processes > 1:
                    # spawn, not fork: callers may hold threads (Ray, progress bars)
                    context = multiprocessing.get_context("spawn")
                    pool = stack.enter_context(ProcessPoolExecutor(config.processes, mp_context=context))
                    files = pool.map(write, plans)
                else:
                    files = map(write, plans)
                for names in files:
                    written.update(names)
                    progress.add(videos=1)
            for k in range(config.broken):
                kind, ext, data = broken_bytes(config, k)
                name = f"broken_{k:03d}{ext}"
                (staging / name).write_bytes(data)
                written.add(name)
                broken_rows.append({"file": name, "kind": kind, "size_bytes": len(data)})
                progress.add(videos=1)
        pq.write_table(pa.Table.from_pylist(broken_rows, schema=BROKEN_SCHEMA), staging / BROKEN_FILE)
        # labels.parquet goes last: its presence says the videos it lists are all there.
        if remote:
            storage.upload_dir(str(staging), out)
        pq.write_table(labels_table(plans, config), staging / LABELS_FILE)
        if remote:
            storage.put_file(str(staging / LABELS_FILE), storage.join_uri(out, LABELS_FILE))
    finally:
        if remote:
            shutil.rmtree(staging, ignore_errors=True)
    remove_stale(out, written)
    console.print(f"make-corpus: {config.videos} videos and {config.broken} broken files in {out}")
    return storage.join_uri(out, LABELS_FILE)
