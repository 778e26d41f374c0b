#!/usr/bin/env bash
# Runs ON each TPU worker (launch.sh and stop.sh call it over ssh --worker=all):
#
#   bash tools/tpu/worker.sh start [--env KEY=VALUE ...] -- <iblip_jax.main flags>
#   [STOP_TIMEOUT=300] bash tools/tpu/worker.sh stop
#
# `start` runs `python -m iblip_jax.main` in the background with its output in ~/iblip_jax.log and its pid in
# ~/iblip_jax.pid. On a multi-host slice it exports JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID,
# read from the TPU metadata server the same way jax's own Cloud TPU detection reads them, so that
# iblip_jax.distributed starts the multi-process runtime explicitly rather than relying on TPU_WORKER_HOSTNAMES
# being in an ssh session's environment. WORKER_ID and WORKER_ENDPOINTS (comma-separated) override the metadata
# server (tests, other clusters). DRY_RUN=1 prints what it would run.
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

LOG="${LOG:-$HOME/iblip_jax.log}"
PID_FILE="${PID_FILE:-$HOME/iblip_jax.pid}"
COORDINATOR_PORT="${COORDINATOR_PORT:-8476}"  # jax's default coordinator port on Cloud TPU
# Seconds between SIGTERM and SIGKILL: training saves a checkpoint on SIGTERM before it exits.
STOP_TIMEOUT="${STOP_TIMEOUT:-300}"
PROJECT_DIR="$REPO_ROOT"

metadata() {
  curl -sf -H "Metadata-Flavor: Google" \
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"
}

# Worker addresses in worker order. Entries are hostnames or name:id:ip triples; jax takes the last field too.
worker_endpoints() {
  local endpoints="${WORKER_ENDPOINTS:-}"
  if [[ -z "$endpoints" ]]; then
    endpoints="$(metadata worker-network-endpoints)" || die "cannot read worker-network-endpoints from the TPU " \
      "metadata server; set WORKER_ENDPOINTS and WORKER_ID"
  fi
  tr ',' '\n' <<<"$endpoints" | awk -F: 'NF { print $NF }'
}

worker_id() {
  if [[ -n "${WORKER_ID:-}" ]]; then
    echo "$WORKER_ID"
  else
    metadata agent-worker-number || die "cannot read agent-worker-number from the TPU metadata server"
  fi
}

running() {
  [[ -f "$PID_FILE" ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null
}

start() {
  local env_vars=("PYTHONUNBUFFERED=1")
  while (($#)); do
    case "$1" in
      --env) flag_value "$@"; env_vars+=("$VALUE"); shift "$SHIFT" ;;
      --) shift; break ;;
      *) die "worker.sh start: unknown flag $1 (main's flags go after --)" ;;
    esac
  done
  local addresses=()
  mapfile -t addresses < <(worker_endpoints)
  if ((${#addresses[@]} > 1)); then
    env_vars+=("JAX_COORDINATOR_ADDRESS=${addresses[0]}:$COORDINATOR_PORT" "JAX_NUM_PROCESSES=${#addresses[@]}"
      "JAX_PROCESS_ID=$(worker_id)")
  fi
  local command=(env "${env_vars[@]}" "$PROJECT_DIR/.venv/bin/python" -m iblip_jax.main "$@")
  if [[ "$DRY_RUN" != 0 ]]; then
    echo "cd $(shell_quote "$PROJECT_DIR") && nohup $(shell_quote "${command[@]}")" \
      "> $(shell_quote "$LOG") 2>&1 < /dev/null &"
    return
  fi
  if running; then
    die "a job is already running here (pid $(cat "$PID_FILE")); stop it first with tools/tpu/stop.sh"
  fi
  cd "$PROJECT_DIR" || die "no $PROJECT_DIR"
  nohup "${command[@]}" >"$LOG" 2>&1 </dev/null &
  echo "$!" >"$PID_FILE"
  echo "$(hostname): started pid $!, log $LOG"
}

stop() {
  if ! running; then
    echo "$(hostname): nothing running"
    return
  fi
  local pid
  pid="$(cat "$PID_FILE")"
  if [[ "$DRY_RUN" != 0 ]]; then
    echo "kill $pid"
    return
  fi
  kill "$pid"
  # The chips are held until the process exits; wait so that a following launch finds them free.
  for _ in $(seq "$STOP_TIMEOUT"); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -9 "$pid"
  fi
  rm -f "$PID_FILE"
  echo "$(hostname): stopped pid $pid"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop ;;
  *) die "usage: worker.sh start [--env KEY=VALUE ...] -- <main flags> | worker.sh stop" ;;
esac
