"""Multi-process start-up: `jax.distributed.initialize()` when the environment asks for it.

Cloud TPU pods (more than one worker in TPU_WORKER_HOSTNAMES) need no arguments; elsewhere (GPU clusters, CPU
tests) set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. Everything downstream keys on
jax.process_index() / jax.process_count().
"""
import os

import jax


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
    if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    return True
  if len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
    jax.distributed.initialize()
    return True
  return False
