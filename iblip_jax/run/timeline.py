"""Where a training job's time goes: a step timeline per logging window, goodput over the job's whole life, and
model FLOP/s per chip (MFU where the chip's peak is known).

Parts of a window (seconds, host wall clock; they add up to the window's wall time, which the log shows too):
  compile     tracing, lowering and compiling (JAX reports each phase's duration; they are moved here from the part
              they happened in: the first step's, a new batch shape's, the first evaluation's, the checkpoint check's)
  data        waiting for the next batch (the input pipeline's iterator, and placing the batch on the devices)
  step        the train step: dispatching it and waiting for its results (JAX runs it asynchronously, so the
              device's time shows up where the host waits: the loss read at a logged step, the hosts' stop check)
  checkpoint  the new state's finiteness check and the checkpoint save
  eval        evaluations run during training
  other       everything outside the other parts: logging, the progress bar, the profiler's bookkeeping, the loop's
              own Python, garbage collection (time is always booked to some part, so the parts add up by design)
Goodput (ml-goodput-measurement's vocabulary): productive time (the `step` time of steps whose results were kept)
over the wall time since the job first started, restarts and the time between them included. Steps after the last
checkpoint of a run that was killed are redone by the next run: their time is badput. What the next run needs
(the job's start time, productive time as of each checkpoint) is kept in workdir/goodput.json.

Model FLOPs per step are XLA's cost analysis of the train step lowered with every layer loop unrolled and without
remat's recompute (what MFU counts; iblip_jax.step_flops); model TFLOP/s per chip = those FLOPs over the `step`
time and the devices; MFU = that over the chip's published bf16 peak (iblip_jax.chips), or config.peak_tflops.
"""
import contextlib
import json
import threading
import time

import jax
from etils import epath

PARTS = ("compile", "data", "step", "checkpoint", "eval", "other")
STATE_FILE = "goodput.json"
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


class Timeline:

  def __init__(self, workdir: str, start_step: int, *, active: bool = True):
    """`start_step`: the step this run starts from (the restored checkpoint's, 0 for a new job). Time is counted
    for the thread that makes the Timeline (the training loop's)."""
    self.path = epath.Path(workdir) / STATE_FILE
    self.active = active
    now = time.time()
    state = _read(self.path) if start_step > 0 else {}
    self.job_start = float(state.get("job_start", now))
    # productive seconds as of each checkpoint of earlier runs: a run resumed at step s keeps what led to step s
    saved = {int(k): float(v) for k, v in state.get("productive_at", {}).items()}
    self.productive_at = {k: v for k, v in saved.items() if k <= start_step}
    self.productive = self.productive_at.get(start_step, 0.0)
    self.restarts = int(state.get("restarts", -1)) + 1
    self._window_start = time.perf_counter()
    self._window = dict.fromkeys(PARTS, 0.0)
    self._steps = 0
    self._open = ["other", self._window_start]   # [part, start] of the part being timed: "other" outside part()
    self._in_part = False
    self._compiling = 0.0            # compile seconds JAX reported inside the open part
    self._owner = threading.get_ident()
    self._closed = False
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, seconds: float, **_) -> None:
    """JAX's compile-phase durations (tracing, lowering, XLA): moved out of whichever part they happened in."""
    if self._closed or event not in COMPILE_EVENTS or threading.get_ident() != self._owner:
      return
    self._compiling += seconds

  @contextlib.contextmanager
  def part(self, name: str):
    assert not self._in_part, f"time part {name!r} inside {self._open[0]!r}"
    self._switch(name)
    self._in_part = True
    try:
      yield
    finally:
      self._switch("other")
      self._in_part = False

  def _switch(self, name: str) -> None:
    """Books the open part up to now and opens `name` at the same instant: no time falls between parts."""
    self._close_open(time.perf_counter())
    self._open[0] = name

  def _close_open(self, now: float) -> None:
    """Books the open part's time up to `now` (its compilation as compile) and restarts it there."""
    name, start = self._open
    elapsed = now - start
    compiled = min(self._compiling, elapsed)   # nested traces can report overlapping durations
    self._window[name] += elapsed - compiled
    self._window["compile"] += compiled
    if name == "step":
      self.productive += elapsed - compiled
    self._open[1], self._compiling = now, 0.0

  def step_done(self) -> None:
    self._steps += 1

  def checkpoint_saving(self, step: int) -> None:
    """The state of `step` is about to be saved: so is the productive time that led to it, first, so that a run
    killed once the checkpoint is on disk always finds it (a rerun resumed from an earlier step ignores the entry of
    a checkpoint that never landed)."""
    self.productive_at[step] = self.productive
    self._write()

  def window(self, model_flops: float | None = None, frozen_flops: float | None = None, devices: int = 1,
             peak_flops: float | None = None, tokens: int = 0) -> dict:
    """The window since the last call as metrics (and a new window starts): each part's seconds, the window's wall
    time, goodput so far; with `model_flops` (of the window's `step` steps, whole job) model TFLOP/s per device over
    the step time and MFU against `peak_flops` (per device); with `frozen_flops` (the frozen towers' forward FLOPs
    within those) the same rate for them and their share of the model FLOPs; with `tokens` (real tokens in the window's batches)
    tokens/s over the window's wall time."""
    now = time.perf_counter()
    self._close_open(now)   # a window ends inside a part (the logging that reports it): split the part there
    wall = now - self._window_start
    out = {f"time/{k}": v for k, v in self._window.items()}
    out["time/window"] = wall
    out["goodput"] = self.goodput()
    if model_flops and self._steps and self._window["step"] > 0:
      per_device = model_flops / self._window["step"] / devices
      out["perf/model_tflops_per_device"] = per_device / 1e12
      if peak_flops:
        out["perf/mfu"] = per_device / peak_flops
      if frozen_flops:
        out["perf/frozen_forward_tflops_per_device"] = frozen_flops / self._window["step"] / devices / 1e12
        out["perf/frozen_forward_share"] = frozen_flops / model_flops
    if tokens and wall > 0:
      out["perf/tokens_per_sec"] = tokens / wall
    self._window_start, self._window, self._steps = now, dict.fromkeys(PARTS, 0.0), 0
    self._write()
    return out

  def close(self) -> None:
    self._closed = True   # jax.monitoring has no public way to remove a listener: this one stops listening

  def goodput(self) -> float:
    return self.productive / max(time.time() - self.job_start, 1e-9)

  def summary(self) -> str:
    lost = time.time() - self.job_start - self.productive
    return (f"goodput {100 * self.goodput():.1f}%: {self.productive:.1f} s of productive steps in "
            f"{time.time() - self.job_start:.1f} s since the job started ({self.restarts} restart"
            f"{'s' if self.restarts != 1 else ''}); {lost:.1f} s went to start-up, input, checkpoints, evaluation, "
            "steps redone after a restart and time between runs")

  def _write(self) -> None:
    if self.active:
      self.path.write_text(json.dumps({"job_start": self.job_start, "restarts": self.restarts,
                                       "productive_at": {str(k): v for k, v in sorted(self.productive_at.items())}}))


def _read(path: epath.Path) -> dict:
  """workdir/goodput.json, or {} when there is none or it cannot be read (goodput is a report: never fatal)."""
  try:
    state = json.loads(path.read_text())
  except (OSError, ValueError):
    return {}
  return state if isinstance(state, dict) else {}
