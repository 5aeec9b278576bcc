"""Object storage: a local folder and a real S3-protocol server must look the same to reelflow."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows import storage


@pytest.fixture
def folder(tmp_path: Path, shared_videos: Path) -> Path:
    """A small corpus: two videos (one upper-case extension, one nested), a text file and a labels file."""
    (tmp_path / "nested").mkdir()
    shutil.copy(shared_videos / "mmaction2" / "test.mp4", tmp_path / "a.mp4")
    shutil.copy(shared_videos / "decord" / "video_90.mov", tmp_path / "nested" / "B.MOV")
    (tmp_path / "notes.txt").write_text("not a video")
    (tmp_path / "labels.parquet").write_bytes(b"PAR1")
    return tmp_path


def relative(objects: list[storage.StoredObject], root: str) -> list[tuple[str, int]]:
    return [(o.uri[len(root) :].lstrip("/"), o.size_bytes) for o in objects]


def test_local_listing_filters_videos_by_extension(folder: Path) -> None:
    objects = storage.list_videos(str(folder))
    assert relative(objects, str(folder)) == [
        ("a.mp4", (folder / "a.mp4").stat().st_size),
        ("nested/B.MOV", (folder / "nested" / "B.MOV").stat().st_size),
    ]
    assert storage.list_videos(f"file://{folder}") == objects
    assert storage.list_videos(str(folder / "a.mp4")) == objects[:1]


def test_s3_listing_matches_local(folder: Path, s3_bucket: str) -> None:
    storage.upload_dir(str(folder), f"{s3_bucket}/corpus")
    s3_objects = storage.list_videos(f"{s3_bucket}/corpus/")
    assert relative(s3_objects, f"{s3_bucket}/corpus") == relative(storage.list_videos(str(folder)), str(folder))
    assert all(o.uri.startswith("s3://") and o.etag for o in s3_objects)
    assert sorted(storage.list_files(f"{s3_bucket}/corpus", suffix=".txt")) == [f"{s3_bucket}/corpus/notes.txt"]


def test_local_video_id_follows_content_not_mtime(folder: Path) -> None:
    path = folder / "a.mp4"
    (before,) = storage.list_videos(str(path))
    os.utime(path, (1, 1))
    (touched,) = storage.list_videos(str(path))
    assert storage.video_id(touched.uri, touched.etag) == storage.video_id(before.uri, before.etag)

    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # a change near the end, outside the first 64 KiB
    path.write_bytes(bytes(data))
    (changed,) = storage.list_videos(str(path))
    assert storage.video_id(changed.uri, changed.etag) != storage.video_id(before.uri, before.etag)

    shutil.copy(path, folder / "copy.mp4")
    (copy,) = storage.list_videos(str(folder / "copy.mp4"))
    assert copy.etag == changed.etag  # same bytes
    assert storage.video_id(copy.uri, copy.etag) != storage.video_id(changed.uri, changed.etag)  # other URI


def test_s3_video_id_changes_with_content(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/v.mp4"
    storage.write_bytes(uri, b"one")
    (first,) = storage.list_videos(uri)
    storage.write_bytes(uri, b"one")
    (same,) = storage.list_videos(uri)
    storage.write_bytes(uri, b"two")
    (other,) = storage.list_videos(uri)
    assert storage.video_id(first.uri, first.etag) == storage.video_id(same.uri, same.etag)
    assert storage.video_id(first.uri, first.etag) != storage.video_id(other.uri, other.etag)


def test_local_copy_of_s3_object_is_identical_and_cleaned_up(folder: Path, s3_bucket: str) -> None:
    uri = f"{s3_bucket}/x/a.mp4"
    storage.put_file(str(folder / "a.mp4"), uri)
    with storage.local_copy(uri) as path:
        assert Path(path).read_bytes() == (folder / "a.mp4").read_bytes()
        assert path.endswith(".mp4")
    assert not os.path.exists(path)


def test_arrow_filesystem_reaches_the_configured_endpoint(s3_bucket: str) -> None:
    table = pa.table({"x": [1, 2, 3]})
    fs, path = storage.arrow_filesystem(f"{s3_bucket}/t/part-0.parquet")
    pq.write_table(table, path, filesystem=fs)
    # the object is on the moto server: s3fs (a different client) sees it
    assert storage.exists(f"{s3_bucket}/t/part-0.parquet")
    fs, path = storage.arrow_filesystem(f"{s3_bucket}/t")
    assert pq.read_table(path, filesystem=fs).equals(table)


def test_rename_and_remove(tmp_path: Path, s3_bucket: str) -> None:
    for base in (str(tmp_path), s3_bucket):
        storage.write_bytes(storage.join_uri(base, "stage", "f.bin"), b"data")
        storage.rename(storage.join_uri(base, "stage", "f.bin"), storage.join_uri(base, "final", "f.bin"))
        assert storage.read_bytes(storage.join_uri(base, "final", "f.bin")) == b"data"
        assert not storage.exists(storage.join_uri(base, "stage", "f.bin"))
        storage.remove(storage.join_uri(base, "final"), recursive=True)
        assert not storage.exists(storage.join_uri(base, "final", "f.bin"))


def test_missing_locations_name_the_uri(tmp_path: Path, s3_server: str) -> None:
    with pytest.raises(FileNotFoundError, match=r"^.*/nowhere: no such") as err:
        storage.list_videos(str(tmp_path / "nowhere"))
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"s3://no-such-bucket-here/x"):
        storage.list_videos("s3://no-such-bucket-here/x")


def test_wrong_credentials_do_not_leak_the_secret(
    strict_s3_server: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sup3r-s3cret-value-do-not-print"
    monkeypatch.setenv("AWS_ENDPOINT_URL", strict_s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with pytest.raises(PermissionError) as err:
        storage.list_videos("s3://corpus-bucket/videos")
    message = str(err.value)
    assert message.startswith("s3://corpus-bucket/videos: access denied")
    assert "\n" not in message
    assert secret not in message
    assert secret not in caplog.text
