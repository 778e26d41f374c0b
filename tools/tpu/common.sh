# shellcheck shell=bash disable=SC2034  # its variables are read by the scripts that source it
# Shared by the tools/tpu scripts (sourced, never run): settings, flag parsing and the dry-run switch.
#
# Every setting comes from the environment or from a flag (the flag wins):
#   TPU_NAME          --name              the TPU VM / pod slice (default: iblip)
#   ZONE              --zone              e.g. us-west4-a (required)
#   PROJECT           --project           Google Cloud project (default: gcloud's configured project)
#   ACCELERATOR_TYPE  --accelerator-type  e.g. v5litepod-16, v4-32, v5p-32 (default: v5litepod-16)
#   RUNTIME_VERSION   --version           TPU VM image (default: the one for the accelerator's generation)
#   DRY_RUN=1         --dry-run           print the commands instead of running them

set -euo pipefail

TPU_NAME="${TPU_NAME:-iblip}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
DRY_RUN="${DRY_RUN:-0}"
# Where the project lives on every worker, relative to the remote home directory.
REMOTE_DIR="iblip_jax"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

die() {
  echo "error: $*" >&2
  exit 1
}

# Consumes one common flag from "$@" (as --flag value or --flag=value); sets SHIFT to the words used.
# Returns 1 when "$1" is not a common flag, so that a script can try its own flags first.
common_flag() {
  local name="${1%%=*}" value
  if [[ "$name" == "--dry-run" ]]; then
    DRY_RUN=1
    SHIFT=1
    return 0
  fi
  if [[ "$1" == *=* ]]; then
    value="${1#*=}"
    SHIFT=1
  elif (($# >= 2)); then
    value="$2"
    SHIFT=2
  else
    value=""
    SHIFT=1
  fi
  case "$name" in
    --name) TPU_NAME="$value" ;;
    --zone) ZONE="$value" ;;
    --project) PROJECT="$value" ;;
    --accelerator-type) ACCELERATOR_TYPE="$value" ;;
    --version) RUNTIME_VERSION="$value" ;;
    *) return 1 ;;
  esac
  [[ -n "$value" ]] || die "$name needs a value"
}

# The flag's value, for scripts parsing their own --flag value / --flag=value pairs.
flag_value() {
  if [[ "$1" == *=* ]]; then
    VALUE="${1#*=}"
    SHIFT=1
  elif (($# >= 2)); then
    VALUE="$2"
    SHIFT=2
  else
    die "$1 needs a value"
  fi
}

# The TPU VM image that goes with each generation (Cloud TPU's JAX/PyTorch base images).
default_runtime_version() {
  case "$ACCELERATOR_TYPE" in
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v4-* | v3-* | v2-*) echo "tpu-ubuntu2204-base" ;;
    *) die "no default --version for --accelerator-type=$ACCELERATOR_TYPE; pass --version" ;;
  esac
}

# One word quoted for a shell only where needed, so that dry-run output can be pasted back into one.
quote_word() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Words quoted as above; --flag=value keeps the flag outside the quotes (easier to read, same meaning).
shell_quote() {
  local out=() word
  for word in "$@"; do
    if [[ "$word" =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
      out+=("${BASH_REMATCH[1]}$(quote_word "${BASH_REMATCH[2]}")")
    else
      out+=("$(quote_word "$word")")
    fi
  done
  echo "${out[*]}"
}

# Runs a command, or prints it under --dry-run / DRY_RUN=1.
run() {
  if [[ "$DRY_RUN" != 0 ]]; then
    shell_quote "$@"
  else
    "$@"
  fi
}

# `gcloud compute tpus tpu-vm VERB TPU --zone=... [--project=...]` as an array, in TPU_CMD.
tpu_cmd() {
  [[ -n "$ZONE" ]] || die "set ZONE or pass --zone (e.g. --zone=us-west4-a)"
  TPU_CMD=(gcloud compute tpus tpu-vm "$1" "$TPU_NAME" "--zone=$ZONE")
  if [[ -n "$PROJECT" ]]; then
    TPU_CMD+=("--project=$PROJECT")
  fi
}

# Runs a shell command on workers (default: all of them at once).
on_workers() {
  local worker="$1" command="$2"
  tpu_cmd ssh
  run "${TPU_CMD[@]}" "--worker=$worker" "--command=$command"
}
