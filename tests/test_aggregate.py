"""Action segments from per-frame probabilities: one true action must give one predicted segment."""

import numpy as np
import pytest

from flows.aggregate import AggregateConfig, VideoClips, action_segments

FPS, CLIP_LEN = 15, 16
LABELS = ("slide", "spin", "shake", "none")


def windows_over(frame_labels: list[str]) -> VideoClips:
    """Back-to-back windows of CLIP_LEN frames whose per-step outputs put 0.9 on each frame's label."""
    n = len(frame_labels) // CLIP_LEN * CLIP_LEN
    probs = np.full((n, len(LABELS)), 0.1 / (len(LABELS) - 1))
    probs[np.arange(n), [LABELS.index(label) for label in frame_labels[:n]]] = 0.9
    starts = np.arange(0, n, CLIP_LEN) / FPS
    return VideoClips(
        start_s=starts,
        end_s=starts + (CLIP_LEN - 1) / FPS,
        outputs={"action_steps": probs.reshape(-1, CLIP_LEN, len(LABELS))},
        duration_s=n / FPS,
    )


def frames(*spans: tuple[str, float]) -> list[str]:
    """Frame labels from (label, seconds) spans in order."""
    return [label for label, seconds in spans for _ in range(round(seconds * FPS))]


def test_a_short_waver_inside_an_action_does_not_cut_it():
    clips = windows_over(frames(("none", 1.0), ("slide", 1.0), ("spin", 0.4), ("slide", 1.2), ("none", 2.8)))
    (segment,) = action_segments(clips, LABELS, AggregateConfig(smooth_frames=1))
    assert segment.label == "slide"
    assert segment.start_s == pytest.approx(1.0, abs=0.1)
    assert segment.end_s == pytest.approx(3.6, abs=0.1)


def test_two_long_actions_back_to_back_stay_two():
    clips = windows_over(frames(("none", 0.8), ("slide", 2.4), ("shake", 2.4), ("none", 0.8)))
    segments = action_segments(clips, LABELS, AggregateConfig(smooth_frames=1))
    assert [s.label for s in segments] == ["slide", "shake"]
    assert segments[0].end_s == pytest.approx(segments[1].start_s, abs=0.1)
    assert segments[1].start_s == pytest.approx(3.2, abs=0.1)


def test_background_separates_actions_and_short_ones_can_be_dropped():
    clips = windows_over(frames(("spin", 2.0), ("none", 1.0), ("spin", 0.4), ("none", 3.0)))
    assert [s.label for s in action_segments(clips, LABELS, AggregateConfig(smooth_frames=1))] == ["spin"] * 2
    kept = action_segments(clips, LABELS, AggregateConfig(smooth_frames=1, min_action_s=1.0))
    assert [(s.label, round(s.start_s, 1)) for s in kept] == [("spin", 0.0)]
