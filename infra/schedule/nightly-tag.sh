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
#   REELFLOW_DEADLINE_S  stop the night's Ray job after this many seconds (default 82800, 23 h)
#   REELFLOW_POLL_S    seconds between status checks (default 30)
#
# Idempotent: the night's job is `reelflow-tag-<night>`. If a job of that id exists, the wrapper does not
# submit another: it waits for one still running, and exits 0 for one that succeeded. A night that failed
# or was stopped is submitted again as `reelflow-tag-<night>-r2`, then `-r3`, and so on. At the deadline
# (and when this script is interrupted) it stops the Ray job, which would otherwise run on.
# The job itself takes S3 and MLflow settings from the cluster nodes' environment (IAM role, MLflow URI);
# no credentials pass through here.
#
# Exit codes: 0 when the night's job succeeded (now or before), 1 when it failed, 2 on bad settings, 75 when
# the previous night's wrapper still runs, 124 when the deadline stopped the job, 130 when interrupted.
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
deadline_s="${REELFLOW_DEADLINE_S:-82800}"
poll_s="${REELFLOW_POLL_S:-30}"
[[ "$deadline_s" =~ ^[0-9]+$ ]] || die "REELFLOW_DEADLINE_S: expected seconds, got '$deadline_s'"

exec > >(tee -a "$log_file") 2>&1
say() {
    echo "nightly-tag: $(date -u +%FT%TZ) $*"
}

# The state of a submitted job (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED), empty when there is none.
# `ray job status` logs it (a timestamp, colours) as "Status for job 'ID': STATE", or as a sentence for the
# three final states. The first such line is the CLI's own (the status message after it quotes the job's
# logs); awk reads them all, where head would close the pipe early and fail it under pipefail.
job_state() {
    { "$ray_cmd" job status --address "$RAY_ADDRESS" "$1" 2>&1 || true; } |
        sed -e 's/\x1b\[[0-9;]*m//g' | sed -n \
            -e "s/.*Status for job '$1': \([A-Z]*\).*/\1/p" -e "s/.*Job '$1' succeeded.*/SUCCEEDED/p" \
            -e "s/.*Job '$1' failed.*/FAILED/p" -e "s/.*Job '$1' was stopped.*/STOPPED/p" | awk 'NR == 1'
}

# The first submission id of this night that did not fail: a job to follow, or the one to submit.
base_id="reelflow-tag-$night"
submission_id="$base_id"
attempt=1
state="$(job_state "$submission_id")"
while [[ "$state" == FAILED || "$state" == STOPPED ]]; do
    say "$submission_id ended $state"
    attempt=$((attempt + 1))
    submission_id="$base_id-r$attempt"
    state="$(job_state "$submission_id")"
done
case "$state" in
    SUCCEEDED)
        say "$submission_id already succeeded; nothing to do"
        exit 0
        ;;
    PENDING | RUNNING)
        say "$submission_id is already $state on $RAY_ADDRESS; waiting for it"
        ;;
    *)
        say "submitting $submission_id to $RAY_ADDRESS"
        "$ray_cmd" job submit --address "$RAY_ADDRESS" --submission-id "$submission_id" --no-wait \
            --working-dir "$repo" --runtime-env "$here/runtime-env.yaml" \
            -- reelflow tag --corpus "$REELFLOW_CORPUS" "${models[@]}" \
            --tables "$REELFLOW_TABLES" --date "$night"
        ;;
esac

# Stopping this script (a cron timeout, an operator) stops the cluster job too, so the lock tells the truth.
trap 'say "interrupted; stopping $submission_id"; "$ray_cmd" job stop --address "$RAY_ADDRESS" "$submission_id" || true; exit 130' INT TERM
"$ray_cmd" job logs --address "$RAY_ADDRESS" --follow "$submission_id" &
logs_pid=$!
while true; do
    state="$(job_state "$submission_id")"
    case "$state" in
        SUCCEEDED) status=0 ;;
        FAILED | STOPPED) status=1 ;;
        *)
            if ((SECONDS >= deadline_s)); then
                say "deadline of $deadline_s s passed; stopping $submission_id"
                "$ray_cmd" job stop --address "$RAY_ADDRESS" "$submission_id" || true
                status=124
            else
                sleep "$poll_s"
                continue
            fi
            ;;
    esac
    break
done
kill "$logs_pid" 2> /dev/null || true
say "$submission_id finished: ${state:-unknown} (exit code $status)"
exit "$status"
