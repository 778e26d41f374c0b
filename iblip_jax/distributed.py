"""Start-up (the platform, the multi-process runtime) and the few host-level exchanges the main job needs.

`maybe_initialize()` must run before anything else touches JAX's backends (`python -m iblip_jax.main` calls it
first, in every mode): `jax.distributed.initialize` refuses to start once a backend exists. One code path serves
- Cloud TPU pods: more than one worker in TPU_WORKER_HOSTNAMES, no arguments (jax reads the metadata server);
- any cluster, and the pod scripts (tools/tpu/worker.sh): JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID;
- a single process: nothing to do.
Everything downstream keys on jax.process_index() / jax.process_count().
"""
import glob
import json
import os

import jax
import numpy as np


def tpu_chips_here() -> bool:
  """Whether this host has TPU chips: they show as /dev/accel* (v4, v5e) or /dev/vfio/<n> (v5p, v6e) device files,
  and a Cloud TPU VM describes its slice in TPU_* variables."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or os.environ.get("TPU_ACCELERATOR_TYPE")
              or os.environ.get("TPU_WORKER_HOSTNAMES"))


def default_platform() -> str | None:
  """Keeps JAX off the TPU plugin on a host without TPU chips, when nobody chose a platform: with libtpu installed
  (the test extra brings it) JAX tries the TPU first, prints a block of TPU_WORKER_HOSTNAMES errors, and the job
  cannot set the CPU compiler's flags in time (see run/cli.py). A GPU host is left to JAX (its CUDA plugin, if
  installed, is what it should pick). Must run before anything uses a JAX backend; returns the platform chosen,
  or None when JAX chooses."""
  if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or tpu_chips_here() or glob.glob("/dev/nvidia[0-9]*"):
    return None
  os.environ["JAX_PLATFORMS"] = "cpu"
  jax.config.update("jax_platforms", "cpu")
  return "cpu"


def maybe_initialize() -> bool:
  """Initialises the distributed runtime if the environment describes several processes. Returns whether it did."""
  if jax.distributed.is_initialized():
    return True
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address:
    try:
      num, pid = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
    except (KeyError, ValueError):
      raise ValueError("JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers "
                       f"too (got {os.environ.get('JAX_NUM_PROCESSES')!r}, {os.environ.get('JAX_PROCESS_ID')!r})")
    if not 0 <= pid < num:
      raise ValueError(f"JAX_PROCESS_ID={pid} must be in [0, JAX_NUM_PROCESSES={num})")
    if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    return True
  if len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
    jax.distributed.initialize()
    return True
  return False


def is_primary() -> bool:
  """Process 0: the one that writes logs, metrics, plots, evaluation files and exports."""
  return jax.process_index() == 0


def broadcast_json(value=None):
  """Process 0's JSON-able `value`, on every process (metrics computed once, then shared so that every process
  takes the same decisions)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  blob = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_primary() else np.zeros(0, np.uint8)
  n = int(multihost_utils.broadcast_one_to_all(np.int32(blob.size)))
  padded = np.zeros(n, np.uint8)
  padded[:blob.size] = blob
  return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(padded)).tobytes().decode())


def sync(name: str) -> None:
  """Waits until every process reaches this point (a no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def gather(x) -> np.ndarray:
  """An array, whole, as one host array on every process (a collective for a global array spread over several
  processes; every process must call it)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def gather_json(value) -> list:
  """Every process's JSON-able `value`, in process order, on every process (e.g. per-host skip counts)."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils
  blob = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(blob.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(row[:n].tobytes().decode()) for row, n in zip(every, sizes)]


def any_process(flag: bool) -> bool:
  """Whether `flag` is set on any process (e.g. a SIGTERM that reached some hosts first): every process must take
  the same branch before the next collective (a save, a step), or they wait for each other for ever."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())
