#!/usr/bin/env bash
# Installs this checkout on every worker of the slice: copies the working tree (what you have is what runs, committed
# or not), then builds ~/iblip_jax/.venv with Python $PYTHON_VERSION, the project and jax[tpu]==$JAX_VERSION.
#
#   tools/tpu/install.sh --name iblip --zone us-west4-a [--dry-run]
#
# Re-running it updates the code and keeps the venv (pip then only installs what changed).
# Settings (environment or flags) are listed in tools/tpu/common.sh, plus:
#   JAX_VERSION     (default 0.10.2: the jax this project is tested with; jax[tpu] pins the matching libtpu)
#   PYTHON_VERSION  (default 3.11: the project needs >= 3.11, older TPU VM images ship 3.10, so uv fetches it)
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

JAX_VERSION="${JAX_VERSION:-0.10.2}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
TARBALL="${TMPDIR:-/tmp}/iblip_jax-src.tar.gz"

while (($#)); do
  common_flag "$@" || die "unknown flag $1 (see the top of $0)"
  shift "$SHIFT"
done

# 1. Pack the working tree without local environments, caches, VCS data and local run directories.
run tar -czf "$TARBALL" --exclude=./.venv --exclude=./.git --exclude=./runs --exclude=__pycache__ \
  --exclude=.pytest_cache --exclude='*.egg-info' -C "$REPO_ROOT" .

# 2. Copy it to every worker. scp names the TPU in its destination (TPU:path), not as an argument of its own.
tpu_cmd scp
run "${TPU_CMD[@]:0:5}" "$TARBALL" "$TPU_NAME:iblip_jax-src.tar.gz" "${TPU_CMD[@]:6}" --worker=all

# 3. Unpack and install on every worker at once. pip's --break-system-packages fallback is for images whose
# system Python refuses user installs (PEP 668); uv then brings its own Python.
pip_uv="python3 -m pip install --user --quiet --upgrade uv"
steps=(
  "mkdir -p \$HOME/$REMOTE_DIR"
  "tar -xzf \$HOME/iblip_jax-src.tar.gz -C \$HOME/$REMOTE_DIR"
  "cd \$HOME/$REMOTE_DIR"
  "($pip_uv || $pip_uv --break-system-packages)"
  "\$HOME/.local/bin/uv venv --allow-existing --python $PYTHON_VERSION .venv"
  "\$HOME/.local/bin/uv pip install --python .venv/bin/python --quiet -e . 'jax[tpu]==$JAX_VERSION'"
  ".venv/bin/python -c 'import iblip_jax, jax; print(\"iblip_jax installed with jax\", jax.__version__)'"
)
remote="$(printf '%s && ' "${steps[@]}")"
on_workers all "${remote% && }"
