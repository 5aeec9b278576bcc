"""One chunk of a night, done in Ray: decode, predict, aggregate per video and write the six tables' data
files in the workers. The driver gets back only the files (what their Delta add actions record) and a few
counts per block, and commits them (`flows.table_writer`).

Prediction rows are hash-partitioned on `video_id` (`flows.inference.predictions_by_video`), so each block
holds whole videos; one writer per block aggregates its videos and writes one file per table. A chunk small
enough for one writer hands it every prediction block at once instead (`flows.inference.merged_block`).
Videos that gave no clip at all appear in no block: their rows (`videos` status failed, an error per model)
come from one more task that reads the chunk's decode errors.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa

from flows.aggregate import AggregateConfig, VideoSummary
from flows.clips import ClipConfig, VideoRow
from flows.inference import (
    Outputs,
    PredictionTimes,
    merged_block,
    prediction_dataset,
    predictions_by_video,
    summarize_video,
    videos_in_block,
)
from flows.predict import PredictConfig
from flows.side_outputs import PARTIAL_SCHEMA, read_errors
from flows.table_files import DataFile, write_files
from jobs.registered import RegisteredModel
from jobs.tag.plan import ChunkPlan
from jobs.tag.rows import ChunkRows

VIDEOS_PER_WRITER = 2_000  # a chunk of 10,000 videos: 5 writers, 5 files per table
WRITTEN = pa.schema([("files", pa.string()), ("stats", pa.string())])


@dataclass(frozen=True)
class ChunkContext:
    """What a chunk's writers need: the plan (an object-store reference), the models without their weights
    (their specs as `Outputs`), and where to write."""

    plan: Any  # ray.ObjectRef[ChunkPlan]
    models: list[RegisteredModel]
    aggregate: AggregateConfig
    tables_uri: str
    job_run_id: str
    run_date: dt.date
    errors_uri: str
    partial_uri: str


@dataclass
class ChunkOutcome:
    """What the chunk's writers wrote and counted."""

    files: dict[str, list[DataFile]] = field(default_factory=dict)
    tagged: int = 0  # videos that gave clips
    failed: int = 0  # videos that gave none
    clips: int = 0
    times: PredictionTimes | None = None
    labels: dict[str, Counter[str]] = field(default_factory=dict)  # panel → top-1 label → videos

    def add(self, row: Mapping[str, str]) -> None:
        """Add one writer's output row (`WRITTEN`)."""
        for name, files in json.loads(row["files"]).items():
            self.files.setdefault(name, []).extend(DataFile(**f) for f in files)
        stats = json.loads(row["stats"])
        self.tagged += stats["tagged"]
        self.failed += stats["failed"]
        self.clips += stats["clips"]
        for panel, counts in stats["labels"].items():
            self.labels.setdefault(panel, Counter()).update(counts)
        if stats["times"]:
            self.times = PredictionTimes(**stats["times"]).merged(self.times)


def tag_chunk(
    plan: ChunkPlan,
    models: Sequence[RegisteredModel],
    clip_config: ClipConfig,
    predict: PredictConfig,
    aggregate: AggregateConfig,
    *,
    tables_uri: str,
    job_run_id: str,
    run_date: dt.date,
    errors_uri: str,
    partial_uri: str,
    progress: Any | None = None,
) -> tuple[ChunkOutcome, float]:
    """Tag the chunk's videos and write their rows as uncommitted files; returns what was written and the
    wall-clock time inference started at. The decode tasks count their videos and clips on `progress`."""
    import ray

    writers_models = [replace(m, module=None, spec=Outputs.of(m.spec)) for m in models]
    context = ChunkContext(
        ray.put(plan), writers_models, aggregate, tables_uri, job_run_id, run_date, errors_uri, partial_uri
    )
    cpus = int(ray.cluster_resources().get("CPU", 1))
    writers = max(1, min(math.ceil(len(plan.videos) / VIDEOS_PER_WRITER), cpus))
    started = time.time()
    inputs = (plan.videos, models, clip_config, predict, errors_uri)
    if writers == 1:
        predictions = prediction_dataset(*inputs, partial_uri, progress=progress)
        blocks = [ref for bundle in predictions.iter_internal_ref_bundles() for ref in bundle.block_refs]
        written = ray.get(ray.remote(write_blocks).options(num_cpus=1).remote(context, *blocks)).to_pylist()
    else:
        grouped = predictions_by_video(*inputs, writers, partial_uri, progress=progress)
        written = grouped.map_batches(
            write_block, batch_size=None, batch_format="pyarrow", fn_kwargs={"context": context}
        ).iter_rows()
    outcome = ChunkOutcome()
    for row in written:
        outcome.add(row)
    # Every prediction is in by now, so every decode task has finished and written its error rows.
    failures = ray.remote(write_failures).options(num_cpus=1)
    outcome.add(ray.get(failures.remote(context)).to_pylist()[0])
    return outcome, started


def write_block(block: pa.Table, context: ChunkContext) -> pa.Table:
    """Ray Data UDF: a block of whole videos' prediction rows → their rows of every table, written as
    files; returns one `WRITTEN` row (the files as JSON, and the block's counts)."""
    rows, videos, errors = _chunk_rows(context)
    partial = {
        p["video_id"]: p["status_reason"]
        for p in read_errors(context.partial_uri, PARTIAL_SCHEMA).to_pylist()
    }
    labels: dict[str, Counter[str]] = {}
    tagged = 0
    for video in videos_in_block(block, context.models):
        summaries = summarize_video(video, context.models, context.aggregate)
        vid = video.video_id
        rows.add(videos[vid], video.info, summaries, errors.get(vid), partial.get(vid))
        count_top_labels(summaries, context.models, labels)
        tagged += 1
    times = PredictionTimes.of(block)
    stats = {"tagged": tagged, "failed": 0, "clips": block.num_rows, "labels": labels,
             "times": asdict(times) if times else None}  # fmt: skip
    return _written(rows, context, stats)


def write_blocks(context: ChunkContext, *blocks: pa.Table) -> pa.Table:
    """Ray task: `write_block` over every prediction block of the chunk at once (a chunk with one writer)."""
    return write_block(merged_block(blocks), context)


def write_failures(context: ChunkContext) -> pa.Table:
    """The rows of the chunk's videos that failed before giving a single clip (one `WRITTEN` row)."""
    rows, videos, errors = _chunk_rows(context)
    failed = 0
    for error in errors.values():
        if not error["clips"] and error["video_id"] in videos:
            rows.add(videos[error["video_id"]], {}, None, error)
            failed += 1
    stats = {"tagged": 0, "failed": failed, "clips": 0, "labels": {}, "times": None}
    return _written(rows, context, stats)


def _chunk_rows(context: ChunkContext) -> tuple[ChunkRows, dict[str, VideoRow], dict[str, dict[str, Any]]]:
    """An empty row collector for the chunk, its videos by id, and its decode errors by video id."""
    import ray

    plan: ChunkPlan = ray.get(context.plan)
    errors = {e["video_id"]: e for e in read_errors(context.errors_uri).to_pylist()}
    rows = ChunkRows(plan, context.models, context.aggregate, context.run_date)
    return rows, {v.video_id: v for v in plan.videos}, errors


def count_top_labels(
    summaries: Sequence[VideoSummary], models: Sequence[RegisteredModel], counts: dict[str, Counter[str]]
) -> None:
    """Add a video's top-1 label, per classification head of each model, to `counts` (panel → label)."""
    for m, s in zip(models, summaries, strict=True):
        for head, probs in s.classes.items():
            panel = counts.setdefault(f"{m.name} v{m.version} · {head}", Counter())
            panel[m.spec.heads[head][int(np.argmax(probs))]] += 1


def _written(rows: ChunkRows, context: ChunkContext, stats: dict[str, Any]) -> pa.Table:
    files = {
        name: [asdict(f) for f in write_files(context.tables_uri, name, data, job_run_id=context.job_run_id,
                                              run_date=context.run_date)]
        for name, data in rows.tables().items()
    }  # fmt: skip
    return pa.Table.from_pylist([{"files": json.dumps(files), "stats": json.dumps(stats)}], schema=WRITTEN)
