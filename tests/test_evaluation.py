"""Evaluation metrics on hand-computed examples, segment-matching edge cases and knapsack optimality."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.evaluation import (
    ACTIVITYNET_TIOUS,
    Segment,
    SegmentCounts,
    confusion_matrix,
    detection_map,
    fixed_shots,
    highlight_f1,
    interpolated_average_precision,
    knapsack,
    match_segments,
    mean_class_accuracy,
    per_class_report,
    segment_f1,
    segments_from_windows,
    select_highlights,
    sentiment_accuracy,
    topk_accuracy,
    valence_mae,
)

# --- classification -----------------------------------------------------------------------------------


def test_topk_accuracy_by_hand() -> None:
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.4, 0.4, 0.2]])
    labels = np.array([1, 1, 0, 1])
    # top-1 picks 1, 0, 2 and, on the tie in the last row, the lower class 0.
    assert topk_accuracy(probs, labels, 1) == 0.25
    assert topk_accuracy(probs, labels, 2) == 0.75
    assert topk_accuracy(probs, labels, 3) == 1.0
    assert topk_accuracy(probs, labels, 5) == 1.0
    assert topk_accuracy(np.full((2, 4), 0.25), [2, 3], 1) == 0.0  # constant scores are not all correct


def test_topk_accuracy_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="class indices"):
        topk_accuracy(np.zeros((2, 3)), [0, 3], 1)
    with pytest.raises(ValueError, match=r"probs \[N, C\] and labels \[N\]"):
        topk_accuracy(np.zeros((2, 3)), [0, 1, 2], 1)
    with pytest.raises(ValueError, match="k=0"):
        topk_accuracy(np.zeros((2, 3)), [0, 1], 0)


def test_confusion_matrix_and_report_by_hand() -> None:
    labels, preds = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0]
    assert confusion_matrix(labels, preds, 3).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    report = per_class_report(labels, preds, ["a", "b", "c"])
    assert report["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert report["b"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert report["c"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    never = per_class_report([0, 0], [0, 0], ["a", "b"])["b"]
    assert never == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


SKLEARN_REFERENCE = """
import json, sys
from sklearn import metrics
out = []
for labels, preds in json.load(sys.stdin):
    cm = metrics.confusion_matrix(labels, preds, labels=range(4)).tolist()
    p, r, f, s = metrics.precision_recall_fscore_support(labels, preds, labels=range(4), zero_division=0)
    out.append([cm, p.tolist(), r.tolist(), f.tolist(), s.tolist()])
json.dump(out, sys.stdout)
"""


def test_report_agrees_with_scikit_learn() -> None:
    # scikit-learn runs in its own process: its bundled libgomp next to torch's in one process crashes
    # torch's next OpenMP region (seen as a segfault in a later test).
    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("scikit-learn is not installed")
    rng = np.random.default_rng(0)
    cases = [rng.integers(0, 4, size=(2, int(rng.integers(1, 41)))).tolist() for _ in range(200)]
    reference = subprocess.run(
        [sys.executable, "-c", SKLEARN_REFERENCE], input=json.dumps(cases), capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    for (labels, preds), (cm, p, r, f, s) in zip(cases, json.loads(reference.stdout), strict=True):
        assert confusion_matrix(labels, preds, 4).tolist() == cm
        report = per_class_report(labels, preds, ["w", "x", "y", "z"])
        for i, name in enumerate("wxyz"):
            expected = {"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]}
            assert report[name] == pytest.approx(expected)


def test_sentiment_metrics_by_hand() -> None:
    true, pred = (
        ["positive", "neutral", "negative", "neutral"],
        ["positive", "negative", "negative", "neutral"],
    )
    assert sentiment_accuracy(true, pred) == 0.75
    assert valence_mae([0.5, -0.5, 0.0], [0.25, -0.5, 0.5]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="one length"):
        valence_mae([0.1], [0.1, 0.2])
    with pytest.raises(ValueError, match="no samples"):
        sentiment_accuracy([], [])


# --- action segments ----------------------------------------------------------------------------------


def test_segments_from_windows_merges_runs() -> None:
    labels = ["bg", "slide", "slide", "bg", "spin", "spin", "spin"]
    times = [(i, i + 1) for i in range(7)]
    scores = [0.9, 0.8, 0.6, 0.9, 0.5, 0.7, 0.9]
    assert segments_from_windows(labels, times, "bg", scores) == [
        Segment(1, 3, "slide", pytest.approx(0.7)),
        Segment(4, 7, "spin", pytest.approx(0.7)),
    ]
    # Overlapping sliding windows: a segment ends where its last window does.
    overlapping = [(0.5 * i, 0.5 * i + 1) for i in range(4)]
    assert segments_from_windows([1, 1, 0, 2], overlapping, 0) == [
        Segment(0, 1.5, 1, 1.0),
        Segment(1.5, 2.5, 2),
    ]
    assert segments_from_windows(["bg", "bg"], [(0, 1), (1, 2)], "bg") == []
    assert segments_from_windows([], [], "bg") == []
    with pytest.raises(ValueError, match="time order"):
        segments_from_windows(["a", "a"], [(1, 2), (0, 1)], "bg")


def test_segment_f1_edge_cases() -> None:
    truth = [Segment(0, 2, "spin")]
    assert segment_f1([], truth) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert segment_f1(truth, []) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert segment_f1([], []) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    # IoU exactly at the threshold matches: [0, 1] against [0, 2] is 0.5.
    assert segment_f1([Segment(0, 1, "spin")], truth)["f1"] == 1.0
    # ... also when the spans are not exact in binary: 0.2 / 0.4 computes to 0.49999999999999994.
    assert segment_f1([Segment(0.1, 0.3, "a")], [Segment(0.1, 0.5, "a")])["f1"] == 1.0
    assert segment_f1([Segment(0, 0.98, "spin")], truth)["f1"] == 0.0  # IoU 0.49
    # The same span with another label is a false positive and a miss.
    assert segment_f1([Segment(0, 2, "slide")], truth) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_segment_matching_is_one_to_one_and_greedy_by_score() -> None:
    truth = [Segment(0, 10, "a")]
    two = [Segment(0, 10, "a", 0.9), Segment(1, 10, "a", 0.8)]
    assert segment_f1(two, truth) == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3})
    # The higher-scored prediction takes the true segment it overlaps most, even when that leaves the
    # other prediction without a match (ActivityNet's greedy rule, not an optimal assignment).
    truth = [Segment(0, 10, "a"), Segment(10, 20, "a")]
    first = Segment(4, 16, "a", score=0.9)  # IoU 6/16 with the first, 6/16 with the second: ties go first
    late = Segment(9, 19, "a", score=0.5)  # IoU 9/11 with the second, 1/19 with the first
    assert match_segments([late, first], truth, iou=0.3) == SegmentCounts(matched=2, predicted=2, true=2)
    first = Segment(5, 17, "a", score=0.9)  # now overlaps the second more (7/15 vs 5/17)
    assert match_segments([late, first], truth, iou=0.3) == SegmentCounts(matched=1, predicted=2, true=2)


def test_segment_counts_add_up_over_videos() -> None:
    videos = [
        ([Segment(0, 2, "a")], [Segment(0, 2, "a")]),
        ([Segment(0, 2, "a"), Segment(3, 4, "b")], [Segment(0, 2, "b")]),
        ([], [Segment(1, 2, "a")]),
    ]
    total = sum((match_segments(p, t) for p, t in videos), SegmentCounts())
    assert total == SegmentCounts(matched=1, predicted=3, true=3)
    assert total.scores() == pytest.approx({"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3})


# --- highlights ---------------------------------------------------------------------------------------


def test_knapsack_by_hand() -> None:
    assert knapsack([60, 100, 120], [10, 20, 30], 50) == [1, 2]
    assert knapsack([1.0, 2.0], [5, 5], 4) == []
    assert knapsack([0.0, -1.0, 0.5], [0, 0, 0], 0) == [2]  # free items are taken only for positive value
    with pytest.raises(ValueError, match="non-negative integers"):
        knapsack([1.0], [1.5], 3)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 1, allow_nan=False), st.integers(0, 12)), min_size=0, max_size=9),
    st.integers(0, 40),
)
def test_knapsack_matches_brute_force(items: list[tuple[float, int]], capacity: int) -> None:
    values = [v for v, _ in items]
    weights = [w for _, w in items]
    chosen = knapsack(values, weights, capacity)
    assert sum(weights[i] for i in chosen) <= capacity
    best = max(
        sum(values[i] for i in subset)
        for r in range(len(items) + 1)
        for subset in itertools.combinations(range(len(items)), r)
        if sum(weights[i] for i in subset) <= capacity
    )
    assert sum(values[i] for i in chosen) == pytest.approx(best, abs=1e-9)


def test_highlight_f1_by_hand() -> None:
    one_second_shots = fixed_shots(10.0, 1.0)
    assert one_second_shots[:2] == [(0.0, 1.0), (1.0, 2.0)] and len(one_second_shots) == 10
    importance, times = [0.1, 0.2, 0.1, 0.9, 0.3, 0.2, 0.1, 0.0, 0.1, 0.1], list(range(10))
    # 15 % of 10 s holds one 1-second shot: (3, 4), the most important. The truth is 1.5 s long.
    assert select_highlights(importance, times, 10.0, shots=one_second_shots) == [
        Segment(3.0, 4.0, "highlight", pytest.approx(0.9))
    ]
    f1 = highlight_f1(importance, times, [Segment(3.0, 4.5)], 10.0, shots=one_second_shots)
    assert f1 == pytest.approx(2 * 1.0 * (10 / 15) / (1.0 + 10 / 15))  # precision 1, recall 10/15 → 0.8
    assert highlight_f1(importance, times, [(6.0, 7.5)], 10.0, shots=one_second_shots) == 0.0

    # Half-second shots: three fit in the budget and cover the truth exactly.
    times, importance = [0.0, 3.0, 4.0, 4.5, 5.0], [0.0, 1.0, 0.9, 0.8, 0.0]
    chosen = select_highlights(importance, times, 10.0, shot_s=0.5)
    assert [(s.start_s, s.end_s) for s in chosen] == [
        (3.0, 3.5),
        (3.5, 4.0),
        (4.0, 4.5),
    ]  # most important first
    assert highlight_f1(importance, times, [(3.0, 4.5)], 10.0, shot_s=0.5) == pytest.approx(1.0)


def test_knapsack_values_shots_by_mean_importance() -> None:
    # As in the SumMe/TVSum protocol a shot's value is its mean score: two short shots of 0.8 beat one
    # long shot of 0.9 that would fill the same budget.
    shots = [(0.0, 1.0), (1.0, 1.5), (1.5, 2.0), (2.0, 10.0)]
    times, importance = [0.0, 1.0, 2.0], [0.9, 0.8, 0.0]
    chosen = select_highlights(importance, times, 10.0, shots=shots, budget=0.1)
    assert [(s.start_s, s.end_s) for s in chosen] == [(1.0, 1.5), (1.5, 2.0)]


def test_short_videos_get_shots_that_fit_the_budget() -> None:
    # A 6 s video keeps 0.9 s: 2 s shots could never be chosen, so shots shrink to budget × duration / 3.
    times = np.arange(60) * 0.1
    importance = ((times >= 2.0) & (times < 3.3)).astype(float)
    f1 = highlight_f1(importance, times, [(2.0, 3.3)], 6.0)
    assert f1 == pytest.approx(2 * (9 / 13) / (1 + 9 / 13))  # 9 steps kept, all inside the 13-step truth
    assert highlight_f1(importance, times, [(2.0, 3.3)], 6.0, shot_s=2.0) == 0.0


# --- mean class accuracy ------------------------------------------------------------------------------


def test_mean_class_accuracy_weighs_classes_equally() -> None:
    labels, preds = [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1]
    assert sentiment_accuracy(labels, preds) == pytest.approx(5 / 6)  # plain accuracy
    assert mean_class_accuracy(labels, preds, 2) == pytest.approx((4 / 4 + 1 / 2) / 2)  # 0.75


def test_mean_class_accuracy_skips_classes_absent_from_labels() -> None:
    # Class 2 is predicted once but never true: only classes 0 (recall 1/2) and 1 (recall 1) are averaged.
    labels, preds = [0, 0, 1, 1], [0, 2, 1, 1]
    assert mean_class_accuracy(labels, preds, 3) == pytest.approx(0.75)  # not (1/2 + 1 + 0) / 3
    assert mean_class_accuracy(np.array([3, 3]), np.array([3, 0]), 5) == 0.5


def test_mean_class_accuracy_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="mean_class_accuracy: class indices"):
        mean_class_accuracy([0, 1], [0, 2], 2)
    with pytest.raises(ValueError, match="mean_class_accuracy: class indices"):
        mean_class_accuracy([0.0, 1.0], [0, 1], 2)
    with pytest.raises(ValueError, match="one length"):
        mean_class_accuracy([0, 1], [0], 2)
    with pytest.raises(ValueError, match="no samples"):
        mean_class_accuracy([], [], 2)


# --- temporal action detection mAP --------------------------------------------------------------------


def test_activitynet_thresholds() -> None:
    np.testing.assert_array_equal(ACTIVITYNET_TIOUS, np.linspace(0.5, 0.95, 10))  # the official thresholds
    np.testing.assert_allclose(ACTIVITYNET_TIOUS, [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])


def test_interpolated_average_precision_by_hand() -> None:
    # TP, FP, TP over 2 true segments: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    assert interpolated_average_precision([1, 0.5, 2 / 3], [0.5, 0.5, 1]) == pytest.approx(
        1 * 0.5 + 2 / 3 * 0.5
    )
    # FP, TP, TP: the envelope lifts recall 0..1/2 to 2/3 (the mean of precisions at TPs would be 0.5833,
    # VOC 2007's 11-point mean 0.6667 too here, but see TP, FP, TP above: 0.8485 there).
    assert interpolated_average_precision([0, 0.5, 2 / 3], [0, 0.5, 1]) == pytest.approx(2 / 3)
    assert interpolated_average_precision([], []) == 0.0
    with pytest.raises(ValueError, match="one length"):
        interpolated_average_precision([1.0], [0.5, 1.0])


def test_detection_map_by_hand() -> None:
    truth = {"v": [Segment(0, 10, "a"), Segment(20, 30, "a")]}
    tp_fp_tp = {"v": [Segment(20, 30, "a", 0.7), Segment(0, 10, "a", 0.9), Segment(40, 50, "a", 0.8)]}
    result = detection_map(tp_fp_tp, truth)
    assert set(result) == {"map"} | {f"map_{t}" for t in range(50, 100, 5)}
    # Every match has tIoU 1, so every threshold gives the interpolated AP 1 × 1/2 + 2/3 × 1/2.
    assert result == pytest.approx(dict.fromkeys(result, 5 / 6))
    fp_tp_tp = {"v": [Segment(20, 30, "a", 0.7), Segment(0, 10, "a", 0.8), Segment(40, 50, "a", 0.9)]}
    assert detection_map(fp_tp_tp, truth)["map"] == pytest.approx(2 / 3)
    assert detection_map({}, truth) == dict.fromkeys(result, 0.0)  # no predictions: every AP is 0


def test_detection_map_ranks_predictions_across_videos() -> None:
    # Scores are ranked over all videos: TP (0.9, v1), TP (0.8, v2), FP (0.6, v1) has AP 1; ranking video
    # by video would give TP, FP, TP and 5/6.
    truth = {"v1": [Segment(0, 10, "a")], "v2": [Segment(0, 10, "a")]}
    predictions = {
        "v1": [Segment(0, 10, "a", 0.9), Segment(50, 60, "a", 0.6)],
        "v2": [Segment(0, 10, "a", 0.8)],
    }
    assert detection_map(predictions, truth)["map"] == pytest.approx(1.0)


def test_detection_map_over_tiou_thresholds() -> None:
    truth = {"v": [Segment(0, 10, "a")]}
    # tIoU 0.6 matches at 0.5, 0.55 and 0.6, not at 0.65 and above: AP 1 at 3 of the 10 thresholds.
    result = detection_map({"v": [Segment(0, 6, "a", 0.5)]}, truth)
    assert [result[f"map_{t}"] for t in range(50, 100, 5)] == [1.0] * 3 + [0.0] * 7
    assert result["map"] == pytest.approx(0.3)
    # tIoU 0.7 (5 thresholds of 10) and 0.925 (9 of 10).
    assert detection_map({"v": [Segment(3, 10, "a")]}, truth)["map"] == pytest.approx(0.5)
    assert detection_map({"v": [Segment(0.75, 10, "a")]}, truth)["map"] == pytest.approx(0.9)
    # A tIoU at a threshold matches even where it computes just below: 0.2 / 0.4 is 0.49999999999999994.
    result = detection_map({"v": [Segment(0.1, 0.3, "a")]}, {"v": [Segment(0.1, 0.5, "a")]})
    assert result["map_50"] == 1.0 and result["map_55"] == 0.0 and result["map"] == pytest.approx(0.1)
    # Custom thresholds name their keys by percent.
    assert detection_map({"v": [Segment(0, 6, "a")]}, truth, tious=[0.3, 0.6, 0.625]) == pytest.approx(
        {"map": 2 / 3, "map_30": 1.0, "map_60": 1.0, "map_62.5": 0.0}
    )


def test_detection_map_duplicate_detection_is_a_false_positive() -> None:
    truth = {"v": [Segment(0, 10, "a"), Segment(20, 30, "a")]}
    duplicate = Segment(0.5, 10, "a", 0.8)  # tIoU 0.95 with the first true segment, already taken at 0.9
    predictions = {"v": [Segment(0, 10, "a", 0.9), duplicate, Segment(20, 30, "a", 0.7)]}
    assert detection_map(predictions, truth)["map_50"] == pytest.approx(5 / 6)  # TP, FP, TP
    # The higher-scored prediction takes the best-overlapping true segment; the next takes what is left.
    truth = {"v": [Segment(0, 10, "a"), Segment(0, 12, "a")]}
    predictions = {"v": [Segment(0, 10, "a", 0.9), Segment(0, 10, "a", 0.8)]}  # tIoU 1 and 10/12
    result = detection_map(predictions, truth)
    assert result["map_80"] == 1.0 and result["map_85"] == pytest.approx(0.5)  # TP, TP at 0.8; TP, FP at 0.85


def test_detection_map_matches_within_a_video() -> None:
    # v1's prediction covers v2's true segment, not v1's: a false positive (pooling videos would make it a
    # TP and v2's prediction the FP: AP 1/2). Then v2's TP: precision 0, 1/2 at recall 0, 1/2 → AP 1/4.
    truth = {"v1": [Segment(0, 10, "a")], "v2": [Segment(20, 30, "a")], "v3": []}
    predictions = {"v1": [Segment(20, 30, "a", 0.9)], "v2": [Segment(20, 30, "a", 0.8)]}
    assert detection_map(predictions, truth)["map"] == pytest.approx(0.25)
    # A video absent from the ground truth is not scored; one present without segments holds only FPs.
    unknown = {**predictions, "elsewhere": [Segment(0, 10, "a", 1.0)]}
    assert detection_map(unknown, truth)["map"] == pytest.approx(0.25)
    empty = {**predictions, "v3": [Segment(0, 10, "a", 1.0)]}  # FP, FP, TP: precision 1/3 at recall 1/2
    assert detection_map(empty, truth)["map"] == pytest.approx(1 / 6)


def test_detection_map_averages_classes() -> None:
    # Class a: 3 true segments, all found (AP 1); class b: 1, missed (AP 0). The mean over classes is 1/2
    # (pooling all 4 segments in one ranking would give 3/4). Class c has no ground truth: not averaged.
    truth = {
        "v": [Segment(0, 10, "a"), Segment(20, 30, "a"), Segment(40, 50, "b")],
        "w": [Segment(0, 5, "a")],
    }
    predictions = {
        "v": [Segment(0, 10, "a", 0.9), Segment(20, 30, "a", 0.8), Segment(60, 70, "c", 0.99)],
        "w": [Segment(0, 5, "a", 0.7), Segment(0, 5, "b", 0.95)],  # the right span with the wrong label
    }
    assert detection_map(predictions, truth) == pytest.approx(
        {"map": 0.5, **{f"map_{t}": 0.5 for t in range(50, 100, 5)}}
    )


def test_detection_map_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no ground-truth segments"):
        detection_map({"v": [Segment(0, 1, "a")]}, {})
    with pytest.raises(ValueError, match="no ground-truth segments"):
        detection_map({"v": [Segment(0, 1, "a")]}, {"v": []})
    with pytest.raises(ValueError, match="tious"):
        detection_map({}, {"v": [Segment(0, 1, "a")]}, tious=[0.0, 0.5])
    with pytest.raises(ValueError, match="tious"):
        detection_map({}, {"v": [Segment(0, 1, "a")]}, tious=[])
    with pytest.raises(ValueError, match="distinct"):
        detection_map({}, {"v": [Segment(0, 1, "a")]}, tious=[0.5, 0.5])
    with pytest.raises(ValueError, match="finite"):
        detection_map({"v": [Segment(0, 1, "a", float("nan"))]}, {"v": [Segment(0, 1, "a")]})


def _official_class_ap(truth: list[tuple], predictions: list[tuple], tious: np.ndarray) -> np.ndarray:
    """ActivityNet's `compute_average_precision_detection` + `interpolated_prec_rec`, transcribed loop by
    loop from `Evaluation/eval_detection.py` (pandas frames → lists of (video, start, end[, score]))."""
    ap = np.zeros(len(tious))
    if not predictions:
        return ap
    npos = float(len(truth))
    lock_gt = np.ones((len(tious), len(truth))) * -1
    predictions = [predictions[i] for i in np.array([p[3] for p in predictions]).argsort()[::-1]]
    tp, fp = np.zeros((len(tious), len(predictions))), np.zeros((len(tious), len(predictions)))
    for idx, (video, start, end, _) in enumerate(predictions):
        this_gt = [(i, t) for i, t in enumerate(truth) if t[0] == video]
        if not this_gt:
            fp[:, idx] = 1
            continue
        gt = np.array([[t[1], t[2]] for _, t in this_gt])
        inter = (np.minimum(end, gt[:, 1]) - np.maximum(start, gt[:, 0])).clip(0)
        tiou_arr = inter / ((gt[:, 1] - gt[:, 0]) + (end - start) - inter)
        tiou_sorted_idx = tiou_arr.argsort()[::-1]
        for tidx, tiou_thr in enumerate(tious):
            for jdx in tiou_sorted_idx:
                if tiou_arr[jdx] < tiou_thr:
                    fp[tidx, idx] = 1
                    break
                if lock_gt[tidx, this_gt[jdx][0]] >= 0:
                    continue
                tp[tidx, idx] = 1
                lock_gt[tidx, this_gt[jdx][0]] = idx
                break
            if fp[tidx, idx] == 0 and tp[tidx, idx] == 0:
                fp[tidx, idx] = 1
    tp_cumsum, fp_cumsum = np.cumsum(tp, axis=1), np.cumsum(fp, axis=1)
    recall_cumsum, precision_cumsum = tp_cumsum / npos, tp_cumsum / (tp_cumsum + fp_cumsum)
    for tidx in range(len(tious)):
        mprec = np.hstack([[0], precision_cumsum[tidx], [0]])
        mrec = np.hstack([[0], recall_cumsum[tidx], [1]])
        for i in range(len(mprec) - 1)[::-1]:
            mprec[i] = max(mprec[i], mprec[i + 1])
        i = np.where(mrec[1::] != mrec[0:-1])[0] + 1
        ap[tidx] = np.sum((mrec[i] - mrec[i - 1]) * mprec[i])
    return ap


def test_detection_map_agrees_with_official_activitynet_code() -> None:
    # Continuous random spans and scores (no ties, no tIoU exactly at a threshold, where the two may differ).
    rng = np.random.default_rng(0)
    tious, nontrivial = np.linspace(0.5, 0.95, 10), 0
    for _ in range(200):
        truth: dict[str, list[Segment]] = {}
        predictions: dict[str, list[Segment]] = {}
        for v in range(int(rng.integers(1, 5))):
            video = f"v{v}"
            truth[video], predictions[video] = [], []
            for _ in range(int(rng.integers(0, 5))):
                start = rng.uniform(0, 50)
                truth[video].append(Segment(start, start + rng.uniform(1, 20), f"c{rng.integers(3)}"))
            for _ in range(int(rng.integers(0, 8))):
                if truth[video] and rng.random() < 0.7:  # near a true segment, mostly with its label
                    t = truth[video][rng.integers(len(truth[video]))]
                    start = t.start_s + rng.normal(0, 1.5)
                    end = max(start + 0.5, t.end_s + rng.normal(0, 1.5))
                    label = t.label if rng.random() < 0.8 else f"c{rng.integers(3)}"
                else:
                    start = rng.uniform(0, 50)
                    end, label = start + rng.uniform(1, 20), f"c{rng.integers(3)}"
                predictions[video].append(Segment(start, end, label, float(rng.random())))
        labels = sorted({s.label for segments in truth.values() for s in segments})
        if not labels:
            continue
        rows = lambda segs, label: [  # noqa: E731
            (v, s.start_s, s.end_s, s.score) for v, ss in segs.items() for s in ss if s.label == label
        ]
        expected = np.mean(
            [_official_class_ap(rows(truth, c), rows(predictions, c), tious) for c in labels], 0
        )
        result = detection_map(predictions, truth)
        assert [result[f"map_{t}"] for t in range(50, 100, 5)] == pytest.approx(expected.tolist(), abs=1e-12)
        assert result["map"] == pytest.approx(expected.mean(), abs=1e-12)
        nontrivial += 0 < result["map"] < 1
    assert nontrivial > 100
