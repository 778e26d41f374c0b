"""A local Google Cloud Storage emulator for tests: `gs://` paths without a network or credentials.

    with gcs_emulator("iblip-test") as emu:   # or: gcs = gcs_fixture() at module level in a test file
      epath.Path("gs://iblip-test/run/x.txt").write_text("hi")
      subprocess.run([sys.executable, "-m", "iblip_jax.main", ...])   # inherits os.environ, so the same bucket
      emu.list("run/")                                                # ["run/x.txt", ...]

The server is `gcp-storage-emulator` (PyPI; worked with 2026.7.19), in memory, in a child process bound to
127.0.0.1 on a port the kernel picks. The child prints the port, serves until its stdin closes (so it also goes away
if the test process dies) and logs requests to `emu.log_path`. Before serving, the child makes up for four gaps
in that emulator (all in `_serve` below; nothing is copied from it):
  * gcsfs >= 2025 renames (`epath.Path.rename`, orbax) with the newer `objects.moveTo` call, which the emulator
    answers 501; gcsfs retries a 501 six times with backoff (~30 s per file) before it copies and deletes. The
    child serves moveTo as copy + delete.
  * `ifGenerationMatch` on uploads and deletes is ignored by the emulator; tensorstore's OCDBT writes its manifest
    with `ifGenerationMatch=0` / `=<generation>` and tensorboardX's uploads carry it too. The child answers 412 on a
    mismatch, as GCS does.
  * object data (`alt=media`, whole or a Range) comes without GCS's `x-goog-generation` / `x-goog-metageneration`
    headers, and GETs ignore `ifGenerationMatch` / `ifGenerationNotMatch`. tensorstore's gcs driver takes a media
    read's generation from `x-goog-generation` (missing: 0); OCDBT's next read of its manifest then carries that 0 as
    `ifGenerationNotMatch` and fails before any request with "Malformed StorageGeneration" (orbax: the second save
    of a big tree). The child sends those headers (plus x-goog-stored-content-length, x-goog-storage-class) and,
    like GCS, answers a GET 304 Not Modified (no body) when `ifGenerationNotMatch` is the live generation and 412
    when `ifGenerationMatch` is not.
  * the emulator is a single-threaded `http.server` with a listen backlog of 5 (tensorstore opens up to 32
    connections at once, and dropped SYNs cost a second each): the backlog is raised to 256. Clients that hang up
    early (gcsfs cancels the listing it races against a metadata GET) are not logged as errors.
Buckets are made with soft delete off, so deleted objects are gone (and do not pile up in memory).

What each library reads (all from the environment, so `python -m iblip_jax.main` subprocesses need nothing else;
`emu.env` is the dict, and the context manager puts it in `os.environ` and takes it out again):

  STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT
      gcsfs (`gcsfs.core._location`: the endpoint for all JSON API calls; etils.epath reaches gcsfs through fsspec
      when TensorFlow is absent), google-cloud-storage (`Client`: endpoint, and `AnonymousCredentials` with project
      "<none>" when no credentials are passed), hence orbax (`orbax.checkpoint._src.path.gcs_utils.get_bucket`:
      `storage.Client().get_bucket` for its hierarchical-namespace check before listing steps and deleting old ones)
      and tensorboardX (`GCSRecordWriter`, a `storage.Client`). With the scheme: google-cloud-storage uses the
      value as the URL as it is.
  TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT
      tensorstore's `gcs` kvstore driver (the array data orbax writes: OCDBT + zarr3), in place of
      https://storage.googleapis.com. Read when a store is opened, not once per process (0.1.86). Scheme, host and
      port only: tensorstore appends "/storage/v1/..." and "/upload/storage/v1/...", so a trailing "/" doubles it.
  GOOGLE_AUTH_TOKEN_FOR_TESTING=emulator
      tensorstore's credential chain takes this fixed bearer token first, before $GOOGLE_APPLICATION_CREDENTIALS,
      gcloud's application_default_credentials.json and the GCE metadata server (which it would otherwise probe).
      The emulator ignores the Authorization header.
  TENSORSTORE_GCS_HTTP_VERSION=1
      plain HTTP/1.1 to the emulator (no HTTP/2 upgrade attempt).
  TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS=5, TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES=1,
  TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS=30
      a stalled connection fails instead of waiting forever. Note that tensorstore then RETRIES (context resource
      `gcs_request_retries`: 32 tries, backoff up to 32 s, no environment variable for it): a write to a dead
      emulator takes minutes to fail, hence the health check before the emulator is handed out.
  FSSPEC_GCS_TOKEN=anon
      fsspec's configuration from the environment (`FSSPEC_<protocol>_<kwarg>`, read when fsspec is imported):
      gcsfs gets token="anon", so it never calls `google.auth.default()` (gcloud files, metadata server).
      Already-imported fsspec gets the same setting in `fsspec.config.conf` while the emulator is up.
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
      read when gcsfs is imported. By default gcsfs >= 2025 exports `ExtendedGcsFileSystem`, which asks the Storage
      Control gRPC API for each bucket's layout (zonal / hierarchical namespace) before operations and does not
      cache a failure: not emulated, so a warning and a gRPC attempt per call. "false" keeps the plain HTTP
      `GCSFileSystem`. (Already-imported gcsfs is re-registered with fsspec for the duration.)
  NO_GCE_CHECK=true
      google-auth (`compute_engine._metadata.is_on_gce`, read at import) and gcsfs (token=None's "cloud" step):
      do not look for a GCE metadata server.
  GCE_METADATA_HOST, GCE_METADATA_ROOT, GCE_METADATA_IP=127.0.0.1:1
      google-auth (HOST, ROOT: the old name, IP) and tensorstore (ROOT): should anything still ask the metadata
      server, it is a closed local port, refused at once instead of a DNS lookup and 3 s x 3 tries.
  CLOUDSDK_CONFIG=<empty temp dir>, GOOGLE_APPLICATION_CREDENTIALS removed
      google-auth and tensorstore look for gcloud's application_default_credentials.json there: a developer's own
      credentials are not picked up (nor refreshed against oauth2.googleapis.com, which is not reachable).
  NO_PROXY / no_proxy += 127.0.0.1,localhost
      requests (google-cloud-storage), aiohttp (trust_env) and curl (tensorstore) must not send loopback traffic
      to a proxy.

In-process caches that would keep pointing elsewhere are cleared when the emulator starts and stops: fsspec/gcsfs
instances, etils.epath's fsspec filesystem (`_FileSystemSpecBackend._get_filesystem`, an lru_cache) and orbax's
`gcs_utils.get_bucket` (an lru_cache of google-cloud-storage buckets, which hold their endpoint).

Known limits: tensorboardX's `GCSRecordWriter` re-uploads the whole events file on every flush, and flushes once
more from `__del__` at interpreter exit (its `FileWriter` registers an atexit close): write TensorBoard events
from a subprocess (as the main job does), or the test process's exit tries to reach an emulator that is gone and
google-cloud-storage retries that for 120 s. gcsfs has no append: `open("a")` warns and OVERWRITES. orbax does
not rename on gs:// (CommitFileTemporaryPath: a step is final once its commit_success.txt exists), but it needs
google-cloud-storage there (listing steps, deleting old ones).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Iterator

DEFAULT_BUCKET = "iblip-test"
_UNREACHABLE = "127.0.0.1:1"  # a closed port: connection refused at once


def emulator_available() -> bool:
  return importlib.util.find_spec("gcp_storage_emulator") is not None


def emulator_environ(url: str, cloudsdk_config: str) -> dict[str, str]:
  """The variables that send gcsfs/epath, google-cloud-storage, tensorstore and google-auth to `url` (see above)."""
  no_proxy = ",".join(x for x in (os.environ.get("NO_PROXY") or os.environ.get("no_proxy"), "127.0.0.1,localhost") if x)
  return {
      "STORAGE_EMULATOR_HOST": url,
      "TENSORSTORE_GCS_HTTP_URL": url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      "TENSORSTORE_GCS_HTTP_VERSION": "1",
      "TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS": "5",
      "TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES": "1",
      "TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS": "30",
      "FSSPEC_GCS_TOKEN": "anon",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "NO_GCE_CHECK": "true",
      "GCE_METADATA_HOST": _UNREACHABLE,
      "GCE_METADATA_ROOT": _UNREACHABLE,
      "GCE_METADATA_IP": _UNREACHABLE,
      "CLOUDSDK_CONFIG": cloudsdk_config,
      "NO_PROXY": no_proxy,
      "no_proxy": no_proxy,
  }


_REMOVED = ("GOOGLE_APPLICATION_CREDENTIALS",)


class GcsEmulator:
  """One emulator process. `start()`/`stop()`, or use `gcs_emulator()`, which also exports `env`."""

  def __init__(self, bucket: str = DEFAULT_BUCKET, startup_timeout: float = 30.0):
    self.bucket = bucket
    self.startup_timeout = startup_timeout
    self.port: int | None = None
    self.url: str | None = None
    self.env: dict[str, str] = {}
    self._dir: str | None = None
    self._proc: subprocess.Popen | None = None

  @property
  def log_path(self) -> str:
    return os.path.join(self._dir, "emulator.log")

  def start(self) -> "GcsEmulator":
    self._dir = tempfile.mkdtemp(prefix="gcs-emulator-")
    os.mkdir(os.path.join(self._dir, "gcloud"))
    log = open(self.log_path, "wb")
    self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--bucket", self.bucket],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=self._dir,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()
    try:
      self.port = self._read_port()
      self.url = f"http://127.0.0.1:{self.port}"
      deadline = time.monotonic() + self.startup_timeout
      while self._request("GET", "/", timeout=2, check=False)[0] != 200:
        if time.monotonic() > deadline:
          raise RuntimeError("the GCS emulator does not answer its health check")
        time.sleep(0.05)
    except BaseException:
      self.stop()
      raise
    self.env = emulator_environ(self.url, os.path.join(self._dir, "gcloud"))
    return self

  def _read_port(self) -> int:
    fd, line, deadline = self._proc.stdout.fileno(), b"", time.monotonic() + self.startup_timeout
    while not line.endswith(b"\n"):
      left = deadline - time.monotonic()
      if left <= 0 or self._proc.poll() is not None or not select.select([fd], [], [], left)[0]:
        raise RuntimeError(f"the GCS emulator did not start (exit code {self._proc.poll()}):\n{self.log_tail()}")
      chunk = os.read(fd, 64)
      if not chunk:
        raise RuntimeError(f"the GCS emulator exited:\n{self.log_tail()}")
      line += chunk
    return int(line)

  def stop(self) -> None:
    if self._proc is not None:
      with contextlib.suppress(OSError):
        self._proc.stdin.close()  # the child serves until its stdin closes
      try:
        self._proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait(timeout=10)
      self._proc.stdout.close()
      self._proc = None
    if self._dir is not None:
      shutil.rmtree(self._dir, ignore_errors=True)
      self._dir = None

  def log_tail(self, n: int = 40) -> str:
    try:
      with open(self.log_path, errors="replace") as f:
        return "".join(f.readlines()[-n:])
    except OSError:
      return ""

  # A few JSON API calls, for tests to look at the bucket without the libraries under test.
  def _request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
               timeout: float = 10, check: bool = True) -> tuple[int, bytes]:
    req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    try:
      with opener.open(req, timeout=timeout) as r:
        return r.status, r.read()
    except urllib.error.HTTPError as e:
      if check:
        raise
      return e.code, e.read()
    except OSError:
      if check:
        raise
      return 0, b""

  def create_bucket(self, name: str) -> None:
    body = json.dumps({"name": name}).encode()
    self._request("POST", "/storage/v1/b?project=test", body, {"Content-Type": "application/json"})
    body = json.dumps({"softDeletePolicy": {"retentionDurationSeconds": "0"}}).encode()
    self._request("PATCH", f"/storage/v1/b/{name}", body, {"Content-Type": "application/json"})

  def list(self, prefix: str = "", bucket: str | None = None) -> list[str]:
    """Object names under `prefix` (no delimiter: every object below)."""
    query = urllib.parse.urlencode({"prefix": prefix})
    _, out = self._request("GET", f"/storage/v1/b/{bucket or self.bucket}/o?{query}")
    return sorted(o["name"] for o in json.loads(out).get("items") or [])

  def read(self, name: str, bucket: str | None = None) -> bytes:
    quoted = urllib.parse.quote(name, safe="")
    return self._request("GET", f"/storage/v1/b/{bucket or self.bucket}/o/{quoted}?alt=media")[1]


def _reset_client_caches() -> None:
  """Drop in-process clients/filesystems that may hold another endpoint (only for modules already imported)."""
  mods = sys.modules
  if "gcsfs" in mods:
    import gcsfs.core
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    if "gcsfs.extended_gcsfs" in mods:
      mods["gcsfs.extended_gcsfs"].ExtendedGcsFileSystem.clear_instance_cache()
  if "etils.epath.backend" in mods:
    mods["etils.epath.backend"]._FileSystemSpecBackend._get_filesystem.cache_clear()
  if "orbax.checkpoint._src.path.gcs_utils" in mods:
    mods["orbax.checkpoint._src.path.gcs_utils"].get_bucket.cache_clear()


@contextlib.contextmanager
def _in_process_settings() -> Iterator[None]:
  """What the environment variables do for a fresh process, for libraries this process has already imported."""
  undo, fsspec_loaded = [], "fsspec" in sys.modules
  if fsspec_loaded:
    import fsspec.config
    gcs_conf = fsspec.config.conf.setdefault("gcs", {})
    old = gcs_conf.get("token", undo)
    gcs_conf["token"] = "anon"
    undo.append(lambda: gcs_conf.pop("token") if old is undo else gcs_conf.__setitem__("token", old))
  if "gcsfs" in sys.modules:  # imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: use the plain class
    import fsspec.registry
    import gcsfs
    import gcsfs.core
    if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
      for proto in ("gs", "gcs"):
        old_cls = fsspec.registry._registry.get(proto)
        fsspec.registry.register_implementation(proto, gcsfs.core.GCSFileSystem, clobber=True)
        undo.append(lambda p=proto, c=old_cls: fsspec.registry._registry.pop(p) if c is None
                    else fsspec.registry._registry.__setitem__(p, c))
  try:
    yield
  finally:
    for fn in reversed(undo):
      fn()
    if not fsspec_loaded and "fsspec.config" in sys.modules:  # imported meanwhile, from FSSPEC_GCS_TOKEN=anon
      sys.modules["fsspec.config"].conf.get("gcs", {}).pop("token", None)


@contextlib.contextmanager
def gcs_emulator(bucket: str = DEFAULT_BUCKET, *, export: bool = True) -> Iterator[GcsEmulator]:
  """Starts the emulator with `bucket`, puts `emu.env` into os.environ (export=True), and undoes both at the end."""
  emu = GcsEmulator(bucket).start()
  saved = {k: os.environ.get(k) for k in (*emu.env, *_REMOVED)}
  try:
    if export:
      for k in _REMOVED:
        os.environ.pop(k, None)
      os.environ.update(emu.env)
      _reset_client_caches()
      with _in_process_settings():
        yield emu
    else:
      yield emu
  finally:
    if export:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
      _reset_client_caches()
    emu.stop()


def gcs_fixture(bucket: str = DEFAULT_BUCKET, scope: str = "module"):
  """A pytest fixture (assign it to a module-level name) yielding a running GcsEmulator; skips when
  gcp-storage-emulator is not installed."""
  import pytest

  @pytest.fixture(scope=scope)
  def _gcs():
    if not emulator_available():
      pytest.skip("gcp-storage-emulator is not installed (pip install gcp-storage-emulator)")
    with gcs_emulator(bucket) as emu:
      yield emu

  return _gcs


# ---- the child process ----------------------------------------------------------------------------------------

def _serve(buckets: list[str]) -> None:
  import http.server
  import logging
  import socketserver
  from http import HTTPStatus

  from gcp_storage_emulator import server as srv
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import buckets as bucket_handlers
  from gcp_storage_emulator.handlers import objects

  logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
  http.server.HTTPServer.request_queue_size = 256

  def handle_error(self, request, client_address):
    if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
      socketserver.BaseServer.handle_error(self, request, client_address)

  http.server.HTTPServer.handle_error = handle_error

  def precondition_failed(request, response, storage, bucket, name) -> bool:
    want = request.query.get("ifGenerationMatch")
    if not want or name is None:
      return False
    obj = storage.objects.get(bucket, {}).get(name)
    if str(want[0]) == (str(obj["generation"]) if obj else "0"):
      return False
    response.status = HTTPStatus.PRECONDITION_FAILED
    response.json({"error": {"code": 412, "message": "Precondition Failed",
                             "errors": [{"reason": "conditionNotMet", "message": "Precondition Failed"}]}})
    return True

  def upload_name(request):
    if "name" in request.query:
      return request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
      return (data.get("meta") or {}).get("name") or data.get("name")
    return None

  def generation_headers(request, response, storage) -> None:
    """What GCS sends with object data: tensorstore takes the generation of a read from x-goog-generation (absent:
    0, which it rejects as 'Malformed StorageGeneration' when it later reads with ifGenerationNotMatch=0)."""
    p = request.params
    obj = storage.objects.get(p["bucket_name"], {}).get(p["object_id"])
    if obj is not None:
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration") or 1)
      response["x-goog-stored-content-length"] = str(obj.get("size"))
      response["x-goog-storage-class"] = obj.get("storageClass") or "STANDARD"

  def read_precondition_failed(request, response, storage) -> bool:
    """GET of an object: ifGenerationMatch as for writes (412), ifGenerationNotMatch equal to the live generation
    answers 304 Not Modified with no body. A missing object falls through to the usual 404."""
    p = request.params
    if precondition_failed(request, response, storage, p["bucket_name"], p["object_id"]):
      return True
    not_match = request.query.get("ifGenerationNotMatch")
    obj = storage.objects.get(p["bucket_name"], {}).get(p["object_id"])
    if not_match and obj is not None and str(not_match[0]) == str(obj["generation"]):
      response.status = HTTPStatus.NOT_MODIFIED
      return True
    return False

  insert, delete, get, download = objects.insert, objects.delete, objects.get, objects.download

  def checked_download(request, response, storage, *args, **kwargs):
    if not read_precondition_failed(request, response, storage):
      download(request, response, storage, *args, **kwargs)
      if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        generation_headers(request, response, storage)

  def checked_get(request, response, storage, *args, **kwargs):
    if (request.query.get("alt") or [""])[0] == "media":
      return checked_download(request, response, storage, *args, **kwargs)
    if "softDeleted" in request.query or not read_precondition_failed(request, response, storage):
      return get(request, response, storage, *args, **kwargs)

  def checked_insert(request, response, storage, *args, **kwargs):
    if "upload_id" in request.query or not precondition_failed(
        request, response, storage, request.params["bucket_name"], upload_name(request)):
      return insert(request, response, storage, *args, **kwargs)

  def checked_delete(request, response, storage, *args, **kwargs):
    p = request.params
    if not precondition_failed(request, response, storage, p["bucket_name"], p["object_id"]):
      return delete(request, response, storage, *args, **kwargs)

  def move(request, response, storage, *args, **kwargs):
    p = request.params
    if precondition_failed(request, response, storage, p["bucket_name"], p["dest_object_id"]):
      return
    try:
      obj = objects._copy(request.base_url, storage, p["bucket_name"], p["object_id"], p["bucket_name"],
                          p["dest_object_id"])
      storage.delete_file(p["bucket_name"], p["object_id"])
    except NotFound:
      response.status = HTTPStatus.NOT_FOUND
      return
    response.json(obj)

  replace = {insert: checked_insert, delete: checked_delete, get: checked_get, download: checked_download}
  objects.insert = checked_insert  # the router's fallback for uploads without the /upload prefix
  objects.download = checked_download  # what objects.get calls for alt=media
  handlers = tuple((regex, {m: replace.get(f, f) for m, f in methods.items()}) for regex, methods in srv.HANDLERS)
  move_route = (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
                r"(?P<dest_object_id>.*[^/]+)$", {"POST": move})
  srv.HANDLERS = (move_route, *handlers)

  server = srv.create_server("127.0.0.1", 0, in_memory=True)
  storage = server._storage
  for name in buckets:
    bucket_handlers.create_bucket(name, storage)
    storage.buckets[name]["softDeletePolicy"] = {"retentionDurationSeconds": "0"}
  server.start()
  print(server._api._httpd.server_address[1], flush=True)
  try:
    sys.stdin.read()  # until the parent closes stdin or dies
  finally:
    server.stop()


if __name__ == "__main__":
  import argparse
  parser = argparse.ArgumentParser(description="gcp-storage-emulator on 127.0.0.1:<free port>; prints the port.")
  parser.add_argument("--bucket", action="append", default=[])
  _serve(parser.parse_args().bucket)
