"""`reelflow tag` in this process, for the tests that kill or pause a night at a step of its commit protocol.

    python tests/tag_process.py tag --corpus … (the `reelflow` arguments)

REELFLOW_TEST_KILL_AT=STEP: SIGKILL this process's whole group when the table writer reaches STEP.
REELFLOW_TEST_PAUSE_AT=STEP: SIGSTOP this process there (the test resumes it with SIGCONT).
"""

from __future__ import annotations

import os
import signal
import sys

from flows import table_writer
from jobs import cli


def main() -> int:
    kill_at, pause_at = os.environ.get("REELFLOW_TEST_KILL_AT"), os.environ.get("REELFLOW_TEST_PAUSE_AT")
    real = table_writer._step

    def step(name: str) -> None:
        real(name)
        print(f"step: {name}", file=sys.stderr, flush=True)
        if name == kill_at:
            os.killpg(os.getpgid(0), signal.SIGKILL)
        if name == pause_at:
            os.kill(os.getpid(), signal.SIGSTOP)

    table_writer._step = step
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
