"""Object storage: a local folder and a real S3-protocol server (moto on loopback) must look the same."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows import storage

SECRET = "sup3r-s3cret-value-do-not-print"


@pytest.fixture
def folder(tmp_path: Path, shared_videos: Path) -> Path:
    """A small corpus: two real videos (one nested, upper-case extension), a text file and a labels file."""
    root = tmp_path / "corpus"
    (root / "nested").mkdir(parents=True)
    shutil.copyfile(shared_videos / "mmaction2" / "test.mp4", root / "a.mp4")
    shutil.copyfile(shared_videos / "decord" / "video_90.mov", root / "nested" / "B.MOV")
    (root / "notes.txt").write_text("not a video")
    (root / "labels.parquet").write_bytes(b"PAR1")
    return root


def relative(objects: list[storage.StoredObject], root: str) -> list[tuple[str, int]]:
    assert all(o.uri.startswith(root + "/") for o in objects), [o.uri for o in objects]
    return [(o.uri[len(root) + 1 :], o.size_bytes) for o in objects]


def test_local_and_s3_listings_agree(folder: Path, s3_bucket: str) -> None:
    local = storage.list_videos(str(folder))
    assert relative(local, str(folder)) == [
        ("a.mp4", (folder / "a.mp4").stat().st_size),
        ("nested/B.MOV", (folder / "nested" / "B.MOV").stat().st_size),
    ]
    assert storage.list_videos(f"file://{folder}/") == local
    assert storage.list_videos(folder) == local  # a pathlib.Path works too

    uploaded = storage.upload_dir(str(folder), f"{s3_bucket}/corpus/")
    assert len(uploaded) == 4
    # Neighbours that share the prefix's leading characters are not under it.
    storage.write_bytes(f"{s3_bucket}/corpus-old/c.mp4", b"other")
    storage.write_bytes(f"{s3_bucket}/corpus.mp4", b"other")
    # A folder marker (an empty "key/" object, as S3 consoles make) is no file.
    fs, path = storage.fsspec_filesystem(f"{s3_bucket}/corpus/empty.mp4/")
    fs.pipe_file(path + "/", b"")
    remote = storage.list_videos(f"{s3_bucket}/corpus")
    assert relative(remote, f"{s3_bucket}/corpus") == relative(local, str(folder))
    assert all(len(o.etag) == 32 and '"' not in o.etag for o in remote)
    assert storage.list_files(f"{s3_bucket}/corpus") == sorted(uploaded)
    assert storage.list_files(f"{s3_bucket}/corpus", suffix=".txt") == [f"{s3_bucket}/corpus/notes.txt"]


def test_a_uri_naming_one_file_lists_that_file(folder: Path, s3_bucket: str) -> None:
    (video,) = storage.list_videos(str(folder / "a.mp4"))
    assert video == storage.stat(str(folder / "a.mp4"))
    # Named explicitly, a file is listed whatever its extension: the decoder reports it if it is no video.
    assert [o.uri for o in storage.list_videos(str(folder / "notes.txt"))] == [str(folder / "notes.txt")]

    storage.put_file(str(folder / "a.mp4"), f"{s3_bucket}/one/a.mp4")
    (remote,) = storage.list_videos(f"{s3_bucket}/one/a.mp4")
    assert (remote.uri, remote.size_bytes) == (f"{s3_bucket}/one/a.mp4", video.size_bytes)
    assert remote == storage.stat(f"{s3_bucket}/one/a.mp4")


def test_extensions_filter_case_insensitively(folder: Path, s3_bucket: str) -> None:
    (folder / "nested" / "c.Mkv").write_bytes(b"x")
    (folder / "mp4").write_bytes(b"x")  # a name without a suffix is not a video
    assert [Path(o.uri).name for o in storage.list_videos(str(folder))] == ["a.mp4", "B.MOV", "c.Mkv"]
    assert [Path(o.uri).name for o in storage.list_videos(str(folder), extensions={".MKV"})] == ["c.Mkv"]

    storage.upload_dir(str(folder), s3_bucket)
    assert [o.uri for o in storage.list_videos(s3_bucket, extensions=[".mov", ".mkv"])] == [
        f"{s3_bucket}/nested/B.MOV",
        f"{s3_bucket}/nested/c.Mkv",
    ]
    with pytest.raises(ValueError, match=r"'mp4' must be a suffix starting with a dot"):
        storage.list_videos(str(folder), extensions={"mp4"})
    with pytest.raises(ValueError, match=r"not the string '\.mp4'"):
        storage.list_videos(str(folder), extensions=".mp4")


def test_local_video_id_follows_content_not_mtime(folder: Path) -> None:
    path = folder / "a.mp4"
    assert path.stat().st_size > 4 * storage.FINGERPRINT_BYTES
    (before,) = storage.list_videos(str(path))
    os.utime(path, (1, 1))
    (touched,) = storage.list_videos(str(path))
    assert storage.video_id(touched.uri, touched.etag) == storage.video_id(before.uri, before.etag)

    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # a change near the end, well past the first 64 KiB, same size
    path.write_bytes(bytes(data))
    (changed,) = storage.list_videos(str(path))
    assert changed.size_bytes == before.size_bytes
    assert storage.video_id(changed.uri, changed.etag) != storage.video_id(before.uri, before.etag)

    path.write_bytes(bytes(data[:-1]))  # truncated by one byte
    (truncated,) = storage.list_videos(str(path))
    assert truncated.etag not in (changed.etag, before.etag)

    shutil.copyfile(path, folder / "copy.mp4")
    (copy,) = storage.list_videos(str(folder / "copy.mp4"))
    assert copy.etag == truncated.etag  # same bytes, same etag, but another URI: another id
    assert storage.video_id(copy.uri, copy.etag) != storage.video_id(truncated.uri, truncated.etag)


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


def test_video_id_ignores_how_a_uri_is_spelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert storage.video_id("s3a://b/k/v.mp4", "e") == storage.video_id("s3://b/k/v.mp4", "e")
    monkeypatch.chdir(tmp_path)
    assert storage.video_id("v.mp4", "e") == storage.video_id(f"file://{tmp_path}/v.mp4", "e")
    assert storage.video_id("v.mp4", "e") == storage.video_id(str(tmp_path / "v.mp4"), "e")
    with pytest.raises(ValueError, match="empty etag"):
        storage.video_id("s3://b/v.mp4", "")


def test_uris_are_canonical_so_listings_and_joins_compare_equal(
    tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bucket = storage.bucket_of(s3_bucket)
    for base in ("out/tables", f"file://{tmp_path}/out/tables/", f"s3a://{bucket}/out/tables/"):
        target = storage.join_uri(base, "_commits", "job.json")
        storage.write_bytes(target, b"{}")
        assert storage.list_files(base) == [target]
        assert target.startswith(storage.join_uri(base) + "/")
    assert storage.join_uri(s3_bucket, "", "/a/", "b") == f"{s3_bucket}/a/b"
    with pytest.raises(ValueError, match=r"gs://b/x: unsupported scheme 'gs'"):
        storage.list_videos("gs://b/x")
    with pytest.raises(ValueError, match="needs a bucket"):
        storage.exists("s3:///key")


def test_s3_local_copy_is_identical_and_cleaned_up(folder: Path, s3_bucket: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    uri = f"{s3_bucket}/x/a.mp4"
    storage.put_file(str(folder / "a.mp4"), uri)
    with storage.local_copy(uri, dir=str(spool)) as path:
        assert Path(path).read_bytes() == (folder / "a.mp4").read_bytes()
        assert Path(path).parent == spool and path.endswith(".mp4")  # decoders may go by the extension
    assert not os.path.exists(path)

    with pytest.raises(RuntimeError), storage.local_copy(uri, dir=str(spool)):
        raise RuntimeError("decoder failed")
    missing = storage.local_copy(f"{s3_bucket}/x/missing.mp4", dir=str(spool))
    with pytest.raises(FileNotFoundError, match=r"/x/missing\.mp4: no such"), missing:
        pass
    assert list(spool.iterdir()) == []

    with storage.local_copy(f"file://{folder}/a.mp4") as path:
        assert path == str(folder / "a.mp4")  # local files are read in place, not copied


def test_arrow_filesystem_writes_parquet_to_the_configured_endpoint(s3_bucket: str, s3_server: str) -> None:
    import s3fs

    table = pa.table({"x": [1, 2, 3], "s": ["a", "b", "c"]})
    fs, path = storage.arrow_filesystem(f"{s3_bucket}/t/part-0.parquet")
    assert path == f"{storage.bucket_of(s3_bucket)}/t/part-0.parquet"
    shipped = pickle.loads(pickle.dumps(fs))  # what Ray does to hand it to a worker
    assert b"testing-secret-key" not in pickle.dumps(fs)
    pq.write_table(table, path, filesystem=shipped)

    # A client of its own, pointed at the moto server by hand, finds the object there.
    direct = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    assert direct.cat_file(path)[:4] == b"PAR1"
    fs, folder = storage.arrow_filesystem(f"{s3_bucket}/t/")
    assert pq.read_table(folder, filesystem=fs).equals(table)


def test_exclusive_writes_let_exactly_one_writer_win(tmp_path: Path, s3_bucket: str) -> None:
    for base in (str(tmp_path), s3_bucket):
        uri = storage.join_uri(base, "_commits", "run-1.json")
        storage.write_bytes(uri, b"first", overwrite=False)
        with pytest.raises(FileExistsError, match=r"run-1\.json: already exists"):
            storage.write_bytes(uri, b"second", overwrite=False)
        with pytest.raises(FileExistsError), storage.open_uri(uri, "xb") as f:
            f.write(b"third")
        assert storage.read_bytes(uri) == b"first"
        storage.write_bytes(uri, b"replaced")
        assert storage.read_bytes(uri) == b"replaced"
        assert storage.list_files(base) == [uri]  # no temporary files left behind


def test_a_failed_local_write_keeps_the_old_bytes_and_leaves_no_temp_file(tmp_path: Path) -> None:
    uri = str(tmp_path / "t" / "manifest.json")
    storage.write_bytes(uri, b"old")
    with pytest.raises(TypeError):
        storage.write_bytes(uri, "not bytes")  # type: ignore[arg-type]  # fails halfway, after the open
    assert storage.read_bytes(uri) == b"old"
    assert os.listdir(tmp_path / "t") == ["manifest.json"]


def test_rename_and_remove(tmp_path: Path, s3_bucket: str) -> None:
    for base in (str(tmp_path), s3_bucket):
        stage, final = storage.join_uri(base, "stage"), storage.join_uri(base, "final")
        storage.write_bytes(f"{stage}/f.bin", b"data")
        storage.rename(f"{stage}/f.bin", f"{final}/f.bin")
        assert storage.read_bytes(f"{final}/f.bin") == b"data"
        assert not storage.exists(f"{stage}/f.bin")

        storage.write_bytes(f"{stage}/run/a/1.bin", b"1")
        storage.write_bytes(f"{stage}/run/2.bin", b"2")
        storage.rename(f"{stage}/run", f"{final}/run")  # a whole folder / prefix
        assert storage.list_files(f"{final}/run") == [f"{final}/run/2.bin", f"{final}/run/a/1.bin"]
        assert not storage.exists(f"{stage}/run")
        with pytest.raises(FileNotFoundError, match=r"/stage/gone: no such"):
            storage.rename(f"{stage}/gone", f"{final}/gone")

        storage.remove(f"{final}/never-was.bin")  # idempotent: nothing there is fine
        storage.remove(f"{final}/no-such-folder", recursive=True)
        storage.remove(f"{final}", recursive=True)
        assert not storage.exists(final)
        assert storage.exists(base)
    with pytest.raises(ValueError, match="refusing to remove a whole bucket"):
        storage.remove(s3_bucket, recursive=True)
    storage.makedirs(str(tmp_path / "d"))
    with pytest.raises(IsADirectoryError, match=r"/d: is a folder"):
        storage.remove(str(tmp_path / "d"))


def test_missing_locations_are_one_line_errors_naming_the_uri(tmp_path: Path, s3_bucket: str) -> None:
    cases = [
        (str(tmp_path / "nowhere"), "no such file, folder or prefix"),
        (f"{s3_bucket}/nowhere", "no such file, folder or prefix"),
        ("s3://no-such-bucket-here/x", "no such bucket"),
        ("s3://no-such-bucket-here", "no such bucket"),
    ]
    for uri, reason in cases:
        with pytest.raises(FileNotFoundError) as err:
            storage.list_videos(uri)
        assert str(err.value) == f"{uri}: {reason}"
    with pytest.raises(FileNotFoundError, match=rf"^{s3_bucket}/x\.bin: no such"):
        storage.read_bytes(f"{s3_bucket}/x.bin")
    assert not storage.exists("s3://no-such-bucket-here")
    assert not storage.exists(f"{s3_bucket}/nowhere")


def test_wrong_credentials_name_the_bucket_and_never_the_secret(
    s3_bucket: str,
    strict_s3_server: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert storage.list_videos(s3_bucket) == []  # the filesystem for the good settings exists already …
    caplog.set_level(logging.DEBUG)
    # … and a change of endpoint and keys after that is honoured (moto's strict server knows no key).
    monkeypatch.setenv("AWS_ENDPOINT_URL", strict_s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    calls = [
        lambda: storage.list_videos("s3://corpus-bucket/videos"),
        lambda: storage.list_videos("s3://corpus-bucket"),
        lambda: storage.exists("s3://corpus-bucket"),  # never a quiet "no"
        lambda: storage.write_bytes("s3://corpus-bucket/x", b"x"),
    ]
    for call in calls:
        with pytest.raises(PermissionError) as err:
            call()
        message = str(err.value)
        assert message.startswith("s3://corpus-bucket")
        assert "access denied to bucket corpus-bucket" in message
        assert "\n" not in message and SECRET not in message
    fs, _ = storage.fsspec_filesystem("s3://corpus-bucket")
    assert SECRET not in repr(fs) and SECRET.encode() not in pickle.dumps(fs)
    assert SECRET not in caplog.text


def test_missing_credentials_are_a_one_line_error(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to look for here
    with pytest.raises(PermissionError, match=r"^s3://corpus-bucket/v: no usable AWS credentials for bucket"):
        storage.list_videos("s3://corpus-bucket/v")
