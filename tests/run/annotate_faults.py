"""The main job (as `python -m iblip_jax.main`) with a fault at annotate mode's N-th output file write, for
tests/run/test_annotate.py:

  python tests/run/annotate_faults.py kill N -- <the job's arguments>   SIGKILL in the middle of the N-th write: its
                                                                         temporary copy half written, not renamed
  python tests/run/annotate_faults.py term N -- <the job's arguments>   SIGTERM to itself just before the N-th write
                                                                         (a preemption notice arriving mid-run)
"""
import os
import runpy
import signal
import sys

from iblip_jax.run import annotate

fault, at = sys.argv[1], int(sys.argv[2])
real = annotate._write_whole
calls = [0]


def faulty(path, text):
  calls[0] += 1
  if calls[0] == at and fault == "kill":
    (path.parent / f".{path.name}.killed.tmp").write_text(text[:len(text) // 2])
    os.kill(os.getpid(), signal.SIGKILL)
  if calls[0] == at and fault == "term":
    os.kill(os.getpid(), signal.SIGTERM)
  real(path, text)


annotate._write_whole = faulty
sys.argv = ["iblip_jax.main", *sys.argv[sys.argv.index("--") + 1:]]
runpy.run_module("iblip_jax.main", run_name="__main__", alter_sys=True)
