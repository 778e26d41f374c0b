"""One training run per workdir (run/workdir_lock.py), as the README promises it: a second run is refused, naming
the holder; a holder's heartbeat is what tells another host it is alive, and a lock whose heartbeat is older than
STALE_AFTER is taken over; on gs:// the create and the take-over are conditional writes (tests/gcs_emulator.py), so
of two runs racing for one workdir exactly one wins.

Runs on other hosts are modelled by giving a lock another `host`: then only its heartbeat says whether it is alive
(the pid check applies to this host's processes only)."""
import json
import threading
import time

import pytest
from etils import epath
from gcs_emulator import gcs_fixture

from iblip_jax.run import workdir_lock
from iblip_jax.run.workdir_lock import WorkdirLock, WorkdirLocked

BUCKET = "iblip-lock"
gcs = gcs_fixture(BUCKET)


def _lock(workdir, host: str) -> WorkdirLock:
  lock = WorkdirLock(str(workdir))
  lock.info["host"] = host   # a run on another host
  return lock


def _write_lock(workdir, host: str, age: float) -> dict:
  """A lock left by a run on `host` whose last heartbeat was `age` seconds ago."""
  info = {"host": host, "pid": 4242, "started": time.time() - 7200, "heartbeat": time.time() - age}
  (epath.Path(str(workdir)) / workdir_lock.NAME).write_text(json.dumps(info))
  return info


def _holder(workdir) -> dict:
  """The lock's content. A read racing the heartbeat's rewrite on gs:// can see the object cut at the size gcsfs
  had cached: such a read is repeated."""
  for _ in range(100):
    try:
      return json.loads((epath.Path(str(workdir)) / workdir_lock.NAME).read_text())
    except ValueError:
      time.sleep(0.02)
  raise AssertionError(f"{workdir}: the lock never read as JSON")


def _wait_until(predicate, timeout: float = 10.0) -> bool:
  deadline = time.monotonic() + timeout
  while not predicate():
    if time.monotonic() > deadline:
      return False
    time.sleep(0.02)
  return True


# ---- heartbeat staleness (shared by local and gs:// workdirs; checked on a local one) ----------------------------

def test_the_staleness_limit_is_the_readmes_ten_minutes():
  assert workdir_lock.STALE_AFTER == 600.0 and workdir_lock.HEARTBEAT < workdir_lock.STALE_AFTER / 5


@pytest.mark.parametrize("age, taken", [(workdir_lock.STALE_AFTER + 60, True), (workdir_lock.STALE_AFTER - 60, False)])
def test_a_lock_is_stale_once_its_heartbeat_is_older_than_the_limit(tmp_path, capsys, age, taken):
  old = _write_lock(tmp_path, "host-a", age)
  lock = _lock(tmp_path, "host-b")
  if taken:
    with lock:
      assert _holder(tmp_path)["host"] == "host-b"
    out = capsys.readouterr().out
    assert "taking over a stale lock" in out and "process 4242 on host host-a" in out
    assert "its heartbeat is 11 minutes old" in out
  else:
    with pytest.raises(WorkdirLocked, match="in use by another training run: process 4242 on host host-a"):
      lock.__enter__()
    assert _holder(tmp_path) == old


def test_a_live_holder_stays_fresh_and_a_silent_one_goes_stale(tmp_path, monkeypatch):
  """The heartbeat thread keeps a held lock fresh past STALE_AFTER; once it stops (the holder's host is gone), the
  lock goes stale and another host takes it over. Intervals shortened so that this takes seconds."""
  monkeypatch.setattr(workdir_lock, "HEARTBEAT", 0.1)
  monkeypatch.setattr(workdir_lock, "STALE_AFTER", 1.5)
  holder = _lock(tmp_path, "host-a")
  with holder:
    first = _holder(tmp_path)["heartbeat"]
    assert _wait_until(lambda: _holder(tmp_path)["heartbeat"] > first), "the heartbeat did not advance"
    time.sleep(2.0)   # longer than STALE_AFTER since the lock was created
    assert time.time() - _holder(tmp_path)["heartbeat"] < 1.0
    with pytest.raises(WorkdirLocked, match="process .* on host host-a"):
      _lock(tmp_path, "host-b").__enter__()

    holder._stop.set()   # host-a stops beating, as if its VM were lost
    holder._thread.join()
    time.sleep(1.6)
    with _lock(tmp_path, "host-b"):
      assert _holder(tmp_path)["host"] == "host-b"
  assert not (tmp_path / workdir_lock.NAME).exists()


def test_a_refresh_in_flight_at_exit_does_not_leave_the_lock_behind(tmp_path, monkeypatch):
  """The heartbeat thread reads the lock, finds it its own, and rewrites it: if the run exits between the read and
  the write, the exit must wait for that write before deleting, or the rewrite re-creates the lock of a finished
  run (another host would then be refused for STALE_AFTER)."""
  monkeypatch.setattr(workdir_lock, "HEARTBEAT", 0.05)
  real_read = workdir_lock._read
  beat_read, exited = threading.Event(), threading.Event()

  def read(path):
    info = real_read(path)
    if threading.current_thread().name == "workdir-lock-heartbeat" and not beat_read.is_set():
      beat_read.set()
      exited.wait(1.0)   # hold the refresh between its read and its write until the run has exited (or 1 s)
    return info

  monkeypatch.setattr(workdir_lock, "_read", read)
  lock = _lock(tmp_path, "host-a")
  lock.__enter__()
  assert beat_read.wait(10)
  lock.__exit__(None, None, None)
  exited.set()
  lock._thread.join(10)
  assert not (tmp_path / workdir_lock.NAME).exists()


class Interrupted(BaseException):
  """What a start-up SIGTERM's handler raises wherever Python is (train.Preempted); a BaseException here so that
  nothing in between may catch it."""


@pytest.mark.parametrize("where", ["writing the lock", "after the lock is written", "starting the heartbeat"])
def test_a_signal_while_taking_the_lock_leaves_no_lock_behind(tmp_path, monkeypatch, where):
  """CI once found LOCK left behind by a job stopped during start-up (exit 75): the signal's exception landed between
  the lock's creation and the end of __enter__, where `with` does not call __exit__. Wherever it lands now, the lock
  is gone afterwards and the workdir can be taken at once."""
  import os
  def interrupt(*_, **__):
    raise Interrupted()
  if where == "writing the lock":   # the file exists, empty: it does not yet say whose it is
    monkeypatch.setattr(os, "fdopen", interrupt)
  elif where == "after the lock is written":
    monkeypatch.setattr(workdir_lock.distributed, "broadcast_json", interrupt)
  else:
    monkeypatch.setattr(threading.Thread, "start", interrupt)
  with pytest.raises(Interrupted):
    with WorkdirLock(str(tmp_path)):
      pytest.fail("entered")
  assert not (tmp_path / "LOCK").exists()
  monkeypatch.undo()
  with WorkdirLock(str(tmp_path)):
    assert (tmp_path / "LOCK").exists()
  assert not (tmp_path / "LOCK").exists()


def test_a_refused_run_does_not_delete_the_holders_lock(tmp_path):
  with WorkdirLock(str(tmp_path)) as holder:
    with pytest.raises(WorkdirLocked):
      with _lock(tmp_path, "elsewhere"):
        pass
    assert json.loads((tmp_path / "LOCK").read_text())["started"] == holder.info["started"]


# ---- gs:// : conditional create and conditional take-over --------------------------------------------------------

def test_gcs_a_second_run_is_refused_naming_the_holder(gcs):
  workdir = f"gs://{BUCKET}/busy"
  with _lock(workdir, "host-a") as first:
    held = _holder(workdir)
    assert held["host"] == "host-a" and held["started"] == first.info["started"]
    with pytest.raises(WorkdirLocked, match=rf"gs://{BUCKET}/busy is in use by another training run: process "
                                            rf"{first.info['pid']} on host host-a"):
      _lock(workdir, "host-b").__enter__()
    assert _holder(workdir) == held   # the refused run wrote nothing
  assert gcs.list("busy/") == []


def test_gcs_the_heartbeat_advances_and_exit_deletes_the_lock(gcs, monkeypatch):
  monkeypatch.setattr(workdir_lock, "HEARTBEAT", 0.1)
  workdir = f"gs://{BUCKET}/beat"
  with _lock(workdir, "host-a"):
    first = _holder(workdir)["heartbeat"]
    assert _wait_until(lambda: _holder(workdir)["heartbeat"] > first, timeout=60.0), \
        "the heartbeat did not advance on gs://"   # a generous wait: a loaded machine slows the GCS emulator
    assert _holder(workdir)["host"] == "host-a"
  assert gcs.list("beat/") == []


def test_gcs_a_stale_lock_is_taken_over_and_a_fresh_one_is_not(gcs, capsys):
  stale = f"gs://{BUCKET}/stale"
  _write_lock(stale, "host-a", workdir_lock.STALE_AFTER + 60)
  with _lock(stale, "host-b"):
    assert _holder(stale)["host"] == "host-b"
  assert "taking over a stale lock on gs://" in capsys.readouterr().out
  assert gcs.list("stale/") == []

  fresh = f"gs://{BUCKET}/fresh"
  old = _write_lock(fresh, "host-a", 5)
  with pytest.raises(WorkdirLocked, match="process 4242 on host host-a"):
    _lock(fresh, "host-b").__enter__()
  assert _holder(fresh) == old


def test_gcs_two_takers_of_one_stale_lock_exactly_one_wins(gcs, monkeypatch):
  """Both read the stale lock before either writes, both remove it, then both create theirs: the creates are
  conditional, so one of them is refused and names the other."""
  workdir = f"gs://{BUCKET}/race"
  _write_lock(workdir, "host-a", workdir_lock.STALE_AFTER + 60)
  barrier = threading.Barrier(2, timeout=20)
  real_read, real_remove = workdir_lock._read, workdir_lock._remove_if_unchanged
  first_read, first_remove = set(), set()

  def once(seen: set) -> bool:   # a taker's first call (not the winner's exit, in the main thread)
    me = threading.current_thread().name
    new = me.startswith("taker-") and me not in seen
    seen.add(me)
    return new

  def read(path):
    info = real_read(path)
    if once(first_read):
      barrier.wait()   # both have seen the stale lock; neither has written
    return info

  def remove(path, info):
    real_remove(path, info)
    if once(first_remove):
      barrier.wait()   # both have removed it; now both create

  monkeypatch.setattr(workdir_lock, "_read", read)
  monkeypatch.setattr(workdir_lock, "_remove_if_unchanged", remove)
  locks = {host: _lock(workdir, host) for host in ("host-b", "host-c")}
  outcome = {}

  def take(host):
    try:
      locks[host].__enter__()
      outcome[host] = None
    except WorkdirLocked as e:
      outcome[host] = str(e)

  threads = [threading.Thread(target=take, args=(host,), name=f"taker-{host}") for host in locks]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  winners = [host for host, error in outcome.items() if error is None]
  try:
    assert len(outcome) == 2 and len(winners) == 1, outcome
    loser = next(host for host in locks if host != winners[0])
    assert f"in use by another training run: process {locks[loser].info['pid']} on host {winners[0]}" \
        in outcome[loser]
    assert _holder(workdir)["host"] == winners[0]
  finally:
    for host in winners:
      locks[host].__exit__(None, None, None)


def test_gcs_a_taker_that_read_the_stale_lock_late_does_not_displace_the_winner(gcs, monkeypatch):
  """The other order of the race: host-b read the stale lock, then host-c took it over, then host-b acts on what it
  read. Its removal is conditional on the lock being the one it judged stale, so host-c keeps it."""
  workdir = f"gs://{BUCKET}/late"
  stale = _write_lock(workdir, "host-a", workdir_lock.STALE_AFTER + 60)
  with _lock(workdir, "host-c"):
    real_read = workdir_lock._read
    looks = [stale]   # host-b's first look happened before host-c wrote
    monkeypatch.setattr(workdir_lock, "_read", lambda path: looks.pop() if looks else real_read(path))
    late = _lock(workdir, "host-b")
    try:
      with pytest.raises(WorkdirLocked, match="on host host-c"):
        late.__enter__()
    finally:
      late._stop.set()
    assert _holder(workdir)["host"] == "host-c"
  assert gcs.list("late/") == []
