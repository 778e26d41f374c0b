"""A lost host, said plainly: each process of a multi-process job runs under a small parent that reports what
happened when a peer dies.

When one process of a job is killed (a preempted VM, the OOM killer), the others learn it from JAX's distributed
runtime, which aborts them from a C++ thread (SIGABRT, a stack dump, nothing a scheduler can act on) or fails
their next collective. The parent (this module) runs the job as its child, passes its output through, forwards
signals to it, and when the child dies of such a loss it prints one line — which process is gone, the workdir's last
checkpoint, what to do — and exits with the preemption status (75: rerun the same command on every host to
resume). The job itself turns a collective that fails for a lost peer into the same line and status (run/cli.py).
A single process needs no parent and gets none.
"""
import collections
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading

from etils import epath

SUPERVISED = "IBLIP_JAX_SUPERVISED"   # set in the child: it is the job, not another parent
LOST_EXIT = 75
# What JAX's runtime says when another process of the job is gone (its coordination service, its collectives).
LOST = ("JAX distributed service detected fatal errors", "heartbeat timeout", "stopped sending heartbeats",
        "Connection closed by peer", "Connection reset by peer", "Socket closed", "Gloo AllGather failed",
        "Gloo AllReduce failed", "Gloo Broadcast failed")
CRASH = (b"*** Check failure stack trace", b"Fatal Python error")   # the first line of a crash dump


def needed() -> bool:
  """Whether this process belongs to a multi-process job and is not already the supervised child."""
  if os.environ.get(SUPERVISED):
    return False
  try:
    several = int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1
  except ValueError:
    several = False
  return several or len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1


def lost_peer(text: str) -> bool:
  return any(marker in text for marker in LOST)


def message(text: str, workdir: str | None) -> str:
  """'another process of this job is gone ...': which one when the runtime said, the last checkpoint, the fix."""
  me = os.environ.get("JAX_PROCESS_ID")
  task = re.search(r"Task (\d+) heartbeat timeout|stopped sending heartbeats\):\s*(\d+)", text)
  gone = next((g for g in (task.groups() if task else ()) if g), None)
  if gone is not None:
    who = f"process {gone} of this job is gone"
  elif me not in (None, "0") and "Socket closed" in text:
    who = "process 0 of this job (the coordinator) is gone"
  else:
    who = "another process of this job is gone"
  return (f"{who} (JAX's distributed runtime lost it), so process {me if me is not None else '?'} stopped too. "
          f"{last_checkpoint(workdir)} Rerun the same command on every host to resume.")


def last_checkpoint(workdir: str | None) -> str:
  if not workdir:
    return "Nothing was being trained (no --workdir)."
  try:
    steps = sorted(int(p.name) for p in (epath.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())
  except OSError:
    steps = []
  return f"The last checkpoint in {workdir} is step {steps[-1]}." if steps else f"{workdir} has no checkpoint yet."


def _workdir(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg in ("--workdir", "-workdir") and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith(("--workdir=", "-workdir=")):
      return arg.split("=", 1)[1]
  return None


def _die_with_parent() -> None:
  """In the child, before it runs: killed (SIGKILL) when the parent dies, however it dies, so that killing the job's
  process kills the job (Linux; elsewhere a child outlives a killed parent)."""
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
  except OSError:
    pass


def run(argv: list[str]) -> int:
  """Runs `python -m iblip_jax.main argv[1:]` as the supervised child; returns the exit status to end with."""
  child = subprocess.Popen([sys.executable, "-m", "iblip_jax.main", *argv[1:]], stderr=subprocess.PIPE,
                           env={**os.environ, SUPERVISED: "1"}, preexec_fn=_die_with_parent)
  for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda signum, _: child.send_signal(signum))
  tail: collections.deque = collections.deque(maxlen=400)
  held: list[bytes] = []
  copier = threading.Thread(target=pass_through, args=(child.stderr, sys.stderr.buffer, tail, held), name="stderr",
                            daemon=True)
  copier.start()
  code = child.wait()
  copier.join(timeout=10)
  text = "".join(tail)
  if code not in (0, LOST_EXIT) and lost_peer(text):
    print(f"error: {message(text, _workdir(argv))}", file=sys.stderr, flush=True)
    return LOST_EXIT
  sys.stderr.buffer.write(b"".join(held))   # not a lost peer: the crash is the child's own, show all of it
  sys.stderr.buffer.flush()
  return code if code >= 0 else 128 - code


def pass_through(source, sink, tail: collections.deque, held: list[bytes]) -> None:
  """Copies the child's stderr to ours line by line, except a crash dump (a C++ check failure's stack, Python's
  "Fatal Python error" thread dump): from its first line on, lines are held back, since a lost peer ends in such a
  dump and its one-line explanation says more; `run` shows the held lines when the crash is something else."""
  crashing = False
  for line in iter(source.readline, b""):
    crashing = crashing or any(mark in line for mark in CRASH)
    if crashing:
      held.append(line)
    else:
      sink.write(line)
      sink.flush()
    tail.append(line.decode("utf-8", "replace"))
