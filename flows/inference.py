"""Tagging inference: videos → sliding windows at the models' input → every head's per-clip outputs,
regrouped per video: in Ray blocks of whole videos for the tag job (`predictions_by_video`), or gathered in
the caller for a bounded set (`run_inference`: evaluation). Models come in loaded (the jobs
resolve registry URIs), so this data plane knows nothing of MLflow. Where the clips are predicted (inside the
decode tasks on CPU, an actor pool with GPUs) is `prediction_dataset`'s choice, by `PredictConfig`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa

from flows.aggregate import AggregateConfig, VideoClips, VideoSummary, summarize
from flows.clips import DECODE_TASK_CPUS, ClipConfig, VideoRow, clip_dataset, video_dataset
from flows.predict import (
    PREDICTED_AT,
    ModelLoader,
    PredictConfig,
    ShippedModel,
    output_column,
    predict_clip_stream,
    predict_dataset,
    warm_workers,
)
from flows.side_outputs import read_errors

if TYPE_CHECKING:
    from models import ModelSpec

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


@dataclass(frozen=True)
class Outputs:
    """What aggregating a model's predictions needs of its spec: its heads and per-frame heads. Plain data,
    so that the tasks that aggregate and write do not import torch to unpickle a `ModelSpec` (a second on
    the tail of every chunk)."""

    name: str
    heads: dict[str, tuple[str, ...]]
    step_heads: tuple[str, ...] = ()

    @classmethod
    def of(cls, spec: ModelSpec) -> Outputs:
        return cls(spec.name, {h: tuple(labels) for h, labels in spec.heads.items()}, tuple(spec.step_heads))


@dataclass
class Inference:
    """Clip predictions per video (one VideoClips per model), probe facts, and decode failures."""

    clips_by_video: dict[str, list[VideoClips]] = field(default_factory=dict)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    clips: int = 0


def run_inference(
    videos: Sequence[VideoRow],
    models: Sequence[LoadedModel],
    clip_config: ClipConfig,
    predict: PredictConfig,
    errors_uri: str,
    progress: Any | None = None,
) -> Inference:
    """Decode `videos` into windows and predict them, gathering the per-clip outputs in this process: for a
    bounded set of videos (evaluation); the tag job aggregates in Ray (`predictions_by_video`).

    `errors_uri` is a scratch location every worker can write (the decode error rows land there); the decode
    tasks count what they have done on `progress` (`flows.progress`).
    """
    predictions = prediction_dataset(videos, models, clip_config, predict, errors_uri, progress=progress)
    batches = list(predictions.iter_batches(batch_format="pyarrow", batch_size=None))
    out = Inference()
    if batches:
        for video in videos_in_block(pa.concat_tables(batches), models):
            out.info[video.video_id], out.clips_by_video[video.video_id] = video.info, video.clips
        out.clips = sum(b.num_rows for b in batches)
    out.errors = sorted(read_errors(errors_uri).to_pylist(), key=lambda r: r["video_id"])
    return out


def model_loaders(models: Sequence[LoadedModel]) -> list[ModelLoader]:
    """Loaders that hand the inference processes the caller's modules through the object store: they then
    start without importing MLflow or downloading artifacts, and run exactly the weights resolved. A module
    already shipped (`ShippedModel`, put once for a whole night) is passed on as it is."""
    return [m.module if isinstance(m.module, ShippedModel) else ShippedModel.put(m.module) for m in models]


def prediction_dataset(
    videos: Sequence[VideoRow],
    models: Sequence[LoadedModel],
    clip_config: ClipConfig,
    predict: PredictConfig,
    errors_uri: str,
    partial_uri: str | None = None,
    progress: Any | None = None,
) -> Any:
    """Lazy Ray Dataset of every window's prediction rows (`flows.predict`'s columns beside the clip's),
    predicted inside the decode tasks (CPU) or by an actor pool after them (GPUs). Inside the decode tasks,
    all but one of the first tasks' workers start loading the models now (`flows.predict.warm_workers`).
    The decode tasks count the videos and clips they have done on `progress` (`flows.progress`)."""
    import ray

    clips = functools.partial(clip_dataset, video_dataset(list(videos)), clip_config, errors_uri,
                              partial_uri=partial_uri, progress=progress)  # fmt: skip
    loaders = model_loaders(models)
    if not predict.predicts_in_decode_tasks():
        return predict_dataset(clips(), loaders, predict)
    threads = predict.threads or 1
    cpus = int(ray.cluster_resources().get("CPU", 1))  # a node runs a decode task per CPU
    warm_workers(loaders, max(0, min(cpus, len(videos)) - 1), DECODE_TASK_CPUS, threads)
    return clips(then=functools.partial(predict_clip_stream, loaders=loaders, batch_size=predict.batch_size,
                                        threads=threads))  # fmt: skip


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
    partial_uri: str | None = None,
    progress: Any | None = None,
) -> Any:
    """Lazy Ray Dataset of the videos' prediction rows hash-partitioned on `video_id` into `blocks` blocks,
    each holding every clip of its videos: a `map_batches(..., batch_size=None)` after it sees whole videos
    (`videos_in_block`), as Ray's own `map_groups` relies on. Decode errors go to `errors_uri` and partial
    videos' reasons to `partial_uri`; all of them are written before the first block comes out, since the
    shuffle waits for every prediction. For a single block, `merged_block` gathers them sooner."""
    predictions = prediction_dataset(videos, models, clip_config, predict, errors_uri, partial_uri, progress)
    # Not `sort=True`: Ray 2.60's sorting reduce fails on a shuffle with no rows (every video failed to
    # decode), so `videos_in_block` sorts each block itself.
    return predictions.repartition(blocks, keys=["video_id"])


def merged_block(blocks: Sequence[pa.Table]) -> pa.Table:
    """Every block of a `prediction_dataset` as one table (empty when no video gave a clip): whole videos for
    one writer, without Ray Data merging them first (an all-to-all stage and one more task on the tail)."""
    return pa.concat_tables(blocks, promote_options="default") if blocks else pa.table({})


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


def _output_keys(spec: ModelSpec | Outputs) -> list[str]:
    return [*spec.heads, *(f"{h}_steps" for h in spec.step_heads)]


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
