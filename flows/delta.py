"""Delta Lake access for reelflow's tables: deltalake's options for a location, opening a table, and its
errors as one line naming the table.

Credentials never pass through here: delta-rs reads the standard AWS chain itself (environment, web
identity, instance metadata), as botocore does for `flows.storage`.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyarrow as pa

from flows import storage

if TYPE_CHECKING:
    from deltalake import DeltaTable

TIMESTAMP = pa.timestamp("us", tz="UTC")  # every timestamp column of the tables and the run log


def storage_options(uri: str) -> dict[str, str]:
    """deltalake's options for a URI (no credential: delta-rs reads the AWS chain itself).

    Commits on S3 need an atomic put-if-absent: S3's conditional writes (`AWS_CONDITIONAL_PUT=etag`, also
    what MinIO and moto honour) unless the environment names another mechanism (a DynamoDB lock provider).
    """
    if not storage.is_s3(uri):
        return {}
    options: dict[str, str] = {}
    if "AWS_CONDITIONAL_PUT" not in os.environ and "AWS_S3_LOCKING_PROVIDER" not in os.environ:
        options["AWS_CONDITIONAL_PUT"] = "etag"
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    if endpoint.startswith("http://"):
        options["AWS_ALLOW_HTTP"] = "true"
    if endpoint and "AWS_ENDPOINT_URL" not in os.environ:
        options["AWS_ENDPOINT_URL"] = endpoint
    return options


def open_delta(uri: str, version: int | None = None) -> DeltaTable | None:
    """The Delta table at `uri`, at `version` (latest when None); None when there is none."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    with delta_errors(uri):
        try:
            return DeltaTable(uri, version=version, storage_options=storage_options(uri))
        except TableNotFoundError:
            return None


@contextlib.contextmanager
def delta_errors(uri: str) -> Iterator[None]:
    """Turn deltalake's errors into one line naming the table (credentials never appear in them)."""
    from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

    try:
        yield
    except (TableNotFoundError, CommitFailedError):
        raise
    except (DeltaError, OSError) as err:
        if getattr(err, "_reelflow_storage", False):
            raise
        text = " ".join(_ANSI.sub("", str(err)).replace("↳", ";").split())
        lowered = text.lower().replace(" ", "")
        if any(word in lowered for word in _DENIED):
            new: Exception = PermissionError(
                f"{uri}: access denied to bucket {storage.bucket_of(uri)}; "
                "check the AWS credentials in the environment, profile or role"
            )
        elif "nosuchbucket" in lowered or ("bucket" in lowered and "notexist" in lowered):
            new = FileNotFoundError(f"{uri}: no such bucket")
        else:
            new = OSError(f"{uri}: {type(err).__name__}: {_short(text)}")
        new._reelflow_storage = True  # type: ignore[attr-defined]
        raise new from None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_DENIED = ("privileges", "permission", "forbidden", "accessdenied", "accesskey", "credential")


def _short(text: str, limit: int = 300) -> str:
    text = storage.redact(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
