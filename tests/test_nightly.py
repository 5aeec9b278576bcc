"""infra/schedule: the nightly wrapper (cron and the CronJob run it), driven by a stand-in Ray Jobs CLI
through every state a night's job can be in; the run against a real cluster is in test_infra's local stack
test."""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

import pytest
from infra_files import INFRA, WRAPPER


def test_crontab_runs_the_wrapper_every_night() -> None:
    lines = [line for line in (INFRA / "schedule" / "reelflow.crontab").read_text().splitlines()
             if line.strip() and not line.startswith("#") and "=" not in line.split()[0]]  # fmt: skip
    (entry,) = lines
    minute, hour, dom, month, dow, *command = entry.split()
    assert minute.isdigit() and hour.isdigit() and (dom, month, dow) == ("*", "*", "*")
    assert command[-1].endswith("infra/schedule/nightly-tag.sh")
    assert os.access(WRAPPER, os.X_OK)


def run_wrapper(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    unset = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "REELFLOW_")  # settings of another cluster or night
    base = {k: v for k, v in os.environ.items() if not k.startswith(unset)}
    return subprocess.run([str(WRAPPER), *args], env={**base, **env}, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def wrapper_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"RAY_ADDRESS": "http://127.0.0.1:9", "REELFLOW_CORPUS": str(tmp_path / "corpus"),
            "REELFLOW_TABLES": str(tmp_path / "tables"), "REELFLOW_MODEL": "models:/m@production",
            "REELFLOW_LOG_DIR": str(tmp_path / "logs"), "RAY": "true", **extra}  # fmt: skip


@pytest.mark.parametrize("missing", ["RAY_ADDRESS", "REELFLOW_CORPUS", "REELFLOW_TABLES", "REELFLOW_MODEL"])
def test_nightly_wrapper_names_a_missing_setting(tmp_path: Path, missing: str) -> None:
    env = wrapper_env(tmp_path)
    del env[missing]
    result = run_wrapper(env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"nightly-tag: error: {missing} is not set"]


def test_nightly_wrapper_rejects_a_bad_date(tmp_path: Path) -> None:
    result = run_wrapper(wrapper_env(tmp_path), "02/01/2026")
    assert result.returncode == 2 and "date: expected YYYY-MM-DD, got '02/01/2026'" in result.stderr


def test_nightly_wrapper_does_not_overlap_a_running_night(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    with open(tmp_path / "logs" / "nightly-tag.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the previous night's wrapper holds it
        result = run_wrapper(wrapper_env(tmp_path), "2026-01-02")
    assert result.returncode == 75
    assert "previous run still in progress; not starting 2026-01-02" in result.stderr
    assert not (tmp_path / "logs" / "tag-2026-01-02.log").exists()  # nothing was submitted


FAKE_RAY = r"""#!/usr/bin/env bash
# A stand-in for the Ray Jobs CLI: job states are files in $FAKE_RAY_DIR (one state per line, the next
# one read at each status call, the last one kept); every call is appended to $FAKE_RAY_DIR/calls.
set -euo pipefail
echo "$*" >> "$FAKE_RAY_DIR/calls"
id="${*: -1}"
case "$1 $2" in
    "job status")
        [[ -f "$FAKE_RAY_DIR/$id" ]] || { echo "Job $id does not exist" >&2; exit 1; }
        state="$(head -n 1 "$FAKE_RAY_DIR/$id")"
        if [[ "$(wc -l < "$FAKE_RAY_DIR/$id")" -gt 1 ]]; then sed -i 1d "$FAKE_RAY_DIR/$id"; fi
        case "$state" in  # worded as Ray 2.60's CLI words them
            SUCCEEDED) printf -- '---\nJob %s succeeded\n---\n' "'$id'" ;;
            FAILED) printf -- '---\nJob %s failed\n---\nStatus message: boom\n' "'$id'" ;;
            STOPPED) echo "Job '$id' was stopped" >&2 ;;
            *) echo "Status for job '$id': $state" ;;
        esac
        ;;
    "job submit")
        for ((i = 1; i <= $#; i++)); do [[ "${!i}" == --submission-id ]] && j=$((i + 1)) && id="${!j}"; done
        printf 'RUNNING\n%s\n' "${FAKE_RAY_OUTCOME:-SUCCEEDED}" > "$FAKE_RAY_DIR/$id"
        ;;
    "job stop") echo STOPPED > "$FAKE_RAY_DIR/$id" ;;
esac
"""


def fake_ray(tmp_path: Path, **jobs: str) -> dict[str, str]:
    """The wrapper's settings with a fake `ray` whose jobs start in the given states (id: 'S1\\nS2')."""
    folder = tmp_path / "ray"
    folder.mkdir()
    (folder / "ray").write_text(FAKE_RAY)
    (folder / "ray").chmod(0o755)
    for job_id, states in jobs.items():
        (folder / job_id).write_text(states + "\n")
    return wrapper_env(tmp_path, RAY=str(folder / "ray"), FAKE_RAY_DIR=str(folder), REELFLOW_POLL_S="0.1")


def ray_calls(env: dict[str, str], verb: str) -> list[str]:
    calls = (Path(env["FAKE_RAY_DIR"]) / "calls").read_text().splitlines()
    return [c for c in calls if c.startswith(f"job {verb}")]


NIGHT = "reelflow-tag-2026-01-02"


def test_nightly_wrapper_submits_the_night_under_its_own_id_and_waits_for_it(tmp_path: Path) -> None:
    env = fake_ray(tmp_path)
    result = run_wrapper(env, "2026-01-02")
    assert result.returncode == 0, result.stdout + result.stderr
    (submit,) = ray_calls(env, "submit")
    assert f"--submission-id {NIGHT} --no-wait" in submit and "--date 2026-01-02" in submit
    assert f"{NIGHT} finished: SUCCEEDED" in result.stdout


@pytest.mark.parametrize(
    ("jobs", "submitted", "code"),
    [
        ({NIGHT: "SUCCEEDED"}, None, 0),  # a hand re-run of a night that is done does nothing
        ({NIGHT: "RUNNING\nRUNNING\nSUCCEEDED"}, None, 0),  # one still running is waited for, not doubled
        ({NIGHT: "FAILED"}, f"{NIGHT}-r2", 0),
        ({NIGHT: "FAILED", f"{NIGHT}-r2": "STOPPED"}, f"{NIGHT}-r3", 0),
    ],
)
def test_nightly_wrapper_reruns_a_night_only_when_it_failed(
    tmp_path: Path, jobs: dict[str, str], submitted: str | None, code: int
) -> None:
    env = fake_ray(tmp_path, **jobs)
    result = run_wrapper(env, "2026-01-02")
    assert result.returncode == code, result.stdout + result.stderr
    ids = [c.split("--submission-id ")[1].split()[0] for c in ray_calls(env, "submit")]
    assert ids == ([submitted] if submitted else [])


def test_nightly_wrapper_stops_the_ray_job_at_its_deadline(tmp_path: Path) -> None:
    env = fake_ray(tmp_path, **{NIGHT: "RUNNING"})
    result = run_wrapper({**env, "REELFLOW_DEADLINE_S": "1"}, "2026-01-02")
    assert result.returncode == 124, result.stdout + result.stderr
    assert ray_calls(env, "stop") == [f"job stop --address {env['RAY_ADDRESS']} {NIGHT}"]
    assert "deadline of 1 s passed" in result.stdout
