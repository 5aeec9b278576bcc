#!/usr/bin/env bash
# A local multi-node Ray cluster on this machine, for tests and for trying the Jobs API:
#
#   infra/local/cluster.sh up [N] [--head-cpus 0] [--cpus C] [--gpus-on-node K]
#                                    # head (dashboard on 127.0.0.1) + N-1 workers, C CPUs each (default 1);
#                                    # a 0-CPU head runs no task, as in production; node K declares a GPU;
#                                    # prints `export RAY_ADDRESS=…` and the auth variables
#   infra/local/cluster.sh status
#   infra/local/cluster.sh down      # stops exactly the processes `up` started, nothing else
#
# State, node temp dirs and logs live in $REELFLOW_STACK_DIR (default /tmp/reelflow-stack). Never use
# `ray stop` for this stack: it kills every Ray process on the machine, other users' and other tests'
# included. The work is done by stack.py beside this script (the same code the tests use); Python is
# $PYTHON, else the repository's .venv, else python3. Ray's dashboard extras (ray[default]) must be installed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
    python="$PYTHON"
elif [[ -x "$repo/.venv/bin/python" ]]; then
    python="$repo/.venv/bin/python"
else
    python="python3"
fi

case "${1:-}" in
    up)
        shift
        exec "$python" "$here/stack.py" up "$@"
        ;;
    status | down) exec "$python" "$here/stack.py" "$1" ;;
    *)
        echo "usage: $0 up [N] [--head-cpus H] [--cpus C] [--gpus-on-node K] | status | down" >&2
        exit 2
        ;;
esac
