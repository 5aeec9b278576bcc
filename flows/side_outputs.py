"""The clip dataflow's side outputs: a row per video that failed (the errors), or that gave clips from only
part of itself (the partial videos), one small Parquet file each under a folder or S3 prefix.

A Ray Dataset has one schema, and clip rows stream on long before a video's outcome is known, so these
rows go beside the dataset rather than in it; the tag job's writers read them after the shuffle.
"""

from __future__ import annotations

from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from flows import storage
from flows.media import VideoError

ERROR_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("uri", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
        ("clips", pa.int32()),  # clips the video gave before it failed (0: it gave none)
    ]
)
# A video that gave clips, but not from all of itself (truncated, cut mid-GOP, undecodable frames, shorter
# than a clip): why, in the words the videos table's `status_reason` shows.
PARTIAL_SCHEMA = pa.schema(
    [("video_id", pa.string()), ("uri", pa.string()), ("status_reason", pa.string()), ("clips", pa.int32())]
)


class Video(Protocol):
    """What a side row names a video by (a listed `flows.clips.VideoRow`)."""

    video_id: str
    uri: str


class ErrorSink:
    """Writes a video's side row to a folder or S3 prefix: one Parquet file per video, named by its id, so
    a task's retry overwrites rather than duplicates it. An error row for a failed video (ERROR_SCHEMA) or,
    with `partial`, a partial video's reason (PARTIAL_SCHEMA)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def write(self, row: Video, error: VideoError, clips: int = 0) -> None:
        self._put(row, {**error.as_row(), "clips": clips}, ERROR_SCHEMA)

    def partial(self, row: Video, reason: str, clips: int) -> None:
        self._put(row, {"status_reason": reason, "clips": clips}, PARTIAL_SCHEMA)

    def _put(self, row: Video, values: dict[str, Any], schema: pa.Schema) -> None:
        table = pa.Table.from_pylist([{"video_id": row.video_id, "uri": row.uri, **values}], schema=schema)
        fs, path = storage.arrow_filesystem(storage.join_uri(self.uri, f"{row.video_id}.parquet"))
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, path, filesystem=fs)


def read_errors(uri: str, schema: pa.Schema = ERROR_SCHEMA) -> pa.Table:
    """Every row written under `uri` (an empty table when there are none): the error rows, or with
    PARTIAL_SCHEMA the partial videos' reasons."""
    files = storage.list_files(uri, suffix=".parquet") if storage.exists(uri) else []
    if not files:
        return schema.empty_table()
    tables = []
    for file in files:
        filesystem, path = storage.arrow_filesystem(file)
        tables.append(pq.read_table(path, filesystem=filesystem, schema=schema))
    return pa.concat_tables(tables)
