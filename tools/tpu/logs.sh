#!/usr/bin/env bash
# Follows the job's log (~/iblip_jax.log) on one worker (default 0, the one that writes metrics and checkpoints'
# metadata), or on several at once with --worker=all (their lines interleave). Ctrl-C stops following, not the job.
#
#   tools/tpu/logs.sh --name iblip --zone us-west4-a [--worker 0|all|1,3] [--lines 200] [--dry-run]
#
# Settings (environment or flags) are listed in tools/tpu/common.sh.
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER="${WORKER:-0}"
# not $LINES: shells set that to the terminal height
LOG_LINES="${LOG_LINES:-200}"
while (($#)); do
  case "$1" in
    --worker | --worker=*) flag_value "$@"; WORKER="$VALUE"; shift "$SHIFT" ;;
    --lines | --lines=*) flag_value "$@"; LOG_LINES="$VALUE"; shift "$SHIFT" ;;
    *) common_flag "$@" || die "unknown flag $1 (see the top of $0)"; shift "$SHIFT" ;;
  esac
done

[[ "$LOG_LINES" =~ ^[0-9]+$ ]] || die "--lines must be a number"
# tail -F keeps following across a relaunch, which replaces the file.
on_workers "$WORKER" "tail -n $LOG_LINES -F \$HOME/iblip_jax.log"
