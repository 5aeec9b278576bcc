"""Pretrained model folders (Hugging Face layout: config.json, weights, preprocessor and tokenizer JSON) as
local folders, wherever they are kept: a local folder, an S3 prefix, or the Hugging Face Hub (`hf://NAME`).

The model builders read local folders only (`models.videomae(pretrained=...)`); `fetch_pretrained` brings a
folder here first. An S3 folder is downloaded once per content into a cache that concurrent workers share.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flows.storage import canonical_uri, is_s3, iter_files, open_uri

HF_SCHEME = "hf://"
# The files of a model folder that a model is built from; anything else in the folder (ONNX or TensorFlow
# exports, training state, READMEs) is not downloaded.
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model")
DOWNLOAD_THREADS = 4


def cache_root() -> Path:
    """Where fetched folders are kept: $REELFLOW_CACHE/pretrained, or ~/.cache/reelflow/pretrained."""
    base = os.environ.get("REELFLOW_CACHE") or os.path.join("~", ".cache", "reelflow")
    return Path(base).expanduser() / "pretrained"


def fetch_pretrained(uri: str | os.PathLike) -> Path:
    """A local folder holding the pretrained model at `uri`.

    A local folder (or file:// URI) is returned as it is. An `s3://` folder is downloaded into the cache under
    a name made of its URI and its objects' etags, so a changed upload is fetched again and an unchanged one
    never is. `hf://NAME[@REVISION]` is a Hugging Face Hub snapshot (needs network access). A place without
    a config.json is a one-line ValueError naming it; storage errors are those of `flows.storage`.
    """
    text = os.fspath(uri)
    if text.startswith(HF_SCHEME):
        return _check(Path(_from_hub(text[len(HF_SCHEME) :])), text)
    if is_s3(text):
        return _fetch_s3(canonical_uri(text))
    return _check(Path(canonical_uri(text)), text)


def _check(folder: Path, uri: str) -> Path:
    if not folder.is_dir():
        raise ValueError(f"{uri}: no such pretrained model folder")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{uri}: not a pretrained model folder (no config.json)")
    return folder


def _fetch_s3(uri: str) -> Path:
    prefix = uri + "/"
    files = {
        name: (object_uri, etag)
        for object_uri, _size, etag in iter_files(uri)
        # Only the folder's own files: subfolders hold other things (checkpoints, exports).
        if "/" not in (name := object_uri.removeprefix(prefix)) and name.endswith(MODEL_FILE_SUFFIXES)
    }
    if "config.json" not in files:
        raise ValueError(f"{uri}: not a pretrained model folder (no config.json)")
    if any(name.endswith(".safetensors") for name in files):
        # The same weights as a pickle: no need for both.
        files = {name: v for name, v in files.items() if not name.endswith(".bin")}
    listing = "\n".join(f"{name}\t{etag}" for name, (_, etag) in sorted(files.items()))
    key = hashlib.sha256(f"{uri}\n{listing}".encode()).hexdigest()[:16]
    root = cache_root()
    folder = root / f"{uri.removeprefix('s3://').replace('/', '--')[:80]}--{key}"
    if (folder / "config.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    # Download beside the cache entry and rename it into place: a folder in the cache is always complete,
    # and of two workers fetching at once, the second rename fails and that worker uses the first's folder.
    partial = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
            list(pool.map(lambda item: download(item[1][0], partial / item[0]), files.items()))
        try:
            partial.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(partial)
    return folder


def download(uri: str, path: Path) -> None:
    """Copy one stored object (a path or s3:// URI) to a local file."""
    with open_uri(uri, "rb") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst, 8 << 20)


def _from_hub(name: str) -> str:
    """A Hub repository's snapshot (model files only), cached by huggingface_hub itself."""
    from huggingface_hub import snapshot_download

    repo, _, revision = name.partition("@")
    patterns = [f"*{suffix}" for suffix in MODEL_FILE_SUFFIXES]
    return snapshot_download(repo, revision=revision or None, allow_patterns=patterns)
