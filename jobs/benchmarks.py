"""Helpers every benchmark shares: peak memory of the process tree, and BENCHMARKS.md records."""

from __future__ import annotations

import datetime as dt
import platform
import shlex
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

BENCHMARKS_FILE = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


class PeakMemory:
    """Samples the proportional set size (PSS) of this process and all its descendants.

    PSS splits shared pages (Ray's object store, shared libraries) between the processes that map them,
    so the sum is the tree's real footprint; RSS would count the object store once per worker.
    A local Ray started by this process is its descendant, so its raylet and workers are counted.
    """

    def __init__(self, interval_s: float = 0.25, measure: Callable[[], int] | None = None) -> None:
        self.interval_s = interval_s
        self.measure = measure or tree_memory  # another footprint to sample, e.g. the largest worker's
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self.peak_bytes = self.measure()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, self.measure())

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30


def tree_memory() -> int:
    """PSS in bytes of this process and its descendants (RSS where PSS is not available)."""
    me = psutil.Process()
    total = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def machine_line() -> str:
    """One line naming the machine a figure was measured on."""
    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{platform.machine()}, {psutil.cpu_count()} cores, {mem:.0f} GiB, Python {platform.python_version()}"
    )


def record(title: str, body: str, command: str | None = None, path: Path = BENCHMARKS_FILE) -> None:
    """Append a dated section to BENCHMARKS.md with the command that produced it."""
    command = command or "reelflow " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = f"\n### {title} — {stamp}\n\n`{command}` on {machine_line()}\n\n{body.strip()}\n"
    if not path.exists():
        path.write_text(
            "# Benchmarks\n\nFigures appended by `reelflow bench …`; newest last in each section.\n"
        )
    with path.open("a") as f:
        f.write(text)


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    """(fn's result, seconds it took)."""
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started
