"""One way to address objects by URI: a local folder, `file://…`, or `s3://bucket/prefix`.

S3 goes through s3fs, which takes the endpoint, region and credentials from the standard AWS chain or
the environment (`AWS_ENDPOINT_URL` points it at MinIO or any S3-compatible store). Ray Data gets an
explicit pyarrow filesystem wrapping the same s3fs instance: pyarrow's own S3FileSystem ignores
`AWS_ENDPOINT_URL`, and Ray Data resolves a bare `s3://` path with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec
import pyarrow.fs as pafs

VIDEO_EXTENSIONS = frozenset(
    {
        ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mts", ".m2ts", ".mpg", ".mpeg",
        ".3gp", ".3g2", ".mxf", ".flv", ".wmv", ".asf", ".ogv", ".vob",
    }
)  # fmt: skip

# Bytes read from each end of a local file for its content fingerprint.
FINGERPRINT_BYTES = 64 * 1024


@dataclass(frozen=True)
class StoredObject:
    """A listed object: absolute URI, size, and an etag that changes when the content does."""

    uri: str
    size_bytes: int
    etag: str


def is_s3(uri: str) -> bool:
    """Whether `uri` names an S3 (or S3-compatible) object or prefix."""
    return uri.startswith(("s3://", "s3a://"))


def _local_path(uri: str) -> str:
    return os.path.abspath(uri[len("file://") :] if uri.startswith("file://") else uri)


def _s3_env_key() -> tuple[str | None, ...]:
    names = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
             "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")  # fmt: skip
    return tuple(os.environ.get(n) for n in names)


_S3_CACHE: dict[tuple[str | None, ...], Any] = {}


def _s3() -> Any:
    """An s3fs filesystem for the current environment (re-made when AWS_* settings change)."""
    import s3fs

    key = _s3_env_key()
    if key not in _S3_CACHE:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            client_kwargs["region_name"] = region
        _S3_CACHE.clear()
        _S3_CACHE[key] = s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs=client_kwargs)
    return _S3_CACHE[key]


def fsspec_filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URI."""
    if is_s3(uri):
        return _s3(), uri.split("://", 1)[1].rstrip("/")
    return fsspec.filesystem("file"), _local_path(uri)


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path) for Ray Data's read/write_parquet and pyarrow datasets."""
    fs, path = fsspec_filesystem(uri)
    if is_s3(uri):
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    return pafs.LocalFileSystem(), path


def _uri(fs: fsspec.AbstractFileSystem, path: str, s3: bool) -> str:
    return f"s3://{path}" if s3 else path


@contextlib.contextmanager
def _friendly_errors(uri: str) -> Iterator[None]:
    """Turn backend errors into one-line messages that name the URI and never a credential."""
    try:
        yield
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no such file, folder or bucket") from None
    except PermissionError as err:
        raise PermissionError(f"{uri}: access denied ({_reason(err)})") from None
    except OSError as err:
        if "InvalidAccessKeyId" in str(err) or "SignatureDoesNotMatch" in str(err) or "Forbidden" in str(err):
            raise PermissionError(f"{uri}: access denied ({_reason(err)})") from None
        raise


def _reason(err: BaseException) -> str:
    text = str(err)
    for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "ExpiredToken"):
        if code in text:
            return f"{code}: check the AWS credentials in the environment or profile"
    return type(err).__name__


def list_files(uri: str, suffix: str | None = None) -> list[str]:
    """Every file under a folder or prefix (recursively), sorted; optionally only names ending in `suffix`."""
    return [obj.uri for obj in _list(uri) if suffix is None or obj.uri.endswith(suffix)]


def _list(uri: str) -> list[StoredObject]:
    fs, path = fsspec_filesystem(uri)
    s3 = is_s3(uri)
    with _friendly_errors(uri):
        if s3:
            fs.invalidate_cache()
        if not fs.exists(path):
            raise FileNotFoundError(uri)
        entries = {path: fs.info(path)} if fs.isfile(path) else fs.find(path, detail=True)
    out = []
    for name, info in sorted(entries.items()):
        if info.get("type", "file") != "file":
            continue
        full = _uri(fs, name, s3)
        etag = str(info.get("ETag", "")).strip('"') if s3 else ""
        out.append(StoredObject(full, int(info.get("size") or 0), etag))
    return out


def list_videos(uri: str, extensions: frozenset[str] = VIDEO_EXTENSIONS) -> list[StoredObject]:
    """Video files under a folder or prefix (or the one file a URI names), sorted by URI.

    Local files get a content fingerprint as etag (size + hash of both ends), so a `touch` or a copy
    of the same bytes keeps the video's id; S3 objects keep their ETag.
    """
    objects = [o for o in _list(uri) if Path(o.uri).suffix.lower() in extensions]
    if is_s3(uri):
        return objects
    return [StoredObject(o.uri, o.size_bytes, _fingerprint(o.uri, o.size_bytes)) for o in objects]


def _fingerprint(path: str, size: int) -> str:
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        if size > 2 * FINGERPRINT_BYTES:
            f.seek(-FINGERPRINT_BYTES, os.SEEK_END)
            digest.update(f.read(FINGERPRINT_BYTES))
        elif size > FINGERPRINT_BYTES:
            digest.update(f.read())
    return digest.hexdigest()[:32]


def video_id(uri: str, etag: str) -> str:
    """A stable id for the content at a URI: the same bytes at the same URI give the same id."""
    return hashlib.sha256(f"{uri}\n{etag}".encode()).hexdigest()[:16]


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local path holding the object's bytes: local files as they are, S3 objects spooled to a temp file."""
    if not is_s3(uri):
        path = _local_path(uri)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{uri}: no such file")
        yield path
        return
    fs, path = fsspec_filesystem(uri)
    suffix = Path(path).suffix
    fd, tmp = tempfile.mkstemp(prefix="reelflow-", suffix=suffix)
    os.close(fd)
    try:
        with _friendly_errors(uri):
            fs.get_file(path, tmp)
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def open_uri(uri: str, mode: str = "rb") -> IO[Any]:
    """Open an object for reading or writing (parent folders are created for local writes)."""
    fs, path = fsspec_filesystem(uri)
    if "w" in mode and not is_s3(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with _friendly_errors(uri):
        return fs.open(path, mode)


def read_bytes(uri: str) -> bytes:
    """The whole object."""
    with open_uri(uri, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write the whole object. On S3 a single PUT, so readers see all of it or none of it."""
    if is_s3(uri):
        with open_uri(uri, "wb") as f:
            f.write(data)
        return
    path = _local_path(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # atomic on POSIX: a reader never sees a half-written file


def exists(uri: str) -> bool:
    """Whether a file, folder or prefix exists."""
    fs, path = fsspec_filesystem(uri)
    with _friendly_errors(uri):
        if is_s3(uri):
            fs.invalidate_cache(path)
        return fs.exists(path)


def is_dir(uri: str) -> bool:
    """Whether the URI is a folder or a non-empty prefix (or a bucket)."""
    fs, path = fsspec_filesystem(uri)
    with _friendly_errors(uri):
        if is_s3(uri):
            fs.invalidate_cache(path)
        return fs.isdir(path)


def join_uri(base: str, *parts: str) -> str:
    """`base/part/…` for folders and prefixes alike."""
    out = base.rstrip("/")
    for part in parts:
        out += "/" + part.strip("/")
    return out


def makedirs(uri: str) -> None:
    """Create a folder (a no-op on S3, where prefixes need no creating)."""
    if not is_s3(uri):
        os.makedirs(_local_path(uri), exist_ok=True)


def put_file(local_path: str, uri: str) -> None:
    """Copy one local file to a URI."""
    if is_s3(uri):
        fs, path = fsspec_filesystem(uri)
        with _friendly_errors(uri):
            fs.put_file(local_path, path)
        return
    target = _local_path(uri)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copyfile(local_path, target)


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local folder tree to a folder or S3 prefix."""
    root = Path(local_dir)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        put_file(str(file), join_uri(uri, file.relative_to(root).as_posix()))


def remove(uri: str, recursive: bool = False) -> None:
    """Delete a file, or a folder/prefix with everything under it when `recursive`."""
    fs, path = fsspec_filesystem(uri)
    with _friendly_errors(uri):
        fs.rm(path, recursive=recursive)
        if is_s3(uri):
            fs.invalidate_cache(path)


def rename(src: str, dst: str) -> None:
    """Move an object. Local: an atomic rename. S3: copy then delete (not atomic; readers may see both)."""
    if is_s3(src) != is_s3(dst):
        raise ValueError(f"rename: {src} and {dst} are on different stores")
    if not is_s3(src):
        target = _local_path(dst)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(_local_path(src), target)
        return
    fs, src_path = fsspec_filesystem(src)
    _, dst_path = fsspec_filesystem(dst)
    with _friendly_errors(src):
        fs.mv(src_path, dst_path)
        fs.invalidate_cache()
