"""The tables' lease: one writing run at a time, taken over from a dead holder, with an epoch for fencing.

Each acquisition creates `TABLES/_lease/epoch-<N>.json` with a conditional put (create only if absent: S3
`If-None-Match: *`, a hard link locally), N one more than the highest epoch there, so of two runs racing
for the same epoch exactly one wins and the epoch grows with every holder. The holder rewrites its own file
as a heartbeat and marks it released at the end. A holder is dead when its file says released, when it ran
on this host and its process is gone, or when its heartbeat is older than its TTL.

A lease alone cannot stop a holder that was paused past its TTL and does not know it lost the lease; every
commit therefore carries the epoch as a fencing token (see flows.table_writer), and commits of a stale epoch
are refused by the tables themselves. The heartbeat also notices a newer epoch and marks the lease lost.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from flows import storage

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 120.0
KEEP_EPOCHS = 8  # epoch files kept behind the current one, for whoever investigates a takeover
_EPOCH_FILE = re.compile(r"epoch-(\d{10})\.json")


class LeaseHeld(RuntimeError):
    """The lease stayed held by a live run for longer than the caller would wait."""

    temporary = True  # a later run will do the work: the command exits 75 (EX_TEMPFAIL)


class LeaseLost(RuntimeError):
    """This run's lease was taken over (it was paused or cut off past its TTL); it must not commit."""

    temporary = True


@dataclass(frozen=True)
class LeaseRecord:
    """What an epoch file says: who holds (or held) the lease, and how recently it said it is alive."""

    epoch: int
    owner: str
    host: str
    pid: int
    pid_started: float
    acquired_at: float
    heartbeat_at: float
    ttl_s: float
    released: bool = False

    def dead(self, now: float) -> bool:
        """Whether another run may take the lease over now."""
        if self.released or now - self.heartbeat_at > self.ttl_s:
            return True
        return self.host == socket.gethostname() and not _process_alive(self.pid, self.pid_started)

    def describe(self) -> str:
        since = dt.datetime.fromtimestamp(self.acquired_at, dt.timezone.utc).isoformat(timespec="seconds")
        return f"run {self.owner} on host {self.host} since {since}"


def _process_alive(pid: int, started: float) -> bool:
    import psutil

    try:
        # The start time tells a reused pid from the holder's own process.
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def _own_start_time() -> float:
    import psutil

    return psutil.Process(os.getpid()).create_time()


class Lease:
    """A held lease on a tables location. Use `Lease.acquire`; release it (or use it as a context manager).

    >>> with Lease.acquire("s3://bucket/tables", owner="tag-2024-05-01-ab12", wait_s=150) as lease:
    ...     lease.check()  # before every commit: raises LeaseLost once another run took it over
    """

    def __init__(
        self, tables_uri: str, record: LeaseRecord, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.tables_uri = tables_uri
        self.record = record
        self._clock = clock
        self._lost: str | None = None
        self._last_beat = record.heartbeat_at
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def epoch(self) -> int:
        return self.record.epoch

    @classmethod
    def acquire(
        cls,
        tables_uri: str,
        owner: str,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        wait_s: float | None = None,
        poll_s: float | None = None,
        heartbeat: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> Lease:
        """Take the lease, waiting up to `wait_s` (default: the TTL and a quarter) for a live holder.

        Raises LeaseHeld, naming the holder, when it is still held after that.
        """
        if ttl_s <= 0:
            raise ValueError(f"lease: ttl_s={ttl_s} must be > 0")
        wait_s = ttl_s * 1.25 if wait_s is None else wait_s
        if wait_s < 0:
            raise ValueError(f"lease: wait_s={wait_s} must be >= 0")
        poll_s = poll_s if poll_s is not None else min(2.0, ttl_s / 8)
        folder = storage.join_uri(tables_uri, "_lease")
        deadline = time.monotonic() + wait_s
        while True:
            current = _highest(folder)
            now = clock()
            if current is None or current.dead(now):
                epoch = (current.epoch if current else 0) + 1
                record = LeaseRecord(
                    epoch=epoch, owner=owner, host=socket.gethostname(), pid=os.getpid(),
                    pid_started=_own_start_time(), acquired_at=now, heartbeat_at=now, ttl_s=ttl_s,
                )  # fmt: skip
                try:
                    storage.write_bytes(_epoch_uri(folder, epoch), _encode(record), overwrite=False)
                except FileExistsError:
                    continue  # another run took this epoch first: look again
                if current is not None and not current.released:
                    log.warning(
                        "lease: took the tables over from %s (epoch %d)", current.describe(), current.epoch
                    )
                lease = cls(tables_uri, record, clock=clock)
                lease._forget_old_epochs(folder)
                if heartbeat:
                    lease.start_heartbeat()
                return lease
            if time.monotonic() >= deadline:
                raise LeaseHeld(f"tables held by {current.describe()} (waited {wait_s:g} s)")
            time.sleep(min(poll_s, max(0.05, deadline - time.monotonic())))

    def start_heartbeat(self) -> None:
        """Renew the lease every quarter TTL in a daemon thread until it is released or lost."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._beat_until_stopped, name="lease-heartbeat", daemon=True
            )
            self._thread.start()

    def heartbeat(self) -> None:
        """Renew the lease once; marks it lost when a newer epoch exists or renewals failed for a TTL."""
        if self._lost:
            return
        folder = storage.join_uri(self.tables_uri, "_lease")
        now = self._clock()
        try:
            newest = _highest(folder)
            if newest is not None and newest.epoch != self.epoch:
                self._lost = f"the tables were taken over by {newest.describe()} (epoch {newest.epoch})"
                return
            self.record = replace(self.record, heartbeat_at=now)
            storage.write_bytes(_epoch_uri(folder, self.epoch), _encode(self.record))
            self._last_beat = now
        except OSError as err:
            log.warning("lease: heartbeat failed: %s", err)
            if now - self._last_beat > self.record.ttl_s:
                self._lost = f"no heartbeat could be written for {now - self._last_beat:.0f} s ({err})"

    def check(self) -> None:
        """Raise LeaseLost when the lease is known to be lost, or its last renewal is older than the TTL."""
        if not self._lost and self._clock() - self._last_beat > self.record.ttl_s:
            self.heartbeat()  # a paused process wakes here before its heartbeat thread does
        if self._lost:
            raise LeaseLost(f"lost the lease of {self.tables_uri} (epoch {self.epoch}): {self._lost}")

    def release(self) -> None:
        """Mark the lease released (when still ours), so the next run need not wait for the TTL."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._lost:
            return
        folder = storage.join_uri(self.tables_uri, "_lease")
        with contextlib.suppress(OSError):
            newest = _highest(folder)
            if newest is not None and newest.epoch == self.epoch:
                storage.write_bytes(
                    _epoch_uri(folder, self.epoch), _encode(replace(self.record, released=True))
                )
        self._lost = "released"

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _beat_until_stopped(self) -> None:
        while not self._stop.wait(self.record.ttl_s / 4):
            self.heartbeat()
            if self._lost:
                log.warning("lease: %s", self._lost)
                return

    def _forget_old_epochs(self, folder: str) -> None:
        for uri, epoch in _epoch_files(folder):
            if epoch < self.epoch - KEEP_EPOCHS:
                with contextlib.suppress(OSError):
                    storage.remove(uri)


def holder(tables_uri: str) -> LeaseRecord | None:
    """The newest epoch's record (the holder, or the last one), or None for tables never leased."""
    return _highest(storage.join_uri(tables_uri, "_lease"))


def _epoch_uri(folder: str, epoch: int) -> str:
    return storage.join_uri(folder, f"epoch-{epoch:010d}.json")


def _epoch_files(folder: str) -> list[tuple[str, int]]:
    try:
        uris = storage.list_files(folder, suffix=".json")
    except FileNotFoundError:
        return []
    found = ((uri, _EPOCH_FILE.fullmatch(uri.rsplit("/", 1)[-1])) for uri in uris)
    return sorted(((uri, int(m[1])) for uri, m in found if m), key=lambda entry: entry[1])


def _highest(folder: str) -> LeaseRecord | None:
    for _ in range(5):
        files = _epoch_files(folder)
        if not files:
            return None
        uri, _ = files[-1]
        try:
            return LeaseRecord(**json.loads(storage.read_bytes(uri)))
        except FileNotFoundError:
            continue  # forgotten by a new holder between the listing and the read
        except (ValueError, TypeError) as err:
            raise ValueError(f"lease file {uri}: not a lease record ({err})") from None
    raise RuntimeError(f"lease {folder}: epoch files kept changing while reading them")


def _encode(record: LeaseRecord) -> bytes:
    return json.dumps(asdict(record), sort_keys=True).encode()
