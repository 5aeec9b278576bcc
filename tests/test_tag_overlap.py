"""`reelflow tag` runs that overlap, die or stall, as separate processes on one Ray cluster: exactly once
under every interleaving, and the next night always works.

Each run is a real `reelflow tag` process (tests/tag_process.py) connected to the session's Ray instance;
runs are killed with SIGKILL to their whole process group, or stopped with SIGSTOP, at named steps of the
commit protocol or at random moments.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.compute as pc
import pytest
from conftest import copy_corpus

from flows import labels as flabels
from flows import runs, tables
from flows.clips import list_video_rows
from flows.lease import Lease
from jobs import tag

REPO = Path(__file__).resolve().parent.parent
D1, D2 = "2024-05-01", "2024-05-02"
LOST_OR_HELD = 75  # jobs.cli.EXIT_TEMPORARY

pytestmark = pytest.mark.slow


@dataclass
class Run:
    """A `reelflow tag` process and where its output goes."""

    proc: subprocess.Popen
    log: Path

    def wait(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)


class Night:
    """Starts `reelflow tag` processes for one corpus, tables and model, on the session's Ray instance."""

    def __init__(self, corpus: Path, tables_uri: str, model: tuple[str, str], ray_address: str, logs: Path):
        self.corpus, self.tables, self.model = corpus, tables_uri, model
        self.ray_address, self.logs = ray_address, logs
        self.started: list[Run] = []

    def start(
        self, date: str = D1, *args: str, kill_at: str | None = None, pause_at: str | None = None
    ) -> Run:
        log = self.logs / f"run-{len(self.started)}.log"
        env = {**os.environ, "RAY_ADDRESS": self.ray_address, "PYTHONUNBUFFERED": "1"}
        env.pop("REELFLOW_TEST_KILL_AT", None)
        if kill_at:
            env["REELFLOW_TEST_KILL_AT"] = kill_at
        if pause_at:
            env["REELFLOW_TEST_PAUSE_AT"] = pause_at
        cmd = [sys.executable, str(REPO / "tests" / "tag_process.py"), "tag", "--corpus", str(self.corpus),
               "--model", self.model[0], "--tracking-uri", self.model[1], "--tables", self.tables,
               "--date", date, "--batch-size", "8", "--lease-wait", "300", *args]  # fmt: skip
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)  # fmt: skip
        run = Run(proc, log)
        self.started.append(run)
        return run

    def run(self, date: str = D1, *args: str, **kwargs: str) -> Run:
        run = self.start(date, *args, **kwargs)
        run.wait()
        return run

    def stop_all(self) -> None:
        for run in self.started:
            if run.proc.poll() is None:
                os.killpg(run.proc.pid, signal.SIGCONT)
                run.kill()


@pytest.fixture(params=["local", "s3"])
def night(request, tmp_path, small_corpus, tagging_model, ray_address):
    """A corpus of 6 labelled videos and the 2 broken files, empty tables (a folder, or a prefix on the S3
    server), and a way to start runs."""
    corpus = copy_corpus(small_corpus, tmp_path / "corpus", 6)
    logs = tmp_path / "logs"
    logs.mkdir()
    local = request.param == "local"
    where = str(tmp_path / "tables") if local else request.getfixturevalue("s3_bucket") + "/tables"
    runner = Night(corpus, where, tagging_model, ray_address, logs)
    yield runner
    runner.stop_all()


def wait_stopped(run: Run, timeout: float = 240) -> None:
    """Until the run has stopped itself (SIGSTOP at its pause step)."""
    deadline = time.monotonic() + timeout
    while psutil.Process(run.proc.pid).status() != psutil.STATUS_STOPPED:
        assert run.proc.poll() is None, run.output()[-3000:]
        assert time.monotonic() < deadline, run.output()[-3000:]
        time.sleep(0.1)


def assert_exactly_once(tables_uri: str, corpus: Path) -> None:
    """No duplicated row in any table, and every listed video accounted for: tagged, or an error row."""
    listed = {r.video_id for r in list_video_rows(str(corpus))}
    manifest = flabels.read_manifest(str(corpus / flabels.LABELS_FILE))
    readable = {r.video_id for r in list_video_rows(str(corpus))
                if flabels.relative_file(r.uri, str(corpus)) in manifest.videos}  # fmt: skip
    videos = tables.read_table(tables_uri, "videos").column("video_id").to_pylist()
    assert sorted(videos) == sorted(listed), "one videos row per listed video"
    for name in (*tables.PREDICTION_TABLES, "errors"):
        table = tables.read_table(tables_uri, name)
        per_key = table.group_by(list(tables.PREDICTION_KEY)).aggregate([("job_run_id", "count_distinct")])
        assert pc.max(per_key.column("job_run_id_count_distinct")).as_py() in (None, 1), name
        rows = [json.dumps(r, sort_keys=True, default=str) for r in table.to_pylist()]
        assert not [r for r, n in Counter(rows).items() if n > 1], name
    ranks = tables.read_table(tables_uri, "classifications", ["video_id", "head", "rank"]).to_pylist()
    assert len({tuple(r.values()) for r in ranks}) == len(ranks)
    assert {r["video_id"] for r in ranks} == readable
    errors = tables.read_table(tables_uri, "errors", ["video_id"]).column("video_id").to_pylist()
    assert sorted(errors) == sorted(listed - readable)


def comparable(tables_uri: str, corpus: Path) -> dict[str, list[str]]:
    """Every table's rows without run columns, videos named by their file in the corpus, scores to 4
    decimals, sorted: equal for equal catalogs of copies of the same corpus."""
    files = {r.video_id: flabels.relative_file(r.uri, str(corpus)) for r in list_video_rows(str(corpus))}

    def plain(value: object) -> object:
        if isinstance(value, float):
            return round(value, 4)
        return value.replace(str(corpus), "CORPUS") if isinstance(value, str) else value

    out = {}
    for name in tables.TABLES:
        table = tables.read_table(tables_uri, name)
        run_columns = ("job_run_id", "run_date", "first_seen", "last_seen", "uri")
        drop = [c for c in run_columns if c in table.column_names]
        rows = [{**{k: plain(v) for k, v in r.items()}, "video_id": files[r["video_id"]]}
                for r in table.drop_columns(drop).to_pylist()]  # fmt: skip
        out[name] = sorted(json.dumps(r, sort_keys=True, default=str) for r in rows)
    return out


def test_two_runs_of_the_same_night_at_once_tag_each_video_once(night: Night) -> None:
    first, second = night.start(), night.start()
    assert first.wait() == 0, first.output()[-3000:]
    assert second.wait() == 0, second.output()[-3000:]
    assert_exactly_once(night.tables, night.corpus)
    tagged = [run for run in (first, second) if "nothing new to commit" not in run.output()]
    assert len(tagged) == 1  # the one that waited for the lease found every video done


def test_two_nights_at_once_share_the_new_videos_and_tag_each_once(night: Night, small_corpus: Path) -> None:
    night.run(D1)
    copy_corpus(small_corpus, night.corpus, 10, broken=False)  # four new videos, visible to both nights
    first, second = night.start(D2), night.start("2024-05-03")
    assert first.wait() == 0 and second.wait() == 0, (first.output() + second.output())[-3000:]
    assert_exactly_once(night.tables, night.corpus)
    dates = tables.read_table(night.tables, "classifications", ["video_id", "run_date"])
    per_video = dates.group_by("video_id").aggregate([("run_date", "count_distinct")])
    assert pc.max(per_video.column("run_date_count_distinct")).as_py() == 1  # each video: one night's rows


def test_a_run_that_gave_up_waiting_exits_with_one_line_and_a_later_run_does_the_work(night: Night) -> None:
    with Lease.acquire(night.tables, "long-night", ttl_s=60):
        gave_up = night.run(D1, "--lease-wait", "1")
    assert gave_up.proc.returncode == LOST_OR_HELD
    last = gave_up.output().strip().splitlines()[-1]
    assert last.startswith("reelflow tag: tables held by run long-night on host ") and " since " in last
    assert tables.read_snapshot(night.tables).run_id is None
    later = night.run(D1)
    assert later.proc.returncode == 0, later.output()[-3000:]
    assert_exactly_once(night.tables, night.corpus)


@pytest.mark.parametrize("step", ["files written", "pending"])
def test_a_holder_paused_past_its_ttl_is_refused_and_nothing_is_duplicated(night: Night, step: str) -> None:
    paused = night.start(D1, "--lease-ttl", "2", pause_at=step)
    wait_stopped(paused)
    time.sleep(2.5)  # past its TTL: the retry takes the tables over
    retry = night.run(D1)
    assert retry.proc.returncode == 0, retry.output()[-3000:]
    assert "took the tables over from run" in retry.output()
    os.killpg(paused.proc.pid, signal.SIGCONT)
    assert paused.wait() == LOST_OR_HELD, paused.output()[-3000:]
    assert "lost the lease" in paused.output().strip().splitlines()[-1]
    assert_exactly_once(night.tables, night.corpus)
    log = runs.read_log(night.tables).to_pylist()
    committed = [e for e in log if e["status"] == runs.COMMITTED]
    if step == "pending":  # the paused run had logged its chunk: the retry finished committing it
        assert [e["recovered_by"] is not None for e in committed] == [True]
    else:
        assert all(e["recovered_by"] is None and e["epoch"] == committed[0]["epoch"] for e in committed)


KILL_STEPS = ["leased", "fenced", "files written", "pending", "committed classifications", "committed errors",
              "chunk committed", "finished"]  # fmt: skip


@pytest.fixture(scope="module")
def clean_tables(tmp_path_factory, small_corpus, tagging_model, ray_session) -> dict[str, list[str]]:
    """The corpus of `night` (6 videos and 2 broken files) tagged once by an undisturbed run."""
    root = tmp_path_factory.mktemp("clean")
    corpus = copy_corpus(small_corpus, root / "corpus", 6)
    uri = str(root / "tables")
    tag.main(tag.TagConfig(corpus=str(corpus), models=(tagging_model[0],), tables=uri, date=D1,
                           tracking_uri=tagging_model[1]))  # fmt: skip
    return comparable(uri, corpus)


@pytest.mark.parametrize(
    ("night", "step"),
    [*(("local", step) for step in KILL_STEPS), ("s3", "pending"), ("s3", "committed classifications")],
    indirect=["night"],
)
def test_a_night_killed_at_any_step_then_rerun_equals_a_clean_night(night: Night, clean_tables, step) -> None:
    killed = night.run(D1, kill_at=step)
    assert killed.proc.returncode == -signal.SIGKILL, killed.output()[-3000:]
    assert f"step: {step}" in killed.output()
    rerun = night.run(D1)
    assert rerun.proc.returncode == 0, rerun.output()[-3000:]
    assert_exactly_once(night.tables, night.corpus)
    assert comparable(night.tables, night.corpus) == clean_tables
    assert night.run(D2).proc.returncode == 0  # and the next night works: nothing left to do


def test_chaos_six_nights_killed_or_overlapped_then_a_clean_night_equal_a_clean_run(
    tmp_path, small_corpus, tagging_model, ray_address
) -> None:
    rng = random.Random(20240501)
    corpus = copy_corpus(small_corpus, tmp_path / "corpus", 2)
    logs = tmp_path / "logs"
    logs.mkdir()
    chaos = Night(corpus, str(tmp_path / "tables"), tagging_model, ray_address, logs)
    steps = [s for s in KILL_STEPS if s != "leased"]
    story = []
    try:
        for index in range(6):
            date = f"2024-05-{index + 1:02d}"
            copy_corpus(small_corpus, corpus, 2 + 2 * (index + 1), broken=False)
            how = rng.choice(["kill at a step", "kill at a moment", "overlapped by a retry"])
            if how == "kill at a step":
                step = rng.choice(steps)
                story.append(f"{date}: killed at {step!r}")
                chaos.run(date, kill_at=step)
            elif how == "kill at a moment":
                run, delay = chaos.start(date), rng.uniform(1.0, 15.0)
                story.append(f"{date}: killed after {delay:.1f} s")
                time.sleep(delay)
                run.kill()
            else:
                first, delay = chaos.start(date), rng.uniform(0.0, 8.0)
                story.append(f"{date}: retried after {delay:.1f} s while the first run lived")
                time.sleep(delay)
                retry = chaos.start(date)
                if rng.random() < 0.5:
                    time.sleep(rng.uniform(0.0, 8.0))
                    first.kill()
                    story[-1] += ", the first run killed"
                for run in (first, retry):
                    assert run.wait() in (0, -signal.SIGKILL), run.output()[-3000:]
        last = chaos.run("2024-05-07")
        assert last.proc.returncode == 0, last.output()[-3000:]
    finally:
        chaos.stop_all()
    assert_exactly_once(chaos.tables, corpus)

    reference = str(tmp_path / "reference")
    tag.main(tag.TagConfig(corpus=str(corpus), models=(tagging_model[0],), tables=reference, date=D1,
                           tracking_uri=tagging_model[1]))  # fmt: skip
    assert comparable(chaos.tables, corpus) == comparable(reference, corpus), "\n".join(story)
