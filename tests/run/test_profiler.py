"""Profiler traces of chosen steps (run/profiler.py): one trace per run of consecutive chosen steps, holding those
steps and no others; nothing traced for steps that were not chosen."""
import gzip
import json

import jax
import jax.numpy as jnp

from iblip_jax.run.profiler import StepProfiler


def _traced_steps(trace_dir) -> list[int]:
  """The step numbers the trace's "train" step markers carry (the perfetto JSON jax.profiler writes beside the
  xplane)."""
  [trace] = list(trace_dir.glob("plugins/profile/*/*.trace.json.gz"))
  events = json.load(gzip.open(trace))["traceEvents"]
  return sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train" and "args" in e)


def test_each_run_of_chosen_steps_is_one_trace_of_exactly_those_steps(tmp_path):
  step_fn = jax.jit(lambda x: jnp.tanh(x @ x))
  x = jnp.ones((64, 64))
  profiler = StepProfiler(tmp_path, steps=(2, 3, 5))
  written = []
  for step in range(1, 8):
    with profiler.step(step):
      x = step_fn(x)
    written.append(profiler.step_done(step, x))
  assert written == [None, None, str(tmp_path / "profile" / "steps_2-3"), None, str(tmp_path / "profile" / "steps_5-5"),
                     None, None]
  assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == ["steps_2-3", "steps_5-5"]
  assert _traced_steps(tmp_path / "profile" / "steps_2-3") == [2, 3]
  assert _traced_steps(tmp_path / "profile" / "steps_5-5") == [5]
  assert list((tmp_path / "profile" / "steps_2-3").glob("plugins/profile/*/*.xplane.pb"))   # what xprof reads


def test_a_job_stopping_during_a_trace_keeps_it(tmp_path):
  profiler = StepProfiler(tmp_path, steps=(1, 2, 3))
  with profiler.step(1):
    y = jnp.ones(3) * 2
  assert profiler.step_done(1, y) is None   # step 2 is chosen too: still tracing
  assert profiler.close(1) == str(tmp_path / "profile" / "steps_1-1")
  assert _traced_steps(tmp_path / "profile" / "steps_1-1") == [1]
  assert profiler.close(1) is None
