"""One way to address objects by URI: a local folder or file, `file://…`, or `s3://bucket/prefix`.

S3 goes through s3fs, with the endpoint, region and credentials from the standard AWS chain or the
environment (`AWS_ENDPOINT_URL` points it at MinIO or any S3-compatible store). Ray Data and pyarrow get
an explicit pyarrow filesystem wrapping that same s3fs instance (`arrow_filesystem`): a directly built
`pyarrow.fs.S3FileSystem()` ignores `AWS_ENDPOINT_URL` (pyarrow 25), and how a bare `s3://` path is
resolved varies with the pyarrow and Ray versions; one filesystem for listing, reading and writing
leaves no doubt about which store a path means.

Credentials are never passed to s3fs as arguments: botocore reads them from the chain on each machine,
so they are in no filesystem repr, pickle (Ray ships filesystems to workers), log line or error message.

Every URI this module returns is canonical (see `canonical_uri`): `s3://bucket/key` or an absolute local
path, without a trailing slash, so `list_files(base)` entries start with `join_uri(base) + "/"`.
Errors are one line naming the URI: FileNotFoundError (missing file, folder, prefix or bucket),
PermissionError (wrong or missing credentials; names the bucket), FileExistsError (exclusive writes),
ConnectionError (S3 endpoint unreachable), ValueError (a malformed URI or argument).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec
import pyarrow.fs as pafs

VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".mp4", ".m4v", ".mov", ".qt", ".mkv", ".webm", ".avi", ".ts", ".mts", ".m2ts", ".mpg", ".mpeg",
        ".m2v", ".3gp", ".3g2", ".mxf", ".flv", ".f4v", ".wmv", ".asf", ".ogv", ".vob", ".dv", ".y4m",
    }
)  # fmt: skip

# Bytes hashed from each end of a local file for its etag (see `content_fingerprint`).
FINGERPRINT_BYTES = 64 * 1024
FINGERPRINT_VERSION = "fp1"

S3_SCHEMES = ("s3://", "s3a://")
# Environment that decides which S3 store, region and identity s3fs talks to; a change re-makes it.
S3_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE",
)  # fmt: skip
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Prefix of the temporary files that local atomic writes leave behind only if the process dies mid-write.
TEMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class StoredObject:
    """A listed object: canonical URI, size, and an etag that changes when the content does.

    S3: the object's ETag without quotes. Local: `content_fingerprint` (unchanged by `touch` or a copy).
    """

    uri: str
    size_bytes: int
    etag: str


# --- URIs ---------------------------------------------------------------------------------------------


def is_s3(uri: str) -> bool:
    """Whether `uri` names an S3 (or S3-compatible) object, prefix or bucket."""
    return isinstance(uri, str) and uri.startswith(S3_SCHEMES)


def canonical_uri(uri: str) -> str:
    """`s3://bucket/key` (s3a:// folded in) or an absolute local path (file:// decoded), no trailing slash."""
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"URI must be a non-empty string, got {uri!r}")
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    return _local_path(uri)


def _split_s3(uri: str) -> tuple[str, str]:
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    # A key is kept as it is, but for a trailing slash: S3 allows any key ("a//b", "/a", spaces, unicode),
    # and a listing must name every object it finds so that reading it reaches that object.
    key = key.rstrip("/")
    if not bucket:
        raise ValueError(f"{uri}: an S3 URI needs a bucket (s3://bucket/prefix)")
    return bucket, key


def _local_path(uri: str) -> str:
    uri = os.fspath(uri)  # a pathlib.Path works too
    if uri.startswith("file://"):
        parsed = urllib.parse.urlsplit(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{uri}: file:// URIs must name a local path (file:///abs/path)")
        uri = urllib.request.url2pathname(parsed.path)
    elif "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise ValueError(f"{uri}: unsupported scheme {scheme!r}; use a local path, file:// or s3://")
    path = os.path.abspath(os.path.expanduser(uri))
    return path if path == "/" else path.rstrip("/")


def join_uri(base: str, *parts: str) -> str:
    """`base/part/…` for folders and prefixes alike, in canonical form (empty parts are skipped)."""
    out = canonical_uri(base).rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out += "/" + part
    return out or "/"


def bucket_of(uri: str) -> str:
    """The bucket an S3 URI lives in."""
    if not is_s3(uri):
        raise ValueError(f"{uri}: not an S3 URI")
    return _split_s3(uri)[0]


# --- filesystems --------------------------------------------------------------------------------------

_S3_LOCK = threading.Lock()
_S3_CACHE: dict[str, Any] = {}


def _s3_settings_key() -> str:
    # Hashed so that no secret is kept in a readable module-level key; pid because an s3fs instance
    # (its event loop and connections) must not be reused across a fork.
    values = "\0".join(os.environ.get(name, "") for name in S3_ENV)
    return f"{os.getpid()}:{hashlib.sha256(values.encode()).hexdigest()}"


def _s3() -> Any:
    """An s3fs filesystem for the current AWS_* environment (re-made when it changes)."""
    import s3fs

    key = _s3_settings_key()
    with _S3_LOCK:
        fs = _S3_CACHE.get(key)
        if fs is None:
            # s3fs (through botocore ≥ 1.31) reads AWS_ENDPOINT_URL itself; passing it explicitly also pins it
            # into the pickled filesystem that Ray ships to workers, so they reach the store that was listed.
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
            # botocore reads AWS_DEFAULT_REGION (and the profile's region) itself; AWS_REGION is what other
            # AWS SDKs and ECS/Lambda set. (An explicit region_name also makes s3fs's mkdir send a
            # LocationConstraint, which us-east-1 rejects, so it is passed only when needed.)
            region = None if os.environ.get("AWS_DEFAULT_REGION") else os.environ.get("AWS_REGION")
            fs = s3fs.S3FileSystem(
                endpoint_url=endpoint,
                client_kwargs={"region_name": region} if region else {},
                skip_instance_cache=True,
                # Other processes write the same prefixes (Ray workers, the next run): never answer from
                # a stale listing. S3 itself is strongly read-after-write consistent.
                use_listings_cache=False,
            )
            _S3_CACHE.clear()
            _S3_CACHE[key] = fs
        return fs


def fsspec_filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path within it) for a URI: `bucket/key` on S3, an absolute path locally."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        return _s3(), f"{bucket}/{key}" if key else bucket
    return fsspec.filesystem("file"), _local_path(uri)


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path) for Ray Data `read_parquet/write_parquet(path, filesystem=...)`.

    On S3 this wraps the same s3fs instance as `fsspec_filesystem`, so it goes to the configured
    endpoint; it pickles without credentials (each Ray worker takes them from its own AWS chain).
    """
    if is_s3(uri):
        fs, path = fsspec_filesystem(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    return pafs.LocalFileSystem(), _local_path(uri)


# --- errors -------------------------------------------------------------------------------------------


def redact(text: str) -> str:
    """`text` on one line, with any secret of the AWS environment replaced by ***."""
    text = " ".join(str(text).split())
    for name in _SECRET_ENV:
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _endpoint_for_message() -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return "the AWS S3 endpoint"
    parts = urllib.parse.urlsplit(endpoint)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")  # no user:pass@


@contextlib.contextmanager
def _errors(uri: str) -> Iterator[None]:
    """Turn backend errors into one-line messages that name the URI (and bucket) and never a credential."""
    try:
        yield
    except Exception as err:
        if getattr(err, "_reelflow_storage", False):  # already translated by an inner block
            raise
        if not isinstance(err, OSError) and type(err).__module__.split(".")[0] != "botocore":
            raise
        new = _translate(uri, err)
        new._reelflow_storage = True  # type: ignore[attr-defined]
        raise new from None


def _translate(uri: str, err: Exception) -> Exception:
    text = str(err)
    if isinstance(err, FileNotFoundError):
        what = "no such bucket" if "bucket does not exist" in text else "no such file, folder or prefix"
        return FileNotFoundError(f"{uri}: {what}")
    if isinstance(err, FileExistsError):
        return FileExistsError(f"{uri}: already exists")
    if isinstance(err, IsADirectoryError):
        return IsADirectoryError(f"{uri}: is a folder, not a file")
    if isinstance(err, NotADirectoryError):
        return NotADirectoryError(f"{uri}: a parent is a file, not a folder")
    if isinstance(err, PermissionError) or (
        is_s3(uri) and any(code in text for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"))
    ):
        return PermissionError(_denied(uri, err))
    if isinstance(err, OSError):
        message = f"{uri}: {redact(text) or type(err).__name__}"
        try:
            return type(err)(message)
        except TypeError:  # a library subclass with a constructor of its own
            return OSError(message)
    return _from_botocore(uri, err)


def _denied(uri: str, err: Exception) -> str:
    if not is_s3(uri):
        return f"{uri}: permission denied"
    # s3fs keeps botocore's ClientError as the cause; its error code says which check failed.
    code = str(getattr(err.__cause__, "response", {}).get("Error", {}).get("Code") or "Forbidden")
    code = f"HTTP {code}" if code.isdigit() else code
    if code == "InvalidObjectState":
        return f"{uri}: the object is archived (a Glacier storage class); restore it to read it ({code})"
    return (
        f"{uri}: access denied to bucket {bucket_of(uri)} ({redact(code)}); "
        "check the AWS credentials in the environment, profile or role"
    )


def _from_botocore(uri: str, err: Exception) -> Exception:
    from botocore import exceptions as bx

    if isinstance(err, bx.NoCredentialsError | bx.PartialCredentialsError):
        return PermissionError(
            f"{uri}: no usable AWS credentials for bucket {bucket_of(uri)} (set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give the machine a role)"
        )
    if isinstance(err, bx.EndpointConnectionError | bx.ConnectTimeoutError | bx.ReadTimeoutError):
        return ConnectionError(f"{uri}: cannot reach {_endpoint_for_message()} ({type(err).__name__})")
    if isinstance(err, bx.ParamValidationError):  # e.g. a bucket name S3 does not allow
        return ValueError(f"{uri}: not a valid S3 location ({redact(str(err))})")
    return OSError(f"{uri}: {type(err).__name__}: {redact(str(err))}")


# --- listing ------------------------------------------------------------------------------------------


def _walk(uri: str) -> list[tuple[str, int, str]]:
    """(canonical uri, size, S3 etag or "") of every file under `uri`, or of the one file it names."""
    if is_s3(uri):
        fs, path = fsspec_filesystem(uri)
        key = _split_s3(uri)[1]
        with _errors(uri):
            # One LIST call answers for a prefix; a key that is an object lists nothing under itself.
            found = fs.find(path, detail=True)
            if not found and key:
                found = {path: fs.info(path)}  # FileNotFoundError when neither object nor prefix
        return [
            (f"s3://{name}", int(info.get("size") or 0), _s3_etag(info))
            for name, info in found.items()
            # Folder markers ("key/" objects that consoles create) are not files.
            if info.get("type") == "file" and not name.endswith("/")
        ]
    path = _local_path(uri)
    with _errors(uri):
        if os.path.isfile(path):
            return [(path, os.path.getsize(path), "")]
        if not os.path.isdir(path):
            raise FileNotFoundError(path)
        return list(_walk_local(path))


def _walk_local(root: str) -> Iterator[tuple[str, int, str]]:
    def fail(err: OSError) -> None:
        raise err

    seen: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, onerror=fail, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop: this folder was walked already
            dirs.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        for name in files:
            full = os.path.join(folder, name)
            with contextlib.suppress(FileNotFoundError):  # deleted (or a dangling link) while walking
                yield full, os.path.getsize(full), ""


def iter_files(uri: str, start: str = "", stop: str | None = None) -> Iterator[tuple[str, int, str]]:
    """(canonical uri, size, S3 etag or "") of the files under a folder or prefix whose name below it
    sorts in [start, stop), streamed: S3 pages of 1000 keys in key order, a folder entry by entry. A URI
    naming a file yields that file (when `start` is empty)."""
    if is_s3(uri):
        yield from _iter_s3(uri, start, stop)
        return
    path = _local_path(uri)
    with _errors(uri):
        if os.path.isfile(path):
            if not start:
                yield path, os.path.getsize(path), ""
            return
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.name < start or (stop is not None and entry.name >= stop):
                    continue
                if entry.is_dir():
                    yield from _walk_local(entry.path)
                elif entry.is_file():
                    with contextlib.suppress(FileNotFoundError):  # deleted while listing
                        yield entry.path, entry.stat().st_size, ""


def _s3_etag(info: Mapping[str, Any]) -> str:
    """The ETag of an S3 listing entry or HEAD answer, without its quotes."""
    return str(info.get("ETag", "")).strip('"')


def _iter_s3(uri: str, start: str, stop: str | None) -> Iterator[tuple[str, int, str]]:
    bucket, key = _split_s3(uri)
    fs = _s3()
    prefix = f"{key}/" if key else ""
    request: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1000}
    if start:
        # StartAfter is exclusive: start after the largest name below `start` (keys are valid UTF-8).
        request["StartAfter"] = prefix + chr(ord(start[0]) - 1) + "\U0010ffff"
    with _errors(uri):
        if key:
            with contextlib.suppress(FileNotFoundError):
                info = fs.info(f"{bucket}/{key}")
                if info.get("type") == "file":  # the URI names one object
                    if not start:
                        yield canonical_uri(uri), int(info["size"]), _s3_etag(info)
                    return
        while True:
            page = fs.call_s3("list_objects_v2", **request)
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix) :]
                if name < start or not name or name.endswith("/"):  # folder markers are not files
                    continue
                if stop is not None and name >= stop:
                    return
                yield f"s3://{bucket}/{item['Key']}", int(item["Size"]), _s3_etag(item)
            if not page.get("IsTruncated"):
                return
            request["ContinuationToken"] = page["NextContinuationToken"]
            request.pop("StartAfter", None)


def list_children(uri: str) -> list[str]:
    """Canonical URIs of the files and folders directly under a folder or prefix, sorted; [] when absent."""
    fs, path = fsspec_filesystem(uri)
    with _errors(uri):
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + e.rstrip("/") for e in entries if e.rstrip("/") != path.rstrip("/"))


def list_files(uri: str, suffix: str | tuple[str, ...] | None = None) -> list[str]:
    """Canonical URIs of every file under a folder or prefix (recursively), sorted.

    `suffix` keeps only names ending in it (case-sensitive). A URI naming a file lists that file.
    A missing folder, prefix or bucket raises FileNotFoundError.
    """
    return sorted(name for name, _, _ in _walk(uri) if suffix is None or name.endswith(suffix))


def list_videos(uri: str, extensions: Iterable[str] = VIDEO_EXTENSIONS) -> list[StoredObject]:
    """Video files under a folder or prefix, recursively, sorted by URI; a URI naming one file lists it.

    Videos are recognised by extension, case-insensitively. A file named directly is listed whatever its
    extension: the caller asked for it, and if it is no video the decoder says so in an error row.
    """
    wanted = _check_extensions(extensions)
    entries = sorted(_walk(uri))
    named_file = len(entries) == 1 and entries[0][0] == canonical_uri(uri)
    if not named_file:
        entries = [e for e in entries if os.path.splitext(e[0])[1].lower() in wanted]
    if is_s3(uri):
        return [StoredObject(name, size, etag) for name, size, etag in entries]
    etags = local_etags([name for name, _, _ in entries])
    return [StoredObject(name, size, etag) for (name, size, _), etag in zip(entries, etags, strict=True)]


def _check_extensions(extensions: Iterable[str]) -> frozenset[str]:
    if isinstance(extensions, str):
        raise ValueError(f"extensions: expected a collection like {{'.mp4'}}, not the string {extensions!r}")
    out = set()
    for ext in extensions:
        if not isinstance(ext, str) or not ext.startswith(".") or len(ext) < 2:
            raise ValueError(f"extensions: {ext!r} must be a suffix starting with a dot, like '.mp4'")
        out.add(ext.lower())
    return frozenset(out)


def stat(uri: str) -> StoredObject:
    """Size and etag of one file (the same etag `list_videos` gives it)."""
    fs, path = fsspec_filesystem(uri)
    with _errors(uri):
        info = fs.info(path)
        if info.get("type") != "file":
            raise IsADirectoryError(path)
    if is_s3(uri):
        return StoredObject(canonical_uri(uri), int(info["size"]), _s3_etag(info))
    return StoredObject(path, int(info["size"]), content_fingerprint(path))


def content_fingerprint(path: str) -> str:
    """Etag of a local file: a hash of its size and its first and last 64 KiB (all of it when small).

    It ignores mtime, so `touch`, a copy or a re-download of the same bytes keep it; any re-encode, remux
    or truncation changes the size or the container's header/index at either end, and with it the etag.
    """
    with _errors(path), open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size  # from the open file: consistent with the bytes read
        digest = hashlib.sha256(f"{size}\n".encode())
        digest.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            digest.update(f.read(FINGERPRINT_BYTES))
    return f"{FINGERPRINT_VERSION}-{digest.hexdigest()[:32]}"


def local_etags(paths: Sequence[str]) -> list[str]:
    """The etags of local files, read in parallel (I/O bound: two small reads per file, NFS-friendly)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(_local_etag, paths))


def _local_etag(path: str) -> str:
    try:
        return content_fingerprint(path)
    except OSError:
        # Unreadable now: list it anyway (its decode then fails into an error row, nothing is lost), with
        # an etag that changes once the file does.
        st = os.stat(path)
        return f"{FINGERPRINT_VERSION}-unreadable-{st.st_size}-{st.st_mtime_ns}"


def video_id(uri: str, etag: str) -> str:
    """Stable id of the content at a URI: 16 hex of sha256(canonical uri + newline + etag).

    The same bytes at the same URI give the same id; changed bytes, or the same bytes elsewhere, a new one.
    """
    if not etag:
        raise ValueError(f"{uri}: empty etag; video_id needs one to notice changed content")
    return hashlib.sha256(f"{canonical_uri(uri)}\n{etag}".encode()).hexdigest()[:16]


# --- reading ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def local_copy(uri: str, dir: str | None = None) -> Iterator[str]:
    """A local path holding the object's bytes: a local file as it is, an S3 object spooled to a temp file.

    The temp file (in `dir`, default the system temp folder) keeps the object's extension and is deleted
    on exit. Decoders always get a path: decord crashes on truncated files opened from memory.
    """
    if not is_s3(uri):
        path = _local_path(uri)
        if not os.path.isfile(path):
            with _errors(uri):
                raise (IsADirectoryError if os.path.isdir(path) else FileNotFoundError)(path)
        yield path
        return
    fs, path = fsspec_filesystem(uri)
    fd, tmp = tempfile.mkstemp(prefix="reelflow-", suffix=Path(path).suffix, dir=dir)
    os.close(fd)
    try:
        with _errors(uri):
            fs.get_file(path, tmp)
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def open_uri(uri: str, mode: str = "rb") -> IO[Any]:
    """Open an object ("rb", "r", "wb", "w", or "xb"/"x" to create only if absent).

    Writes to S3 appear whole when the file is closed; local writes stream into place (use `write_bytes`
    or `put_file` where readers must never see a partial file). Local parent folders are created.
    """
    if mode not in ("rb", "r", "wb", "w", "xb", "x"):
        raise ValueError(f"{uri}: unsupported mode {mode!r}; use rb, r, wb, w, xb or x")
    fs, path = fsspec_filesystem(uri)
    with _errors(uri):
        if mode[0] != "r" and not is_s3(uri):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        return fs.open(path, mode)


def read_bytes(uri: str) -> bytes:
    """The whole object."""
    fs, path = fsspec_filesystem(uri)
    with _errors(uri):
        return fs.cat_file(path)


def exists(uri: str) -> bool:
    """Whether a file, folder, non-empty prefix or bucket exists. Wrong credentials raise, never say no."""
    fs, path = fsspec_filesystem(uri)
    if not is_s3(uri):
        return os.path.exists(path)
    with _errors(uri):
        try:
            # info, not s3fs's exists: that answers False for a bucket when the credentials are wrong.
            fs.info(path)
        except FileNotFoundError:
            return False
    return True


def is_dir(uri: str) -> bool:
    """Whether the URI is a folder, a non-empty prefix or a bucket."""
    fs, path = fsspec_filesystem(uri)
    if not is_s3(uri):
        return os.path.isdir(path)
    with _errors(uri):
        try:
            return fs.info(path).get("type") == "directory"
        except FileNotFoundError:
            return False


# --- writing ------------------------------------------------------------------------------------------


def write_bytes(uri: str, data: bytes, *, overwrite: bool = True) -> None:
    """Write a whole object atomically: a reader sees the old bytes or all of the new ones, never part.

    With `overwrite=False` it creates the object only if absent, else FileExistsError — atomically on
    both backends (S3 `If-None-Match: *`), so of two writers racing for the same name exactly one wins.
    """
    if is_s3(uri):
        fs, path = fsspec_filesystem(uri)
        with _errors(uri):
            fs.pipe_file(path, data, mode="overwrite" if overwrite else "create")
        return
    path = _local_path(uri)
    with _errors(uri):
        _place_local(path, overwrite, lambda f: f.write(data))


def put_file(local_path: str, uri: str, *, overwrite: bool = True) -> None:
    """Copy one local file to a URI, atomically like `write_bytes` (and exclusively with overwrite=False)."""
    if not os.path.isfile(local_path):
        raise FileNotFoundError(f"{local_path}: no such local file")
    if is_s3(uri):
        fs, path = fsspec_filesystem(uri)
        with _errors(uri):
            fs.put_file(local_path, path, mode="overwrite" if overwrite else "create")
        return
    path = _local_path(uri)
    with _errors(uri), open(local_path, "rb") as src:
        _place_local(path, overwrite, lambda f: shutil.copyfileobj(src, f))


def _place_local(path: str, overwrite: bool, fill: Any) -> None:
    """Write a temp file beside `path` and move it into place (replace, or link to create exclusively)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    if not overwrite and os.path.exists(path):
        raise FileExistsError(path)  # fail before writing; the link below is what makes it race-free
    # Named by hand (not mkstemp) so the file gets the umask's permissions, not 0600; ".part" so that a
    # leftover of a crash is never taken for a video (or a table file) by a listing.
    tmp = os.path.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{os.path.basename(path)}.part")
    try:
        with open(tmp, "xb") as f:
            fill(f)
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # atomic create-if-absent: raises FileExistsError when another writer won
        except FileExistsError:
            raise
        except OSError:  # no hard links on this filesystem (some FUSE/SMB mounts): exclusive, not all-at-once
            with open(tmp, "rb") as src, open(path, "xb") as dst:
                shutil.copyfileobj(src, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def upload_dir(local_dir: str, uri: str) -> list[str]:
    """Copy a local folder tree to a folder or S3 prefix (S3 uploads run concurrently); returns the URIs."""
    root = Path(local_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"{local_dir}: no such local folder")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    targets = [join_uri(uri, p.relative_to(root).as_posix()) for p in files]
    if is_s3(uri) and files:
        fs, _ = fsspec_filesystem(uri)
        with _errors(uri):
            fs.put([str(p) for p in files], [fsspec_filesystem(t)[1] for t in targets])
    else:
        for file, target in zip(files, targets, strict=True):
            put_file(str(file), target)
    return targets


def makedirs(uri: str) -> None:
    """Create a local folder and its parents; a no-op on S3, where prefixes need no creating."""
    if not is_s3(uri):
        with _errors(uri):
            os.makedirs(_local_path(uri), exist_ok=True)


def remove(uri: str, recursive: bool = False) -> None:
    """Delete a file, or a folder/prefix and everything under it when `recursive`.

    Removing what is not there is no error (S3 semantics; it keeps retries and recovery idempotent).
    A whole bucket is never removed.
    """
    if is_s3(uri):
        if not _split_s3(uri)[1]:
            raise ValueError(f"{uri}: refusing to remove a whole bucket; name a prefix inside it")
        fs, path = fsspec_filesystem(uri)
        # s3fs raises for a prefix with nothing under it; S3 itself says nothing of a missing key.
        with _errors(uri), contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=recursive)
        return
    path = _local_path(uri)
    with _errors(uri):
        if os.path.isdir(path) and not os.path.islink(path):
            if not recursive:
                raise IsADirectoryError(path)
            shutil.rmtree(path, ignore_errors=False)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def rename(src: str, dst: str) -> None:
    """Move a file (or a folder/prefix) to `dst`, replacing a file there.

    Local: `os.replace`, atomic. S3 has no rename: it is copy then delete, so for a moment (or, after a
    crash in between, until a retry) both names exist with the same bytes; retrying is safe while `src`
    is there. Callers that need atomic publishing should make a single small object the commit point.
    """
    if is_s3(src) != is_s3(dst):
        raise ValueError(f"rename: {src} and {dst} are on different stores")
    if not is_s3(src):
        source, target = _local_path(src), _local_path(dst)
        with _errors(src):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(source, target)
        return
    fs, src_path = fsspec_filesystem(src)
    _, dst_path = fsspec_filesystem(dst)
    with _errors(src):
        try:
            fs.cp_file(src_path, dst_path)  # server-side copy; the common case is one object
        except FileNotFoundError:
            prefix = canonical_uri(src) + "/"
            sources = [name for name, _, _ in _walk(src)]  # FileNotFoundError when src is not a prefix
            fs.copy(
                [fsspec_filesystem(s)[1] for s in sources],
                [fsspec_filesystem(join_uri(dst, s[len(prefix) :]))[1] for s in sources],
            )
            fs.rm([fsspec_filesystem(s)[1] for s in sources])
            return
        fs.rm(src_path)
