"""Evaluation metrics: pure numpy functions, each following a published protocol.

- categories: top-k accuracy;
- actions: windows → segments, and segment precision / recall / F1 at a temporal IoU (ActivityNet matching);
- sentiment: accuracy and valence mean absolute error;
- highlights: knapsack shot selection under a 15 % duration budget and per-time-step F1 against the
  ground-truth highlight mask (the SumMe / TVSum protocol of Zhang et al. 2016, as evaluated by VASNet);
- per-class confusion matrix and precision / recall / F1 / support.

The tag job uses `segments_from_windows` and `select_highlights` to write its `actions` and `highlights`
rows, so what is evaluated is exactly what is tagged.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Two IoUs this close count as equal, so that a segment exactly at the threshold matches despite rounding
# (e.g. 0.1 s steps: (0.3 - 0.1) / (0.5 - 0.1) is 0.49999999999999994 in binary floating point).
IOU_TOLERANCE = 1e-9


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


# --- classification -----------------------------------------------------------------------------------


def topk_accuracy(probs: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of samples whose true class is among the `k` highest scores (top-k accuracy).

    The standard ImageNet / Kinetics top-1 / top-5 metric. `probs` is [N, C] (probabilities or logits:
    only the order matters), `labels` [N] class indices. Ties go to the lower class index (a stable sort),
    so constant scores do not count as correct for every class. With `k >= C` every sample is correct.
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(
            f"topk_accuracy: probs [N, C] and labels [N] expected, got {probs.shape}, {labels.shape}"
        )
    if probs.shape[0] == 0:
        raise ValueError("topk_accuracy: no samples")
    if k < 1:
        raise ValueError(f"topk_accuracy: k={k} must be >= 1")
    _check_classes("topk_accuracy", labels, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, : min(k, probs.shape[1])]
    return float((top == labels[:, None]).any(axis=1).mean())


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """[n_classes, n_classes] int64 counts: row = true class, column = predicted (scikit-learn's order)."""
    labels, preds = _pair("confusion_matrix", labels, preds)
    _check_classes("confusion_matrix", labels, n_classes)
    _check_classes("confusion_matrix", preds, n_classes)
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (labels.astype(np.int64), preds.astype(np.int64)), 1)
    return cm


def per_class_report(labels: np.ndarray, preds: np.ndarray, class_names: Sequence[str]) -> dict[str, dict]:
    """Precision, recall, F1 and support for each class name (a class never predicted has precision 0).

    The same definitions as scikit-learn's `classification_report` with `zero_division=0`.
    """
    cm = confusion_matrix(labels, preds, len(class_names))
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    report = {}
    for i, name in enumerate(class_names):
        precision = float(tp[i] / predicted[i]) if predicted[i] else 0.0
        recall = float(tp[i] / support[i]) if support[i] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report[str(name)] = {"precision": precision, "recall": recall, "f1": f1, "support": int(support[i])}
    return report


# --- sentiment ----------------------------------------------------------------------------------------


def sentiment_accuracy(true_labels: Sequence[Hashable], pred_labels: Sequence[Hashable]) -> float:
    """Fraction of videos whose predicted sentiment class equals the true one (3-class accuracy)."""
    true, pred = _pair("sentiment_accuracy", true_labels, pred_labels)
    return float((true == pred).mean())


def valence_mae(true_valence: Sequence[float], pred_valence: Sequence[float]) -> float:
    """Mean absolute error of the predicted valence (the regression metric of continuous affect tasks)."""
    true, pred = _pair("valence_mae", true_valence, pred_valence)
    return float(np.abs(true.astype(np.float64) - pred.astype(np.float64)).mean())


# --- action segments ----------------------------------------------------------------------------------


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


def temporal_iou(a: Segment, b: Segment) -> float:
    """Intersection over union of two time spans (0 when both are empty)."""
    inter = max(0.0, min(a.end_s, b.end_s) - max(a.start_s, b.start_s))
    union = max(a.end_s, b.end_s) - min(a.start_s, b.start_s)
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class SegmentCounts:
    """Matched (true positive), predicted and true segment counts; add them up over videos."""

    matched: int = 0
    predicted: int = 0
    true: int = 0

    def __add__(self, other: SegmentCounts) -> SegmentCounts:
        return SegmentCounts(
            self.matched + other.matched, self.predicted + other.predicted, self.true + other.true
        )

    def scores(self) -> dict[str, float]:
        """precision, recall and f1; with no predictions or no true segments, 1 if both are empty, else 0."""
        precision = self.matched / self.predicted if self.predicted else float(self.true == 0)
        recall = self.matched / self.true if self.true else float(self.predicted == 0)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"precision": precision, "recall": recall, "f1": f1}


def match_segments(pred: Iterable[Segment], true: Iterable[Segment], iou: float = 0.5) -> SegmentCounts:
    """Greedy one-to-one matching of predicted to true segments of the same label at IoU >= `iou`.

    ActivityNet detection matching (Heilbron et al. 2015, `compute_average_precision_detection`):
    predictions in decreasing score order each take the unmatched true segment of their label with the
    highest IoU, if that IoU reaches the threshold; every other prediction is a false positive.
    """
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"match_segments: iou={iou} must be in (0, 1]")
    pred = sorted(pred, key=lambda s: -s.score)  # stable: equal scores keep their given order
    true = list(true)
    taken = [False] * len(true)
    matched = 0
    for p in pred:
        best, best_iou = -1, -1.0
        for j, t in enumerate(true):
            if taken[j] or t.label != p.label:
                continue
            overlap = temporal_iou(p, t)
            if overlap > best_iou:
                best, best_iou = j, overlap
        if best >= 0 and best_iou >= iou - IOU_TOLERANCE:
            taken[best] = True
            matched += 1
    return SegmentCounts(matched, len(pred), len(true))


def segment_f1(pred: Iterable[Segment], true: Iterable[Segment], iou: float = 0.5) -> dict[str, float]:
    """precision / recall / f1 of one video's predicted segments (see `match_segments`).

    For a corpus, add up `match_segments` over videos and call `.scores()` (micro-averaging).
    """
    return match_segments(pred, true, iou).scores()


# --- highlights ---------------------------------------------------------------------------------------


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
    """Consecutive shots of `shot_s` seconds covering [0, duration_s] (the last one may be shorter).

    The stand-in for KTS shot boundaries when a video has none: SumMe / TVSum select whole shots.
    """
    if duration_s <= 0 or shot_s <= 0:
        raise ValueError(f"fixed_shots: duration_s={duration_s} and shot_s={shot_s} must be > 0")
    n = max(1, math.ceil(duration_s / shot_s - 1e-9))
    return [(i * shot_s, min((i + 1) * shot_s, duration_s)) for i in range(n)]


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

    `importance[i]` holds from `step_times[i]` (ascending) until the next step, as VASNet spreads its
    sub-sampled frame scores over the frames between them. Time is cut into `resolution_s` steps; a
    shot's value is the mean importance of its steps and the total duration kept is at most
    `budget` × the video's. Without `shots`, fixed shots of `shot_s` seconds; by default 2 s, shorter
    for short videos (budget × duration / 3) so that a summary can hold a few. Returns
    `Segment(start, end, "highlight", mean importance)`, most important first (the table's rank order).
    """
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"select_highlights: budget={budget} must be in (0, 1]")
    grid = _TimeGrid(duration_s, resolution_s)
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


def default_shot_s(duration_s: float, budget: float = 0.15, resolution_s: float = 0.1) -> float:
    """2 s shots, or shorter ones (whole steps, at least one) when the budget would hold fewer than three."""
    steps = math.floor(min(2.0, budget * duration_s / 3) / resolution_s + 1e-9)
    return max(1, steps) * resolution_s


def highlight_f1(
    pred_importance: Sequence[float],
    step_times: Sequence[float],
    true_segments: Iterable[Segment | tuple[float, float]],
    duration_s: float,
    budget: float = 0.15,
    shots: Sequence[tuple[float, float]] | None = None,
    shot_s: float | None = None,
    resolution_s: float = 0.1,
) -> float:
    """F1 of the knapsack summary against the ground-truth highlight mask, per time step (SumMe / TVSum).

    The summary is `select_highlights(...)`; both it and `true_segments` become binary masks over
    `resolution_s` steps, and precision = overlap / summary length, recall = overlap / ground-truth
    length, as in VASNet's `evaluate_summary` (0 when they do not overlap; one annotator, so no max or
    mean over users). Returns F1 in [0, 1].
    """
    grid = _TimeGrid(duration_s, resolution_s)
    selected = select_highlights(pred_importance, step_times, duration_s, budget, shots, shot_s, resolution_s)
    pred = grid.mask([(s.start_s, s.end_s) for s in selected])
    truth = grid.mask([(s.start_s, s.end_s) if isinstance(s, Segment) else s for s in true_segments])
    overlap = int((pred & truth).sum())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / pred.sum(), overlap / truth.sum()
    return float(2 * precision * recall / (precision + recall))


class _TimeGrid:
    """[0, duration) cut into equal steps; a step belongs to a span when its centre falls inside it."""

    def __init__(self, duration_s: float, resolution_s: float) -> None:
        if not duration_s > 0 or not resolution_s > 0:
            raise ValueError(
                f"highlights: duration_s={duration_s} and resolution_s={resolution_s} must be > 0"
            )
        self.n = max(1, math.ceil(duration_s / resolution_s - 1e-9))
        self.centres = (np.arange(self.n) + 0.5) * resolution_s

    def mask(self, spans: Iterable[tuple[float, float]]) -> np.ndarray:
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


# --- helpers ------------------------------------------------------------------------------------------


def _pair(name: str, a: Sequence, b: Sequence) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"{name}: two 1-D sequences of one length expected, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError(f"{name}: no samples")
    return a, b


def _check_classes(name: str, labels: np.ndarray, n_classes: int) -> None:
    if labels.size and (
        not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= n_classes
    ):
        raise ValueError(
            f"{name}: class indices must be integers in [0, {n_classes}), got {labels.min()}..{labels.max()}"
        )
