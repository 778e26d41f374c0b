#!/usr/bin/env bash
# Stops the job started by launch.sh on every worker (by the pid it recorded) and waits until the chips are free.
# SIGTERM first (training then saves a checkpoint and exits); SIGKILL after --timeout seconds (default 300).
#
#   tools/tpu/stop.sh --name iblip --zone us-west4-a [--timeout 300] [--dry-run]
#
# Settings (environment or flags) are listed in tools/tpu/common.sh.
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TIMEOUT=300
while (($#)); do
  case "$1" in
    --timeout | --timeout=*) flag_value "$@"; TIMEOUT="$VALUE"; shift "$SHIFT" ;;
    *) common_flag "$@" || die "unknown flag $1 (see the top of $0)"; shift "$SHIFT" ;;
  esac
done

[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds"
on_workers all "STOP_TIMEOUT=$TIMEOUT bash $REMOTE_DIR/tools/tpu/worker.sh stop"
