"""The training data: clips from the clip dataflow with their targets, cached in Parquet once per run."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from flows import labels as flabels
from flows import storage, tensor_parquet
from flows.clips import DECODE_TASK_CPUS, ClipConfig, VideoRow, clip_dataset, video_dataset
from flows.transforms import Augment
from jobs.train.config import TrainConfig
from jobs.train.plan import Plan


def clip_configs(config: TrainConfig, spec: Any, aug: Augment) -> tuple[ClipConfig, ClipConfig]:
    """(training, validation) clip configs: random longer/larger clips; evenly spaced clips at model size."""
    modalities = getattr(spec, "modalities", ("video",))
    common = {
        "target_fps": config.model.fps,
        "decoder": config.data.decoder,
        "audio": "audio" in modalities,
        "audio_rate": spec.audio_rate or 16_000,
        "subtitles": "text" in modalities,
    }
    train = ClipConfig(
        clip_len=aug.decode_len,
        size=aug.decode_size,
        sampling="random",
        clips_per_video=config.data.clips_per_video,
        seed=config.seed,
        **common,
    )
    val = ClipConfig(
        clip_len=config.model.clip_len,
        size=tuple(config.model.frame_size),
        sampling="uniform",
        clips_per_video=config.data.val_clips_per_video,
        **common,
    )
    return train, val


def model_columns(spec: Any) -> list[str]:
    """Columns a training worker reads: frames, the model's other inputs, and the targets."""
    columns = ["frames", "category", "sentiment", "valence", "action_steps", "importance_steps"]
    if "audio" in spec.modalities:
        columns.append("audio")
    if "text" in spec.modalities:
        columns.append("text")
    return columns


def labelled_clips(
    rows: Sequence[VideoRow], clips: ClipConfig, plan: Plan, errors_uri: str, progress: Any | None = None
) -> Any:
    """Lazy dataset: decode the videos' clips and add their per-frame targets (the decode tasks count what
    they did on `progress`, a `flows.progress` counter)."""
    videos = {plan.manifest_file(r): plan.manifest.videos[plan.manifest_file(r)] for r in rows}
    ds = clip_dataset(video_dataset(list(rows)), clips, errors_uri, progress=progress)
    return ds.map_batches(
        flabels.attach_targets,
        batch_size=None,
        batch_format="numpy",
        fn_kwargs={"videos": videos, "labels": plan.manifest.labels, "corpus_uri": plan.corpus},
        num_cpus=DECODE_TASK_CPUS,  # fused into the decode tasks (see `tensor_parquet.write_parquet`)
    )


@dataclass
class TrainData:
    train: Any
    validation: Any
    train_clips: int
    errors: int


def prepare_data(config: TrainConfig, plan: Plan, aug: Augment) -> TrainData:
    """The training and validation datasets; with `data.cache`, decoded once to Parquet under the run."""
    train_clips, val_clips = clip_configs(config, plan.spec, aug)
    errors_uri = storage.join_uri(config.run_uri, "errors")
    columns = model_columns(plan.spec)
    train_of = functools.partial(labelled_clips, plan.train_rows, train_clips, plan, errors_uri)
    val_of = functools.partial(labelled_clips, plan.val_rows, val_clips, plan, errors_uri)
    train, val = train_of(), val_of()
    n_train = len(plan.train_rows) * config.data.clips_per_video
    if config.data.cache:
        cache = storage.join_uri(config.run_uri, "cache")
        key = _cache_key(config, plan, train_clips, val_clips)
        marker = storage.join_uri(cache, "COMPLETE.json")
        if not (storage.exists(marker) and json.loads(storage.read_bytes(marker)).get("key") == key):
            splits = {"train": (train_of, len(plan.train_rows)), "validation": (val_of, len(plan.val_rows))}
            _write_cache(cache, marker, key, splits, columns)
        counts = json.loads(storage.read_bytes(marker))["rows"]
        n_train = counts["train"]
        # Files in a new order every epoch; the workers' shuffle buffers mix clips across videos.
        train = _read_cache(storage.join_uri(cache, "train"), shuffle="files")
        val = _read_cache(storage.join_uri(cache, "validation"))
    train = train.select_columns(columns)
    val = val.select_columns(columns)
    if config.data.in_memory:
        # Read (or decode) once into Ray's object store: epochs then cost no Parquet decoding at all.
        train, val = train.materialize(), val.materialize()
        n_train = train.count()
        train = train.randomize_block_order()
    # One error file per failed video (flows.side_outputs.ErrorSink).
    errors = len(storage.list_files(errors_uri, ".parquet")) if storage.exists(errors_uri) else 0
    return TrainData(train, val, n_train, errors)


def _cache_key(config: TrainConfig, plan: Plan, *clip_configs: ClipConfig) -> str:
    """What the cached clips depend on: the videos (by content id), their labels and how clips are cut."""
    parts = {
        "videos": [r.video_id for r in (*plan.train_rows, *plan.val_rows)],
        "split": [plan.train_files, plan.val_files],
        "labels": asdict(plan.manifest.labels),
        "targets": sorted(
            json.dumps(asdict(plan.manifest.videos[f]), sort_keys=True)
            for f in (*plan.train_files, *plan.val_files)
        ),
        "clips": [asdict(c) for c in clip_configs],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _write_cache(
    cache: str,
    marker: str,
    key: str,
    splits: Mapping[str, tuple[Callable[..., Any], int]],
    columns: list[str],
) -> None:
    """Decode each split (its dataset made by `dataset_of(progress=…)`, over `videos` videos) into Parquet,
    one progress display per split."""
    from jobs.output import stage

    if storage.exists(cache):
        storage.remove(cache, recursive=True)
    rows = {}
    for name, (dataset_of, videos) in splits.items():
        uri = storage.join_uri(cache, name)
        fs, path = storage.arrow_filesystem(uri)
        with stage(f"decode {name} clips", total=videos, remote=True) as shown:
            selected = dataset_of(progress=shown.counter).select_columns([*columns, "file"])
            tensor_parquet.write_parquet(selected, path, filesystem=fs, num_cpus=DECODE_TASK_CPUS)
        rows[name] = _parquet_rows(uri)
    # Written last: a cache without its marker (a crash mid-write) is rebuilt.
    storage.write_bytes(marker, json.dumps({"key": key, "rows": rows}).encode())


def _read_cache(uri: str, shuffle: str | None = None) -> Any:
    fs, path = storage.arrow_filesystem(uri)
    return tensor_parquet.read_parquet(path, filesystem=fs, shuffle=shuffle)


def _parquet_rows(uri: str) -> int:
    import pyarrow.parquet as pq

    if not storage.exists(uri):
        return 0
    total = 0
    for file in storage.list_files(uri, ".parquet"):
        fs, path = storage.arrow_filesystem(file)
        total += pq.ParquetFile(path, filesystem=fs).metadata.num_rows
    return total
