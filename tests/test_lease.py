"""flows.lease: one holder at a time, waiting, takeover of dead holders, the epoch, losing the lease."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flows import lease as leases
from flows.lease import Lease, LeaseHeld, LeaseLost

REPO = Path(__file__).resolve().parent.parent


def test_a_held_lease_makes_the_next_run_wait_then_name_the_holder(tables_uri: str) -> None:
    with Lease.acquire(tables_uri, "night-1", ttl_s=30) as held:
        assert held.epoch == 1
        started = time.monotonic()
        with pytest.raises(LeaseHeld) as err:
            Lease.acquire(tables_uri, "night-2", ttl_s=30, wait_s=0.5)
        assert time.monotonic() - started >= 0.5
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith("tables held by run night-1 on host ") and " since 20" in message
    # Released: the next run takes it at once, under a new epoch.
    with Lease.acquire(tables_uri, "night-2", ttl_s=30, wait_s=0) as second:
        assert second.epoch == 2
        assert leases.holder(tables_uri).owner == "night-2"


def test_a_waiting_run_gets_the_lease_when_the_holder_releases_it(tmp_path: Path) -> None:
    uri = str(tmp_path)
    first = Lease.acquire(uri, "first", ttl_s=30)
    threading.Timer(0.5, first.release).start()
    with Lease.acquire(uri, "second", ttl_s=30, wait_s=10) as second:
        assert second.epoch == first.epoch + 1


def test_a_live_holders_heartbeat_keeps_the_lease_past_its_ttl(tmp_path: Path) -> None:
    uri = str(tmp_path)
    with Lease.acquire(uri, "long-night", ttl_s=1.0) as held:
        with pytest.raises(LeaseHeld):
            Lease.acquire(uri, "retry", ttl_s=1.0, wait_s=3.0)
        held.check()  # still ours


def test_a_holder_silent_past_its_ttl_is_taken_over_and_knows_it(tables_uri: str) -> None:
    paused = Lease.acquire(tables_uri, "paused", ttl_s=0.5, heartbeat=False)
    time.sleep(0.7)
    with Lease.acquire(tables_uri, "retry", ttl_s=30, wait_s=0) as retry:
        assert retry.epoch == paused.epoch + 1
        with pytest.raises(LeaseLost, match="taken over by run retry"):
            paused.check()
        paused.release()  # a lost lease is not released over the new holder's
        retry.check()
        assert leases.holder(tables_uri).owner == "retry"


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    uri = str(tmp_path)
    code = (
        "import sys, time; from flows.lease import Lease; "
        f"Lease.acquire({uri!r}, 'killed', ttl_s=600); print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match="held by run killed"):
            Lease.acquire(uri, "retry", ttl_s=600, wait_s=0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        started = time.monotonic()
        with Lease.acquire(uri, "retry", ttl_s=600, wait_s=5) as retry:
            assert retry.epoch == 2
        assert time.monotonic() - started < 5  # no waiting for the 600 s TTL: its process is gone
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_runs_racing_for_the_lease_hold_it_one_at_a_time(tables_uri: str) -> None:
    inside, most, epochs = [0], [0], []
    lock = threading.Lock()

    def run(owner: str) -> None:
        with Lease.acquire(tables_uri, owner, ttl_s=30, wait_s=60, poll_s=0.05) as held:
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                epochs.append(held.epoch)
            time.sleep(0.1)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=run, args=(f"run-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1
    assert sorted(epochs) == [1, 2, 3, 4]


def test_old_epoch_files_are_forgotten(tmp_path: Path) -> None:
    uri = str(tmp_path)
    for i in range(leases.KEEP_EPOCHS + 4):
        Lease.acquire(uri, f"run-{i}", ttl_s=30, heartbeat=False).release()
    kept = sorted(p.name for p in (tmp_path / "_lease").iterdir() if p.suffix == ".json")
    assert len(kept) == leases.KEEP_EPOCHS + 1
    assert kept[-1] == f"epoch-{leases.KEEP_EPOCHS + 4:010d}.json"


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ttl_s=0"):
        Lease.acquire(str(tmp_path), "x", ttl_s=0)
    with pytest.raises(ValueError, match="wait_s=-1"):
        Lease.acquire(str(tmp_path), "x", wait_s=-1)
