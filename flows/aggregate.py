"""Clip predictions → per-video rows of the analyst tables (pure numpy; no Ray, no I/O).

One `VideoClips` holds a video's clip predictions for one model, in time order; `summarize` turns it into a
`VideoSummary` (video-level class probabilities, action segments, sentiment per video and per segment,
highlights), and `table_rows` into rows of `classifications`, `actions`, `sentiment` and `highlights`.
The evaluation job scores the same `VideoSummary`, so what is evaluated is exactly what is tagged.

Window → segment merging and the SumMe / TVSum knapsack shot selection live here (jobs import flows,
never the reverse); `jobs.evaluation` scores them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Heads with a table of their own; every other classification head goes to `classifications`.
ACTION_HEAD = "action"
SENTIMENT_HEAD = "sentiment"
VALENCE_HEAD = "valence"
IMPORTANCE_HEAD = "importance"
STEPS_SUFFIX = "_steps"
BACKGROUND = "none"


@dataclass(frozen=True)
class Segment:
    """A labelled time span in seconds with a confidence score."""

    start_s: float
    end_s: float
    label: Hashable = ""
    score: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start_s) and math.isfinite(self.end_s)) or self.end_s < self.start_s:
            raise ValueError(
                f"segment: start_s={self.start_s}, end_s={self.end_s} must be finite, start <= end"
            )

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


# --- windows → segments -------------------------------------------------------------------------------


def segments_from_windows(
    window_labels: Sequence[Hashable],
    window_times: np.ndarray | Sequence[tuple[float, float]],
    background_label: Hashable,
    window_scores: Sequence[float] | None = None,
) -> list[Segment]:
    """Merge runs of consecutive windows with the same non-background label into segments.

    Windows come in time order (`window_times` [W, 2] start and end, starts non-decreasing); a segment
    spans its first window's start to the latest end in its run, and its score is the mean of the run's
    window scores (1.0 when none are given).
    """
    times = np.asarray(window_times, dtype=np.float64).reshape(-1, 2)
    n = len(window_labels)
    if times.shape[0] != n:
        raise ValueError(f"segments_from_windows: {n} labels but {times.shape[0]} window times")
    scores = np.ones(n) if window_scores is None else np.asarray(window_scores, dtype=np.float64)
    if scores.shape != (n,):
        raise ValueError(f"segments_from_windows: {n} labels but {scores.shape} scores")
    if n and (np.any(times[:, 1] < times[:, 0]) or np.any(np.diff(times[:, 0]) < 0)):
        raise ValueError("segments_from_windows: windows must have start <= end and come in time order")

    segments: list[Segment] = []
    i = 0
    while i < n:
        j = i + 1
        while j < n and window_labels[j] == window_labels[i]:
            j += 1
        if window_labels[i] != background_label:
            end, score = float(times[i:j, 1].max()), float(scores[i:j].mean())
            segments.append(Segment(float(times[i, 0]), end, window_labels[i], score))
        i = j
    return segments


# --- highlights: the SumMe / TVSum shot selection -----------------------------------------------------


def knapsack(values: Sequence[float], weights: Sequence[int], capacity: int) -> list[int]:
    """Indices (ascending) of the items of greatest total value whose total weight is at most `capacity`.

    The exact 0/1 knapsack by dynamic programming over integer weights, O(items × capacity): the shot
    selection step of the SumMe / TVSum summary protocol (Zhang et al. 2016; VASNet, Fajtl et al. 2018).
    Items of non-positive value are never taken, so importance scores should be >= 0 (e.g. sigmoids).
    """
    values = np.asarray(values, dtype=np.float64)
    weights = np.asarray(weights)
    if values.shape != weights.shape or values.ndim != 1:
        raise ValueError(
            f"knapsack: values and weights must be 1-D of one length, got {values.shape}, {weights.shape}"
        )
    if weights.size and (not np.issubdtype(weights.dtype, np.integer) or weights.min() < 0):
        raise ValueError("knapsack: weights must be non-negative integers")
    if capacity < 0:
        raise ValueError(f"knapsack: capacity={capacity} must be >= 0")

    best = np.zeros(capacity + 1)  # best[c]: greatest value with total weight <= c
    take = np.zeros((len(values), capacity + 1), dtype=bool)
    for i, (value, weight) in enumerate(zip(values, weights.astype(np.int64), strict=True)):
        if value <= 0 or weight > capacity:
            continue
        with_item = best[: capacity + 1 - weight] + value
        better = with_item > best[weight:]
        take[i, weight:] = better
        best[weight:] = np.where(better, with_item, best[weight:])
    chosen, c = [], capacity
    for i in range(len(values) - 1, -1, -1):
        if take[i, c]:
            chosen.append(i)
            c -= int(weights[i])
    return sorted(chosen)


def fixed_shots(duration_s: float, shot_s: float = 2.0) -> list[tuple[float, float]]:
    """Consecutive shots of `shot_s` seconds covering [0, duration_s] (the last one may be shorter)."""
    if duration_s <= 0 or shot_s <= 0:
        raise ValueError(f"fixed_shots: duration_s={duration_s} and shot_s={shot_s} must be > 0")
    n = max(1, math.ceil(duration_s / shot_s - 1e-9))
    return [(i * shot_s, min((i + 1) * shot_s, duration_s)) for i in range(n)]


def default_shot_s(duration_s: float, budget: float = 0.15, resolution_s: float = 0.1) -> float:
    """2 s shots, or shorter ones (whole steps, at least one) when the budget would hold fewer than three."""
    steps = math.floor(min(2.0, budget * duration_s / 3) / resolution_s + 1e-9)
    return max(1, steps) * resolution_s


def select_highlights(
    importance: Sequence[float],
    step_times: Sequence[float],
    duration_s: float,
    budget: float = 0.15,
    shots: Sequence[tuple[float, float]] | None = None,
    shot_s: float | None = None,
    resolution_s: float = 0.1,
) -> list[Segment]:
    """The shots a summary keeps: a 0/1 knapsack over shots, value = mean importance, weight = duration.

    `importance[i]` holds from `step_times[i]` (ascending) until the next step. Time is cut into
    `resolution_s` steps; the total duration kept is at most `budget` × the video's. Without `shots`,
    fixed shots of `shot_s` seconds (default `default_shot_s`). Returns
    `Segment(start, end, "highlight", mean importance)`, most important first (the table's rank order).
    """
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"select_highlights: budget={budget} must be in (0, 1]")
    grid = TimeGrid(duration_s, resolution_s)
    step_values = grid.spread(importance, step_times)
    if shots is None:
        shots = fixed_shots(duration_s, shot_s or default_shot_s(duration_s, budget, resolution_s))
    spans = list(shots)
    masks = [grid.mask([(start, end)]) for start, end in spans]
    weights = np.array([int(m.sum()) for m in masks], dtype=np.int64)
    values = np.array([float(step_values[m].mean()) if m.any() else 0.0 for m in masks])
    chosen = knapsack(values, weights, math.floor(budget * grid.n + 1e-9))
    selected = [
        Segment(float(spans[i][0]), float(spans[i][1]), "highlight", float(values[i])) for i in chosen
    ]
    return sorted(selected, key=lambda s: (-s.score, s.start_s))


class TimeGrid:
    """[0, duration) cut into equal steps; a step belongs to a span when its centre falls inside it."""

    def __init__(self, duration_s: float, resolution_s: float) -> None:
        if not duration_s > 0 or not resolution_s > 0:
            raise ValueError(
                f"highlights: duration_s={duration_s} and resolution_s={resolution_s} must be > 0"
            )
        self.n = max(1, math.ceil(duration_s / resolution_s - 1e-9))
        self.centres = (np.arange(self.n) + 0.5) * resolution_s

    def mask(self, spans: Sequence[tuple[float, float]] | Any) -> np.ndarray:
        out = np.zeros(self.n, dtype=bool)
        for start, end in spans:
            out |= (self.centres >= start) & (self.centres < end)
        return out

    def spread(self, values: Sequence[float], times: Sequence[float]) -> np.ndarray:
        values, times = np.asarray(values, dtype=np.float64), np.asarray(times, dtype=np.float64)
        if values.ndim != 1 or values.shape != times.shape or values.size == 0:
            shapes = f"{values.shape}, {times.shape}"
            raise ValueError(f"highlights: importance and step_times must be 1-D of one length, got {shapes}")
        if np.any(np.diff(times) < 0):
            raise ValueError("highlights: step_times must be ascending")
        index = np.clip(np.searchsorted(times, self.centres, side="right") - 1, 0, values.size - 1)
        return values[index]


# --- one video's clips → its summary ------------------------------------------------------------------


@dataclass(frozen=True)
class AggregateConfig:
    """How clip predictions become table rows.

    `top_k` labels per classification head; `smooth_frames` is the width of the moving average over
    per-frame action probabilities (removes one-frame flickers); `min_action_s` drops shorter action
    segments (see `action_segments`); `highlight_budget` is the summary's share of the video.
    """

    top_k: int = 5
    smooth_frames: int = 5
    min_action_s: float = 0.0
    highlight_budget: float = 0.15

    def __post_init__(self) -> None:
        checks = [
            ("top_k", self.top_k >= 1, "must be >= 1"),
            ("smooth_frames", self.smooth_frames >= 1, "must be >= 1"),
            ("min_action_s", self.min_action_s >= 0, "must be >= 0"),
            ("highlight_budget", 0 < self.highlight_budget <= 1, "must be in (0, 1]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"aggregate config: {name}={getattr(self, name)!r} {why}")


@dataclass
class VideoClips:
    """One video's clip predictions from one model, in any order (`summarize` sorts them by time).

    `outputs[head]` is [N, K] probabilities for a classification head, [N] for a scalar head, and
    [N, T, K] per-frame probabilities for "<head>_steps".
    """

    start_s: np.ndarray
    end_s: np.ndarray
    outputs: dict[str, np.ndarray]
    duration_s: float | None = None

    def sorted(self) -> VideoClips:
        order = np.argsort(self.start_s, kind="stable")
        return VideoClips(
            self.start_s[order],
            self.end_s[order],
            {k: np.asarray(v)[order] for k, v in self.outputs.items()},
            self.duration_s,
        )


@dataclass
class VideoSummary:
    """What one model says about one video."""

    classes: dict[str, np.ndarray] = field(default_factory=dict)  # head -> mean probabilities [K]
    actions: list[Segment] = field(default_factory=list)
    sentiment: tuple[int, float] | None = None  # (label index, probability)
    valence: float | None = None
    sentiment_segments: list[tuple[float, float, int, float, float | None]] = field(default_factory=list)
    importance: tuple[np.ndarray, np.ndarray] | None = None  # (clip start times, importance)
    highlights: list[tuple[Segment, float]] = field(default_factory=list)  # (shot, keyframe_s)


def summarize(
    clips: VideoClips, heads: Mapping[str, Sequence[str]], config: AggregateConfig = AggregateConfig()
) -> VideoSummary:
    """A video's summary from its clip predictions under a model whose spec has `heads`."""
    clips = clips.sorted()
    out = VideoSummary()
    if not len(clips.start_s):
        return out
    duration = clips.duration_s or float(clips.end_s.max())
    for head, labels in heads.items():
        if not labels or head == ACTION_HEAD or head not in clips.outputs:
            continue
        out.classes[head] = np.asarray(clips.outputs[head], dtype=np.float64).mean(axis=0)
    if ACTION_HEAD in heads and (ACTION_HEAD in clips.outputs or ACTION_HEAD + STEPS_SUFFIX in clips.outputs):
        out.actions = action_segments(clips, list(heads[ACTION_HEAD]), config)
    if SENTIMENT_HEAD in out.classes:
        probs = out.classes[SENTIMENT_HEAD]
        out.sentiment = (int(probs.argmax()), float(probs.max()))
        per_clip = np.asarray(clips.outputs[SENTIMENT_HEAD], dtype=np.float64)
        valence = clips.outputs.get(VALENCE_HEAD)
        for i in range(len(clips.start_s)):
            v = float(valence[i]) if valence is not None else None
            label = int(per_clip[i].argmax())
            out.sentiment_segments.append(
                (float(clips.start_s[i]), float(clips.end_s[i]), label, float(per_clip[i, label]), v)
            )
    if VALENCE_HEAD in clips.outputs:
        out.valence = float(np.mean(clips.outputs[VALENCE_HEAD]))
    if IMPORTANCE_HEAD in clips.outputs and duration > 0:
        starts = np.asarray(clips.start_s, dtype=np.float64)
        values = np.asarray(clips.outputs[IMPORTANCE_HEAD], dtype=np.float64)
        out.importance = (starts, values)
        shots = select_highlights(values, starts, duration, budget=config.highlight_budget)
        out.highlights = [(shot, keyframe(shot, clips, values)) for shot in shots]
    return out


def keyframe(shot: Segment, clips: VideoClips, importance: np.ndarray) -> float:
    """The time inside `shot` of the most important clip overlapping it: the centre of that clip's part
    inside the shot (the summarizer scores clips, so that is the finest keyframe it can name)."""
    overlap = np.minimum(clips.end_s, shot.end_s) - np.maximum(clips.start_s, shot.start_s)
    inside = np.flatnonzero(overlap > 0)
    if not len(inside):
        return (shot.start_s + shot.end_s) / 2
    best = inside[np.argmax(importance[inside])]
    lo, hi = max(clips.start_s[best], shot.start_s), min(clips.end_s[best], shot.end_s)
    return float((lo + hi) / 2)


def action_segments(clips: VideoClips, labels: Sequence[str], config: AggregateConfig) -> list[Segment]:
    """Action segments from per-frame action probabilities (per-step outputs where the model has them,
    else each clip's probabilities on all its frames; frames shared by overlapping windows averaged, then
    smoothed over `smooth_frames`).

    With a background label, segments come in two stages, actionness grouping then classification (the
    TAG proposals of SSN, Zhao et al. 2017): a run of frames whose background probability is below one
    half is an action, and its label is the best action over the run's mean probabilities. Labelling
    every frame on its own instead cuts one action into pieces wherever the model wavers between two
    similar actions for a few frames, and each piece then misses the true segment. A run is split where
    another action takes over for longer than one model window and `min_action_s` (shorter stretches
    join their longer neighbour), and runs shorter than `min_action_s` are dropped. Without a background
    label every frame takes its best label and runs of one label make the segments.
    """
    steps = clips.outputs.get(ACTION_HEAD + STEPS_SUFFIX)
    n = len(clips.start_s)
    if steps is None:
        clip_probs = np.asarray(clips.outputs[ACTION_HEAD], dtype=np.float64)
        steps = np.repeat(clip_probs[:, None, :], 2, axis=1)  # the clip's label at its first and last frame
    steps = np.asarray(steps, dtype=np.float64)
    t = steps.shape[1]
    times = np.concatenate(
        [np.linspace(clips.start_s[i], clips.end_s[i], t) if t > 1 else [clips.start_s[i]] for i in range(n)]
    )
    probs = steps.reshape(-1, steps.shape[-1])
    # Frames decoded by two overlapping windows share a time: average their probabilities.
    keys = np.round(times, 4)
    unique, inverse = np.unique(keys, return_inverse=True)
    sums = np.zeros((len(unique), probs.shape[1]))
    np.add.at(sums, inverse, probs)
    frame_probs = sums / np.bincount(inverse, minlength=len(unique))[:, None]
    if config.smooth_frames > 1 and len(unique) > 1:
        frame_probs = _moving_average(frame_probs, config.smooth_frames)
    step = float(np.median(np.diff(unique))) if len(unique) > 1 else float(clips.end_s[-1] - clips.start_s[0])
    ends = np.append(unique[1:], unique[-1] + step)
    if BACKGROUND not in labels:
        best = frame_probs.argmax(axis=1)
        scores = frame_probs[np.arange(len(best)), best]
        windows = np.stack([unique, ends], axis=1)
        segments = segments_from_windows([labels[i] for i in best], windows, None, scores)
        return [s for s in segments if s.duration_s >= config.min_action_s]

    background = list(labels).index(BACKGROUND)
    # The model labels each window on its own, so it can get a whole window wrong: another action must
    # hold for longer than one window (and than `min_action_s`) to cut a run in two.
    window_s = float(np.median(clips.end_s - clips.start_s)) + step
    split_s = max(config.min_action_s, window_s + step / 2)
    actions = frame_probs.copy()
    actions[:, background] = -np.inf  # the best action of each frame, whatever the background's share
    segments = []
    for first, stop in _runs(frame_probs[:, background] < 0.5):
        pieces = _runs_of_labels(actions[first:stop].argmax(axis=1))
        lengths = [ends[first + b - 1] - unique[first + a] for a, b in pieces]
        while len(pieces) > 1 and min(lengths) < split_s:
            k = int(np.argmin(lengths))  # the shortest piece joins its longer neighbour
            j = k - 1 if k == len(pieces) - 1 or (k > 0 and lengths[k - 1] >= lengths[k + 1]) else k + 1
            lo, hi = min(k, j), max(k, j)
            pieces[lo : hi + 1] = [(pieces[lo][0], pieces[hi][1])]
            lengths[lo : hi + 1] = [ends[first + pieces[lo][1] - 1] - unique[first + pieces[lo][0]]]
        for (a, b), length in zip(pieces, lengths, strict=True):
            if length < config.min_action_s:
                continue
            mean = actions[first + a : first + b].mean(axis=0)
            label = int(mean.argmax())
            segments.append(
                Segment(
                    float(unique[first + a]), float(ends[first + b - 1]), labels[label], float(mean[label])
                )
            )
    return segments


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first, stop) index ranges of the runs of True in a 1-D boolean array."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def _runs_of_labels(values: np.ndarray) -> list[tuple[int, int]]:
    """(first, stop) index ranges of the runs of equal values in a non-empty 1-D array."""
    cuts = np.flatnonzero(np.diff(values) != 0) + 1
    bounds = np.concatenate([[0], cuts, [len(values)]]).tolist()
    return list(itertools.pairwise(bounds))


def _moving_average(values: np.ndarray, width: int) -> np.ndarray:
    """Centered moving average along axis 0, edges averaged over the frames that exist."""
    kernel = np.ones(width)
    padded = np.apply_along_axis(lambda c: np.convolve(c, kernel, mode="same"), 0, values)
    counts = np.convolve(np.ones(len(values)), kernel, mode="same")[:, None]
    return padded / counts


# --- summary → table rows -----------------------------------------------------------------------------


def table_rows(
    summary: VideoSummary, heads: Mapping[str, Sequence[str]], top_k: int = 5
) -> dict[str, list[dict[str, Any]]]:
    """Rows (without the video, model and run columns) of the four prediction tables for one video."""
    rows: dict[str, list[dict[str, Any]]] = {
        "classifications": [],
        "actions": [],
        "sentiment": [],
        "highlights": [],
    }
    for head, probs in summary.classes.items():
        if head == SENTIMENT_HEAD:
            continue
        order = np.argsort(-probs, kind="stable")[: min(top_k, len(probs))]
        for rank, index in enumerate(order, start=1):
            rows["classifications"].append(
                {"head": head, "label": heads[head][index], "score": float(probs[index]), "rank": rank}
            )
    for seg in summary.actions:
        rows["actions"].append(
            {"label": str(seg.label), "start_s": seg.start_s, "end_s": seg.end_s, "score": seg.score}
        )
    if summary.sentiment is not None:
        names = heads[SENTIMENT_HEAD]
        label, score = summary.sentiment
        rows["sentiment"].append(
            {"scope": "video", "label": names[label], "score": score, "valence": summary.valence,
             "start_s": None, "end_s": None}
        )  # fmt: skip
        for start, end, seg_label, seg_score, valence in summary.sentiment_segments:
            rows["sentiment"].append(
                {"scope": "segment", "label": names[seg_label], "score": seg_score, "valence": valence,
                 "start_s": start, "end_s": end}
            )  # fmt: skip
    for rank, (shot, key_s) in enumerate(summary.highlights, start=1):
        rows["highlights"].append(
            {"rank": rank, "start_s": shot.start_s, "end_s": shot.end_s, "importance": shot.score,
             "keyframe_s": key_s}
        )  # fmt: skip
    return rows
