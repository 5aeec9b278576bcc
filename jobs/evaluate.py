"""`reelflow evaluate`: a registered model scored on labelled videos through the tagging path.

    reelflow evaluate --model models:/reelflow-multitask@candidate --corpus reelflow-demo/corpus

The videos are decoded and predicted exactly as `reelflow tag` does (sliding windows at the model's
input, the actor pool, `flows.aggregate`), and what would become table rows is scored against the
labels manifest with `jobs.evaluation`: category top-1 / top-5 and mean class accuracy, action segment F1
at IoU 0.5 and ActivityNet's mAP over tIoU 0.5:0.95, sentiment accuracy, valence MAE and highlight F1
(SumMe / TVSum protocol). Each head is scored on the videos that have its ground truth; a metric without
any is null. With a `split` column the manifest's held-out split (`test`, else `val`) is scored unless
`--split` says otherwise. The command prints the metrics as one JSON object on its last line.
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
from jobs.output import stage
from jobs.registered import DEFAULT_MLFLOW_DIR, resolve_models
from jobs.runtime import console

METRICS = (
    "category_top1", "category_top5", "category_mean_class_accuracy", "action_f1", "action_map",
    "sentiment_accuracy", "valence_mae", "highlight_f1",
)  # fmt: skip


@dataclass(frozen=True)
class EvaluateConfig:
    """The model, the labelled corpus (labels default to CORPUS/labels.parquet) and how to run inference."""

    model: str
    corpus: str
    labels: str | None = None
    tracking_uri: str | None = None
    split: str | None = None  # train, val, test or all; default: test, else val, when the labels have splits
    trust_pickle: bool = False  # load a version an older reelflow pickled (see jobs.tracking.load_model)
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
    (model,) = resolve_models([config.model], tracking_uri, config.trust_pickle)
    manifest = flabels.read_manifest(config.labels or storage.join_uri(config.corpus, flabels.LABELS_FILE))
    split = None if videos is not None else config.split or held_out_split(manifest)
    rows = select_videos(config.corpus, manifest, videos, None if split == "all" else split)
    clip_config = tagging_clip_config([model.spec], None)
    scope = f" (split {split})" if split and split != "all" else ""
    console.print(f"evaluate: {model.uri} on {len(rows)} labelled videos of {config.corpus}{scope}")

    init_ray()
    with (
        tempfile.TemporaryDirectory(prefix="reelflow-evaluate-") as tmp,
        stage("evaluate", total=len(rows), remote=True) as shown,
    ):
        result = run_inference(rows, [model], clip_config, config.predict, tmp, progress=shown.counter)
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


def held_out_split(manifest: flabels.Manifest) -> str | None:
    """The split a model is scored on: `test` when the manifest has test videos, else `val`, else None."""
    splits = {v.split for v in manifest.videos.values()}
    return next((s for s in ("test", "val") if s in splits), None)


def select_videos(
    corpus: str, manifest: flabels.Manifest, videos: Sequence[str] | None, split: str | None = None
) -> list[VideoRow]:
    """The corpus's videos that have labels (in `split`, when given), or just `videos` (each must be in
    the corpus and labelled)."""
    listed = {flabels.relative_file(r.uri, corpus): r for r in list_video_rows(corpus)}
    if split is not None and split not in flabels.SPLITS:
        raise ValueError(f"evaluate: split {split!r} must be one of {', '.join(flabels.SPLITS)} or all")
    if videos is None:
        chosen = [
            f for f in sorted(listed) if f in manifest.videos and split in (None, manifest.videos[f].split)
        ]
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
        scope = f" in split {split!r}" if split else ""
        raise ValueError(f"evaluate: no labelled videos{scope} in {corpus} (labels {manifest.uri})")
    return [listed[f] for f in chosen]


def score(
    summaries: dict[str, VideoSummary],
    manifest: flabels.Manifest,
    heads: dict[str, tuple[str, ...]],
    durations: dict[str, float | None],
    config: AggregateConfig | None = None,
) -> dict[str, Any]:
    """The metrics of per-video summaries (by corpus-relative file) against the manifest. Each head is
    scored on the videos that have its ground truth; a head without any stays None."""
    config = config or AggregateConfig()
    out: dict[str, Any] = dict.fromkeys(METRICS)

    def labelled(head: str) -> dict[str, flabels.VideoLabels]:
        return {f: manifest.videos[f] for f in summaries if manifest.videos[f].has(head)}

    if "category" in heads and (truth := labelled("category")):
        out.update(_classification({f: summaries[f] for f in truth}, truth, heads["category"]))
    if "action" in heads and (truth := labelled("action")):
        out.update(_actions({f: summaries[f] for f in truth}, truth))
    if "sentiment" in heads and (truth := labelled("sentiment")):
        names = heads["sentiment"]
        pred = [names[summaries[f].sentiment[0]] if summaries[f].sentiment else "" for f in truth]
        out["sentiment_accuracy"] = evaluation.sentiment_accuracy([t.sentiment for t in truth.values()], pred)
    if "valence" in heads and (truth := labelled("valence")):
        pairs = [
            (t.valence, summaries[f].valence) for f, t in truth.items() if summaries[f].valence is not None
        ]
        if pairs:
            out["valence_mae"] = evaluation.valence_mae(*zip(*pairs, strict=True))
    if "importance" in heads and (truth := labelled("importance")):
        f1s = []
        for f, video in truth.items():
            s, duration = summaries[f], durations.get(f)
            if s.importance is None or not duration:
                continue
            times, values = s.importance
            true = true_highlights(video, duration, config.highlight_budget)
            if true:
                f1s.append(evaluation.highlight_f1(values, times, true, duration, config.highlight_budget))
        out["highlight_f1"] = float(np.mean(f1s)) if f1s else None
    return out


def _classification(
    summaries: dict[str, VideoSummary], truth: dict[str, flabels.VideoLabels], names: Sequence[str]
) -> dict[str, float]:
    """Top-1 / top-5 and mean class accuracy of the video-level category (UCF101's and Kinetics' metrics);
    a true label the head lacks is a miss."""
    index = {name: i for i, name in enumerate(names)}
    unknown = len(names)  # a true class outside the head: one more class, never predicted
    target = np.array([index.get(t.category, unknown) for t in truth.values()])
    predicted = np.array(["category" in summaries[f].classes for f in truth])
    scored = (target < unknown) & predicted
    top1 = top5 = 0.0
    if scored.any():
        probs = np.stack(
            [summaries[f].classes["category"] for f, ok in zip(truth, scored, strict=True) if ok]
        )
        top1 = evaluation.topk_accuracy(probs, target[scored], 1) * scored.mean()
        top5 = evaluation.topk_accuracy(probs, target[scored], 5) * scored.mean()
    preds = np.array(
        [
            summaries[f].classes["category"].argmax() if ok else unknown + 1
            for f, ok in zip(truth, predicted, strict=True)
        ]
    )
    return {
        "category_top1": top1,
        "category_top5": top5,
        "category_mean_class_accuracy": evaluation.mean_class_accuracy(target, preds, unknown + 2),
    }


def _actions(summaries: dict[str, VideoSummary], truth: dict[str, flabels.VideoLabels]) -> dict[str, float]:
    """Segment F1 at tIoU 0.5 and ActivityNet's detection mAP averaged over tIoU 0.5:0.05:0.95."""
    counts = evaluation.SegmentCounts()
    true = {
        f: [evaluation.Segment(start, end, label) for label, start, end in t.actions]
        for f, t in truth.items()
    }
    for f, s in summaries.items():
        counts += evaluation.match_segments(s.actions, true[f], iou=0.5)
    scores = counts.scores()
    out = {
        "action_f1": scores["f1"],
        "action_precision": scores["precision"],
        "action_recall": scores["recall"],
    }
    if any(true.values()):
        detection = evaluation.detection_map({f: s.actions for f, s in summaries.items()}, true)
        out.update({f"action_{k}": v for k, v in detection.items()})
    return out


def true_highlights(
    video: flabels.VideoLabels, duration_s: float, budget: float
) -> list[tuple[float, float]]:
    """A video's ground-truth summary: its highlight segments, or for per-frame importance scores (TVSum)
    the knapsack summary of those scores under the same budget, as the summarization papers build it."""
    if video.highlights is not None:
        return list(video.highlights)
    if video.importance is None or not video.importance_fps:
        return []
    scores = flabels.scaled_importance(video.importance)
    times = np.arange(len(scores)) / float(video.importance_fps)
    return [(s.start_s, s.end_s) for s in evaluation.select_highlights(scores, times, duration_s, budget)]


def print_metrics(metrics: dict[str, Any]) -> None:
    """A short table on the console, then the JSON line the interface promises (last line of stdout)."""
    for key in METRICS:
        value = metrics.get(key)
        console.print(f"{key:<20} {'n/a' if value is None else f'{value:.3f}'}")
    print(json.dumps(metrics, sort_keys=True), flush=True)
