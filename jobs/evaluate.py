"""`reelflow evaluate`: a registered model scored on labelled videos through the tagging path.

    reelflow evaluate --model models:/reelflow-multitask@candidate --corpus reelflow-demo/corpus

The videos are decoded and predicted exactly as `reelflow tag` does (sliding windows at the model's
input, the actor pool, `flows.aggregate`), and what would become table rows is scored against the
labels manifest with `jobs.evaluation`: category top-1 / top-5, action segment F1 at IoU 0.5, sentiment
accuracy, valence MAE and highlight F1 (SumMe / TVSum protocol). The command prints the metrics as one
JSON object on its last line.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flows import labels as flabels
from flows import storage
from flows.aggregate import AggregateConfig, VideoSummary, summarize
from flows.clips import VideoRow, list_video_rows
from flows.inference import run_inference, tagging_clip_config
from flows.predict import PredictConfig
from jobs import evaluation
from jobs.registered import DEFAULT_MLFLOW_DIR, resolve_models
from jobs.runtime import console

METRICS = ("category_top1", "category_top5", "action_f1", "sentiment_accuracy", "valence_mae", "highlight_f1")


@dataclass(frozen=True)
class EvaluateConfig:
    """The model, the labelled corpus (labels default to CORPUS/labels.parquet) and how to run inference."""

    model: str
    corpus: str
    labels: str | None = None
    tracking_uri: str | None = None
    predict: PredictConfig = field(default_factory=PredictConfig)
    aggregate: AggregateConfig = field(default_factory=AggregateConfig)


def evaluate_model(
    model_uri: str,
    corpus: str,
    labels: str | None = None,
    videos: Sequence[str] | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Metrics of `model_uri` on the labelled videos of `corpus` (or only `videos`: corpus-relative file
    names or URIs). A metric whose head the model lacks, or with no ground truth, is None."""
    return main(EvaluateConfig(model_uri, corpus, labels, tracking_uri), videos)


def main(config: EvaluateConfig, videos: Sequence[str] | None = None) -> dict[str, Any]:
    """Select the labelled videos, run the tagging path on them, score the summaries."""
    from jobs import tracking
    from jobs.runtime import init_ray

    tracking_uri = tracking.tracking_uri(config.tracking_uri, DEFAULT_MLFLOW_DIR)
    (model,) = resolve_models([config.model], tracking_uri)
    manifest = flabels.read_manifest(config.labels or storage.join_uri(config.corpus, flabels.LABELS_FILE))
    rows = select_videos(config.corpus, manifest, videos)
    clip_config = tagging_clip_config([model.spec], None)
    console.print(f"evaluate: {model.uri} on {len(rows)} labelled videos of {config.corpus}")

    init_ray()
    with tempfile.TemporaryDirectory(prefix="reelflow-evaluate-") as tmp:
        result = run_inference(rows, [model], clip_config, config.predict, tmp)
    by_file = {flabels.relative_file(r.uri, config.corpus): r.video_id for r in rows}
    summaries: dict[str, VideoSummary] = {}
    for file, vid in by_file.items():
        if vid in result.clips_by_video:
            (clips,) = result.clips_by_video[vid]
            summaries[file] = summarize(clips, model.spec.heads, config.aggregate)
    durations = {f: result.info[v].get("duration_s") for f, v in by_file.items() if v in result.info}
    metrics = score(summaries, manifest, model.spec.heads, durations, config.aggregate)
    metrics.update(videos=len(rows), videos_scored=len(summaries), videos_failed=len(rows) - len(summaries),
                   clips=result.clips, model=model.uri)  # fmt: skip
    return metrics


def select_videos(corpus: str, manifest: flabels.Manifest, videos: Sequence[str] | None) -> list[VideoRow]:
    """The corpus's videos that have labels, or just `videos` (each must be in the corpus and labelled)."""
    listed = {flabels.relative_file(r.uri, corpus): r for r in list_video_rows(corpus)}
    if videos is None:
        chosen = [f for f in sorted(listed) if f in manifest.videos]
    else:
        chosen = []
        for name in videos:
            file = flabels.relative_file(name, corpus) if "://" in name or name.startswith("/") else name
            if file not in listed:
                raise ValueError(f"evaluate: video {name!r} is not in the corpus {corpus}")
            if file not in manifest.videos:
                raise ValueError(f"evaluate: video {name!r} has no labels in {manifest.uri}")
            chosen.append(file)
    if not chosen:
        raise ValueError(f"evaluate: no labelled videos in {corpus} (labels {manifest.uri})")
    return [listed[f] for f in chosen]


def score(
    summaries: dict[str, VideoSummary],
    manifest: flabels.Manifest,
    heads: dict[str, tuple[str, ...]],
    durations: dict[str, float | None],
    config: AggregateConfig | None = None,
) -> dict[str, Any]:
    """The metrics of per-video summaries (by corpus-relative file) against the manifest."""
    config = config or AggregateConfig()
    out: dict[str, Any] = dict.fromkeys(METRICS)
    truth = {f: manifest.videos[f] for f in summaries}
    if not truth:
        return out
    if "category" in heads:
        out["category_top1"], out["category_top5"] = _topk(summaries, truth, heads["category"])
    if "action" in heads:
        counts = evaluation.SegmentCounts()
        for f, s in summaries.items():
            true = [evaluation.Segment(start, end, label) for label, start, end in truth[f].actions]
            counts += evaluation.match_segments(s.actions, true, iou=0.5)
        scores = counts.scores()
        out.update(
            action_f1=scores["f1"], action_precision=scores["precision"], action_recall=scores["recall"]
        )
    if "sentiment" in heads:
        names = heads["sentiment"]
        pred = [names[s.sentiment[0]] if s.sentiment else "" for s in summaries.values()]
        out["sentiment_accuracy"] = evaluation.sentiment_accuracy([t.sentiment for t in truth.values()], pred)
    if "valence" in heads:
        pairs = [(truth[f].valence, s.valence) for f, s in summaries.items() if s.valence is not None]
        if pairs:
            out["valence_mae"] = evaluation.valence_mae(*zip(*pairs, strict=True))
    if "importance" in heads:
        f1s = []
        for f, s in summaries.items():
            duration = durations.get(f)
            if s.importance is None or not truth[f].highlights or not duration:
                continue
            times, values = s.importance
            f1s.append(
                evaluation.highlight_f1(values, times, truth[f].highlights, duration, config.highlight_budget)
            )
        out["highlight_f1"] = float(np.mean(f1s)) if f1s else None
    return out


def _topk(summaries: dict[str, VideoSummary], truth: dict, labels: Sequence[str]) -> tuple[float, float]:
    """Top-1 and top-5 accuracy of the video-level category; a true label the head lacks is a miss."""
    index = {name: i for i, name in enumerate(labels)}
    known = [f for f in summaries if truth[f].category in index and "category" in summaries[f].classes]
    if not known:
        return 0.0, 0.0
    probs = np.stack([summaries[f].classes["category"] for f in known])
    target = np.array([index[truth[f].category] for f in known])
    share = len(known) / len(summaries)
    top1 = evaluation.topk_accuracy(probs, target, 1) * share
    top5 = evaluation.topk_accuracy(probs, target, 5) * share
    return top1, top5


def print_metrics(metrics: dict[str, Any]) -> None:
    """A short table on the console, then the JSON line the interface promises (last line of stdout)."""
    for key in METRICS:
        value = metrics.get(key)
        console.print(f"{key:<20} {'n/a' if value is None else f'{value:.3f}'}")
    print(json.dumps(metrics, sort_keys=True), flush=True)
