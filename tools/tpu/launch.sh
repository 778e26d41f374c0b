#!/usr/bin/env bash
# Starts `python -m iblip_jax.main --config CONFIG --workdir gs://...` on every worker of the slice, in the background
# (each worker logs to ~/iblip_jax.log; follow them with tools/tpu/logs.sh).
#
#   tools/tpu/launch.sh --name iblip --zone us-west4-a --config configs/instructblip_flant5xl.py \
#       --workdir gs://BUCKET/runs/xl-1 [--env KEY=VALUE ...] [--libtpu-flags FLAGS] [--dry-run]
#       [-- --config.batch_size=192 ...]
#
# --config is a path inside the project (it travels with tools/tpu/install.sh). The workdir must be on GCS: every
# worker writes to it and the workers' disks go away with the slice. Flags after -- go to iblip_jax.main.
# --env KEY=VALUE sets a variable for the job, e.g. --env XLA_FLAGS=...
#
# libtpu flags: the job gets LIBTPU_INIT_ARGS="$DEFAULT_LIBTPU_FLAGS" (below): the flags MaxText's v5e training
# recipes export to overlap collectives with compute (asynchronous all-gathers fused with the compute that hides
# them, data-parallel all-reduces pipelined; AI-Hypercomputer/maxtext src/maxtext/configs/tpu/v5e/*.sh).
# tools/aot_compile.py compiles with the same string (MAXTEXT_LIBTPU_FLAGS), so its estimate is of this program.
# --libtpu-flags "FLAGS" (or the LIBTPU_FLAGS variable) sends others, --libtpu-flags "" none; an explicit
# --env LIBTPU_INIT_ARGS=... replaces them.
# Settings (environment or flags) are listed in tools/tpu/common.sh.
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DEFAULT_LIBTPU_FLAGS="--xla_tpu_enable_data_parallel_all_reduce_opt=true"
DEFAULT_LIBTPU_FLAGS+=" --xla_tpu_data_parallel_opt_different_sized_ops=true"
DEFAULT_LIBTPU_FLAGS+=" --xla_tpu_enable_async_collective_fusion=true"
DEFAULT_LIBTPU_FLAGS+=" --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true"
DEFAULT_LIBTPU_FLAGS+=" --xla_tpu_enable_async_collective_fusion_multiple_steps=true"
DEFAULT_LIBTPU_FLAGS+=" --xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true"
LIBTPU_FLAGS="${LIBTPU_FLAGS-$DEFAULT_LIBTPU_FLAGS}"

CONFIG=""
WORKDIR=""
ENV_ARGS=()
MAIN_ARGS=()
while (($#)); do
  case "$1" in
    --config | --config=*) flag_value "$@"; CONFIG="$VALUE"; shift "$SHIFT" ;;
    --workdir | --workdir=*) flag_value "$@"; WORKDIR="$VALUE"; shift "$SHIFT" ;;
    --env | --env=*) flag_value "$@"; ENV_ARGS+=(--env "$VALUE"); shift "$SHIFT" ;;
    --libtpu-flags | --libtpu-flags=*) flag_value "$@"; LIBTPU_FLAGS="$VALUE"; shift "$SHIFT" ;;
    --) shift; MAIN_ARGS+=("$@"); break ;;
    *) common_flag "$@" || die "unknown flag $1 (see the top of $0)"; shift "$SHIFT" ;;
  esac
done

[[ -n "$CONFIG" ]] || die "pass --config configs/<name>.py"
[[ -f "$REPO_ROOT/$CONFIG" ]] || die "$CONFIG: no such config in $REPO_ROOT (paths are relative to the project)"
[[ "$WORKDIR" == gs://* ]] || die "--workdir must be a gs:// path (got '${WORKDIR}'): all workers write to it"

if [[ -n "$LIBTPU_FLAGS" && " ${ENV_ARGS[*]-} " != *" LIBTPU_INIT_ARGS="* ]]; then
  ENV_ARGS=(--env "LIBTPU_INIT_ARGS=$LIBTPU_FLAGS" ${ENV_ARGS[@]+"${ENV_ARGS[@]}"})
fi

remote=(bash "$REMOTE_DIR/tools/tpu/worker.sh" start ${ENV_ARGS[@]+"${ENV_ARGS[@]}"} --
  --config "$CONFIG" --workdir "$WORKDIR" ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})
on_workers all "$(shell_quote "${remote[@]}")"
