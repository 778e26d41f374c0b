"""Which processes run under the parent that reports a lost host (run/supervise.py): one of several, however the
environment says there are several; never a single process, nor the supervised child itself."""
import pytest

from iblip_jax.run import supervise

POD = "10.130.0.2,10.130.0.3,10.130.0.4,10.130.0.5"


@pytest.mark.parametrize("env, needed", [
    ({"TPU_WORKER_HOSTNAMES": POD, "TPU_WORKER_ID": "1"}, True),   # a Cloud TPU pod worker, no JAX_* variables
    ({"TPU_WORKER_HOSTNAMES": "10.130.0.2", "TPU_WORKER_ID": "0"}, False),   # a single-host TPU VM
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, True),
    ({"JAX_NUM_PROCESSES": "1"}, False),
    ({}, False),
    ({"TPU_WORKER_HOSTNAMES": POD, supervise.SUPERVISED: "1"}, False),   # the child: supervised already
], ids=["tpu-pod", "tpu-one-host", "two-processes", "one-process", "nothing", "supervised-child"])
def test_needed(monkeypatch, env, needed):
  for name in ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", supervise.SUPERVISED):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert supervise.needed() is needed
