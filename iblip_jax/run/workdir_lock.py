"""One training run per workdir: a lock file `workdir/LOCK` holding who runs there.

Two runs on one workdir would overwrite each other's checkpoints and interleave metrics.jsonl. A training run
creates the lock atomically (O_EXCL locally; a create-only upload, ifGenerationMatch=0, on gs://), refreshes its
heartbeat every minute from a background thread, and deletes it on exit. A second run finds the lock and stops,
saying which host and process hold it. A lock left by a process that died (SIGKILL, a lost VM) is stale: on the same
host its pid is gone; anywhere, its heartbeat is older than STALE_AFTER seconds. A stale lock is reported and
taken over. On a multi-host job only process 0 takes the lock, and every process learns the outcome.
"""
import json
import os
import socket
import threading
import time

from etils import epath

from iblip_jax import distributed
from iblip_jax.errors import UserError

NAME = "LOCK"
HEARTBEAT = 60.0        # seconds between refreshes of a held lock
STALE_AFTER = 600.0     # a heartbeat older than this means the holder is gone


class WorkdirLocked(UserError):
  """Another live run holds the workdir."""


def _remote(path: epath.Path) -> bool:
  return "://" in str(path)


def _blob(path: epath.Path):
  from google.cloud import storage
  bucket, _, name = str(path)[len("gs://"):].partition("/")
  return storage.Client().bucket(bucket).blob(name)


def _create(path: epath.Path, text: str) -> bool:
  """Creates the file only if it does not exist; False if it does."""
  if not _remote(path):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    try:
      with os.fdopen(fd, "w") as f:
        f.write(text)
    except BaseException:   # interrupted before the file says whose it is (a start-up SIGTERM's exception): ours
      os.unlink(path)
      raise
    return True
  from google.api_core import exceptions
  try:
    _blob(path).upload_from_string(text, if_generation_match=0)
  except exceptions.PreconditionFailed:
    return False
  return True


def _read(path: epath.Path) -> dict | None:
  try:
    info = json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except (ValueError, OSError):   # half-written or garbled: treat it as a lock of unknown owner
    return {"host": "?", "pid": -1, "heartbeat": 0.0}
  return info if isinstance(info, dict) else {"host": "?", "pid": -1, "heartbeat": 0.0}


def _remove_if_unchanged(path: epath.Path, info: dict) -> None:
  """Deletes the lock only if it still holds `info` (two runs taking over one stale lock must not delete each
  other's fresh lock): a conditional delete on gs://, a rename to a private name and a check locally."""
  if _remote(path):
    from google.api_core import exceptions
    blob = _blob(path)
    try:
      blob.reload()
      if json.loads(blob.download_as_text(if_generation_match=blob.generation)) == info:
        blob.delete(if_generation_match=blob.generation)
    except (exceptions.NotFound, exceptions.PreconditionFailed, ValueError):
      pass
    return
  tomb = f"{path}.stale.{os.getpid()}"
  try:
    os.rename(path, tomb)
  except FileNotFoundError:
    return
  if _read(epath.Path(tomb)) != info:   # not the lock we judged stale: put it back
    try:
      os.link(tomb, path)
    except FileExistsError:
      pass
  os.unlink(tomb)


def _stale(info: dict) -> str | None:
  """Why a lock's holder is gone, or None if it may be alive."""
  age = time.time() - float(info.get("heartbeat", 0.0))
  if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and info["pid"] > 0:
    try:
      os.kill(info["pid"], 0)
    except ProcessLookupError:
      return f"process {info['pid']} is no longer running on this host"
    except PermissionError:
      pass   # alive, owned by someone else
  if age > STALE_AFTER:
    return f"its heartbeat is {age / 60:.0f} minutes old"
  return None


def _describe(info: dict) -> str:
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("started", 0.0))))
  age = time.time() - float(info.get("heartbeat", 0.0))
  return f"process {info.get('pid')} on host {info.get('host')} (started {started}, heartbeat {age:.0f} s ago)"


class WorkdirLock:
  """with WorkdirLock(workdir): ... (training); raises WorkdirLocked when another live run holds it."""

  def __init__(self, workdir: str):
    self.path = epath.Path(workdir) / NAME
    self.info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    self._stop = threading.Event()
    self._thread = None

  def _text(self) -> str:
    return json.dumps({**self.info, "heartbeat": time.time()})

  def _acquire_here(self) -> str | None:
    """Process 0: takes the lock. Returns an error message instead of raising, so it can be shared."""
    for _ in range(3):   # a stale lock is removed and the create tried again (another run may race us)
      if _create(self.path, self._text()):
        return None
      info = _read(self.path)
      if info is None:
        continue   # released between our two looks
      why = _stale(info)
      if why is None:
        return (f"{self.path.parent} is in use by another training run: {_describe(info)}. Stop that run first, "
                f"or use another --workdir. (If that process is really gone, delete {self.path}.)")
      message = f"taking over a stale lock on {self.path.parent} from {_describe(info)}: {why}"
      print(f"WARNING: {message}", flush=True)
      _remove_if_unchanged(self.path, info)
    return f"could not take the lock {self.path} (another run keeps creating it)"

  def __enter__(self):
    # A start-up SIGTERM raises (Preempted, train._start_up_handler) wherever Python happens to be. If that is in
    # here, after the lock was taken, `with` never calls __exit__: release it here (__exit__ deletes only our lock).
    try:
      error = self._acquire_here() if distributed.is_primary() else None
      error = distributed.broadcast_json(error)
      if error:
        raise WorkdirLocked(error)
      if distributed.is_primary():
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()
    except BaseException:
      self.__exit__()
      raise
    return self

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT):
      try:
        if self._ours(_read(self.path)):
          self.path.write_text(self._text())
      except Exception:  # noqa: BLE001 - a failed refresh must not kill training; the next one may work
        pass

  def _ours(self, info: dict | None) -> bool:
    return info is not None and all(info.get(k) == self.info[k] for k in ("host", "pid", "started"))

  def __exit__(self, *exc):
    self._stop.set()
    if self._thread is not None and self._thread.is_alive():
      self._thread.join()   # a refresh between its read and its write would re-create the lock once deleted
    if distributed.is_primary() and self._ours(_read(self.path)):
      self.path.unlink(missing_ok=True)
    return False
