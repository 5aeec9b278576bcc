"""Run decoder generators in a child process, so that a segfault or a hang costs one video, not the job.

A native decoder that crashes takes its whole process down, and a Ray task retry would only crash
again on the same file. `IsolatedRunner` keeps one persistent child process (started with "spawn":
Ray workers are threaded, and forking a threaded process can deadlock), sends it a generator
function, and streams the items back over a pipe as they are produced. The child runs at most a few
items ahead of the consumer (credit-based flow control), so memory stays bounded and a consumer that
stops early can tell the child to drop the rest. When the child dies or stalls, the call raises a
VideoError and the next call starts a fresh child.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

import cloudpickle

from flows.media import VideoError

log = logging.getLogger(__name__)

# Items the child may produce ahead of the consumer.
WINDOW = 4
# How long a child gets to stop a generator the consumer abandoned, and to exit on close.
STOP_GRACE_S = 5.0


class IsolatedRunner:
    """A persistent child process that runs generator functions and streams their items back.

    One call at a time. The child starts lazily on the first call and again after a crash, a
    timeout or an abandoned call it would not stop.
    """

    def __init__(self, start_method: str = "spawn") -> None:
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(
                f"start_method: must be 'spawn' or 'forkserver' (not fork), got {start_method!r}"
            )
        self._mp = multiprocessing.get_context(start_method)
        self._proc: Any = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._calls = 0

    def __enter__(self) -> IsolatedRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The child's process id, or None when no child is running."""
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def iter(
        self,
        fn: Callable[..., Iterator[Any]],
        *args: Any,
        timeout_s: float,
        idle_timeout_s: float | None = None,
        **kwargs: Any,
    ) -> Iterator[Any]:
        """Run `fn(*args, **kwargs)` (a generator function) in the child and yield its items.

        `timeout_s` bounds the time spent waiting for the child over the whole call, `idle_timeout_s`
        the wait for any one item (the consumer's own time between items counts for neither).
        Raises VideoError(stage="decode") with error_type "DecoderCrashed" when the child dies and
        "DecoderTimeout" when a limit passes; an exception raised by `fn` is re-raised here as the
        VideoError it was, or as VideoError(stage="decode", error_type=<its type name>).
        """
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: must be > 0, got {timeout_s}")
        if idle_timeout_s is not None and idle_timeout_s <= 0:
            raise ValueError(f"idle_timeout_s: must be > 0, got {idle_timeout_s}")
        payload = cloudpickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        return self._iter(getattr(fn, "__qualname__", repr(fn)), payload, timeout_s, idle_timeout_s)

    def _iter(self, name: str, payload: bytes, timeout_s: float, idle_s: float | None) -> Iterator[Any]:
        if self._owner == threading.get_ident():
            raise RuntimeError(
                "IsolatedRunner runs one call at a time; finish or close the previous one first"
            )
        self._lock.acquire()  # another thread's call: wait for it
        self._owner = threading.get_ident()
        finished = False
        call_id = None
        try:
            conn = self._ensure_child()
            self._calls += 1
            call_id = self._calls
            level = logging.getLogger("flows").getEffectiveLevel()
            self._send_or_crash(conn, ("call", call_id, (payload, level)), name)
            budget = timeout_s
            while True:
                limit = budget if idle_s is None else min(budget, idle_s)
                started = time.monotonic()
                message = self._receive(conn, call_id, limit, name)
                budget -= time.monotonic() - started
                if message is None:
                    which = "the call limit" if idle_s is None or budget <= 0 else "the idle limit"
                    seconds = timeout_s if which == "the call limit" else idle_s
                    self._kill()
                    finished = True
                    raise VideoError("decode", "DecoderTimeout", f"{name} exceeded {which} of {seconds:g} s")
                kind, _, body = message
                if kind == "item":
                    # If the child is already gone, hand over what it sent first; the end of
                    # the pipe then reports the crash.
                    with contextlib.suppress(OSError):
                        _send(conn, ("more", call_id, 1))
                    yield body
                elif kind == "done":
                    finished = True
                    return
                elif kind == "error":
                    finished = True
                    raise body
        finally:
            try:
                if not finished and call_id is not None:
                    self._abandon(call_id)
            finally:
                self._owner = None
                self._lock.release()

    def _send_or_crash(self, conn: Connection, message: tuple, name: str) -> None:
        try:
            _send(conn, message)
        except OSError:
            raise self._crashed(name) from None

    def _receive(self, conn: Connection, call_id: int, limit: float, name: str) -> tuple | None:
        """The next message of this call; None when `limit` seconds pass; VideoError if the child dies."""
        deadline = time.monotonic() + max(0.0, limit)
        while True:
            remaining = deadline - time.monotonic()
            ready = wait([conn, self._proc.sentinel], timeout=max(0.0, remaining))
            if conn in ready:
                try:
                    message = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    raise self._crashed(name) from None
                if message[0] == "log":
                    logger_name, level, text = message[2]
                    logging.getLogger(logger_name).log(level, "[decoder child] %s", text)
                elif message[1] == call_id:
                    return message
                continue  # a log record, or a late message of an earlier, abandoned call
            if ready:
                raise self._crashed(name)
            if remaining <= 0:
                return None

    def _crashed(self, name: str) -> VideoError:
        proc = self._proc
        proc.join(STOP_GRACE_S)
        code = proc.exitcode
        self._discard_child()
        if code is not None and code < 0:
            try:
                how = f"signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"signal {-code}"
        else:
            how = f"exit code {code}"
        return VideoError("decode", "DecoderCrashed", f"decoder process died with {how} while running {name}")

    def _abandon(self, call_id: int) -> None:
        """The consumer stopped early: ask the child to drop the generator, or replace the child."""
        conn = self._conn
        if conn is None or self._proc is None:
            return
        try:
            _send(conn, ("stop", call_id, None))
            deadline = time.monotonic() + STOP_GRACE_S
            while time.monotonic() < deadline:
                if not conn.poll(max(0.0, deadline - time.monotonic())):
                    break
                kind, cid, _ = pickle.loads(conn.recv_bytes())
                if cid == call_id and kind in ("stopped", "done", "error"):
                    return
        except (EOFError, OSError):
            pass
        log.debug("decoder child did not stop an abandoned call; replacing it")
        self._kill()

    def _ensure_child(self) -> Connection:
        if self._proc is not None and self._proc.is_alive() and self._conn is not None:
            return self._conn
        self._discard_child()
        parent_end, child_end = self._mp.Pipe(duplex=True)
        proc = self._mp.Process(target=_child_main, args=(child_end,), name="reelflow-decoder", daemon=True)
        proc.start()
        child_end.close()  # so that the child's death reads as end-of-file here
        self._proc, self._conn = proc, parent_end
        log.debug("started decoder child pid %s", proc.pid)
        return parent_end

    def _kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(STOP_GRACE_S)
        self._discard_child()

    def _discard_child(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        if self._proc is not None and not self._proc.is_alive():
            self._proc.join(0)
        self._proc = None

    def close(self) -> None:
        """Stop the child process (the runner can still be used: a new child starts on the next call)."""
        proc, conn = self._proc, self._conn
        if proc is None:
            return
        if conn is not None:
            with contextlib.suppress(OSError):
                _send(conn, ("exit", 0, None))
        proc.join(STOP_GRACE_S)
        self._kill()


def _send(conn: Connection, message: tuple) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _as_video_error(exc: BaseException) -> VideoError:
    if isinstance(exc, VideoError):
        return exc
    text = " ".join(str(exc).split()) or type(exc).__name__
    return VideoError("decode", type(exc).__name__, text)


def _child_main(conn: Connection) -> None:
    """The child's loop: run one call at a time until told to exit or the parent goes away."""
    # Ctrl-C reaches the whole process group; the parent decides what happens to the child.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    forward = _ForwardLogs(conn)
    logging.getLogger().addHandler(forward)
    while True:
        try:
            kind, call_id, body = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        if kind == "exit":
            return
        if kind == "call":
            payload, level = body
            logging.getLogger().setLevel(level)  # the parent's: records it would drop are not sent
            forward.call_id = call_id
            _run_call(conn, call_id, payload)
        # "more"/"stop" for a call that has already finished are dropped


class _ForwardLogs(logging.Handler):
    """Sends the child's log records to the parent, which logs them under the same logger names."""

    def __init__(self, conn: Connection) -> None:
        super().__init__()
        self.conn = conn
        self.call_id = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _send(self.conn, ("log", self.call_id, (record.name, record.levelno, record.getMessage())))
        except Exception:
            self.handleError(record)


def _run_call(conn: Connection, call_id: int, payload: bytes) -> None:
    credit = WINDOW
    try:
        fn, args, kwargs = cloudpickle.loads(payload)
        items = iter(fn(*args, **kwargs))
    except BaseException as exc:
        _send(conn, ("error", call_id, _as_video_error(exc)))
        return
    try:
        while True:
            while credit <= 0 or conn.poll(0):
                kind, cid, body = pickle.loads(conn.recv_bytes())
                if cid != call_id:
                    continue
                if kind == "more":
                    credit += body
                elif kind in ("stop", "exit"):
                    _send(conn, ("stopped", call_id, None))
                    if kind == "exit":
                        os._exit(0)
                    return
            try:
                item = next(items)
            except StopIteration:
                _send(conn, ("done", call_id, None))
                return
            except BaseException as exc:
                log.debug("decoder call failed", exc_info=True)
                _send(conn, ("error", call_id, _as_video_error(exc)))
                return
            try:
                message = _dumps_item(call_id, item)
            except Exception as exc:
                _send(conn, ("error", call_id, _as_video_error(exc)))
                return
            conn.send_bytes(message)
            credit -= 1
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.debug("closing an abandoned decoder generator failed", exc_info=True)


def _dumps_item(call_id: int, item: Any) -> bytes:
    try:
        return pickle.dumps(("item", call_id, item), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        # Classes defined where the parent cannot import them (a test module, a notebook).
        return cloudpickle.dumps(("item", call_id, item), protocol=pickle.HIGHEST_PROTOCOL)


_shared: IsolatedRunner | None = None
_shared_pid: int | None = None
_shared_lock = threading.Lock()


def shared_runner() -> IsolatedRunner:
    """This process's shared IsolatedRunner (one decoder child per process, e.g. per Ray worker)."""
    global _shared, _shared_pid
    with _shared_lock:
        if _shared is None or _shared_pid != os.getpid():
            _shared, _shared_pid = IsolatedRunner(), os.getpid()
            atexit.register(_shared.close)
        return _shared
