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
    Segment,
    SegmentCounts,
    confusion_matrix,
    fixed_shots,
    highlight_f1,
    knapsack,
    match_segments,
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
