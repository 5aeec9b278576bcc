#!/usr/bin/env bash
# Submit one night of `reelflow tag` to a running Ray cluster through the Ray Jobs API, wait for it, and
# exit with its outcome. For hosts with plain cron (see reelflow.crontab); on Kubernetes use
# infra/k8s/cronjob-nightly-tag.yaml instead.
#
#   nightly-tag.sh [YYYY-MM-DD]        # default: today's date in UTC
#
# Settings come from the environment, or from the file named by REELFLOW_ENV_FILE (nightly.env.example):
#   RAY_ADDRESS        the cluster's dashboard / Jobs API, e.g. http://ray-head.internal:8265   (required)
#   REELFLOW_CORPUS    where the videos are, e.g. s3://bucket/videos/                           (required)
#   REELFLOW_TABLES    where the tables go, e.g. s3://bucket/tables/                            (required)
#   REELFLOW_MODEL     registered model(s) to tag with, space-separated models:/NAME@ALIAS      (required)
#   REELFLOW_REPO      checkout shipped as the job's working_dir (default: this script's repository)
#   REELFLOW_LOG_DIR   where each night's log goes (default: $XDG_STATE_HOME/reelflow/logs)
#   RAY                the ray command (default: ray; it needs `ray[default]` for the Jobs CLI)
# The job itself takes S3 and MLflow settings from the cluster nodes' environment (IAM role, MLflow URI);
# no credentials pass through here.
#
# Exit codes: the job's (0 when it succeeded), 2 on bad settings, 75 when the previous night still runs.
set -euo pipefail

if [[ -n "${REELFLOW_ENV_FILE:-}" ]]; then
    # shellcheck source=/dev/null
    source "$REELFLOW_ENV_FILE"
fi

die() {
    echo "nightly-tag: error: $*" >&2
    exit 2
}

night="${1:-$(date -u +%F)}"
[[ "$night" =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}$ ]] || die "date: expected YYYY-MM-DD, got '$night'"
for name in RAY_ADDRESS REELFLOW_CORPUS REELFLOW_TABLES REELFLOW_MODEL; do
    [[ -n "${!name:-}" ]] || die "$name is not set"
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="${REELFLOW_REPO:-$(cd "$here/../.." && pwd)}"
[[ -f "$repo/pyproject.toml" ]] || die "REELFLOW_REPO: $repo is not a reelflow checkout"
ray_cmd="${RAY:-ray}"
command -v "$ray_cmd" > /dev/null || die "RAY: '$ray_cmd' not found (pip install 'ray[default]')"

log_dir="${REELFLOW_LOG_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/reelflow/logs}"
mkdir -p "$log_dir"
log_file="$log_dir/tag-$night.log"

# One night at a time: the lock is held for as long as this script waits on the job. flock releases it
# when the process ends, however it ends.
exec 9> "$log_dir/nightly-tag.lock"
if ! flock --nonblock 9; then
    echo "nightly-tag: $(date -u +%FT%TZ) previous run still in progress; not starting $night" >&2
    exit 75
fi

models=()
for model in $REELFLOW_MODEL; do
    models+=(--model "$model")
done
submission_id="reelflow-tag-$night-$(date -u +%H%M%S)"

exec > >(tee -a "$log_file") 2>&1
echo "nightly-tag: $(date -u +%FT%TZ) submitting $submission_id to $RAY_ADDRESS"
"$ray_cmd" job submit --address "$RAY_ADDRESS" --submission-id "$submission_id" \
    --working-dir "$repo" --runtime-env "$here/runtime-env.yaml" \
    -- reelflow tag --corpus "$REELFLOW_CORPUS" "${models[@]}" \
    --tables "$REELFLOW_TABLES" --date "$night" &
submit_pid=$!

# Stopping this script (a cron timeout, an operator) stops the cluster job too, so the lock tells the
# truth. `ray job submit` only stops following the job when interrupted; the job itself goes on.
# shellcheck disable=SC2317  # called by the trap below
stop_job() {
    echo "nightly-tag: $(date -u +%FT%TZ) interrupted; stopping $submission_id"
    kill "$submit_pid" 2> /dev/null || true
    "$ray_cmd" job stop --address "$RAY_ADDRESS" "$submission_id" || true
    exit 130
}
trap stop_job INT TERM

status=0
wait "$submit_pid" || status=$?
echo "nightly-tag: $(date -u +%FT%TZ) $submission_id finished with exit code $status"
exit "$status"
