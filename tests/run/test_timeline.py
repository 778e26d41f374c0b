"""The step timeline (run/timeline.py) on a clock the test moves: parts that add up to the window, a window that
ends inside a part, compilation moved out of the part it happened in (reported through jax.monitoring, as JAX
reports it), goodput across a restart from workdir/goodput.json, model TFLOP/s and MFU by hand."""
import json

import jax
import pytest

from iblip_jax.run import timeline as timeline_lib


class Clock:
  def __init__(self):
    self.now = 1000.0

  def perf_counter(self):
    return self.now

  def time(self):
    return self.now

  def sleep(self, seconds):
    self.now += seconds


@pytest.fixture
def clock(monkeypatch):
  c = Clock()
  monkeypatch.setattr(timeline_lib, "time", c)
  return c


def test_parts_add_up_and_a_window_may_end_inside_a_part(tmp_path, clock):
  t = timeline_lib.Timeline(str(tmp_path), 0)
  with t.part("data"):
    clock.sleep(0.5)
  with t.part("step"):
    clock.sleep(2.0)
  t.step_done()
  clock.sleep(0.25)   # outside any part: "other" (the loop's own Python, garbage collection)
  with t.part("other"):
    clock.sleep(0.1)
    w = t.window(model_flops=8e12, frozen_flops=2e12, devices=2, peak_flops=4e12, tokens=300)
    clock.sleep(0.3)   # the rest of this part belongs to the next window
  assert w["time/data"] == 0.5 and w["time/step"] == 2.0 and w["time/other"] == pytest.approx(0.35)
  assert w["time/window"] == pytest.approx(2.85) and w["time/compile"] == w["time/eval"] == 0.0
  assert w["perf/model_tflops_per_device"] == pytest.approx(8e12 / 2.0 / 2 / 1e12)   # 2 TFLOP/s per device
  assert w["perf/mfu"] == pytest.approx(0.5)
  assert w["perf/frozen_forward_tflops_per_device"] == pytest.approx(2e12 / 2.0 / 2 / 1e12)
  assert w["perf/frozen_forward_share"] == pytest.approx(0.25)
  assert w["perf/tokens_per_sec"] == pytest.approx(300 / 2.85)
  assert w["goodput"] == pytest.approx(2.0 / 2.85)
  with t.part("checkpoint"):
    clock.sleep(1.0)
  nxt = t.window()
  assert nxt["time/other"] == pytest.approx(0.3) and nxt["time/checkpoint"] == 1.0
  assert nxt["time/window"] == pytest.approx(1.3) and "perf/mfu" not in nxt   # no FLOPs given: no MFU
  clock.sleep(0.5)   # compiling outside any part is moved out of "other" too
  jax.monitoring.record_event_duration_secs("/jax/core/compile/backend_compile_duration", 0.125)
  last = t.window()
  assert last["time/compile"] == 0.125 and last["time/other"] == pytest.approx(0.375)
  assert sum(last[f"time/{p}"] for p in timeline_lib.PARTS) == pytest.approx(last["time/window"])
  t.close()


def test_compilation_is_moved_out_of_the_part_it_happened_in(tmp_path, clock):
  t = timeline_lib.Timeline(str(tmp_path), 0)
  with t.part("step"):
    clock.sleep(5.0)
    jax.monitoring.record_event_duration_secs("/jax/core/compile/backend_compile_duration", 3.0)
    jax.monitoring.record_event_duration_secs("/jax/core/compile/jaxpr_trace_duration", 0.5)
    jax.monitoring.record_event_duration_secs("/jax/some/other/event", 9.0)   # not compilation
  t.step_done()
  w = t.window(model_flops=1e12, devices=1)
  assert w["time/compile"] == pytest.approx(3.5) and w["time/step"] == pytest.approx(1.5)
  assert w["perf/model_tflops_per_device"] == pytest.approx(1 / 1.5)   # over the step's own time
  assert t.productive == pytest.approx(1.5)
  t.close()
  with t.part("step"):   # a closed timeline no longer listens
    jax.monitoring.record_event_duration_secs("/jax/core/compile/backend_compile_duration", 1.0)
  assert t.window()["time/compile"] == 0.0


def test_goodput_counts_the_whole_job_and_steps_redone_after_a_restart_are_lost(tmp_path, clock):
  first = timeline_lib.Timeline(str(tmp_path), 0)
  for step in (1, 2, 3):
    with first.part("step"):
      clock.sleep(1.0)
    if step == 2:
      first.checkpoint_saving(2)
  first.window()
  clock.sleep(10.0)    # killed after step 3; the job is down for a while, then rerun from the step-2 checkpoint
  state = json.loads((tmp_path / "goodput.json").read_text())
  assert state["productive_at"] == {"2": 2.0} and state["restarts"] == 0
  second = timeline_lib.Timeline(str(tmp_path), 2)
  assert second.restarts == 1 and second.productive == 2.0   # step 3's second is lost
  with second.part("step"):
    clock.sleep(1.0)
  assert second.goodput() == pytest.approx(3.0 / 14.0)   # job wall: 3 + 10 + 1 seconds
  assert "(1 restart)" in second.summary()
  fresh = timeline_lib.Timeline(str(tmp_path / "new"), 0)
  assert fresh.productive == 0.0 and fresh.restarts == 0
  (tmp_path / "goodput.json").write_text("{not json")   # a damaged file is a report lost, never a failed run
  assert timeline_lib.Timeline(str(tmp_path), 2).productive == 0.0
  for t in (first, second, fresh):
    t.close()
