"""Profiler traces of chosen training steps (config.profile_steps), for TensorBoard's profile plugin or xprof.

Each run of consecutive chosen steps is one trace: jax.profiler starts before the first step's batch is read and
stops once the last step's results are ready, so the trace holds the input, the dispatch and the device work of
exactly those steps, each marked as step `n` (a StepTraceAnnotation, which the profile plugin's step view reads).
The trace is written to a local temporary directory and then copied to
workdir/profile/steps_<first>-<last>/plugins/profile/<time>/ (etils.epath: a gs:// workdir works as a local one).
Only process 0 traces unless config.profile_all_processes (each process then writes under process_<i>/). Steps
that are not chosen run exactly as without profiling: nothing is started or annotated for them.
"""
import contextlib
import os
import shutil
import tempfile

import jax
from etils import epath


class StepProfiler:

  def __init__(self, workdir, steps, all_processes: bool = False):
    traced_here = all_processes or jax.process_index() == 0
    self.steps = frozenset(steps) if traced_here else frozenset()
    self.root = epath.Path(workdir) / "profile"
    self.per_process = all_processes and jax.process_count() > 1
    self._local = None    # the temporary directory of the trace in progress
    self._first = None

  def step(self, step: int):
    """The context to run step `step` (numbered from 1, as the log numbers them) in."""
    if step not in self.steps:
      return contextlib.nullcontext()
    if self._local is None:
      self._local, self._first = tempfile.mkdtemp(prefix="iblip_profile_"), step
      jax.profiler.start_trace(self._local)
    return jax.profiler.StepTraceAnnotation("train", step_num=step)

  def step_done(self, step: int, outputs) -> str | None:
    """After step `step`: at the end of a run of chosen steps, waits for `outputs`, stops the trace and copies it
    under the workdir; returns where it went (None otherwise)."""
    if self._local is None or step + 1 in self.steps:
      return None
    jax.block_until_ready(outputs)
    return self._finish(step)

  def close(self, step: int) -> str | None:
    """The job stops (a signal, an error) during a trace: keep what was traced up to `step`."""
    return self._finish(step) if self._local is not None else None

  def _finish(self, last: int) -> str:
    jax.profiler.stop_trace()
    dest = self.root / f"steps_{self._first}-{last}"
    if self.per_process:
      dest = dest / f"process_{jax.process_index()}"
    for folder, _, files in os.walk(self._local):   # the trace is local; the workdir may be gs://
      for name in files:
        target = dest / os.path.relpath(os.path.join(folder, name), self._local)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(os.path.join(folder, name), "rb") as f:
          target.write_bytes(f.read())
    shutil.rmtree(self._local, ignore_errors=True)
    self._local = None
    return str(dest)
