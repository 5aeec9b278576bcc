"""What a person sees: one progress display per stage in a terminal, plain stage and progress lines
under cron, Ray's INFO lines only with --verbose, and everything in the run's log file."""

from __future__ import annotations

import fcntl
import io
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from jobs import cli, output

REELFLOW = [sys.executable, "-m", "jobs.cli"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BOX_DRAWING = set("─━│┃┏┓┗┛┡┩└┘╸╺╇")
DEMO_STAGES = ("make-corpus", "decode train clips", "decode validation clips", "train", "evaluate", "tag")
SMALL_DEMO = ["demo", "--videos", "20", "--epochs", "1", "--date", "2024-05-01"]
RAY_INFO = re.compile(r"\bINFO\b")


def job_env(ray_address: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The job's environment: the session's Ray cluster, logs under tmp_path, no inherited display
    settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "NO_COLOR", "TERM")}
    return {**env, "RAY_ADDRESS": ray_address, output.LOG_DIR_ENV: str(tmp_path / "logs"), **extra}


def run_in_terminal(argv: list[str], env: dict[str, str], timeout_s: float = 600) -> tuple[int, str]:
    """Run `argv` with a pseudo-terminal (150 columns) as its stdin, stdout and stderr; returns its exit
    status and everything it wrote there."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 150, 0, 0))
    env = {**env, "TERM": "xterm-256color"}
    proc = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: every process holding the terminal's other end has exited
                break
            if not data:
                break
            chunks.append(data)
        else:
            pytest.fail(f"{argv} ran past {timeout_s} s")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(leader)
    return proc.returncode, b"".join(chunks).decode("utf-8", errors="replace")


def plain_console() -> output.JobConsole:
    """The jobs' console as it is without a terminal (cron), writing to a string."""
    return output.JobConsole(file=io.StringIO(), force_terminal=False, soft_wrap=True, width=200)


def screen_lines(raw: str) -> list[str]:
    """What the terminal drew, line by line, each redraw (carriage return) a line of its own, colours gone."""
    return [part for line in ANSI.sub("", raw).split("\n") for part in line.split("\r") if part.strip()]


def test_verbose_is_accepted_before_or_after_the_command() -> None:
    parser = cli.build_parser()
    tag = ["tag", "--corpus", "c", "--model", "m", "--tables", "t", "--date", "2024-05-01"]
    assert parser.parse_args(["--verbose", *tag]).verbose
    assert parser.parse_args([*tag, "--verbose"]).verbose
    assert parser.parse_args(["tables", "history", "t", "-v"]).verbose
    assert not parser.parse_args(tag).verbose


def test_a_stage_without_a_terminal_prints_a_start_line_progress_lines_and_an_end_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(output.PROGRESS_INTERVAL_ENV, "0.2")
    monkeypatch.setattr(output, "console", plain_console())
    with output.stage("decode", total=4) as shown:
        shown.add(videos=1, clips=8)
        time.sleep(0.9)
        shown.add(videos=3, clips=24, failed=1)
    err = output.console.file.getvalue()
    lines = err.splitlines()
    assert lines[0] == "decode: started, 4 videos"
    end = r"decode: done in 0:00:01: 4/4 videos · 32 clips · [\d.]+ clips/s · 1 failed"
    assert re.fullmatch(end, lines[-1])
    progress = lines[1:-1]
    assert progress and all(re.fullmatch(r"decode: 1/4 videos · 8 clips · [\d.]+ clips/s, ETA 0:00:0\d", p)
                            for p in progress)  # fmt: skip
    assert "\r" not in err and not BOX_DRAWING & set(err)


@pytest.mark.usefixtures("ray_session")
def test_a_stage_adds_up_what_its_ray_tasks_report(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from flows.progress import report

    @ray.remote(num_cpus=0.5)
    def decode(counter: object, clips: int) -> None:
        report(counter, videos=1, clips=clips)

    monkeypatch.setattr(output, "console", plain_console())
    with output.stage("decode", total=3, remote=True) as shown:
        ray.get([decode.remote(shown.counter, n) for n in (4, 5, 6)])
    assert shown.values["videos"] == 3 and shown.values["clips"] == 15
    last = output.console.file.getvalue().splitlines()[-1]
    assert re.fullmatch(r"decode: done in 0:00:0\d: 3/3 videos · 15 clips · [\d.]+ clips/s", last)


def test_the_demo_in_a_terminal_shows_a_progress_display_per_stage_and_no_ray_info(
    tmp_path: Path, ray_address: str
) -> None:
    env = job_env(ray_address, tmp_path)
    status, raw = run_in_terminal([*REELFLOW, *SMALL_DEMO, "--workdir", str(tmp_path / "demo")], env)
    lines = screen_lines(raw)
    assert status == 0, "\n".join(lines[-30:])
    for name in DEMO_STAGES:  # a bar drawn, then redrawn as the stage moves
        bars = [line for line in lines if re.match(re.escape(name) + r" [━╸╺]{10,}", line)]
        assert len(bars) >= 2, f"no progress display for {name}"
    training = r"epoch 1/1 · step \d+/\d+ · loss \d+\.\d{3} · [\d.]+ clips/s"
    assert any(re.search(training, line) for line in lines)
    assert any(re.search(r"23/23 videos · \d+ clips · [\d.]+ clips/s · 3 failed", line) for line in lines)
    assert not [line for line in lines if RAY_INFO.search(line)]
    assert "20 tagged" in ANSI.sub("", raw)
    (log,) = (tmp_path / "demo" / "logs").glob("demo-*.log")  # the stages' outcome, not the bars' redraws
    text = log.read_text()
    assert re.search(r"reelflow\.console: tag: done in \d+:\d\d:\d\d: 23/23 videos", text)
    assert not re.search(r"reelflow\.console: *$", text, re.M)


def test_the_demo_without_a_terminal_prints_stage_lines_and_periodic_progress_lines(
    tmp_path: Path, ray_address: str
) -> None:
    env = job_env(ray_address, tmp_path, **{output.PROGRESS_INTERVAL_ENV: "1"})
    workdir = tmp_path / "demo"
    argv = [*REELFLOW, *SMALL_DEMO, "--workdir", str(workdir)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    err = done.stderr
    for name in DEMO_STAGES:
        assert re.search(rf"^{re.escape(name)}: started", err, re.M), name
        assert re.search(rf"^{re.escape(name)}: done in \d+:\d\d:\d\d: ", err, re.M), name
    assert re.search(r"^train: (starting the workers|epoch 1/1 · step .*), ETA ", err, re.M)
    assert "\r" not in err + done.stdout and not BOX_DRAWING & set(err + done.stdout)
    assert not RAY_INFO.search(err)
    assert "20 tagged" in err
    (log,) = (workdir / "logs").glob("demo-*.log")
    text = log.read_text()
    assert re.search(r" INFO ray\.data\.[\w.]+: Starting execution of Dataset", text)  # Ray's INFO lines
    assert "tag: done in " in text  # and the job's own lines


def test_verbose_brings_ray_info_lines_back_to_the_console(
    tmp_path: Path, ray_address: str, small_corpus: Path
) -> None:
    argv = [*REELFLOW, "clips", str(small_corpus), "--out", str(tmp_path / "out"), "--clips-per-video", "1"]
    env = job_env(ray_address, tmp_path)
    quiet = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    loud = subprocess.run([*argv, "--verbose"], env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == loud.returncode == 0, loud.stderr[-2000:]
    assert not RAY_INFO.search(quiet.stderr)
    assert re.search(r"^INFO ray\.data\.[\w.]+: Starting execution of Dataset", loud.stderr, re.M)
    assert quiet.stderr.splitlines()[0].startswith("full log: ")
