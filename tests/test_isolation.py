"""IsolatedRunner: a decoder that segfaults, hangs or raises costs one call, never the calling process."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from flows import decode, isolation
from flows.isolation import IsolatedRunner, shared_runner
from flows.media import VideoError
from flows.probe import probe


def count(n: int) -> Iterator[int]:
    yield from range(n)


def pid_then(n: int) -> Iterator[int]:
    yield os.getpid()
    yield from range(n)


def segfault_after(n: int) -> Iterator[int]:
    yield from range(n)
    os.kill(os.getpid(), signal.SIGSEGV)
    yield -1


def exit_abruptly() -> Iterator[int]:
    yield 1
    os._exit(3)


def hang_after(n: int, marker: str | None = None) -> Iterator[int]:
    yield from range(n)
    if marker:
        Path(marker).touch()
    time.sleep(600)
    yield -1


def trickle(period_s: float) -> Iterator[int]:
    i = 0
    while True:
        time.sleep(period_s)
        yield i
        i += 1


def fail_with(exc: BaseException) -> Iterator[int]:
    yield 0
    raise exc


@pytest.fixture
def runner() -> Iterator[IsolatedRunner]:
    with IsolatedRunner() as r:
        yield r


def test_items_stream_back_from_one_reused_child(runner: IsolatedRunner) -> None:
    first = list(runner.iter(pid_then, 3, timeout_s=60))
    child = first[0]
    assert child != os.getpid() and first[1:] == [0, 1, 2]
    second = list(runner.iter(pid_then, 2, timeout_s=60))
    assert second == [child, 0, 1]  # the same process served both calls
    assert runner.pid == child


def test_segfault_becomes_decoder_crashed_and_the_next_call_works(runner: IsolatedRunner) -> None:
    got = []
    with pytest.raises(VideoError) as caught:
        for item in runner.iter(segfault_after, 3, timeout_s=60):
            got.append(item)
            while runner.pid is not None:  # let the child die with items still in the pipe
                time.sleep(0.01)
    assert got == [0, 1, 2]  # what came before the crash was delivered
    err = caught.value
    assert (err.stage, err.error_type) == ("decode", "DecoderCrashed")
    assert "SIGSEGV" in err.message and "segfault_after" in err.message
    assert list(runner.iter(count, 3, timeout_s=60)) == [0, 1, 2]


def test_exit_code_is_reported(runner: IsolatedRunner) -> None:
    with pytest.raises(VideoError, match="exit code 3") as caught:
        list(runner.iter(exit_abruptly, timeout_s=60))
    assert caught.value.error_type == "DecoderCrashed"


def test_hang_becomes_decoder_timeout_and_the_child_is_replaced(runner: IsolatedRunner) -> None:
    child = next(iter(runner.iter(pid_then, 0, timeout_s=60)))
    started = time.monotonic()
    with pytest.raises(VideoError, match="idle limit of 1 s") as caught:
        list(runner.iter(hang_after, 2, timeout_s=300, idle_timeout_s=1))
    assert caught.value.error_type == "DecoderTimeout"
    assert time.monotonic() - started < 60  # the limit, not the sleep, ended it
    fresh = list(runner.iter(pid_then, 1, timeout_s=60))
    assert fresh[1:] == [0] and fresh[0] != child


def test_whole_call_limit_applies_even_while_items_keep_coming(runner: IsolatedRunner) -> None:
    got = []
    with pytest.raises(VideoError, match=r"call limit of 1\.5 s") as caught:
        for item in runner.iter(trickle, 0.2, timeout_s=1.5, idle_timeout_s=30):
            got.append(item)
    assert caught.value.error_type == "DecoderTimeout"
    assert 2 <= len(got) < 20


def test_exceptions_propagate_with_their_type_name(runner: IsolatedRunner) -> None:
    with pytest.raises(VideoError) as caught:
        list(runner.iter(fail_with, KeyError("missing key"), timeout_s=60))
    assert (caught.value.stage, caught.value.error_type) == ("decode", "KeyError")
    assert "missing key" in caught.value.message

    original = VideoError("probe", "InvalidData", "clip.mp4: cannot open")
    with pytest.raises(VideoError) as caught:
        list(runner.iter(fail_with, original, timeout_s=60))
    assert caught.value.as_row() == original.as_row()
    # A failing call leaves the child usable.
    assert list(runner.iter(count, 2, timeout_s=60)) == [0, 1]


def test_consumer_stopping_early_leaves_the_runner_clean(runner: IsolatedRunner) -> None:
    items = runner.iter(pid_then, 10_000, timeout_s=60)
    child = next(items)
    assert [next(items), next(items)] == [0, 1]
    items.close()
    assert list(runner.iter(pid_then, 2, timeout_s=60)) == [child, 0, 1]  # same child, no stale items


def test_abandoned_hanging_call_gets_a_fresh_child(
    runner: IsolatedRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(isolation, "STOP_GRACE_S", 0.5)
    child = next(iter(runner.iter(pid_then, 0, timeout_s=60)))
    marker = tmp_path / "hanging"
    items = runner.iter(hang_after, 1, str(marker), timeout_s=60)
    assert next(items) == 0
    while not marker.exists():  # the child is now stuck inside the generator
        time.sleep(0.01)
    items.close()
    assert next(iter(runner.iter(pid_then, 0, timeout_s=60))) != child


def test_one_call_at_a_time(runner: IsolatedRunner) -> None:
    outer = runner.iter(count, 5, timeout_s=60)
    next(outer)
    with pytest.raises(RuntimeError, match="one call at a time"):
        next(runner.iter(count, 1, timeout_s=60))
    assert list(outer) == [1, 2, 3, 4]


def test_bad_limits_are_rejected(runner: IsolatedRunner) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        runner.iter(count, 1, timeout_s=0)
    with pytest.raises(ValueError, match="idle_timeout_s"):
        runner.iter(count, 1, timeout_s=1, idle_timeout_s=-1)


def test_real_decoding_in_the_child_matches_in_process(
    runner: IsolatedRunner, shared_videos: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(shared_videos / "mmaction2/test.mp4")
    info = probe(path)
    indices = [0, 100, 250]
    caplog.set_level(logging.DEBUG, logger="flows")
    isolated = list(runner.iter(decode.iter_frames, path, info, indices, (64, 64), timeout_s=120))
    # The child's log records reach the parent's loggers.
    assert any(r.name == "flows.decode" and "decoding with decord" in r.getMessage() for r in caplog.records)
    local = list(decode.iter_frames(path, info, indices, (64, 64)))
    assert [f.index for f in isolated] == indices
    assert all(np.array_equal(a.image, b.image) for a, b in zip(isolated, local, strict=True))


def test_shared_runner_is_one_per_process() -> None:
    assert shared_runner() is shared_runner()
