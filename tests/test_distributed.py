"""Start-up of the multi-process runtime (distributed.py): which environment starts it, and with which arguments.
jax.distributed.initialize is replaced by a recorder, so nothing is started."""
import jax
import pytest

from iblip_jax import distributed

POD = "10.130.0.2,10.130.0.3,10.130.0.4,10.130.0.5"   # a Cloud TPU pod's TPU_WORKER_HOSTNAMES: four workers
VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID")


@pytest.fixture
def initialize(monkeypatch):
  """The calls maybe_initialize makes to jax.distributed.initialize, as (args, kwargs)."""
  calls = []
  for name in VARIABLES:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append((args, kwargs)))
  collectives = jax.config.jax_cpu_collectives_implementation   # the explicit branch picks gloo on CPU
  yield calls
  jax.config.update("jax_cpu_collectives_implementation", collectives)


def test_a_tpu_pod_starts_the_runtime_from_its_worker_list(initialize, monkeypatch):
  """Several workers and no JAX_* variables: initialize() without arguments, so that JAX takes the coordinator,
  the process count and this worker's index from the TPU environment itself."""
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", POD)
  monkeypatch.setenv("TPU_WORKER_ID", "2")
  assert distributed.maybe_initialize() is True
  assert initialize == [((), {})]
  assert distributed.tpu_chips_here()


@pytest.mark.parametrize("hosts", ["10.130.0.2", "", None])
def test_one_worker_or_none_is_a_single_process(initialize, monkeypatch, hosts):
  if hosts is not None:
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", hosts)
    monkeypatch.setenv("TPU_WORKER_ID", "0")
  assert distributed.maybe_initialize() is False
  assert initialize == []


def test_the_explicit_variables_win_over_the_worker_list(initialize, monkeypatch):
  """What tools/tpu/worker.sh exports on a pod, which also has TPU_WORKER_HOSTNAMES: its values are used."""
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", POD)
  monkeypatch.setenv("TPU_WORKER_ID", "3")
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.130.0.2:8476")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert distributed.maybe_initialize() is True
  assert initialize == [((), {"coordinator_address": "10.130.0.2:8476", "num_processes": 4, "process_id": 3})]


def test_an_initialized_runtime_is_not_started_again(initialize, monkeypatch):
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", POD)
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  assert distributed.maybe_initialize() is True
  assert initialize == []
