"""Video rows: the listed videos that enter the clip dataflow, and the Ray Dataset of them in blocks that
spread the decode tasks over the cluster (`flows.clips` decodes them)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from flows import storage


@dataclass(frozen=True)
class VideoRow:
    """One listed video: the input row of the clip dataflow."""

    video_id: str
    uri: str
    size_bytes: int
    etag: str
    window_s: tuple[float, float] | None = None  # (start, end): plan clips only inside (a labelled window)


def list_video_rows(corpus_uri: str) -> list[VideoRow]:
    """List every video under a folder, `file://` or `s3://` prefix, with its stable id."""
    return [
        VideoRow(storage.video_id(obj.uri, obj.etag), obj.uri, obj.size_bytes, obj.etag)
        for obj in storage.list_videos(corpus_uri)
    ]


# Each block of video rows is one decode task, and a task costs Ray about 0.1 core-seconds, as much as
# decoding a short clip, and leaves its core idle about as long before the next one starts. At most 16 videos
# per block leave tasks for a cluster that grows after the job starts, and 16 rather than 8 took half the gaps
# out of a 360p run (bench decode 0.83 → 0.88 of the limit). Blocks shrink towards the end of the dataset
# (`block_sizes`), so the last tasks are short and the cores finish together. A task's clips still reach the
# inference stage as they decode (CLIP_BLOCK_BYTES).
BLOCKS_PER_CPU = 2
MAX_VIDEOS_PER_BLOCK = 16
MAX_BLOCKS = 1000


# Ray Data hands a stage's output on in blocks of up to this many bytes (128 MiB by default): a decode task's
# first clips reach the inference actors, or the Parquet writer, when a block fills, not when they decode.
CLIP_BLOCK_BYTES = 8 * 2**20

_VIDEO_SCHEMA = pa.schema(
    [("video_id", pa.string()), ("uri", pa.string()), ("size_bytes", pa.int64()), ("etag", pa.string())]
)
_WINDOW_SCHEMA = _VIDEO_SCHEMA.append(pa.field("window_start_s", pa.float64())).append(
    pa.field("window_end_s", pa.float64())
)


def block_sizes(
    videos: int, slots: int, most: int = MAX_VIDEOS_PER_BLOCK, blocks: int = MAX_BLOCKS
) -> list[int]:
    """Videos per decode task, in order (guided self-scheduling): each block takes its share of the videos
    left over `slots` tasks running at once, between 1 and `most`, so the first tasks are long and the last
    ones short, and no core waits long for another to finish. `most` grows until at most `blocks` blocks."""
    if videos < 0 or slots < 1 or most < 1 or blocks < 1:
        raise ValueError(f"block_sizes: videos={videos}, slots={slots}, most={most}, blocks={blocks}")
    while True:
        sizes, left = [], videos
        while left:
            sizes.append(min(most, max(1, math.ceil(left / slots)), left))
            left -= sizes[-1]
        if len(sizes) <= blocks or most >= videos:
            return sizes
        most *= 2


def video_dataset(videos: list[VideoRow]) -> Any:
    """A Ray Dataset of video rows in blocks of `block_sizes` (about two tasks per cluster CPU at a time), so
    decoding spreads out and ends together; its clip stages pass on blocks of at most `CLIP_BLOCK_BYTES`."""
    import ray
    import ray.data

    items = [asdict(v) for v in videos]
    windowed = any(v.window_s is not None for v in videos)
    for item in items:
        # Two float columns (NaN: no window) rather than a nullable list, which numpy batches mangle.
        start, end = item.pop("window_s") or (math.nan, math.nan)
        if windowed:
            item.update(window_start_s=start, window_end_s=end)
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else os.cpu_count() or 1
    schema = _WINDOW_SCHEMA if windowed else _VIDEO_SCHEMA
    tables, begin = [], 0
    for size in block_sizes(len(items), BLOCKS_PER_CPU * max(1, cpus)) or [0]:
        tables.append(pa.Table.from_pylist(items[begin : begin + size], schema=schema))
        begin += size
    # A Dataset keeps the DataContext it was made with, and so does every stage made from it.
    context = ray.data.DataContext.get_current()
    default_block_bytes = context.target_max_block_size
    context.target_max_block_size = CLIP_BLOCK_BYTES
    try:
        return ray.data.from_blocks(tables)
    finally:
        context.target_max_block_size = default_block_bytes
