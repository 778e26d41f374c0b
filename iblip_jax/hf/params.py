"""Parameters <-> tensors: a parameter tree filled from a checkpoint straight into its shardings (each process reads
only the regions its devices hold, once), after checking every name and shape; and a tree written back as
safetensors shards that transformers loads.
"""
import dataclasses
import functools
import json
import math
import mmap
import os

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from iblip_jax import distributed
from iblip_jax.errors import CheckpointError
from iblip_jax.hf.config import config_to_hf
from iblip_jax.hf.names import (CONFIG_NAME, IGNORED, INDEX_NAME, QFORMER_TEXT, WEIGHTS_NAME, flat, hf_names,
                                hf_tensors, leaf_mapping, unflat)
from iblip_jax.hf.prefault import Prefault
from iblip_jax.hf.safetensors import SafetensorsReader, write
from iblip_jax.models.configs import InstructBlipConfig


def check_params(params_shape, reader: SafetensorsReader, *, instruction_aware: bool = True) -> None:
  """Every parameter's tensors exist with the layout its shape implies, and nothing unknown is left over; all
  missing, unexpected and mis-shaped keys are reported together, before anything is read."""
  present = set(reader.keys())
  missing, bad_shapes, used = [], [], set()
  for path, leaf in flat(params_shape).items():
    m = leaf_mapping(path, len(leaf.shape))
    names = hf_names(m, leaf.shape)
    core_shape = leaf.shape[1:] if "{i}" in m.hf_name else leaf.shape
    expected = m.to_hf(np.empty(core_shape, dtype=np.uint8)).shape  # the layout the HF tensor must have
    missing += [n for n in names if n not in present]
    used.update(n for n in names if n in present)  # so that a partly missing stack is not also "unexpected"
    bad_shapes += [f"{n}: {reader.shape(n)}, expected {expected} (for {'/'.join(path)})"
                   for n in names if n in present and reader.shape(n) != expected]
  unexpected = sorted(k for k in present - used if not IGNORED.fullmatch(k)
                      and not (not instruction_aware and QFORMER_TEXT.match(k)))
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
  if unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
  if bad_shapes:
    problems.append("shape mismatches with config.json:\n    " + "\n    ".join(bad_shapes))
  if problems:
    raise CheckpointError(f"{reader.directory}: checkpoint does not match its config:\n  " + "\n  ".join(problems))


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
  return tuple(slice(*s.indices(d)[:2]) for s, d in zip(index, shape))


def _hf_sharding(sharding, perm: tuple[int, ...] | None):
  """The sharding of the HF-layout array whose transpose(perm) is laid out as `sharding`: HF axis perm[j] is split
  like our axis j, so each device can transpose its own block without talking to the others."""
  if perm is None or not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  spec = tuple(sharding.spec) + (None,) * (len(perm) - len(sharding.spec))
  hf = [None] * len(perm)
  for j, a in enumerate(perm):
    hf[a] = spec[j]
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*hf))


@functools.lru_cache(maxsize=None)
def _converter(perm: tuple[int, ...] | None, dtype: np.dtype, sharding):
  """HF layout and stored dtype -> ours, on the devices: numpy's strided transpose of a (out, in) kernel runs at
  ~0.25 GB/s on a CPU host, the compiled one at several GB/s (and on TPU it costs nothing)."""
  return jax.jit(lambda x: (x if perm is None else x.transpose(perm)).astype(dtype), out_shardings=sharding)


PREFAULT_AHEAD = 64 * 2**20     # bytes of the next parameter's buffers faulted in while one is read (0 did as well)
ALIGN = 64                      # a CPU device takes a host buffer this aligned as it is, without a copy


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  """An uninitialised C-contiguous array on a page boundary (so on an ALIGN-byte one: jax.device_put onto a CPU
  device then adopts the buffer instead of copying it; on an accelerator it is copied to the device either way).
  Its own anonymous mapping, without the transparent-huge-page advice numpy gives its large arrays: where the kernel
  compacts memory for advised regions (THP "madvise", the common default) that advice made the first touch of
  fresh memory 1.5-4x slower on the benchmark VM (BENCHMARKS.md), and a load touches every byte once."""
  nbytes = math.prod(shape) * np.dtype(dtype).itemsize
  if nbytes == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)
  pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
  return np.frombuffer(pages, dtype).reshape(shape)


@dataclasses.dataclass
class _Plan:
  """Where one parameter comes from and goes: its HF tensors and layout, and the distinct blocks (HF layout) this
  process's devices hold, each with the devices that hold it."""
  names: list[str]
  stacked: bool
  perm: tuple[int, ...] | None
  hf_shape: tuple[int, ...]
  hf_sharding: jax.sharding.Sharding
  sharding: jax.sharding.Sharding                  # ours
  blocks: dict[tuple[tuple[int, int], ...], list]   # ((start, stop) per HF dimension) -> devices
  nbytes: int


def _plan(reader, path: tuple[str, ...], leaf, sharding) -> _Plan:
  m = leaf_mapping(path, len(leaf.shape))
  names = hf_names(m, leaf.shape)
  stacked = "{i}" in m.hf_name
  perm = None if m.perm is None else ((0,) + tuple(p + 1 for p in m.perm) if stacked else m.perm)
  hf_shape = leaf.shape if perm is None else tuple(leaf.shape[perm.index(a)] for a in range(len(perm)))
  hf_sharding = _hf_sharding(sharding, perm)
  blocks: dict = {}
  for device, index in hf_sharding.addressable_devices_indices_map(hf_shape).items():
    key = tuple((s.start, s.stop) for s in _bounds(index, hf_shape))
    blocks.setdefault(key, []).append(device)
  item = np.dtype(reader.dtype(names[0])).itemsize
  nbytes = sum(math.prod(b - a for a, b in key) * item for key in blocks)
  return _Plan(names, stacked, perm, hf_shape, hf_sharding, sharding, blocks, nbytes)


def _buffers(reader, plan: _Plan) -> dict:
  """{block: empty host array} for this process's distinct blocks of one parameter (HF layout, stored dtype)."""
  dtype = reader.dtype(plan.names[0])
  return {key: _aligned_empty(tuple(b - a for a, b in key), dtype) for key in plan.blocks}


def _reads(plan: _Plan) -> list[tuple[str, list[tuple[tuple[slice, ...], tuple, int | None]]]]:
  """The reads of one parameter, in order: (HF tensor, [(its region, the block it goes to, the layer within that
  block, None if not stacked)]); a stacked parameter's one tensor per layer, each read once."""
  if not plan.stacked:
    return [(plan.names[0], [(tuple(slice(a, b) for a, b in key), key, None) for key in plan.blocks])]
  reads = []
  for i, name in enumerate(plan.names):   # the layer axis comes first
    here = [(tuple(slice(a, b) for a, b in key[1:]), key, i - key[0][0])
            for key in plan.blocks if key[0][0] <= i < key[0][1]]
    if here:
      reads.append((name, here))
  return reads


def _read(reader, plan: _Plan, out: dict) -> dict:
  """Fills `out` ({block: host array}, from _buffers) with this process's distinct blocks of one parameter, each
  read straight into its own buffer (a stacked parameter: layer by layer); a tensor's copies out of a direct read
  overlap the next tensor's read."""
  for name, parts in _reads(plan):
    reader.read_into(name, [(region, out[key] if layer is None else out[key][layer]) for region, key, layer in parts],
                     wait=False)
  reader.flush()
  return out


def _place(plan: _Plan, hosts: dict, dtype) -> jax.Array:
  """The parameter as a global array: each device gets its block (a CPU device adopts the aligned buffer), then
  the devices transpose and cast their own blocks (see _converter)."""
  convert = plan.perm is not None or np.dtype(dtype) != hosts[next(iter(hosts))].dtype
  arrays = []
  for key, devices in plan.blocks.items():
    for n, device in enumerate(devices):
      # A block several devices hold is shared only when a conversion copies it next: a kept, shared buffer
      # would let a donated update on one device write into another's parameter.
      host = hosts[key] if n == 0 or convert else _copy(hosts[key])
      arrays.append(jax.device_put(host, device))
  array = jax.make_array_from_single_device_arrays(plan.hf_shape, plan.hf_sharding, arrays)
  if not convert:
    return array
  return _converter(plan.perm, np.dtype(dtype), plan.sharding)(array)


def _load_leaf_by_leaf(reader, plans, prefault: Prefault, bar, on_leaf) -> dict:
  """One parameter after another, each turned by on_leaf (if any) as soon as it is placed: one parameter's read
  form held at a time (its buffers, and the first PREFAULT_AHEAD bytes of the next one's, faulted in ahead).

  Reading the files in their own order instead (every buffer made first, each parameter placed once its last layer
  is in) was tried: the direct reads alone take 4.8-5.3 s in this order against 3.8 s for 16 MiB reads straight
  through the files, but the load did not gain, as its reads slow beside the copies either way (6.1-7.9 s against
  5.7-7.1 s; BENCHMARKS.md); and it would hold every quantised tower whole."""
  reader.read_ahead([(name, [region for region, _, _ in parts]) for _, _, plan in plans for name, parts in _reads(plan)])
  out = {}
  upcoming = _buffers(reader, plans[0][2]) if plans else {}
  for k, (path, leaf, plan) in enumerate(plans):
    hosts = upcoming
    prefault.ahead(list(hosts.values()))   # what was faulted in ahead already costs nothing here
    if k + 1 < len(plans):
      upcoming = _buffers(reader, plans[k + 1][2])
      prefault.ahead(list(upcoming.values()), PREFAULT_AHEAD)
    value = _place(plan, _read(reader, plan, hosts), leaf.dtype)
    del hosts
    out.update(on_leaf(path, value) if on_leaf is not None else {path: value})
    bar.update(plan.nbytes)
  return out


def _copy(host: np.ndarray) -> np.ndarray:
  out = _aligned_empty(host.shape, host.dtype)
  out[...] = host
  return out


def load_params(params_shape, reader: SafetensorsReader, *, shardings=None, instruction_aware: bool = True,
                progress: bool = False, on_leaf=None) -> dict:
  """Fills a params shape tree (from jax.eval_shape) with global arrays read through `reader`.

  `shardings` (a matching tree of jax.sharding.Sharding) places every parameter straight into its devices: a
  process reads only what its devices hold and nothing passes through one device whole. Without it, everything
  goes to this process's first device. Tensors are cast to the tree's dtypes as they are read (the frozen towers
  to bfloat16 on TPU, say); everything is checked (check_params) before the first byte is read. `on_leaf(path,
  array)`, when given, turns each leaf as it is read into the leaves to keep ({path: array}; quantisation), so that
  no more than one leaf is ever held in its read form.
  """
  check_params(params_shape, reader, instruction_aware=instruction_aware)
  flat_shape = flat(params_shape)
  if shardings is None:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    flat_sh = {path: one for path in flat_shape}
  else:
    flat_sh = flat(shardings)
  plans = [(path, leaf, _plan(reader, path, leaf, flat_sh[path])) for path, leaf in flat_shape.items()]
  total = sum(plan.nbytes for _, _, plan in plans)   # what this process reads
  # A real-size checkpoint takes minutes: show bytes read and an ETA (process 0, on a terminal or a log).
  bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {os.path.basename(reader.directory)}",
             disable=not progress or jax.process_index() != 0, dynamic_ncols=True, mininterval=2.0)
  # The disk's reads run ahead of the loop, in its order, on the reader's own thread (hf/direct_io.py); the buffers
  # they land in are faulted in on another (hf/prefault.py). No read-ahead hints for buffered reads:
  # posix_fadvise(WILLNEED) waits while it queues the reads, and with it the load took 18 s against 15 s without
  # (BENCHMARKS.md); each scattered preadv reads in file order, which the kernel's own read-ahead follows.
  prefault = Prefault()
  try:
    with bar:
      out = _load_leaf_by_leaf(reader, plans, prefault, bar, on_leaf)
  finally:
    prefault.close()
  return unflat(out)


def save_hf(cfg: InstructBlipConfig, params, out_dir: str, *, max_shard_bytes: int = 4 * 2**30) -> None:
  """Writes config.json and model.safetensors (sharded with an index above max_shard_bytes) to `out_dir`, a local
  path or gs://. Parameters may be global arrays spread over several processes: every process must call this
  (each parameter is gathered in turn); process 0 writes, holding at most one shard in host memory."""
  from jax.experimental import multihost_utils
  leaves = flat(params)
  writer = jax.process_index() == 0
  # The plan from shapes alone: which shard each parameter's tensors go to (a stack stays in one shard).
  plan, size = [[]], 0
  for path, value in leaves.items():
    nbytes = int(np.prod(value.shape)) * np.dtype(value.dtype).itemsize
    if plan[-1] and size + nbytes > max_shard_bytes:
      plan.append([])
      size = 0
    plan[-1].append(path)
    size += nbytes
  out = epath.Path(out_dir)
  if writer:
    out.mkdir(parents=True, exist_ok=True)
  names = [WEIGHTS_NAME] if len(plan) == 1 else [f"model-{n:05d}-of-{len(plan):05d}.safetensors"
                                                 for n in range(1, len(plan) + 1)]
  meta = {"format": "pt"}  # transformers refuses safetensors files without this tag
  weight_map, total = {}, 0
  for name, paths in zip(names, plan):
    shard = {}
    for path in paths:
      value = distributed.gather(leaves[path])
      if writer:
        shard.update(hf_tensors(path, value))
      del value
    if writer:
      write(out / name, sorted(shard.items()), metadata=meta)
      weight_map.update({k: name for k in shard})
      total += sum(a.nbytes for a in shard.values())
    del shard
  if writer:
    if len(names) > 1:
      index = {"metadata": {"total_size": total}, "weight_map": weight_map}
      (out / INDEX_NAME).write_text(json.dumps(index, indent=2))
    (out / CONFIG_NAME).write_text(json.dumps(config_to_hf(cfg), indent=2))
  if jax.process_count() > 1:  # the directory is complete when any process returns
    multihost_utils.sync_global_devices("iblip_jax_save_hf")
