"""gs:// workdirs against a local GCS emulator (tests/gcs_emulator.py, which documents the environment variables):
etils.epath, orbax CheckpointManager with a grain iterator item, TensorBoard events and the main job's other outputs,
from this process and from a subprocess configured by the environment alone."""
import faulthandler
import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gcs_emulator import DEFAULT_BUCKET as BUCKET
from gcs_emulator import gcs_fixture

gcs = gcs_fixture(BUCKET)


@pytest.fixture(autouse=True)
def _cwd_and_watchdog(tmp_path, monkeypatch):
  """Runs each test in an empty cwd (a gs:// path mistaken for a local one would show up there as a `gs:` folder)
  and ends the process with a traceback if a test hangs: tensorstore and google-cloud-storage retry an unreachable
  endpoint for minutes."""
  monkeypatch.chdir(tmp_path)
  faulthandler.dump_traceback_later(150, exit=True)
  yield
  faulthandler.cancel_dump_traceback_later()


def _no_local_gs(tmp_path):
  assert not os.path.exists(tmp_path / "gs:") and not os.path.exists(tmp_path / "gs"), os.listdir(tmp_path)


def _read_events(data: bytes) -> list:
  """Parses a TensorBoard events file: TFRecord framing (length, masked CRC32C of it, payload, masked CRC32C of
  it) around serialized Event protos."""
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c
  events, i = [], 0
  while i < len(data):
    (n,), (len_crc,) = struct.unpack_from("<Q", data, i), struct.unpack_from("<I", data, i + 8)
    assert len_crc == masked_crc32c(data[i:i + 8])
    payload = data[i + 12:i + 12 + n]
    assert struct.unpack_from("<I", data, i + 12 + n)[0] == masked_crc32c(payload)
    event = event_pb2.Event()
    event.ParseFromString(payload)
    events.append(event)
    i += 12 + n + 4
  assert i == len(data)
  return events


def test_epath_on_gcs_uses_gcsfs(gcs, tmp_path):
  import fsspec
  from etils import epath
  root = epath.Path(f"gs://{BUCKET}/epath")
  root.mkdir(parents=True, exist_ok=True)  # GCS has no directories: a no-op that must not fail
  (root / "a.txt").write_text("hello")
  assert (root / "a.txt").read_text() == "hello"
  assert (root / "a.txt").exists() and root.exists() and root.is_dir() and not (root / "nope").exists()
  (root / "sub" / "deep").mkdir(parents=True, exist_ok=True)
  (root / "sub" / "deep" / "b.bin").write_bytes(b"\x00\x01")
  assert sorted(p.name for p in root.iterdir()) == ["a.txt", "sub"]
  assert [str(p) for p in root.glob("*.txt")] == [f"gs://{BUCKET}/epath/a.txt"]
  assert [str(p) for p in root.glob("sub/*/*.bin")] == [f"gs://{BUCKET}/epath/sub/deep/b.bin"]
  (root / "a.txt").rename(root / "c.txt")  # one object: gcsfs's objects.moveTo
  assert not (root / "a.txt").exists() and (root / "c.txt").read_text() == "hello"
  (root / "sub").rename(root / "sub2")  # a "directory": every object under the prefix
  assert (root / "sub2" / "deep" / "b.bin").read_bytes() == b"\x00\x01" and not (root / "sub").exists()
  assert gcs.list("epath/") == ["epath/c.txt", "epath/sub2/deep/b.bin"]
  root.rmtree()
  assert not root.exists() and gcs.list("epath/") == []
  fs = fsspec.filesystem("gcs")  # what epath uses for gs:// without TensorFlow
  assert type(fs).__module__ == "gcsfs.core" and fs.base == f"{gcs.url}/storage/v1/" and fs.credentials.token == "anon"
  _no_local_gs(tmp_path)


def test_orbax_checkpoint_manager_with_grain_iterator(gcs, tmp_path):
  import grain
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from etils import epath

  directory = f"gs://{BUCKET}/run/checkpoints"
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
  shardings = {"w": NamedSharding(mesh, P("d")), "b": {"x": NamedSharding(mesh, P())}}
  n = len(jax.devices())
  dataset = grain.MapDataset.range(1000).map(lambda x: x * 2).to_iter_dataset()
  iterator = iter(dataset)
  options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True, create=True)
  with ocp.CheckpointManager(directory, item_names=("state", "data"), options=options) as mngr:
    for step in range(3):
      for _ in range(5):
        next(iterator)
      state = {"w": jax.device_put(jnp.arange(n * 4, dtype=jnp.float32).reshape(n, 4) + step, shardings["w"]),
               "b": {"x": jax.device_put(jnp.full((5,), step, jnp.int32), shardings["b"]["x"])}}
      mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              data=grain.checkpoint.CheckpointSave(iterator)))
    mngr.wait_until_finished()
    assert mngr.all_steps() == [1, 2]
  expected_next = next(iterator)

  assert gcs.list("run/checkpoints/0/") == []  # garbage-collected (max_to_keep=2)
  names = gcs.list("run/checkpoints/")
  for step in (1, 2):
    for obj in ("commit_success.txt", "state/commit_success.txt", "data/process_0-of-1.json", "state/_METADATA",
                "state/manifest.ocdbt"):
      assert f"run/checkpoints/{step}/{obj}" in names
  assert any(x.startswith("run/checkpoints/2/state/ocdbt.process_0/d/") for x in names)  # the array data
  assert [p.name for p in epath.Path(directory).iterdir()] == ["1", "2"]

  target = {"w": jax.ShapeDtypeStruct((n, 4), jnp.float32, sharding=shardings["w"]),
            "b": {"x": jax.ShapeDtypeStruct((5,), jnp.int32, sharding=shardings["b"]["x"])}}
  restored_iterator = iter(dataset)
  with ocp.CheckpointManager(directory, item_names=("state", "data")) as mngr:  # a fresh manager lists the bucket
    assert mngr.latest_step() == 2
    restored = mngr.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                       data=grain.checkpoint.CheckpointRestore(restored_iterator)))
  np.testing.assert_array_equal(restored.state["w"], np.arange(n * 4, dtype=np.float32).reshape(n, 4) + 2)
  np.testing.assert_array_equal(restored.state["b"]["x"], np.full((5,), 2, np.int32))
  assert restored.state["w"].sharding == shardings["w"] and restored.state["b"]["x"].sharding == shardings["b"]["x"]
  assert next(restored_iterator) == expected_next == 2 * 15
  _no_local_gs(tmp_path)


def test_conditional_writes_like_gcs(gcs):
  """google-cloud-storage reaches the emulator anonymously, and ifGenerationMatch is honoured (tensorstore's OCDBT
  manifest and tensorboardX's uploads rely on it)."""
  from google.api_core.exceptions import PreconditionFailed
  from google.cloud import storage
  blob = storage.Client().bucket(BUCKET).blob("cond/x")
  blob.upload_from_string(b"1", if_generation_match=0)
  with pytest.raises(PreconditionFailed):
    blob.upload_from_string(b"2", if_generation_match=0)
  blob.upload_from_string(b"3", if_generation_match=blob.generation)
  assert gcs.read("cond/x") == b"3"
  with pytest.raises(PreconditionFailed):
    blob.delete(if_generation_match=int(blob.generation) + 1)
  blob.delete(if_generation_match=blob.generation)
  assert gcs.list("cond/") == []


def test_reads_carry_the_generation_like_gcs(gcs):
  """Object data comes with its generation in x-goog-generation, and GETs honour ifGenerationNotMatch (304) and
  ifGenerationMatch (412). tensorstore takes a read's generation from that header: without it the generation is 0,
  and OCDBT's next conditional read of its manifest (a second writer, or orbax's later saves) fails with
  'Malformed StorageGeneration'."""
  import urllib.error
  import urllib.request

  import tensorstore as ts
  from google.cloud import storage

  blob = storage.Client().bucket(BUCKET).blob("gen/x")
  blob.upload_from_string(b"abcd")
  gen = int(blob.generation)
  opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

  def get(query, **headers):
    req = urllib.request.Request(f"{gcs.url}/storage/v1/b/{BUCKET}/o/gen%2Fx?{query}", headers=headers)
    try:
      with opener.open(req, timeout=10) as r:
        return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
      return e.code, e.headers, e.read()

  meta = json.loads(get("alt=json")[2])
  status, headers, body = get("alt=media")
  assert (status, body) == (200, b"abcd")
  assert (headers["x-goog-generation"], headers["x-goog-metageneration"]) == (str(gen), meta["metageneration"])
  status, headers, body = get("alt=media", Range="bytes=1-2")
  assert (status, body, headers["x-goog-generation"]) == (206, b"bc", str(gen))
  assert get(f"alt=media&ifGenerationNotMatch={gen}")[::2] == (304, b"")
  assert get(f"ifGenerationNotMatch={gen}")[::2] == (304, b"")  # metadata (alt=json) too
  assert get(f"alt=media&ifGenerationNotMatch={gen + 1}")[::2] == (200, b"abcd")
  assert get(f"alt=media&ifGenerationMatch={gen + 1}")[0] == 412
  assert get(f"alt=media&ifGenerationMatch={gen}")[::2] == (200, b"abcd")
  assert json.loads(get(f"ifGenerationMatch={gen}")[2])["generation"] == str(gen)

  spec = {"driver": "ocdbt", "base": f"gs://{BUCKET}/gen/db/"}
  ts.KvStore.open(spec).result().write("a", b"1").result()
  other = ts.KvStore.open(spec).result()  # a fresh cache: reads the manifest with a plain GET, then conditionally
  assert other.read("a").result().value == b"1"
  other.write("b", b"2").result()
  assert other.read("b").result().value == b"2" and ts.KvStore.open(spec).result().list().result() == [b"a", b"b"]


# What the main job writes into a gs:// workdir, in a subprocess that gets only the environment.
_JOB = textwrap.dedent("""
  import io, json, sys
  import jax, jax.numpy as jnp, numpy as np
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import orbax.checkpoint as ocp
  import safetensors.numpy
  from etils import epath
  from tensorboardX import SummaryWriter

  workdir = epath.Path(sys.argv[1])
  writer = SummaryWriter(str(workdir / "tensorboard"))  # tensorboardX's own gs:// writer (google-cloud-storage)
  rows = []
  for step in range(3):
    rows.append({"step": step, "loss": 1.0 / (step + 1)})
    writer.add_scalar("loss", rows[-1]["loss"], step)
    writer.flush()
    # GCS has no append (gcsfs's open("a") overwrites): the JSONL is rewritten whole.
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
  writer.close()

  fig, ax = plt.subplots()
  ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
  with (workdir / "curves.png").open("wb") as f:
    fig.savefig(f, format="png")
  (workdir / "eval" / "coco_val.json").write_text(json.dumps({"CIDEr": 1.5}))
  (workdir / "eval" / "coco_val_predictions.jsonl").write_text(json.dumps({"image_id": 1, "caption": "a cat"}) + "\\n")
  hf = workdir / "hf_export"
  hf.mkdir(parents=True, exist_ok=True)
  (hf / "model.safetensors").write_bytes(safetensors.numpy.save({"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
                                                                   metadata={"format": "pt"}))
  (hf / "config.json").write_text(json.dumps({"model_type": "instructblip"}))

  with ocp.CheckpointManager(str(workdir / "checkpoints"), item_names=("state",),
                             options=ocp.CheckpointManagerOptions(create=True)) as mngr:
    mngr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": jnp.ones((2, 2)) * 7})))
  print("done")
""")


def test_main_job_outputs_from_a_subprocess(gcs, tmp_path):
  import orbax.checkpoint as ocp
  import safetensors.numpy
  from etils import epath

  (tmp_path / "job.py").write_text(_JOB)
  workdir = f"gs://{BUCKET}/job"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # os.environ holds the emulator's variables (gcs_emulator exports)
  out = subprocess.run([sys.executable, str(tmp_path / "job.py"), workdir], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=100)
  assert out.returncode == 0 and out.stdout.strip().endswith("done"), out.stderr[-4000:] + gcs.log_tail()

  names = gcs.list("job/")
  events = [x for x in names if x.startswith("job/tensorboard/events.out.tfevents.")]
  assert len(events) == 1, names
  scalars = [(e.step, v.tag, v.simple_value) for e in _read_events(gcs.read(events[0])) for v in e.summary.value]
  assert scalars == [(0, "loss", 1.0), (1, "loss", 0.5), (2, "loss", pytest.approx(1 / 3))]

  job = epath.Path(workdir)
  rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [0, 1, 2]
  assert (job / "curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
  assert json.loads((job / "eval" / "coco_val.json").read_text()) == {"CIDEr": 1.5}
  assert json.loads((job / "eval" / "coco_val_predictions.jsonl").read_text())["caption"] == "a cat"
  weights = safetensors.numpy.load((job / "hf_export" / "model.safetensors").read_bytes())
  np.testing.assert_array_equal(weights["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
  assert json.loads((job / "hf_export" / "config.json").read_text()) == {"model_type": "instructblip"}

  with ocp.CheckpointManager(f"{workdir}/checkpoints", item_names=("state",)) as mngr:
    assert mngr.all_steps() == [7]
    restored = mngr.restore(7, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  np.testing.assert_array_equal(restored.state["w"], np.full((2, 2), 7.0))
  _no_local_gs(tmp_path)
