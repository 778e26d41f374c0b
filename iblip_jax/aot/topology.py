"""TPU chips and slices for ahead-of-time compiles: each generation's published figures (HBM, bf16 peak, ICI links),
topologies parsed from libtpu's names or Cloud TPU accelerator types, their compile-only devices, and mesh presets."""
import dataclasses
import math
import os

from iblip_jax import sharding

from iblip_jax.chips import ALIASES, CHIPS, Chip, GiB  # noqa: F401 (the slices' chips; GiB for the tool)

# Default chip grids of the Cloud TPU accelerator types (MaxText's accelerator_to_spec_map / Cloud TPU docs).
GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
GRIDS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
            256: (4, 8, 8), 512: (8, 8, 8)}


@dataclasses.dataclass(frozen=True)
class Topology:
  chip: Chip
  grid: tuple[int, ...]

  @property
  def num_chips(self) -> int:
    return math.prod(self.grid)

  @property
  def libtpu_name(self) -> str:
    return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.grid))}"

  def __str__(self) -> str:
    return f"{self.chip.name}:{'x'.join(map(str, self.grid))}"


def _chip(name: str) -> Chip:
  name = ALIASES.get(name.lower(), name.lower())
  if name not in CHIPS:
    raise ValueError(f"unknown TPU generation {name!r}; expected one of {sorted(CHIPS) + sorted(ALIASES)}")
  return CHIPS[name]


def parse_topology(text: str) -> Topology:
  """'v5e:4x4' / 'v4:2x2x4' (chip grid) or 'v5litepod-16' / 'v4-32' / 'v5p-32' (accelerator type)."""
  if ":" in text:
    name, grid_text = text.split(":", 1)
    chip = _chip(name)
    try:
      grid = tuple(int(d) for d in grid_text.lower().split("x"))
    except ValueError:
      raise ValueError(f"--topology={text!r}: the grid must look like 4x4 or 2x2x4") from None
    if len(grid) != chip.dims:
      raise ValueError(f"--topology={text!r}: {chip.name} grids have {chip.dims} dimensions")
    return Topology(chip, grid)
  name, _, count = text.rpartition("-")
  if not name or not count.isdigit():
    raise ValueError(f"--topology={text!r}: expected <chip>:<grid> (v5e:4x4) or an accelerator type (v5litepod-16)")
  chip = _chip(name)
  # v4-N and v5p-N count TensorCores (2 per chip); v5litepod-N counts chips.
  chips = int(count) // (2 if chip.chip_config == "megacore" else 1)
  grids = GRIDS_2D if chip.dims == 2 else GRIDS_3D
  if chips not in grids:
    raise ValueError(f"--topology={text!r}: no default grid for {chips} chips; give one, e.g. {chip.name}:2x2x4")
  return Topology(chip, grids[chips])


def wrap(topology: Topology) -> tuple[bool, bool, bool]:
  """Torus wrap-around links: full v4/v5p cubes (every side >= 4) and 16-chip v5e sides wrap (MaxText's table)."""
  grid = topology.grid + (1,) * (3 - len(topology.grid))
  if topology.chip.dims == 3:
    return (all(d >= 4 for d in grid),) * 3
  return tuple(d == 16 for d in grid[:2]) + (False,)


def _host_bounds(topology: Topology) -> tuple[int, int, int]:
  """Chips per host: a 2x2 block on all three generations, or the whole slice when it is smaller."""
  grid = topology.grid + (1,) * (3 - len(topology.grid))
  return tuple(min(g, b) for g, b in zip(grid, (2, 2, 1)))


def topology_devices(topology: Topology) -> list:
  """Compile-only devices of the slice (needs libtpu, not a TPU)."""
  # libtpu takes /tmp/libtpu_lockfile so that two processes cannot drive one TPU; compiling drives none, and
  # without this a second compile (or a test next to a running compile) fails with "ABORTED ... lockfile".
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # noqa: PLC0415 (loads the TPU plugin; only when asked for)
  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=topology.libtpu_name, chip_config_name=topology.chip.chip_config,
      chips_per_host_bounds=_host_bounds(topology), num_slices=1, wrap=wrap(topology))
  return list(desc.devices)


def parse_mesh(text: str) -> dict[str, int]:
  """'data=2,fsdp=8,tensor=1' (-1 = the rest) -> {axis: size}."""
  out = {}
  for item in filter(None, text.split(",")):
    axis, _, size = item.partition("=")
    if axis not in sharding.AXES:
      raise ValueError(f"--mesh: unknown axis {axis!r}; axes are {', '.join(sharding.AXES)}")
    out[axis] = int(size)
  return out


# Mesh presets the step model compares (--preset); --mesh entries given with a preset override its sizes.
PRESETS = {
    "fsdp": "fsdp over every chip: parameters, gradients and optimizer state sharded over all chips",
    "data_fsdp": "fsdp over the longest side of the chip grid, data over the rest (parameters replicated across data)",
    "tensor4": "tensor=4 (attention heads, MLP and vocabulary split over 4 chips; those weights are never gathered), "
               "fsdp over the rest",
}


def preset_mesh(preset: str, topology: Topology) -> dict[str, int]:
  """The mesh sizes of a preset on `topology` (see PRESETS)."""
  n = topology.num_chips
  if preset == "fsdp":
    return dict(data=1, fsdp=n, tensor=1)
  if preset == "data_fsdp":
    side = max(topology.grid)
    return dict(data=n // side, fsdp=side, tensor=1)
  if preset == "tensor4":
    if n % 4:
      raise ValueError(f"--preset=tensor4 needs a multiple of 4 chips, {topology} has {n}")
    return dict(data=1, fsdp=n // 4, tensor=4)
  raise ValueError(f"unknown --preset {preset!r}; expected one of {', '.join(PRESETS)}")
