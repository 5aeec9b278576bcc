"""`reelflow evaluate`: a registered model scored through the tagging path against the labels manifest."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flows import labels as flabels
from jobs import evaluate

KEYS = ("category_top1", "category_top5", "action_f1", "sentiment_accuracy", "valence_mae", "highlight_f1")


def test_evaluate_model_scores_every_head(ray_session, small_corpus, tagging_model):
    model_uri, tracking_uri = tagging_model
    manifest = flabels.read_manifest(str(small_corpus / flabels.LABELS_FILE))
    chosen = sorted(manifest.videos)[:6]
    metrics = evaluate.evaluate_model(model_uri, str(small_corpus), videos=chosen, tracking_uri=tracking_uri)

    assert metrics["videos"] == metrics["videos_scored"] == 6 and metrics["videos_failed"] == 0
    assert metrics["clips"] >= 6 * 5  # 6 s at 15 fps in 16-frame windows
    for key in KEYS:
        assert isinstance(metrics[key], float), key
    for key in ("category_top1", "category_top5", "action_f1", "sentiment_accuracy", "highlight_f1"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["category_top1"] <= metrics["category_top5"]
    assert 0.0 <= metrics["valence_mae"] <= 2.0
    # Fitted on these videos for a few epochs: clearly better than chance (1 / number of categories).
    assert metrics["category_top1"] > 1.5 / len(manifest.labels.categories)


def test_evaluate_rejects_unknown_videos(small_corpus, tagging_model):
    with pytest.raises(ValueError, match="not in the corpus"):
        evaluate.evaluate_model(
            tagging_model[0], str(small_corpus), videos=["nope.mp4"], tracking_uri=tagging_model[1]
        )


def test_evaluate_cli_prints_json_last(small_corpus, tagging_model, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    manifest = flabels.read_manifest(str(small_corpus / flabels.LABELS_FILE))
    for file in sorted(manifest.videos)[:3]:
        (corpus / file).write_bytes((small_corpus / file).read_bytes())
    labels = small_corpus / flabels.LABELS_FILE
    out = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "evaluate", "--model", tagging_model[0], "--corpus", str(corpus),
         "--labels", str(labels), "--tracking-uri", tagging_model[1]],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(KEYS) <= set(metrics) and metrics["videos"] == 3
    assert all(isinstance(metrics[k], float) for k in KEYS)


def test_perfect_clip_predictions_score_perfectly(small_corpus):
    """Aggregation + scoring against the manifest: clip outputs equal to the ground truth give 1.0."""
    import numpy as np

    from flows.aggregate import VideoClips, summarize

    manifest = flabels.read_manifest(str(small_corpus / flabels.LABELS_FILE))
    ls = manifest.labels
    heads = {"category": ls.categories, "action": ls.actions, "sentiment": ls.sentiments, "valence": ()}
    summaries = {}
    for file in sorted(manifest.videos)[:10]:
        video = manifest.videos[file]
        starts = np.arange(0, 6.0 - 1.0, 16 / 15)  # 16-frame windows at 15 fps, side by side
        ends = starts + 15 / 15
        steps = []
        for s, e in zip(starts, ends, strict=True):
            actions, _ = flabels.step_targets(video, flabels.frame_times(s, e, 16), ls)
            steps.append(np.eye(len(ls.actions))[actions])
        n = len(starts)
        outputs = {
            "category": np.tile(np.eye(len(ls.categories))[ls.categories.index(video.category)], (n, 1)),
            "sentiment": np.tile(np.eye(len(ls.sentiments))[ls.sentiments.index(video.sentiment)], (n, 1)),
            "valence": np.full(n, video.valence),
            "action_steps": np.stack(steps),
        }
        summaries[file] = summarize(VideoClips(starts, ends, outputs, 6.0), heads)
    metrics = evaluate.score(summaries, manifest, heads, dict.fromkeys(summaries, 6.0))
    assert metrics["category_top1"] == metrics["sentiment_accuracy"] == 1.0
    assert metrics["valence_mae"] < 1e-9
    assert metrics["action_f1"] == 1.0
    assert metrics["highlight_f1"] is None  # no importance head
