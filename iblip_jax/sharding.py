"""Device mesh and logical-axis sharding (MaxText/t5x recipe, with jax.jit in/out shardings).

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters sharded over it), `tensor` (heads and
MLP split). Modules name their axes logically ("embed", "mlp", "heads_joined", ...); the config's rule table maps
those names to mesh axes. A dimension that a mesh axis does not divide is left unsharded rather than failing.
"""
import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")


def mesh_shape(sizes: Sequence[int], num_devices: int, what: str = "mesh") -> tuple[int, ...]:
  """Resolves one -1 entry to 'the rest' and checks the product."""
  sizes = list(sizes)
  if sizes.count(-1) > 1:
    raise ValueError(f"{what}: at most one axis may be -1, got {dict(zip(AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"{what}: {dict(zip(AXES, sizes))} cannot cover {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"{what}: {dict(zip(AXES, sizes))} uses {math.prod(sizes)} devices, there are {num_devices}")
  return tuple(sizes)


def mesh_sizes(mesh_config, num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(within-slice sizes, across-slice sizes) of the data/fsdp/tensor axes for `num_devices` devices."""
  dcn = tuple(mesh_config.get(f"dcn_{a}", 1) for a in AXES)
  num_slices = math.prod(dcn)
  if num_slices < 1 or num_devices % num_slices:
    raise ValueError(f"config.mesh: dcn_* sizes {dict(zip(AXES, dcn))} do not divide the {num_devices} devices")
  return mesh_shape([mesh_config.get(a, 1) for a in AXES], num_devices // num_slices, "config.mesh"), dcn


def batch_split(mesh_config, num_devices: int) -> int:
  """Into how many parts a global batch is split (data x fsdp, within and across slices)."""
  ici, dcn = mesh_sizes(mesh_config, num_devices)
  return ici[0] * ici[1] * dcn[0] * dcn[1]


def make_mesh(mesh_config, devices=None) -> Mesh:
  """Mesh from `config.mesh` (data/fsdp/tensor sizes within a slice; dcn_* across slices for multi-slice pods)."""
  devices = jax.devices() if devices is None else devices
  ici, dcn = mesh_sizes(mesh_config, len(devices))
  if math.prod(dcn) > 1:  # slices talk over the data-centre network: keep the chatty axes inside a slice
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide (e.g. a 30523-row vocabulary over 2 devices)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    out.append(axes if names and dim % math.prod(mesh.shape[n] for n in names) == 0 else None)
  return P(*out)


def logical_shardings(boxed_shapes: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of (boxed, logically annotated) shapes, e.g. jax.eval_shape of init or tx.init."""
  specs = nn.get_partition_spec(boxed_shapes)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = nn.meta.unbox(boxed_shapes)
  return jax.tree.map(lambda s, x: NamedSharding(mesh, _fit(s, x.shape, mesh)), mesh_specs, shapes,
                      is_leaf=lambda s: isinstance(s, P))


def check_sharded(shapes: Any, shardings: Any, max_replicated_bytes: int) -> None:
  """Fails when a tensor above `max_replicated_bytes` is fully replicated on a mesh of several devices."""
  bad = []
  for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(shapes)[0], jax.tree.leaves(shardings)):
    nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
    if s.mesh.size > 1 and s.is_fully_replicated and nbytes > max_replicated_bytes:
      bad.append(f"{jax.tree_util.keystr(path, simple=True, separator='/')} {tuple(x.shape)} "
                 f"({nbytes / 2**20:.1f} MiB)")
  if bad:
    raise ValueError(f"{len(bad)} tensors larger than {max_replicated_bytes / 2**20:.1f} MiB would be replicated on "
                     "every device; add a sharding rule for their logical axes (config.sharding_rules) or raise "
                     "config.max_replicated_mb:\n  " + "\n  ".join(bad))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches split their leading dimension over data x fsdp."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_rows(mesh: Mesh, global_size: int) -> tuple[int, int]:
  """The rows [start, stop) of a global batch that this process's devices hold (batch_sharding). The input
  pipeline and the evaluator feed exactly these; they are contiguous on every mesh make_mesh builds."""
  index = batch_sharding(mesh).addressable_devices_indices_map((global_size,))
  rows = sorted({idx[0].indices(global_size)[:2] for idx in index.values()})
  start, stop = rows[0][0], rows[-1][1]
  if sum(b - a for a, b in rows) != stop - start:
    raise ValueError(f"this process's devices hold rows {rows} of the batch, not one contiguous block; use a mesh "
                     "from sharding.make_mesh")
  return start, stop


# Padding values of the batch fields whose width can differ between hosts: label-like fields are ignored at -100,
# everything else is masked by its attention mask, so 0 is as good as the pad id.
IGNORED_FILL = ("labels", "candidate_labels")


def agree_shapes(local_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Pads every field to the largest shape any process has for it, so that all processes build the same global
  batch (each process picks its token buckets from its own rows; without this, two hosts whose rows fall in
  different buckets would compile different programs and wait for each other for ever). One small all-gather
  of the shapes per batch; nothing happens on a single process."""
  if jax.process_count() == 1:
    return local_batch
  from jax.experimental import multihost_utils
  keys = sorted(local_batch)
  ranks = [np.ndim(local_batch[k]) for k in keys]
  mine = np.array([d for k in keys for d in np.shape(local_batch[k])[1:]], np.int32)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1).max(axis=0)
  out, i = {}, 0
  for k, r in zip(keys, ranks):
    want = tuple(int(d) for d in every[i:i + r - 1])
    i += r - 1
    x = np.asarray(local_batch[k])
    pad = [(0, 0)] + [(0, w - d) for w, d in zip(want, x.shape[1:])]
    out[k] = np.pad(x, pad, constant_values=-100 if k in IGNORED_FILL else 0) if any(p[1] for p in pad) else x
  return out


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Process-local rows -> global arrays sharded over data x fsdp (each process feeds the rows its devices hold,
  see process_rows); field widths are first agreed between processes (agree_shapes)."""
  sharding = batch_sharding(mesh)
  local_batch = agree_shapes(local_batch)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


@contextlib.contextmanager
def context(mesh: Mesh, rules):
  """Mesh and logical rules for tracing: activation constraints (nn.with_logical_constraint) need both."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
