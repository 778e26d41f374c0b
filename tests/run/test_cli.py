"""The job's console rules (run/cli.py) that need no job: calls from native code on a closed event loop."""
import _thread
import asyncio
import functools
import sys
import time

from iblip_jax.run import cli


def _from_native_code(function, wait_s: float = 1.0) -> list:
  """Calls `function` in a new thread with no Python frame below it (how tensorstore's C++ futures call asyncio);
  returns what it raised within `wait_s`, as sys.unraisablehook saw it."""
  raised = []
  hook, sys.unraisablehook = sys.unraisablehook, lambda u: raised.append(u.exc_value)
  try:
    _thread.start_new_thread(function, ())
    deadline = time.monotonic() + wait_s
    while not raised and time.monotonic() < deadline:
      time.sleep(0.01)
  finally:
    sys.unraisablehook = hook
  return raised


def test_native_calls_on_a_closed_loop_are_dropped_and_python_calls_still_raise():
  loop = asyncio.new_event_loop()
  loop.close()
  calls = []
  # asyncio itself: the error escapes to native code, which prints it (tensorstore: straight to fd 2)
  original = _from_native_code(functools.partial(asyncio.BaseEventLoop.call_soon_threadsafe, loop, calls.append, 1))
  assert [type(e) for e in original] == [RuntimeError] and "Event loop is closed" in str(original[0])
  assert _from_native_code(functools.partial(cli._native_calls_on_closed_loops_drop, loop, calls.append, 1)) == []
  assert calls == []   # dropped, as it was before, but silently
  try:
    cli._native_calls_on_closed_loops_drop(loop, calls.append, 1)
    raise AssertionError("a Python caller must still hear that the loop is closed")
  except RuntimeError as e:
    assert "Event loop is closed" in str(e)
  live = asyncio.new_event_loop()
  try:   # an open loop is untouched
    assert cli._native_calls_on_closed_loops_drop(live, calls.append, 2) is not None
    live.run_until_complete(asyncio.sleep(0))
    assert calls == [2]
  finally:
    live.close()
