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


def test_a_crash_dump_is_held_back_and_the_rest_passes_through():
  """The child's lines reach our stderr as they come until a crash dump begins (a C++ check failure's stack, Python's
  thread dump); those are held for `run` to show only when the crash is not a lost peer. Every line still reaches
  the tail that `run` reads the cause from."""
  import collections
  import io
  lines = [b"step 3 loss 1.2\n",
           b"F1204 coordination_service_agent.cc:332] Terminating process because the JAX distributed service "
           b"detected fatal errors\n",
           b"*** Check failure stack trace: ***\n", b"    @     0x7f5af7f040ee  xla::CoordinationServiceAgent::SetError()\n",
           b"Fatal Python error: Aborted\n", b"Thread 0x00007f5a537fe6c0 (most recent call first):\n"]
  sink, tail, held = io.BytesIO(), collections.deque(maxlen=400), []
  supervise.pass_through(io.BytesIO(b"".join(lines)), sink, tail, held)
  assert sink.getvalue() == b"".join(lines[:2])
  assert held == lines[2:]
  assert "".join(tail) == b"".join(lines).decode()
  assert supervise.lost_peer("".join(tail))
