#!/usr/bin/env bash
# Deletes the TPU VM or pod slice (and everything on its disks; checkpoints in the gs:// workdir stay).
#
#   tools/tpu/delete.sh --name iblip --zone us-west4-a [--yes] [--dry-run]
#
# gcloud asks for confirmation unless --yes is given.
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

EXTRA=()
while (($#)); do
  case "$1" in
    --yes) EXTRA+=(--quiet); shift ;;
    *) common_flag "$@" || die "unknown flag $1 (see the top of $0)"; shift "$SHIFT" ;;
  esac
done

tpu_cmd delete
run "${TPU_CMD[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
