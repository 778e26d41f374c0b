#!/usr/bin/env bash
# Creates a TPU VM or pod slice.
#
#   tools/tpu/create.sh --name iblip --zone us-west4-a --accelerator-type v5litepod-16 [--spot] [--dry-run]
#       [-- <more gcloud flags, e.g. --reserved --network=...>]
#
# Settings (environment or flags) are listed in tools/tpu/common.sh.
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

EXTRA=()
while (($#)); do
  case "$1" in
    --spot) EXTRA+=(--spot); shift ;;
    --) shift; EXTRA+=("$@"); break ;;
    *) common_flag "$@" || die "unknown flag $1 (see the top of $0)"; shift "$SHIFT" ;;
  esac
done

RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime_version)}"
tpu_cmd create
# cloud-platform scope: IAM roles, not access scopes, then decide what the workers may do (they write the gs://
# workdir and read data from GCS).
run "${TPU_CMD[@]}" "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION" \
  --scopes=https://www.googleapis.com/auth/cloud-platform ${EXTRA[@]+"${EXTRA[@]}"}
