"""A corpus listed in name ranges, for Ray tasks to list it in parallel and never the driver.

`name_ranges` splits a corpus by the first character after its prefix (the driver's only part);
`list_range`, run in a task, lists one range page by page on S3 (ListObjectsV2 with StartAfter) or entry by
entry on a folder, and yields a block every `rows_per_block` videos, so no process holds the corpus. A local
file's etag (a content fingerprint, two small reads) is computed there too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import pyarrow as pa

from flows import storage

LISTING_SCHEMA = pa.schema(
    [("video_id", pa.string()), ("uri", pa.string()), ("size_bytes", pa.int64()), ("etag", pa.string())]
)
# First characters that split a corpus into ranges (S3 orders keys by their UTF-8 bytes, and so does this).
# Names starting with digits, capitals and lowercase letters spread over several ranges; the last range
# takes everything from "~" on, unicode included.
RANGE_STARTS = ("", "0", "5", "A", "N", "a", "e", "i", "m", "q", "u", "~")
ROWS_PER_BLOCK = 10_000


def name_ranges(corpus_uri: str) -> list[tuple[str, str | None]]:
    """The [lo, hi) name ranges that list a corpus in parallel: one for a URI naming a file. Raises
    FileNotFoundError, naming the corpus, when there is nothing there."""
    corpus = storage.canonical_uri(corpus_uri)
    if not storage.exists(corpus):
        raise FileNotFoundError(f"corpus {corpus_uri}: no such folder, prefix or file")
    if not storage.is_dir(corpus):
        return [("", None)]
    return list(zip(RANGE_STARTS, [*RANGE_STARTS[1:], None], strict=True))


def list_range(
    corpus_uri: str,
    lo: str = "",
    hi: str | None = None,
    extensions: Iterable[str] = storage.VIDEO_EXTENSIONS,
    rows_per_block: int = ROWS_PER_BLOCK,
) -> Iterator[pa.Table]:
    """The videos of one name range under a corpus (every file, when the URI names one) as LISTING_SCHEMA
    blocks of at most `rows_per_block` rows, listed as they stream in."""
    if rows_per_block < 1:
        raise ValueError(f"listing: rows_per_block={rows_per_block} must be >= 1")
    corpus = storage.canonical_uri(corpus_uri)
    wanted = frozenset(e.lower() for e in extensions)
    batch: list[tuple[str, int, str]] = []
    for entry in storage.iter_files(corpus, lo, hi):
        if entry[0] == corpus or os.path.splitext(entry[0])[1].lower() in wanted:
            batch.append(entry)
        if len(batch) >= rows_per_block:
            yield _block(corpus, batch)
            batch = []
    if batch:
        yield _block(corpus, batch)


def _block(corpus: str, entries: list[tuple[str, int, str]]) -> pa.Table:
    if not storage.is_s3(corpus):
        etags = storage.local_etags([uri for uri, _, _ in entries])
        entries = [(uri, size, etag) for (uri, size, _), etag in zip(entries, etags, strict=True)]
    return pa.table(
        {
            "video_id": [storage.video_id(uri, etag) for uri, _, etag in entries],
            "uri": [uri for uri, _, _ in entries],
            "size_bytes": [size for _, size, _ in entries],
            "etag": [etag for _, _, etag in entries],
        },
        schema=LISTING_SCHEMA,
    )
