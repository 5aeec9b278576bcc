"""What a person sees while a job runs, and the run's full log.

- `setup`: the console shows warnings and errors from Ray and the libraries (and their INFO lines with
  `--verbose`); the run's log file gets everything at INFO and above, the job's own lines included.
- `console`: the job's own lines, without level words: coloured in a terminal, plain and unwrapped elsewhere
  (cron, CI, `ray job submit` logs), and copied to the log file.
- `stage`: one progress display per stage. In a terminal, a live bar with the stage's counts, rate and ETA;
  elsewhere a line when the stage starts, one every `REELFLOW_PROGRESS_INTERVAL` seconds (30) and one when
  it ends, without carriage returns or box drawing. The counts come from the stage's Ray tasks and actors
  (`flows.progress`) or from the driver itself (`Stage.add`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.control import Control
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

LOG_DIR_ENV = "REELFLOW_LOG_DIR"
PROGRESS_INTERVAL_ENV = "REELFLOW_PROGRESS_INTERVAL"
PROGRESS_INTERVAL_S = 30.0
POLL_S = 0.5  # how often a stage reads its counter
OWN_LOGGERS = ("flows", "jobs", "models", "reelflow")
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_ECHO = "reelflow_echo"  # a record that copies a console line into the log file


class JobConsole(Console):
    """A rich console whose every line also goes to the run's log file; headings are plain text outside a
    terminal. A `preamble` is printed once, before the first line."""

    preamble: str | None = None

    def print(self, *objects: Any, **kwargs: Any) -> None:
        self._print_preamble()
        if not self.is_terminal:  # logs and files get no box-drawing characters
            for table in objects:
                if isinstance(table, Table) and table.box is not None:
                    table.box = box.ASCII
        super().print(*objects, **kwargs)
        _echo(objects, markup=kwargs.get("markup", True))

    def rule(self, title: str | Text = "", **kwargs: Any) -> None:
        self._print_preamble()
        if self.is_terminal:
            Console.print(self, Rule(title, **kwargs))
        else:
            Console.print(self, Text.from_markup(f"== {title} ==") if isinstance(title, str) else title)
        _echo([f"== {title} =="], markup=True)

    def _print_preamble(self) -> None:
        if self.preamble is not None:
            preamble, self.preamble = self.preamble, None
            self.print(preamble, markup=False, highlight=False)


def job_console(stderr: bool = True) -> JobConsole:
    """A `JobConsole` on stderr (the job's lines) or stdout (its results)."""
    made = JobConsole(stderr=stderr)
    made.soft_wrap = not made.is_terminal  # a log line stays one line
    return made


console = job_console()
_plain = Console(file=io.StringIO(), width=120, color_system=None, soft_wrap=True)


def _echo(objects: Any, markup: bool) -> None:
    logger = logging.getLogger("reelflow.console")
    if not logger.isEnabledFor(logging.INFO):
        return
    parts = []
    for obj in objects:
        if isinstance(obj, str):
            parts.append(Text.from_markup(obj).plain if markup else obj)
        elif not isinstance(obj, Control):  # a live display's redraws are not lines
            with _plain.capture() as captured:
                _plain.print(obj)
            parts.append(captured.get().rstrip("\n"))
    if any(parts):
        log_line(" ".join(parts))


def log_line(text: str) -> None:
    """A line of the job's own in the run's log file only (the console has it already)."""
    logging.getLogger("reelflow.console").info(text, extra={_ECHO: True})


# --- logging ----------------------------------------------------------------------------------------------


class _ConsoleHandler(logging.Handler):
    """Log records on the job's console (above a live progress display, never through it): the job's own
    loggers without a level word, the libraries' with theirs."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, _ECHO, False):
            return
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            if record.name.split(".")[0] not in OWN_LOGGERS:
                text = f"{record.levelname} {record.name}: {text}"
            Console.print(console, text, markup=False, highlight=False)
        except Exception:  # a broken console must not stop the job
            self.handleError(record)


_handlers: list[logging.Handler] = []


def setup(
    command: str, verbose: bool = False, log_file: bool = True, log_dir: str | Path | None = None
) -> Path | None:
    """Route every logger to the console (WARNING and above; INFO with `verbose`) and, with `log_file`, to
    a new log file under `log_dir` ($REELFLOW_LOG_DIR, else ~/.local/state/reelflow/logs), whose path is
    returned. Call it once per command, before the job imports MLflow."""
    # MLflow then leaves its loggers to this set-up, and draws no download bars of its own.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    console.preamble = None
    root = logging.getLogger()
    for handler in _handlers:
        root.removeHandler(handler)
        handler.close()
    _handlers.clear()
    on_console = _ConsoleHandler(logging.INFO if verbose else logging.WARNING)
    _handlers.append(on_console)
    path = None
    if log_file:
        try:
            path = _log_path(command, log_dir)
            to_file = logging.FileHandler(path, encoding="utf-8")
        except OSError as err:  # a read-only home folder costs the log file, not the run
            console.print(f"no log file for this run: {err}", markup=False, highlight=False)
            path = None
        else:
            to_file.setLevel(logging.INFO)
            to_file.setFormatter(logging.Formatter(FILE_FORMAT))
            _handlers.append(to_file)
    for handler in _handlers:
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("reelflow").setLevel(logging.INFO)
    for chatty in ("alembic", "sqlalchemy"):  # MLflow's database migrations, as MLflow itself sets them
        logging.getLogger(chatty).setLevel(logging.WARNING)
    logging.captureWarnings(True)
    return path


def _log_path(command: str, log_dir: str | Path | None) -> Path:
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    folder = Path(log_dir or os.environ.get(LOG_DIR_ENV) or state / "reelflow" / "logs")
    folder.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return folder / f"{command}-{stamp}-{os.getpid()}.log"


def adopt_loggers(*names: str) -> None:
    """Have libraries' loggers that print on their own (Ray's) pass their records to the handlers `setup`
    installed instead; their file handlers (Ray Data's session log) stay."""
    for name in names:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler or type(handler).__name__ == "PlainRayHandler":
                logger.removeHandler(handler)
        logger.propagate = True


# --- progress ---------------------------------------------------------------------------------------------


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    return str(dt.timedelta(seconds=round(max(seconds, 0.0))))


def video_detail(values: Mapping[str, Any], total: float | None) -> str:
    """A decode stage's counts as "12/40 videos · 96 clips · 31.5 clips/s · 1 failed"."""
    videos = int(values.get("videos", 0))
    text = f"{videos}/{int(total)} videos" if total else f"{videos} videos"
    if "clips" in values:
        text += f" · {int(values['clips'])} clips"
    if values.get("clips_per_s"):
        text += f" · {values['clips_per_s']:.1f} clips/s"
    if values.get("failed"):
        text += f" · {int(values['failed'])} failed"
    return text


def training_detail(values: Mapping[str, Any], total: float | None) -> str:
    """What training's rank 0 reported as "epoch 2/8 · step 40/320 · loss 1.234 · 45.2 clips/s"."""
    if "epoch" not in values:
        return "starting the workers"
    text = f"epoch {values['epoch']}/{values['epochs']} · step {int(values.get('step', 0))}/{int(total or 0)}"
    if values.get("loss") is not None:
        text += f" · loss {values['loss']:.3f}"
    if values.get("clips_per_s"):
        text += f" · {values['clips_per_s']:.1f} clips/s"
    if values.get("phase") == "validating":
        text += " · validating"
    return text


class Stage:
    """One stage's progress display (see the module's docstring). `done_key` names the count that moves the
    bar; `total` is known up front or reported as the value `total`."""

    def __init__(
        self,
        name: str,
        total: float | None = None,
        done_key: str = "videos",
        detail: Callable[[Mapping[str, Any], float | None], str] = video_detail,
        counter: Any | None = None,
        quiet: bool = False,
    ) -> None:
        self.name, self.total, self.done_key, self.detail = name, total, done_key, detail
        self.counter, self.quiet = counter, quiet
        self.values: dict[str, Any] = {}
        self._local: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._interval = float(os.environ.get(PROGRESS_INTERVAL_ENV) or PROGRESS_INTERVAL_S)
        self._progress: Progress | None = None
        self._task: Any = None
        self._thread: threading.Thread | None = None

    def add(self, **counts: float) -> None:
        """Count work the driver did itself."""
        with self._lock:
            for key, n in counts.items():
                self._local[key] = self._local.get(key, 0) + n

    def __enter__(self) -> Stage:
        self._started = time.monotonic()
        if self.quiet:
            return self
        if console.is_terminal:
            columns = (
                TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=30),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            # stdout stays the job's results (a JSON line, a model URI), even while a bar is drawn on stderr
            self._progress = Progress(*columns, console=console, transient=False, redirect_stdout=False)
            self._progress.start()
            self._task = self._progress.add_task(self.name, total=self.total, detail="")
        what = f", {int(self.total)} {self.done_key}" if self.total else ""
        self._say(f"{self.name}: started{what}")
        self._thread = threading.Thread(target=self._poll, name=f"progress-{self.name}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.counter is not None:
            self._read_settled()
            with contextlib.suppress(Exception):
                self.counter.actor.drop.remote(self.counter.stage)
        else:
            self._read()
        if self.quiet:
            return
        if self._progress is not None:
            self._render()
            self._progress.stop()
        outcome = "done" if exc_type is None else "failed"
        elapsed = clock(time.monotonic() - self._started)
        self._say(f"{self.name}: {outcome} in {elapsed}: {self._detail()}")

    def _say(self, line: str) -> None:
        """A stage line: on the console without a terminal (a bar shows it there), in the log file always."""
        if self._progress is None:
            console.print(line, markup=False, highlight=False)
        else:
            log_line(line)

    def _poll(self) -> None:
        """A live bar reads the counts twice a second; lines read them only when one is due."""
        every = POLL_S if self._progress is not None else self._interval
        while not self._stop.wait(every):
            self._read()
            if self._progress is not None:
                self._render()
            else:
                console.print(self._line(), markup=False, highlight=False)

    def _read(self) -> None:
        values: dict[str, Any] = {}
        if self.counter is not None:
            import ray

            with contextlib.suppress(Exception):  # a display never fails the stage
                values = ray.get(self.counter.read(), timeout=5)
        with self._lock:
            for key, n in self._local.items():
                values[key] = values.get(key, 0) + n
            self.values = values

    def _read_settled(self) -> None:
        """The final counts: the tasks' last reports may still be on their way when the stage's work is."""
        for _ in range(5):
            before = self.values
            self._read()
            if self.values == before:
                return
            time.sleep(0.1)

    def _done(self) -> float:
        return float(self.values.get(self.done_key, 0) or 0)

    def _total(self) -> float | None:
        return self.total or self.values.get("total")

    def _detail(self) -> str:
        """The counts in words; clips/s end to end from the stage's start, unless the workers report it."""
        values = self.values
        if "clips" in values and "clips_per_s" not in values:
            values = {**values, "clips_per_s": values["clips"] / max(time.monotonic() - self._started, 1e-3)}
        return self.detail(values, self._total())

    def _eta(self) -> str:
        done, total = self._done(), self._total()
        if not done or not total:
            return "unknown"
        elapsed = time.monotonic() - self._started
        return clock(elapsed / done * max(total - done, 0))

    def _line(self) -> str:
        return f"{self.name}: {self._detail()}, ETA {self._eta()}"

    def _render(self) -> None:
        assert self._progress is not None
        self._progress.update(self._task, completed=self._done(), total=self._total(), detail=self._detail())


def stage(
    name: str,
    total: float | None = None,
    done_key: str = "videos",
    detail: Callable[[Mapping[str, Any], float | None], str] = video_detail,
    remote: bool = False,
    quiet: bool = False,
) -> Stage:
    """A stage's progress display, for a `with` block (none when `quiet`); with `remote`, its `counter` (a
    `flows.progress.StageCounter`, Ray initialized) is what the stage's tasks report to."""
    counter = None
    if remote:
        from flows.progress import StageCounter

        counter = StageCounter(start_progress(), f"{name}-{next(_stage_numbers)}")
    return Stage(name, total, done_key, detail, counter, quiet)


_stage_numbers = itertools.count(1)
_counter: tuple[str, Any] | None = None  # (the Ray job it lives in, the actor)


def start_progress() -> Any:
    """The job's `flows.progress.ProgressCounter` actor, started on first use; `init_ray` starts it at once,
    so that its worker process starts while the job plans rather than when the first stage's tasks do."""
    global _counter
    import ray

    from flows.progress import start_counter

    job = ray.get_runtime_context().get_job_id()
    if _counter is None or _counter[0] != job:  # a new Ray session (tests start several) needs its own
        _counter = (job, start_counter())
    return _counter[1]
