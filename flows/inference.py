"""Tagging inference: videos → sliding windows at the models' input → every head's per-clip outputs,
regrouped per video: in Ray blocks of whole videos for the tag job (`predictions_by_video`), or gathered in
the caller for a bounded set (`run_inference`: evaluation, benchmarks). Models come in loaded (the jobs
resolve registry URIs), so this data plane knows nothing of MLflow.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa

from flows.aggregate import AggregateConfig, VideoClips, VideoSummary, summarize
from flows.clips import ClipConfig, VideoRow, clip_dataset, read_errors, video_dataset
from flows.predict import PREDICTED_AT, PredictConfig, output_column, predict_dataset

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
    """Decode `videos` into windows and predict them, gathering the per-clip outputs in this process: for a
    bounded set of videos (evaluation, benchmarks); the tag job aggregates in Ray (`predictions_by_video`).

    `errors_uri` is a scratch location every worker can write (the decode error rows land there);
    `progress` gets a line after the first predictions and then every few seconds.
    """
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the caller prints progress
    clips = clip_dataset(video_dataset(list(videos)), clip_config, errors_uri)
    predictions = predict_dataset(clips, model_loaders(models), predict)

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
        video = _video_predictions(
            vid, {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}, models
        )
        out.info[vid], out.clips_by_video[vid] = video.info, video.clips
    out.errors = sorted(read_errors(errors_uri).to_pylist(), key=lambda r: r["video_id"])
    return out


def model_loaders(models: Sequence[LoadedModel]) -> list[Callable[[], Any]]:
    """Loaders that hand each inference actor the caller's modules through the object store: an actor then
    starts without importing MLflow or downloading artifacts, and runs exactly the weights resolved."""
    import ray

    return [functools.partial(ray.get, ray.put(m.module)) for m in models]


# --- per-video aggregation in Ray ---------------------------------------------------------------------


@dataclass
class VideoPredictions:
    """One video's probe facts and its clip predictions under each model."""

    video_id: str
    info: dict[str, Any]
    clips: list[VideoClips]


def predictions_by_video(
    videos: Sequence[VideoRow],
    models: Sequence[LoadedModel],
    clip_config: ClipConfig,
    predict: PredictConfig,
    errors_uri: str,
    blocks: int,
) -> Any:
    """Lazy Ray Dataset of the videos' prediction rows hash-partitioned on `video_id` into `blocks` blocks,
    each holding every clip of its videos: a `map_batches(..., batch_size=None)` after it sees whole videos
    (`videos_in_block`), as Ray's own `map_groups` relies on. Decode errors go to `errors_uri`; all of them
    are written before the first block comes out, since the shuffle waits for every prediction."""
    clips = clip_dataset(video_dataset(list(videos)), clip_config, errors_uri)
    predictions = predict_dataset(clips, model_loaders(models), predict)
    if blocks <= 1:  # one block holds every video: merging blocks costs less than a hash shuffle
        return predictions.repartition(1)
    # Not `sort=True`: Ray 2.60's sorting reduce fails on a shuffle with no rows (every video failed to
    # decode), so `videos_in_block` sorts each block itself.
    return predictions.repartition(blocks, keys=["video_id"])


def videos_in_block(block: pa.Table, models: Sequence[LoadedModel]) -> Iterator[VideoPredictions]:
    """The videos of a block holding every prediction row of each of its videos (`predictions_by_video`)."""
    if not block.num_rows:
        return
    block = block.sort_by("video_id")
    ids = block.column("video_id").to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    for begin, end in zip(starts, [*starts[1:], len(ids)], strict=True):
        rows = block.slice(int(begin), int(end - begin))
        columns = {name: _column(rows.column(name)) for name in rows.column_names}
        yield _video_predictions(str(ids[begin]), columns, models)


@dataclass(frozen=True)
class PredictionTimes:
    """When a block's clips were predicted: the first batch (its time and clips) and the last."""

    first_at: float
    first_clips: int
    last_at: float

    @classmethod
    def of(cls, block: pa.Table) -> PredictionTimes | None:
        if not block.num_rows:
            return None
        times = block.column(PREDICTED_AT).to_numpy()
        first = float(times.min())
        return cls(first, int((times == first).sum()), float(times.max()))

    def merged(self, other: PredictionTimes | None) -> PredictionTimes:
        """The times of this block and `other` together."""
        if other is None:
            return self
        first = min(self.first_at, other.first_at)
        first_clips = sum(t.first_clips for t in (self, other) if t.first_at == first)
        return PredictionTimes(first, first_clips, max(self.last_at, other.last_at))


def _video_predictions(
    vid: str, columns: dict[str, np.ndarray], models: Sequence[LoadedModel]
) -> VideoPredictions:
    info = {c: _scalar(columns[c][0]) for c in INFO_COLUMNS if c in columns}
    duration = info.get("duration_s")
    clips = [
        VideoClips(
            columns["start_s"].astype(np.float64),
            columns["end_s"].astype(np.float64),
            {
                key: columns[output_column(i, key)]
                for key in _output_keys(m.spec)
                if output_column(i, key) in columns
            },
            float(duration) if duration else None,
        )
        for i, m in enumerate(models)
    ]
    return VideoPredictions(vid, info, clips)


def _column(column: pa.ChunkedArray) -> np.ndarray:
    """A column as numpy: tensor columns (per-frame outputs) as N-d arrays, lists of floats as 2-d arrays."""
    from ray.data.extensions import ArrowTensorType, ArrowVariableShapedTensorType

    array = column.combine_chunks()
    if isinstance(array.type, (ArrowTensorType, ArrowVariableShapedTensorType)):
        return array.to_numpy()
    if pa.types.is_list(array.type) or pa.types.is_fixed_size_list(array.type):
        return np.stack(array.to_numpy(zero_copy_only=False)) if len(array) else np.empty((0, 0))
    return array.to_numpy(zero_copy_only=False)


def summarize_video(
    video: VideoPredictions, models: Sequence[LoadedModel], config: AggregateConfig
) -> list[VideoSummary]:
    """One VideoSummary per model."""
    return [summarize(c, m.spec.heads, config) for c, m in zip(video.clips, models, strict=True)]


def _output_keys(spec: ModelSpec) -> list[str]:
    return [*spec.heads, *(f"{h}_steps" for h in spec.step_heads)]


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
