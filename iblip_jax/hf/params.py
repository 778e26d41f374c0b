"""Parameters <-> tensors: a parameter tree filled from a checkpoint straight into its shardings (each process reads
only the regions its devices hold, once), after checking every name and shape; and a tree written back as
safetensors shards that transformers loads.
"""
import functools
import json
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


def _load_leaf(reader: SafetensorsReader, path: tuple[str, ...], leaf, sharding) -> jax.Array:
  """One parameter as a global array in `sharding`. This process reads, in the HF layout and stored dtype, the
  smallest box that covers its devices' blocks (each HF tensor's bytes once), hands each device its block, and the
  devices transpose and cast their own blocks (see _converter)."""
  m = leaf_mapping(path, len(leaf.shape))
  names = hf_names(m, leaf.shape)
  stacked = "{i}" in m.hf_name
  perm = None if m.perm is None else ((0,) + tuple(p + 1 for p in m.perm) if stacked else m.perm)
  hf_shape = leaf.shape if perm is None else tuple(leaf.shape[perm.index(a)] for a in range(len(perm)))
  hf_sharding = _hf_sharding(sharding, perm)
  slices = [_bounds(idx, hf_shape) for idx in hf_sharding.addressable_devices_indices_map(hf_shape).values()]
  box = tuple(slice(min(s[d].start for s in slices), max(s[d].stop for s in slices)) for d in range(len(hf_shape)))
  if stacked:  # one HF tensor per layer; the layer axis comes first
    host = np.empty(tuple(s.stop - s.start for s in box), reader.dtype(names[0]))
    for j, i in enumerate(range(box[0].start, box[0].stop)):
      host[j] = reader.get(names[i], box[1:])
  else:
    host = reader.get(names[0], box or None)

  def local(index):
    index = _bounds(index, hf_shape)
    return host[tuple(slice(i.start - b.start, i.stop - b.start) for i, b in zip(index, box))]
  array = jax.make_array_from_callback(hf_shape, hf_sharding, local)
  if perm is None and array.dtype == leaf.dtype:
    return array
  return _converter(perm, np.dtype(leaf.dtype), sharding)(array)


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
  total = sum(reader.nbytes(k) for k in reader.keys())
  out = {}
  # A real-size checkpoint takes minutes: show bytes read and an ETA (process 0, on a terminal or a log).
  with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {os.path.basename(reader.directory)}",
            disable=not progress or jax.process_index() != 0, dynamic_ncols=True, mininterval=2.0) as bar:
    for path, leaf in flat_shape.items():
      before = reader.bytes_read
      value = _load_leaf(reader, path, leaf, flat_sh[path])
      out.update(on_leaf(path, value) if on_leaf is not None else {path: value})
      bar.update(reader.bytes_read - before)
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
