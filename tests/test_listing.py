"""The corpus listed by name range (`flows.listing`, what the planning tasks run) finds what the driver-side
listing finds, on a folder and on a real S3 server, across ranges, pages, blocks and odd keys."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ODD_KEYS

from flows import listing, storage

NAMES = [
    "0001.mp4", "4/x.mp4", "5.mkv", "Apple/b.MOV", "Zed.mp4", "a/b/c.mp4", "mm.webm", "zz/deep/er/x.mp4",
    "~tilde.mp4", "ünï/cødé.mp4", "_under.mp4", "notes.txt", "labels.parquet", "e/with space.mp4",
]  # fmt: skip


def _listed(corpus: str, rows_per_block: int = 3) -> list[tuple]:
    rows = []
    for lo, hi in listing.name_ranges(corpus):
        for block in listing.list_range(corpus, lo, hi, rows_per_block=rows_per_block):
            assert block.num_rows <= rows_per_block
            rows += block.to_pylist()
    return sorted((r["video_id"], r["uri"], r["size_bytes"], r["etag"]) for r in rows)


def _expected(corpus: str) -> list[tuple]:
    return sorted(
        (storage.video_id(o.uri, o.etag), o.uri, o.size_bytes, o.etag) for o in storage.list_videos(corpus)
    )


def test_a_folder_is_listed_by_range_as_the_driver_lists_it(tmp_path: Path):
    for i, name in enumerate(NAMES):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"v" * (i + 1))
    found = _listed(str(tmp_path))
    assert found == _expected(str(tmp_path))
    assert len(found) == len(NAMES) - 2  # every video, in every name range; no .txt, no .parquet
    assert _listed(str(tmp_path / "Zed.mp4")) == _expected(str(tmp_path / "Zed.mp4"))  # a named file


def test_an_s3_prefix_is_listed_page_by_page_with_odd_keys(s3_bucket: str):
    import boto3

    bucket = s3_bucket.removeprefix("s3://")
    s3 = boto3.client("s3")
    keys = [f"c/{name}" for name in NAMES] + [f"c/many/{i:05d}.mp4" for i in range(1100)]
    keys += ["c/" + key.removeprefix("odd/") for key in ODD_KEYS] + ["c/folder/", "other/x.mp4"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=k.encode()), keys))
    corpus = f"{s3_bucket}/c"
    found = _listed(corpus, rows_per_block=500)
    assert found == _expected(corpus)
    assert len(found) == len(keys) - 4  # no .txt or .parquet, no folder marker, nothing outside c/
    assert f"{corpus}//lead.mp4" in {uri for _, uri, _, _ in found}


def test_a_missing_corpus_is_one_line_naming_it(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"corpus .*nowhere: no such folder, prefix or file"):
        listing.name_ranges(str(tmp_path / "nowhere"))
