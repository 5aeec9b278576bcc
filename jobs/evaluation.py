"""Evaluation metrics: pure numpy functions, each following a published protocol.

- categories: top-k accuracy, and mean class accuracy (the UCF101 / HMDB51 mean of per-class recall);
- actions: windows → segments, segment precision / recall / F1 at a temporal IoU (ActivityNet matching),
  and ActivityNet temporal action detection mAP: interpolated average precision per class, averaged over
  classes at each tIoU threshold and over the thresholds 0.5:0.05:0.95 (`Evaluation/eval_detection.py`);
- sentiment: accuracy and valence mean absolute error;
- highlights: knapsack shot selection under a 15 % duration budget and per-time-step F1 against the
  ground-truth highlight mask (the SumMe / TVSum protocol of Zhang et al. 2016, as evaluated by VASNet);
- per-class confusion matrix and precision / recall / F1 / support.

Window → segment merging and the knapsack shot selection live in `flows.aggregate` (the tag job writes its
`actions` and `highlights` rows with them), so what is evaluated is exactly what is tagged; they are
re-exported here.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from flows.aggregate import (  # noqa: F401  (re-exported: the metrics' vocabulary)
    Segment,
    TimeGrid,
    default_shot_s,
    fixed_shots,
    knapsack,
    segments_from_windows,
    select_highlights,
)

# Two IoUs this close count as equal, so that a segment exactly at the threshold matches despite rounding
# (e.g. 0.1 s steps: (0.3 - 0.1) / (0.5 - 0.1) is 0.49999999999999994 in binary floating point).
IOU_TOLERANCE = 1e-9

# ActivityNet's detection tIoU thresholds, 0.5, 0.55, ..., 0.95 (`np.linspace(0.5, 0.95, 10)`).
ACTIVITYNET_TIOUS: tuple[float, ...] = tuple(float(t) for t in np.linspace(0.5, 0.95, 10))


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


def mean_class_accuracy(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> float:
    """Mean over the classes present in `labels` of per-class recall (UCF101 / HMDB51 mean class accuracy).

    Each class present in the ground truth weighs the same however many samples it has; a class absent
    from `labels` is not averaged (its recall is undefined), even when it is predicted.
    """
    labels, preds = _pair("mean_class_accuracy", labels, preds)
    _check_classes("mean_class_accuracy", labels, n_classes)
    _check_classes("mean_class_accuracy", preds, n_classes)
    labels, preds = labels.astype(np.int64), preds.astype(np.int64)
    support = np.bincount(labels, minlength=n_classes)
    correct = np.bincount(labels[labels == preds], minlength=n_classes)
    present = support > 0
    return float((correct[present] / support[present]).mean())


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


def interpolated_average_precision(precision: Sequence[float], recall: Sequence[float]) -> float:
    """Area under the monotone precision envelope of a ranked list's precision / recall (VOC 2010+ AP).

    ActivityNet's `interpolated_prec_rec`: precision is padded with 0 at both ends and recall with 0 and 1,
    each precision becomes the highest at equal or greater recall, and AP sums recall steps × precision.
    """
    prec, rec = np.asarray(precision, dtype=np.float64), np.asarray(recall, dtype=np.float64)
    if prec.ndim != 1 or prec.shape != rec.shape:
        raise ValueError(
            f"interpolated_average_precision: two 1-D arrays of one length, got {prec.shape}, {rec.shape}"
        )
    mprec = np.concatenate([[0.0], prec, [0.0]])
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mprec = np.maximum.accumulate(mprec[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * mprec[steps]))


def detection_map(
    predictions: Mapping[str, Sequence[Segment]],
    ground_truth: Mapping[str, Sequence[Segment]],
    tious: Sequence[float] = ACTIVITYNET_TIOUS,
) -> dict[str, float]:
    """ActivityNet temporal action detection mAP of per-video predicted segments, by tIoU threshold.

    As the official `Evaluation/eval_detection.py` (`compute_average_precision_detection`): for each
    label with ground truth, its predictions from all videos in decreasing score order (equal scores keep
    their given order) each take, per threshold, the unmatched true segment of that label in the same
    video with the highest tIoU, if it reaches the threshold (within `IOU_TOLERANCE`, so a tIoU exactly
    at a threshold matches; ties go to the first given); any other prediction is a false positive. AP is
    `interpolated_average_precision` of the cumulative precision / recall (recall over all of the label's
    true segments); mAP at a threshold is the mean AP over labels with ground truth, and "map" averages
    over the thresholds. Predictions of labels without ground truth cannot change it; predictions for
    videos not in `ground_truth` are ignored (the official script would count them as false positives).

    Returns "map" and "map_<threshold in %>" for each threshold: "map_50", "map_55", ..., "map_95" for
    the default ActivityNet thresholds.
    """
    thresholds = np.asarray(tious, dtype=np.float64)
    if thresholds.ndim != 1 or thresholds.size == 0 or not np.all((thresholds > 0) & (thresholds <= 1)):
        raise ValueError(f"detection_map: tious must be a non-empty list of values in (0, 1], got {tious}")
    keys = [f"map_{round(float(t) * 100, 6):02g}" for t in thresholds]
    if len(set(keys)) != len(keys):
        raise ValueError(f"detection_map: tious must be distinct, got {tious}")
    truth: dict[Hashable, dict[str, list[Segment]]] = {}  # label → video → true segments
    for video, segments in ground_truth.items():
        for segment in segments:
            truth.setdefault(segment.label, {}).setdefault(video, []).append(segment)
    if not truth:
        raise ValueError("detection_map: no ground-truth segments")
    ap = np.zeros((len(truth), thresholds.size))
    for c, (label, true_by_video) in enumerate(truth.items()):
        ranked = [
            (video, p)
            for video, segments in predictions.items()
            if video in ground_truth
            for p in segments
            if p.label == label
        ]
        ap[c] = _detection_ap(ranked, true_by_video, thresholds)
    mean_ap = ap.mean(axis=0)
    return {"map": float(mean_ap.mean()), **{k: float(v) for k, v in zip(keys, mean_ap, strict=True)}}


def _detection_ap(
    predictions: list[tuple[str, Segment]], truth: Mapping[str, list[Segment]], thresholds: np.ndarray
) -> np.ndarray:
    """Interpolated AP at each threshold of one label's (video, segment) predictions against its truth."""
    scores = np.array([p.score for _, p in predictions], dtype=np.float64)
    if not np.all(np.isfinite(scores)):
        raise ValueError("detection_map: prediction scores must be finite")
    order = np.argsort(-scores, kind="stable")
    tp = np.zeros((thresholds.size, len(predictions)), dtype=bool)
    taken = {
        video: np.zeros((thresholds.size, len(segments)), dtype=bool) for video, segments in truth.items()
    }
    for rank, i in enumerate(order):
        video, p = predictions[i]
        true = truth.get(video, [])
        if not true:
            continue  # no true segment of this label in the video: a false positive at every threshold
        ious = np.array([temporal_iou(p, t) for t in true])
        by_iou = np.argsort(-ious, kind="stable")
        for k, threshold in enumerate(thresholds):
            for j in by_iou:
                if ious[j] < threshold - IOU_TOLERANCE:
                    break
                if not taken[video][k, j]:
                    taken[video][k, j] = tp[k, rank] = True
                    break
    n_true = sum(len(segments) for segments in truth.values())
    tp_cum = np.cumsum(tp, axis=1)
    precision = tp_cum / np.arange(1, len(predictions) + 1)
    recall = tp_cum / n_true
    return np.array([interpolated_average_precision(precision[k], recall[k]) for k in range(thresholds.size)])


# --- highlights ---------------------------------------------------------------------------------------


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
    grid = TimeGrid(duration_s, resolution_s)
    selected = select_highlights(pred_importance, step_times, duration_s, budget, shots, shot_s, resolution_s)
    pred = grid.mask([(s.start_s, s.end_s) for s in selected])
    truth = grid.mask([(s.start_s, s.end_s) if isinstance(s, Segment) else s for s in true_segments])
    overlap = int((pred & truth).sum())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / pred.sum(), overlap / truth.sum()
    return float(2 * precision * recall / (precision + recall))


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
