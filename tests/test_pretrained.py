"""Loading released-format weights straight into a device mesh, and the config that comes with them."""
import math
import threading

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import iblip_jax
import oracle
import train_helper
from iblip_jax import hf, sharding
from iblip_jax.hf import (direct_io, names as hf_names, params as hf_params, prefault,
                          safetensors as hf_safetensors)
from iblip_jax.models.instructblip import params_shape

RULES = [tuple(r) for r in train_helper.load_config("tiny").sharding_rules]


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
  """A tiny checkpoint written by transformers in several safetensors files (an index, as the released ones)."""
  path = tmp_path_factory.mktemp("ckpt") / "hf"
  oracle.tiny_hf_model(untie_head=True, tie=False).save_pretrained(path, max_shard_size="60KB")
  return path


def test_mesh_load_equals_one_device_and_each_device_holds_its_shard(sharded_dir):
  assert (sharded_dir / hf_names.INDEX_NAME).exists()
  _, single = iblip_jax.from_pretrained(str(sharded_dir))
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  _, meshed = iblip_jax.from_pretrained(str(sharded_dir), mesh=mesh, rules=RULES)
  flat_single = jax.tree_util.tree_leaves_with_path(single)
  flat_mesh = jax.tree_util.tree_leaves_with_path(meshed)
  split = 0
  for (path, a), (_, b) in zip(flat_single, flat_mesh, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    assert len(b.sharding.device_set) == 8
    for shard in b.addressable_shards:  # each device holds exactly its slice, nothing more
      assert shard.data.shape == b.sharding.shard_shape(b.shape)
      np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(a)[shard.index])
    split += not b.sharding.is_fully_replicated
    if b.sharding.is_fully_replicated:   # a block several devices hold is never one buffer they share
      pointers = {s.data.unsafe_buffer_pointer() for s in b.addressable_shards}
      assert len(pointers) == len(b.addressable_shards), jax.tree_util.keystr(path)
  assert split > 20   # the big matrices really are split (the logical rules apply)
  weight = meshed["language_model"]["encoder"]["layers"]["mlp"]["wi_0"]["weight"]   # (layers, out, in)
  assert weight.sharding.shard_shape(weight.shape) == (2, 37, 32 // 4)   # layers, mlp (37: odd), embed / fsdp


def test_every_tensor_byte_is_read_once(sharded_dir, monkeypatch):
  readers = []
  original = hf_safetensors.SafetensorsReader.__init__

  def spy(self, directory):
    original(self, directory)
    readers.append(self)
  monkeypatch.setattr(hf_safetensors.SafetensorsReader, "__init__", spy)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  iblip_jax.from_pretrained(str(sharded_dir), mesh=mesh, rules=RULES)
  loader = readers[-1]   # the one that read the weights (load_config's only reads headers)
  want = sum(loader.nbytes(k) for k in loader.keys())
  assert loader.bytes_read == want


def test_bfloat16_checkpoint_is_cast_while_loading(tmp_path, sharded_dir):
  """A bf16 checkpoint (as the released ones are) loads into bf16 frozen towers and an f32 trainable side."""
  hf = oracle.tiny_hf_model(untie_head=True, tie=False)
  hf.to(dtype=__import__("torch").bfloat16).save_pretrained(tmp_path / "bf16")
  model, params = iblip_jax.from_pretrained(str(tmp_path / "bf16"), dtype=jnp.bfloat16)
  assert params["vision"]["layers"]["fc1"]["weight"].dtype == jnp.bfloat16
  assert params["language_model"]["shared"]["embedding"].dtype == jnp.bfloat16
  # a frozen tower's weight is kept (out, in), as the checkpoint holds it
  np.testing.assert_array_equal(np.asarray(params["vision"]["layers"]["fc1"]["weight"][1], np.float32),
                                hf.state_dict()["vision_model.encoder.layers.1.mlp.fc1.weight"].float().numpy())
  q = params["qformer"]["layer_0"]["attention"]["query"]["kernel"]
  assert q.dtype == jnp.float32
  want = hf.state_dict()["qformer.encoder.layer.0.attention.attention.query.weight"].float().numpy().T
  np.testing.assert_array_equal(np.asarray(q), want)   # bf16 -> f32 is exact


def test_region_reads_equal_numpy_slices(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {"a": rng.standard_normal((7, 5, 3)).astype(np.float32),
             "b": rng.standard_normal((4, 6)).astype(ml_dtypes.bfloat16), "s": np.array(3, np.int64)}
  hf_safetensors.write(tmp_path / "x.safetensors", list(tensors.items()), metadata={"format": "pt"})
  f = hf_safetensors.File(str(tmp_path / "x.safetensors"))
  assert f.metadata == {"format": "pt"}
  for region in [(slice(2, 5), slice(0, 5), slice(0, 3)), (slice(0, 7), slice(1, 4), slice(2, 3)),
                 (slice(6, 7), slice(0, 1), slice(0, 3))]:
    got, n = f.read("a", region)
    np.testing.assert_array_equal(got, tensors["a"][region])
    assert n == (region[0].stop - region[0].start) * 5 * 3 * 4   # whole rows, nothing twice
  old = hf_safetensors.CHUNK_BYTES
  try:
    hf_safetensors.CHUNK_BYTES = 24   # two rows per chunk: the chunked path
    got, _ = f.read("b", (slice(1, 4), slice(2, 5)))
  finally:
    hf_safetensors.CHUNK_BYTES = old
  np.testing.assert_array_equal(got, tensors["b"][1:4, 2:5])
  np.testing.assert_array_equal(f.read("s")[0], tensors["s"])


def _grid(shape, splits):
  """The blocks of a tensor cut into splits[d] equal parts along each dimension d (a device mesh's blocks)."""
  import itertools
  cuts = [[slice(i * n // k, (i + 1) * n // k) for i in range(k)] for n, k in zip(shape, splits)]
  return list(itertools.product(*cuts))


@pytest.mark.parametrize("direct", [True, False], ids=["libc_preadv", "os_preadv"])
def test_scattered_reads_fill_each_block_once(tmp_path, monkeypatch, direct):
  """File.read_into against numpy slicing: blocks of every kind of split (rows, columns, both, inner dimensions)
  land in their own arrays, each byte of the file is read once, and a short read is resumed where it stopped."""
  if not direct:
    monkeypatch.setattr(hf_safetensors, "_PREADV", None)
  rng = np.random.default_rng(1)
  tensors = {"a": rng.standard_normal((6, 8, 5)).astype(np.float32),
             "b": rng.standard_normal((9, 12)).astype(ml_dtypes.bfloat16), "s": np.array(7, np.int64)}
  hf_safetensors.write(tmp_path / "x.safetensors", list(tensors.items()))
  f = hf_safetensors.File(str(tmp_path / "x.safetensors"))
  for name, splits in [("a", (2, 1, 1)), ("a", (1, 4, 1)), ("a", (3, 2, 5)), ("a", (1, 1, 5)), ("b", (1, 4)),
                       ("b", (3, 3)), ("b", (1, 1)), ("s", ())]:
    blocks = [(r, np.empty(tuple(s.stop - s.start for s in r), tensors[name].dtype))
              for r in _grid(tensors[name].shape, splits)]
    n = f.read_into(name, blocks)
    assert n == tensors[name].nbytes, (name, splits)
    for region, dest in blocks:
      np.testing.assert_array_equal(dest, tensors[name][region], err_msg=f"{name} {splits} {region}")
  assert f.read_into("a", [((slice(2, 2), slice(0, 8), slice(0, 5)), np.empty((0, 8, 5), np.float32))]) == 0
  with pytest.raises(ValueError, match="overlapping"):
    f.read_into("b", [((slice(0, 5), slice(0, 12)), np.empty((5, 12), ml_dtypes.bfloat16)),
                      ((slice(4, 9), slice(0, 12)), np.empty((5, 12), ml_dtypes.bfloat16))])
  if direct:   # a read that stops short (as Linux's do past 2 GiB) is resumed in the middle of a destination
    real = hf_safetensors._PREADV

    def short(fd, iov, count, offset):
      return min(real(fd, iov, 1, offset), 7)   # fills (some of) the first destination, says 7 bytes came
    monkeypatch.setattr(hf_safetensors, "_PREADV", short)
    blocks = [(r, np.empty(tuple(s.stop - s.start for s in r), np.float32)) for r in _grid((6, 8, 5), (1, 2, 1))]
    assert f.read_into("a", blocks) == tensors["a"].nbytes
    for region, dest in blocks:
      np.testing.assert_array_equal(dest, tensors["a"][region])


def _direct_file(path, monkeypatch, capacity: int):
  """File(path) reading around the page cache through a ring of small slots, its direct reads counted."""
  f = hf_safetensors.File(str(path), direct=True, ring=direct_io.Ring(capacity))
  if f._direct is None:
    pytest.skip(f"{path.parent}: this filesystem does not take O_DIRECT reads")
  reads = []
  real = direct_io.DirectFile.read_at
  monkeypatch.setattr(direct_io.DirectFile, "read_at", lambda self, b, o, n: reads.append(n) or real(self, b, o, n))
  return f, reads


def test_direct_reads_equal_numpy_slices(tmp_path, monkeypatch):
  """Reads around the page cache (O_DIRECT: whole pages into a ring's slot, each block's bytes copied out) give
  the blocks numpy slicing gives, with the data at offsets that are not page- or even 64-byte-aligned (the header's
  length shifts it), slots smaller than the tensor (several reads), and each block's bytes counted once."""
  rng = np.random.default_rng(2)
  tensors = {"pad": np.arange(5, dtype=np.uint8),   # the data that follows starts 5 bytes off any alignment
             "a": rng.standard_normal((6, 8, 5)).astype(np.float32),
             "b": rng.standard_normal((90, 12)).astype(ml_dtypes.bfloat16), "v": rng.standard_normal(13).astype(
                 np.float32), "s": np.array(7, np.int64)}
  hf_safetensors.write(tmp_path / "x.safetensors", list(tensors.items()))
  f, reads = _direct_file(tmp_path / "x.safetensors", monkeypatch, capacity=1024)
  assert f.data_start % 64 != 0 or f.tensors["a"].begin % 64 != 0
  for name, splits in [("a", (2, 1, 1)), ("a", (1, 4, 1)), ("a", (3, 2, 1)), ("b", (1, 4)), ("b", (3, 3)),
                       ("b", (1, 1)), ("v", (2,)), ("s", ())]:
    blocks = [(r, np.empty(tuple(s.stop - s.start for s in r), tensors[name].dtype))
              for r in _grid(tensors[name].shape, splits)]
    reads.clear()
    assert f.read_into(name, blocks) == tensors[name].nbytes, (name, splits)
    assert reads, (name, splits)   # it did go around the page cache
    for region, dest in blocks:
      np.testing.assert_array_equal(dest, tensors[name][region], err_msg=f"{name} {splits} {region}")
  assert len(reads) == 1
  reads.clear()
  whole = np.empty((90, 12), ml_dtypes.bfloat16)
  f.read_into("b", [(None, whole)])
  np.testing.assert_array_equal(whole, tensors["b"])
  assert len(reads) == 3 and max(reads) <= 1024   # 2160 bytes through a 1 KiB buffer, whole rows at a time


def test_direct_reads_fall_back_where_they_do_not_pay_or_are_refused(tmp_path, monkeypatch):
  rng = np.random.default_rng(3)
  tensors = {"a": rng.standard_normal((6, 8, 5)).astype(np.float32),
             "b": rng.standard_normal((40, 12)).astype(np.float32)}
  hf_safetensors.write(tmp_path / "x.safetensors", list(tensors.items()))
  f, reads = _direct_file(tmp_path / "x.safetensors", monkeypatch, capacity=4096)
  cases = [("b", [(slice(0, 40), slice(0, 3))]),                  # a quarter of the rows' bytes: another host's rest
           ("a", [(slice(0, 6), slice(0, 8), slice(0, 2))]),     # cut below the second axis
           ("b", [(slice(0, 40), slice(0, 12))])]                # fine, but the filesystem refuses (below)
  for k, (name, regions) in enumerate(cases):
    if k == 2:
      monkeypatch.setattr(direct_io.DirectFile, "read_at", lambda *a: (_ for _ in ()).throw(OSError(22, "EINVAL")))
    blocks = [(tuple(r), np.empty(tuple(s.stop - s.start for s in r), tensors[name].dtype)) for r in regions]
    f.read_into(name, blocks)
    for region, dest in blocks:
      np.testing.assert_array_equal(dest, tensors[name][region])
  assert reads == []
  assert f._direct is None   # refused once: buffered reads from then on


def test_ring_reads_ahead_in_order_and_recovers_from_a_broken_order(tmp_path, monkeypatch):
  """The ring's reader thread does the scheduled reads ahead; each take() gets exactly the bytes it asks for, also
  out of the schedule's order (done there and then, the rest of the schedule dropped without a hang); copies out of
  a slot through the copy threads land before wait() returns."""
  data = np.random.default_rng(4).integers(0, 256, 300_000, dtype=np.uint8)
  (tmp_path / "f").write_bytes(data.tobytes())
  direct = direct_io.DirectFile.open(str(tmp_path / "f"), force=True)
  if direct is None:
    pytest.skip("this filesystem does not take O_DIRECT reads")
  threads = []
  real = direct_io.DirectFile.read_at
  monkeypatch.setattr(direct_io.DirectFile, "read_at",
                      lambda self, *a: threads.append(threading.current_thread().name) or real(self, *a))
  monkeypatch.setattr(direct_io, "SMALL_COPY", 0)   # every copy through the copy threads
  ring = direct_io.Ring(64 * 1024, slots=2)
  requests = [(direct, 5 + 40_000 * k, 30_000 + 7 * k) for k in range(6)]
  ring.schedule(requests)
  dests = []
  for k in [0, 1, 2, 5, 3]:   # 5 out of order: read there and then, and 3, 4 no longer ahead
    _, offset, length = requests[k]
    view, slot = ring.take(direct, offset, length)
    dests.append((np.empty(length, np.uint8), offset))
    ring.copy(slot, dests[-1][0], view)
    ring.release(slot)
  ring.wait()
  for dest, offset in dests:
    np.testing.assert_array_equal(dest, data[offset:offset + len(dest)])
  assert threads[:3] == ["iblip-read-ahead"] * 3 and threads[-2:] == ["MainThread"] * 2
  ring.release_all()
  direct.close()


def test_loading_around_the_page_cache_equals_the_buffered_load(sharded_dir, monkeypatch):
  """The direct path as a real load runs it: read ahead on the ring's thread, through slots smaller than some
  tensors, the copies on the copy threads; the same parameters as buffered reads."""
  monkeypatch.setattr(direct_io, "SMALL_COPY", 0)
  monkeypatch.setattr(direct_io, "SLOT_BYTES", 8192)
  ahead = []
  real = direct_io.DirectFile.read_at
  monkeypatch.setattr(direct_io.DirectFile, "read_at",
                      lambda self, *a: ahead.append(threading.current_thread().name == "iblip-read-ahead") or real(
                          self, *a))
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  model = iblip_jax.InstructBlip(hf.load_config(str(sharded_dir)))
  shardings = sharding.logical_shardings(params_shape(model, boxed=True), mesh, RULES)
  loaded = {}
  for direct in (True, False):
    reader = hf_safetensors.SafetensorsReader(str(sharded_dir), direct=direct)
    if direct and all(f._direct is None for f in reader._files.values()):
      pytest.skip("this filesystem does not take O_DIRECT reads")
    loaded[direct] = hf_params.load_params(params_shape(model), reader, shardings=shardings)
    assert reader.bytes_read == sum(reader.nbytes(k) for k in reader.keys())
    reader.close()
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(loaded[True]),
                               jax.tree_util.tree_leaves_with_path(loaded[False]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
  assert len(ahead) > 100 and all(ahead)   # every direct read was done ahead, on the ring's thread


def _resident_pages(array: np.ndarray) -> np.ndarray:
  """Which of the array's pages are in memory (the kernel's mincore, on an anonymous mapping)."""
  import ctypes
  import mmap
  libc = ctypes.CDLL(None, use_errno=True)
  libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
  pages = -(-array.nbytes // mmap.PAGESIZE)
  vec = ctypes.create_string_buffer(pages)
  assert libc.mincore(array.ctypes.data, array.nbytes, vec) == 0
  return np.frombuffer(vec.raw, np.uint8) & 1


def test_prefault_faults_in_the_requested_bytes_and_no_more():
  import mmap
  madvise = prefault._madvise()
  probe = hf_params._aligned_empty((mmap.PAGESIZE,), np.uint8)
  if madvise is None or madvise(probe.ctypes.data, probe.nbytes, prefault.MADV_POPULATE_WRITE) != 0:
    pytest.skip("no MADV_POPULATE_WRITE here (Linux >= 5.14)")
  buffers = [hf_params._aligned_empty((4 * 2**20,), np.uint8), hf_params._aligned_empty((6 * 2**20,), np.uint8)]
  assert all(_resident_pages(b).sum() == 0 for b in buffers)   # fresh mappings: nothing touched yet
  faults = prefault.Prefault()
  faults.ahead(buffers, 5 * 2**20)   # all of the first, 1 MiB of the second
  faults.close()
  assert _resident_pages(buffers[0]).all()
  second, mib = _resident_pages(buffers[1]), 2**20 // mmap.PAGESIZE
  assert second[:mib].all() and not second[mib:].any()
  assert not buffers[0].any()   # faulting in writes nothing


def test_a_truncated_shard_names_the_file(tmp_path, sharded_dir):
  import shutil
  d = tmp_path / "d"
  shutil.copytree(sharded_dir, d)
  victim = sorted(p for p in d.iterdir() if p.suffix == ".safetensors")[1]
  data = victim.read_bytes()
  victim.write_bytes(data[:len(data) - 100])
  with pytest.raises(iblip_jax.CheckpointError, match=victim.name + ".*truncated"):
    iblip_jax.from_pretrained(str(d))


def test_overrides_apply_settings_and_refuse_contradictions(sharded_dir):
  cfg = hf.load_config(str(sharded_dir), overrides={
      "vision": {"dtype": "bfloat16", "hidden_size": 32}, "text": {"remat": True, "model_type": "t5"},
      "instruction_aware": False})
  assert cfg.vision.dtype == cfg.vision.param_dtype == "bfloat16"   # a frozen tower stores what it computes in
  assert cfg.text.remat and not cfg.instruction_aware and cfg.qformer.dtype == "float32"
  with pytest.raises(iblip_jax.CheckpointError) as e:
    hf.load_config(str(sharded_dir), overrides={"text": {"d_model": 2048, "colour": "red"},
                                                "num_query_tokens": 32})
  msg = str(e.value)
  assert "model.text.d_model=2048 but" in msg and "config.json says 32" in msg
  assert "model.num_query_tokens=32 but" in msg and "says 10" in msg
  assert "model.text.colour: no such field" in msg
  with pytest.raises(iblip_jax.CheckpointError, match="holds a t5 language model"):
    hf.load_config(str(sharded_dir), overrides={"text": {"model_type": "llama"}})


def test_export_from_a_sharded_state_round_trips(tmp_path, sharded_dir):
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  model, params = iblip_jax.from_pretrained(str(sharded_dir), mesh=mesh, rules=RULES)
  hf_params.save_hf(model.config, params, str(tmp_path / "out"), max_shard_bytes=50_000)
  assert len(list((tmp_path / "out").glob("*.safetensors"))) > 2
  _, again = iblip_jax.from_pretrained(str(tmp_path / "out"))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert math.prod(again["query_tokens"].shape) == 10 * 32
