"""`reelflow clips`: a corpus's decoded clips to Parquet, its unreadable videos to an errors table, and why
the videos that gave clips from only part of themselves did (truncated, cut mid-GOP) to a partial table."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from flows import storage, tensor_parquet
from flows.clips import DECODE_TASK_CPUS, ClipConfig, clip_dataset, list_corpus, video_dataset
from flows.side_outputs import PARTIAL_SCHEMA, read_errors
from jobs.output import stage
from jobs.runtime import console, init_ray


@dataclass(frozen=True)
class ClipsJobConfig:
    """Where to read videos and write clips, and how to cut them."""

    corpus: str
    out: str
    clips: ClipConfig = field(default_factory=ClipConfig)
    ray_address: str | None = None


@dataclass(frozen=True)
class ClipsSummary:
    videos: int
    clips: int
    errors: int
    seconds: float
    partial: int = 0

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds if self.seconds else 0.0


def main(config: ClipsJobConfig) -> ClipsSummary:
    """Decode every video under `config.corpus`; clips go to OUT/clips/ (read them back with
    `flows.tensor_parquet.read_parquet`), failures to OUT/errors/, partial videos' reasons to OUT/partial/."""
    init_ray(config.ray_address)
    clips_uri = storage.join_uri(config.out, "clips")
    errors_uri = storage.join_uri(config.out, "errors")
    partial_uri = storage.join_uri(config.out, "partial")
    for stale in (clips_uri, errors_uri, partial_uri):
        if storage.exists(stale):
            storage.remove(stale, recursive=True)

    started = time.perf_counter()
    videos = list_corpus(config.corpus)
    console.print(f"[bold]clips[/]: {len(videos)} videos under {config.corpus} → {config.out}")
    fs, path = storage.arrow_filesystem(clips_uri)
    with stage("decode", total=len(videos), remote=True) as shown:
        rows = video_dataset(videos)
        clips = clip_dataset(rows, config.clips, errors_uri, partial_uri=partial_uri, progress=shown.counter)
        tensor_parquet.write_parquet(clips, path, filesystem=fs, num_cpus=DECODE_TASK_CPUS)
    seconds = time.perf_counter() - started

    n_clips = _count_rows(clips_uri)
    partial = read_errors(partial_uri, PARTIAL_SCHEMA).num_rows
    summary = ClipsSummary(len(videos), n_clips, read_errors(errors_uri).num_rows, seconds, partial)
    console.print(
        f"[bold green]done[/]: {summary.videos} videos, {summary.clips} clips, {summary.errors} errors, "
        f"{summary.partial} partial in {summary.seconds:.1f} s ({summary.clips_per_s:.1f} clips/s)"
    )
    return summary


def _count_rows(uri: str) -> int:
    import pyarrow.parquet as pq

    if not storage.exists(uri):
        return 0
    return sum(
        pq.ParquetFile(storage.open_uri(f)).metadata.num_rows for f in storage.list_files(uri, ".parquet")
    )
