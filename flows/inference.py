"""Tagging inference: videos → sliding windows at the models' input → every head's per-clip outputs,
regrouped per video. Shared by the tag job, evaluation and the tag benchmark; models come in loaded (the
jobs resolve registry URIs), so this data plane knows nothing of MLflow.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from flows.aggregate import AggregateConfig, VideoClips, VideoSummary, summarize
from flows.clips import ClipConfig, VideoRow, clip_dataset, read_errors, video_dataset
from flows.predict import PredictConfig, output_column, predict_dataset

if TYPE_CHECKING:
    from models import ModelSpec

PROGRESS_EVERY_S = 5.0
INFO_COLUMNS = ("duration_s", "fps", "n_frames", "width", "height", "codec", "has_audio")


class LoadedModel(Protocol):
    """A model ready for inference: its spec (how to preprocess, which heads) and its module."""

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def module(self) -> Any: ...


def tagging_clip_config(specs: Sequence[ModelSpec], stride: int | None, decoder: str = "auto") -> ClipConfig:
    """Sliding windows covering each video at the models' input; all models must read the same clips."""
    first = specs[0]
    for spec in specs[1:]:
        differ = [f for f in ("clip_len", "frame_size", "fps") if getattr(spec, f) != getattr(first, f)]
        if differ:
            raise ValueError(
                f"tag: models {first.name} and {spec.name} read different clips ({', '.join(differ)}); "
                "tag them in separate runs"
            )
    audio_rates = {s.audio_rate for s in specs if "audio" in s.modalities}
    if len(audio_rates) > 1:
        raise ValueError(f"tag: the models read audio at different rates {sorted(audio_rates)}")
    return ClipConfig(
        clip_len=first.clip_len,
        size=tuple(first.frame_size),
        sampling="sliding",
        stride=min(stride or first.clip_len, first.clip_len),
        target_fps=first.fps,
        decoder=decoder,
        audio=bool(audio_rates),
        audio_rate=audio_rates.pop() if audio_rates else 16_000,
        subtitles=any("text" in s.modalities for s in specs),
        video_info=True,
    )


@dataclass
class Inference:
    """Clip predictions per video (one VideoClips per model), probe facts, and decode failures."""

    clips_by_video: dict[str, list[VideoClips]] = field(default_factory=dict)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    clips: int = 0
    seconds: float = 0.0
    first_batch_s: float = 0.0  # start-up: until the first predictions came back
    first_batch_clips: int = 0

    @property
    def steady_clips_per_s(self) -> float:
        """Clips/s after the first predictions (actor start-up and the first decode excluded)."""
        span = self.seconds - self.first_batch_s
        return (self.clips - self.first_batch_clips) / span if span > 0 else 0.0

    @property
    def failed(self) -> set[str]:
        """Videos that failed and gave no clips at all."""
        return {e["video_id"] for e in self.errors} - set(self.clips_by_video)


def run_inference(
    videos: Sequence[VideoRow],
    models: Sequence[LoadedModel],
    clip_config: ClipConfig,
    predict: PredictConfig,
    errors_uri: str,
    progress: Callable[[str], None] | None = None,
) -> Inference:
    """Decode `videos` into windows and predict them; the caller gathers the small per-clip outputs.

    `errors_uri` is a scratch location every worker can write (the decode error rows land there);
    `progress` gets a line after the first predictions and then every few seconds.
    """
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the caller prints progress
    # The caller's copies go through the object store: an actor then starts without importing MLflow or
    # downloading artifacts, and every actor runs exactly the weights the caller resolved.
    loaders = [functools.partial(ray.get, ray.put(m.module)) for m in models]
    clips = clip_dataset(video_dataset(list(videos)), clip_config, errors_uri)
    predictions = predict_dataset(clips, loaders, predict)

    started = time.perf_counter()
    parts: dict[str, list[dict[str, np.ndarray]]] = {}
    out = Inference()
    last = started
    for batch in predictions.iter_batches(batch_format="numpy", batch_size=None):
        ids = batch["video_id"]
        for vid in np.unique(ids):
            rows = ids == vid
            parts.setdefault(str(vid), []).append({k: np.asarray(v)[rows] for k, v in batch.items()})
        out.clips += len(ids)
        now = time.perf_counter()
        if not out.first_batch_clips:
            out.first_batch_s, out.first_batch_clips = now - started, len(ids)
        if progress is not None and (out.clips == len(ids) or now - last >= PROGRESS_EVERY_S):
            last = now
            progress(
                f"tag: {out.clips} clips from {len(parts)}/{len(videos)} videos, "
                f"{out.clips / (now - started):.1f} clips/s"
            )
    out.seconds = time.perf_counter() - started
    for vid, chunks in parts.items():
        merged = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        out.info[vid] = {c: _scalar(merged[c][0]) for c in INFO_COLUMNS if c in merged}
        duration = out.info[vid].get("duration_s")
        out.clips_by_video[vid] = [
            VideoClips(
                merged["start_s"].astype(np.float64),
                merged["end_s"].astype(np.float64),
                {
                    key: merged[output_column(i, key)]
                    for key in _output_keys(m.spec)
                    if output_column(i, key) in merged
                },
                float(duration) if duration else None,
            )
            for i, m in enumerate(models)
        ]
    out.errors = sorted(read_errors(errors_uri).to_pylist(), key=lambda r: r["video_id"])
    return out


def summaries(
    result: Inference, models: Sequence[LoadedModel], config: AggregateConfig
) -> dict[str, list[VideoSummary]]:
    """video_id → one VideoSummary per model."""
    return {
        vid: [summarize(c, m.spec.heads, config) for c, m in zip(per_model, models, strict=True)]
        for vid, per_model in result.clips_by_video.items()
    }


def _output_keys(spec: ModelSpec) -> list[str]:
    return [*spec.heads, *(f"{h}_steps" for h in spec.step_heads)]


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
