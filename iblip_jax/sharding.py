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


def make_mesh(mesh_config, devices=None) -> Mesh:
  """Mesh from `config.mesh` (data/fsdp/tensor sizes within a slice; dcn_* across slices for multi-slice pods)."""
  devices = jax.devices() if devices is None else devices
  dcn = tuple(mesh_config.get(f"dcn_{a}", 1) for a in AXES)
  num_slices = math.prod(dcn)
  ici = mesh_shape([mesh_config.get(a, 1) for a in AXES], len(devices) // num_slices, "config.mesh")
  if num_slices > 1:  # slices talk over the data-centre network: keep the chatty axes inside a slice
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


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Process-local rows -> global arrays sharded over data x fsdp (each process feeds its own rows)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


@contextlib.contextmanager
def context(mesh: Mesh, rules):
  """Mesh and logical rules for tracing: activation constraints (nn.with_logical_constraint) need both."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
