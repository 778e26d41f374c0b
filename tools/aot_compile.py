"""Ahead-of-time compile of the real train step and greedy decoding for a TPU slice, on a host without TPUs, and a
model of the step's time on that slice.

  python tools/aot_compile.py --config configs/instructblip_flant5xl.py --topology v5e:4x4 [--batch 192]
      [--preset fsdp|data_fsdp|tensor4] [--mesh data=1,fsdp=16,tensor=1] [--remat_policy save_dots_no_batch]
      [--mfu 0.5] [--libtpu_flags '...'] [--nodecode] [--config.x=...]

Needs libtpu installed (it is the TPU compiler; no TPU hardware is touched). Nothing is allocated: parameters,
optimizer state and batches are jax.ShapeDtypeStructs carrying their NamedShardings on a mesh of the topology's
compile-only devices (MaxText's train_compile recipe). The step is the one training runs: frozen ViT and LLM in
bfloat16, trainable tree and AdamW in float32, LLM blocks rematerialised with the configured policy. It is compiled
with the libtpu flags the job gets from tools/tpu/launch.sh (MaxText's collective-overlap flags by default).

Reports per-chip memory from XLA's buffer assignment of the TPU compile (compiled.memory_analysis) against the
chip's HBM; FLOPs per call, counted on the same program with its layer loops unrolled, before partitioning (see
global_flops for why not from the TPU compile), executed (remat's recompute included) and model FLOPs (without);
and, for the train step, a step model (StepEstimate) whose three terms each print their source:
  compute  executed FLOPs per chip / (the chip's published bf16 peak x an assumed utilisation, --mfu)
  ICI      the bytes the compiled program's collectives move per chip (read from compiled.as_text(): each
           collective's operand size and replica groups, ring algorithms, while-loop bodies times their trip counts)
           over the ICI links each collective's group spans, at the published per-link bandwidth (Communication)
  HBM      the bytes the compiled program's operations read and write (its operations' operands and outputs in
           the TPU's tiled layouts, loops times trip counts; hbm_bytes) at the published HBM bandwidth
The estimate is their maximum (each assumed hidden behind the largest); their sum, the time with nothing
overlapped, is printed too. Exits with status 1 when a program does not fit. The TPU compile of FlanT5-XL's train
step at batch 192 took ~10 minutes and ~16 GB of host memory on a busy 2-core machine.

Loading libtpu on a machine without TPUs prints warnings about TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES
("could not determine TPU accelerator type", "unexpected worker hostname"): they are harmless here.

Topologies: <chip>:<dims> as libtpu names them, e.g. v5e:4x4 (16 chips), v4:2x2x4 (16 chips), v5p:2x2x4, or a Cloud
TPU accelerator type: v5litepod-16, v4-32, v5p-32 (v4/v5p accelerator types count TensorCores, 2 per chip).
"""
import dataclasses
import math
import os
import re
import sys
import time
from typing import Any

# Only ever compile here: never try to bring up a local TPU (there is none, and libtpu would complain loudly).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from iblip_jax import decoding, optim, sharding, train_state  # noqa: E402
from iblip_jax import trainable as trainable_lib  # noqa: E402
from iblip_jax.models import configs as model_configs  # noqa: E402
from iblip_jax.models.instructblip import InstructBlip  # noqa: E402
from iblip_jax.models.instructblip import params_shape  # noqa: E402
from iblip_jax.run import settings  # noqa: E402
from iblip_jax.train_step import make_train_step  # noqa: E402

GiB = 2**30


# --- chips and topologies -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str              # what users type: v5e, v4, v5p
  libtpu_name: str       # the generation as libtpu's topology names spell it ("v5" is v5p)
  chip_config: str       # "megacore": v4/v5p's two TensorCores act as one device, as on Cloud TPU VMs
  hbm_bytes: int         # published HBM per chip
  peak_flops: float      # published dense bf16 FLOP/s per chip
  dims: int              # 2-D (v5e torus) or 3-D (v4/v5p) topology
  hbm_bandwidth: float = 0.0   # published HBM bandwidth per chip, bytes/s
  ici_link_bandwidth: float = 0.0   # one ICI link, one direction, bytes/s
  ici_ports: int = 0     # ICI links per chip (2 per torus dimension)
  source: str = ""       # where the figures come from


# Published figures (Cloud TPU system-architecture pages, read 2026; /work/shared/reference/jax_anchors.md section 10):
# - v5e (docs.cloud.google.com/tpu/docs/v5e): 197 TFLOP/s bf16, 16 GB HBM at 819 GB/s, ICI 400 GB/s per chip
#   bidirectional over 4 ports (the older table says 1,600 Gbps = 200 GB/s each way): 50 GB/s per link each way.
# - v4 (docs.cloud.google.com/tpu/docs/v4): 275 TFLOP/s bf16, 32 GiB HBM2 at 1,200 GB/s. The page gives no per-chip
#   ICI figure; the TPU v4 paper (Jouppi et al., ISCA 2023, arXiv:2304.01433) gives 6 ICI links per chip at 400 Gbit/s
#   = 50 GB/s each way.
# - v5p (docs.cloud.google.com/tpu/docs/v5p-training): 459 TFLOP/s bf16, 95 GB HBM2e at 2,765 GB/s, ICI 1,200 GB/s per
#   chip bidirectional (4,800 Gbps each way) over 6 ports (3-D torus): 100 GB/s per link each way.
CHIPS = {
    "v5e": Chip("v5e", "v5e", "default", 16 * GiB, 197e12, 2, hbm_bandwidth=819e9, ici_link_bandwidth=50e9,
                ici_ports=4, source="Cloud TPU v5e page: 197 TFLOP/s bf16, 819 GB/s HBM, ICI 400 GB/s bidirectional "
                "per chip over 4 ports"),
    "v4": Chip("v4", "v4", "megacore", 32 * GiB, 275e12, 3, hbm_bandwidth=1200e9, ici_link_bandwidth=50e9,
               ici_ports=6, source="Cloud TPU v4 page: 275 TFLOP/s bf16, 1,200 GB/s HBM; TPU v4 paper (ISCA 2023): "
               "6 ICI links at 50 GB/s each way"),
    "v5p": Chip("v5p", "v5", "megacore", 95 * GiB, 459e12, 3, hbm_bandwidth=2765e9, ici_link_bandwidth=100e9,
                ici_ports=6, source="Cloud TPU v5p page: 459 TFLOP/s bf16, 2,765 GB/s HBM, ICI 1,200 GB/s "
                "bidirectional per chip over 6 ports"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p"}

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


def _wrap(topology: Topology) -> tuple[bool, bool, bool]:
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
      chips_per_host_bounds=_host_bounds(topology), num_slices=1, wrap=_wrap(topology))
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


# --- the model and its abstract inputs ------------------------------------------------------------------------


Shapes = train_state.Lengths   # the batch's sequence lengths (the tokenizers' longest buckets by default)


def tpu_model_config(config, *, frozen_dtype: str = "bfloat16", remat: bool = True, remat_policy: str | None = None):
  """The model config TPU training uses: frozen towers (ViT, LLM) in `frozen_dtype`, the trainable side as
  configured (float32), LLM blocks rematerialised with `remat_policy` (default: config.model.text.remat_policy)."""
  d = config.model.to_dict()
  d["vision"] = dict(d.get("vision", {}), dtype=frozen_dtype, param_dtype=frozen_dtype)
  d["text"] = dict(d.get("text", {}), dtype=frozen_dtype, param_dtype=frozen_dtype, remat=remat)
  if remat_policy:
    d["text"]["remat_policy"] = remat_policy
  return model_configs.from_dict(d)


def fully_unrolled(cfg):
  """The same model (parameters and maths) with no layer loops left, for counting FLOPs (see global_flops)."""
  t = cfg.text
  text_layers = t.num_hidden_layers if cfg.decoder_only else max(t.num_layers, t.num_decoder_layers)
  return cfg.replace(vision=dataclasses.replace(cfg.vision, scan_unroll=cfg.vision.num_hidden_layers),
                     text=dataclasses.replace(cfg.text, scan_unroll=text_layers))


def _abstract_state(config, model: InstructBlip) -> tuple[dict, dict, Any]:
  """(trainable, frozen, optimizer state) as unsharded ShapeDtypeStructs (for counting FLOPs before partitioning)."""
  trainable, frozen = trainable_lib.split(params_shape(model), config.trainable)
  return trainable, frozen, jax.eval_shape(optim.make(config.optim, config.total_steps).init, trainable)


def setup(config, cfg, devices, mesh_sizes: dict[str, int]) -> train_state.TrainSetup:
  """The training state the main job builds (iblip_jax.train_state), on the topology's devices, from shapes only."""
  s = settings.for_tools(config, model=cfg)
  mesh = sharding.make_mesh(dict(s.mesh, **mesh_sizes), devices)
  return train_state.build(InstructBlip(cfg), patterns=s.trainable, optim=s.optim, total_steps=s.total_steps,
                           mesh=mesh, rules=s.sharding_rules, max_replicated_bytes=s.max_replicated_bytes)


# --- the compiled program read back: collectives, loops and HBM traffic ---------------------------------------
#
# compiled.as_text() is the partitioned, scheduled TPU program of ONE chip. Its computations are read into
# instructions (name, result shape, opcode, operand names, attributes); a computation's runs per call of the
# program follow from the call graph: a while body runs (trip count) times per run of its caller, everything else
# once. XLA's own cost analysis counts every computation once (a layer scan's body as one layer), hence this.

_DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4,
    "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "token": 0,
    "f4e2m1fn": 0.5, "f8e3m4": 1, "f8e4m3": 1, "f8e4m3fn": 1, "f8e4m3fnuz": 1, "f8e4m3b11fnuz": 1, "f8e5m2": 1,
    "f8e5m2fnuz": 1, "f8e8m0fnu": 1,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")


def shape_bytes(shape: str, *, padded: bool = False) -> int:
  """Bytes of an HLO shape ('bf16[4,16]{1,0:T(8,128)(2,1)}', or a tuple of them). padded: as the TPU stores it,
  the two most-minor dimensions rounded up to the layout's first tile (T(8,128): rows to 8, columns to 128)."""
  total = 0.0
  for dtype, dims_text, layout in _ARRAY.findall(shape):
    if dtype not in _DTYPE_BYTES:
      raise ValueError(f"unknown HLO element type {dtype!r} in {shape!r}")
    dims = [int(d) for d in dims_text.split(",") if d]
    tile = re.search(r"T\(([\d,]+)\)", layout or "")
    if padded and dims and tile and ":" in layout:
      minor_to_major = [int(x) for x in layout[1:layout.index(":")].split(",") if x]
      for axis, t in zip(minor_to_major, reversed([int(x) for x in tile.group(1).split(",")])):
        dims[axis] = -(-dims[axis] // t) * t
    total += _DTYPE_BYTES[dtype] * math.prod(dims)
  return int(total)


def _closing(text: str, start: int) -> int:
  """Index just past the bracket that closes the one at text[start]."""
  pairs, stack = {"(": ")", "{": "}", "[": "]"}, []
  for i in range(start, len(text)):
    if text[i] in pairs:
      stack.append(pairs[text[i]])
    elif stack and text[i] == stack[-1]:
      stack.pop()
      if not stack:
        return i + 1
  raise ValueError(f"unbalanced HLO text: {text[start:start + 200]!r}")


@dataclasses.dataclass
class Instr:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  attrs: str
  literal: str = ""   # a constant's value, a parameter's number


@dataclasses.dataclass
class Computation:
  name: str
  instrs: dict[str, Instr]
  root: str = ""


_HEADER = re.compile(r"^(ENTRY\s+)?%(\S+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%(\S+)\s*=\s*")
_OPCODE = re.compile(r"([a-z][a-z0-9\-]*)\(")
_NAME = re.compile(r"%([^\s,(){}]+)")


def _parse_instr(line: str) -> tuple[bool, Instr] | None:
  m = _INSTR.match(line)
  if not m:
    return None
  pos = m.end()
  end = _closing(line, pos) if line[pos] == "(" else line.index(" ", pos)   # a tuple shape, or one array
  rest = line[end:].lstrip()
  op = _OPCODE.match(rest)
  if not op:
    raise ValueError(f"cannot read HLO instruction %{m.group(2)}: {rest[:120]!r}")
  close = _closing(rest, op.end() - 1)
  inner = rest[op.end():close - 1]
  literal = inner if op.group(1) in ("constant", "parameter") else ""
  return bool(m.group(1)), Instr(m.group(2), line[pos:end], op.group(1), _NAME.findall(inner), rest[close:], literal)


def parse_hlo(text: str) -> tuple[dict[str, Computation], str]:
  """HLO module text -> ({computation name: Computation}, the entry computation's name)."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m and line.startswith(("%", "ENTRY")):
        current = Computation(m.group(2), {})
        entry = current.name if m.group(1) else entry
    elif line.startswith("}"):
      comps[current.name], current = current, None
    elif parsed := _parse_instr(line):
      is_root, instr = parsed
      current.instrs[instr.name] = instr
      current.root = instr.name if is_root else current.root
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


def _head(attrs: str) -> str:
  """An instruction's attributes before the free-text ones (frontend attributes, metadata, backend config)."""
  for key in (", frontend_attributes=", ", metadata={", ", backend_config="):
    attrs = attrs.split(key, 1)[0]
  return attrs


_CALLED = re.compile(r"\b(calls|to_apply|body|true_computation|false_computation)=%([^\s,{}]+)")
_CALLED_LIST = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")


def _called(instr: Instr) -> list[str]:
  head = _head(instr.attrs)
  return [m.group(2) for m in _CALLED.finditer(head)] + [n for m in _CALLED_LIST.finditer(head)
                                                          for n in _NAME.findall(m.group(2))]


def _through_copies(comp: Computation, name: str) -> Instr | None:
  instr = comp.instrs.get(name)
  while instr is not None and instr.opcode in ("copy", "bitcast", "convert", "reshape") and instr.operands:
    instr = comp.instrs.get(instr.operands[0])
  return instr


def _int_constant(instr: Instr | None) -> int | None:
  if instr is None or instr.opcode != "constant" or not re.fullmatch(r"\s*-?\d+\s*", instr.literal):
    return None
  return int(instr.literal)


def _tuple_index(instr: Instr | None) -> int | None:
  m = re.search(r"\bindex=(\d+)", instr.attrs) if instr is not None and instr.opcode == "get-tuple-element" else None
  return int(m.group(1)) if m else None


def trip_count(comps: dict[str, Computation], parent: Computation, loop: Instr) -> int | None:
  """Iterations of a while loop: the known_trip_count XLA recorded, else read from the loop: a counter (element k
  of the loop state) that the condition compares with a constant, that starts from a constant in the initial
  tuple and that the body steps by a constant. None when the loop has no such counter."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
  if known:
    return int(known.group(1))
  head = _head(loop.attrs)
  cond = comps[re.search(r"condition=%([^\s,]+)", head).group(1)]
  body = comps[re.search(r"body=%([^\s,]+)", head).group(1)]
  test = cond.instrs[cond.root]
  if test.opcode != "compare" or len(test.operands) != 2:
    return None
  direction = re.search(r"direction=(\w+)", test.attrs).group(1)
  counter, limit = (_through_copies(cond, o) for o in test.operands)
  if _tuple_index(counter) is None:
    counter, limit = limit, counter
    direction = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE"}.get(direction, direction)
  k, end = _tuple_index(counter), _int_constant(limit)
  init = _through_copies(parent, loop.operands[0]) if loop.operands else None
  if k is None or end is None or init is None or init.opcode != "tuple" or k >= len(init.operands):
    return None
  start = _int_constant(_through_copies(parent, init.operands[k]))
  new = body.instrs[body.root]
  new = _through_copies(body, new.operands[k]) if new.opcode == "tuple" and k < len(new.operands) else None
  if start is None or new is None or new.opcode not in ("add", "subtract") or len(new.operands) != 2:
    return None
  x, y = (_through_copies(body, o) for o in new.operands)
  if _tuple_index(x) != k:
    x, y = y, x
  step = _int_constant(y)
  if _tuple_index(x) != k or not step:
    return None
  step = abs(step)
  span = {"LT": end - start, "LE": end - start + 1, "GT": start - end, "GE": start - end + 1,
          "NE": abs(end - start)}.get(direction)
  return None if span is None else max(0, -(-span // step))


def _async_done_half(comp: Computation) -> bool:
  """The fused computation of an async collective fusion's 'done' half: it repeats the collective its 'start'
  half holds (same channel), so only the start is counted."""
  root = comp.instrs[comp.root]
  return root.opcode == "custom-call" and 'custom_call_target="AsyncCollectiveDone"' in root.attrs


@dataclasses.dataclass
class Program:
  """A compiled program's computations, how often each runs per call, and what kind of computation it is:
  'control' (the entry, loop bodies, called computations: their instructions are the scheduled operations),
  'fused' (inside a fusion) or 'applied' (a reducer)."""
  comps: dict[str, Computation]
  entry: str
  runs: dict[str, int]
  kind: dict[str, str]
  loops: list[tuple[str, int | None]]   # (while instruction, trip count or None when unreadable)

  @classmethod
  def from_text(cls, text: str) -> "Program":
    comps, entry = parse_hlo(text)
    runs, kind, loops = {}, {entry: "control"}, []

    def visit(name: str, times: int) -> None:
      runs[name] = runs.get(name, 0) + times
      comp = comps[name]
      for instr in comp.instrs.values():
        if instr.opcode.endswith("-done"):   # an async pair's work is counted at its start
          continue
        callees = _called(instr)
        n = times
        if instr.opcode == "while":
          trips = trip_count(comps, comp, instr)
          loops.append((instr.name, trips))
          n = times * (1 if trips is None else trips)
          callees = [re.search(r"body=%([^\s,]+)", _head(instr.attrs)).group(1)]
        for callee in callees:
          if instr.opcode == "fusion" and _async_done_half(comps[callee]):
            continue
          kind.setdefault(callee, "fused" if instr.opcode == "fusion" or kind[name] == "fused" else
                          "control" if instr.opcode in ("while", "call", "conditional", "async-start") else
                          "applied")
          visit(callee, n)

    visit(entry, 1)
    return cls(comps, entry, runs, kind, loops)

  def instructions(self, kind: str = "control"):
    """(computation, instruction, runs per call) for every instruction of the computations of `kind`."""
    for name, times in self.runs.items():
      if self.kind.get(name) == kind or kind == "any":
        comp = self.comps[name]
        for instr in comp.instrs.values():
          yield comp, instr, times


# Collective opcodes (sync, async start, and the ops inside TPU async collective fusions) -> the kind reported.
COLLECTIVE_KINDS = {
    "all-gather": "all-gather", "all-gather-start": "all-gather", "reduce-scatter": "reduce-scatter",
    "all-reduce": "all-reduce", "all-reduce-start": "all-reduce", "all-to-all": "all-to-all",
    "ragged-all-to-all": "all-to-all", "collective-permute": "collective-permute",
    "collective-permute-start": "collective-permute", "collective-broadcast": "collective-permute",
}
KIND_ORDER = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def _iota_groups(text: str) -> np.ndarray:
  """XLA's iota replica groups '[G,S]<=[d0,d1,..]T(p0,p1,..)': iota over the dims, transposed, as G groups of S."""
  m = re.fullmatch(r"\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
  if not m:
    raise ValueError(f"unreadable iota replica groups {text!r}")
  ids = np.arange(math.prod(int(d) for d in m.group(3).split(","))).reshape(
      [int(d) for d in m.group(3).split(",")])
  if m.group(4):
    ids = ids.transpose([int(p) for p in m.group(4).split(",")])
  return ids.reshape(int(m.group(1)), int(m.group(2)))


_MESH_GROUPS = re.compile(r"mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?\s*\{([^}]*)\}")


def _mesh_groups(text: str) -> np.ndarray:
  """XLA's mesh-axes replica groups "mesh['a'=2,'b'=4], device_ids=([4,2]T(1,0)) {'a'}": the devices (in mesh
  order, or permuted by device_ids) that differ only along the named axes form a group."""
  m = _MESH_GROUPS.fullmatch(text.strip())
  if not m:
    raise ValueError(f"unreadable mesh replica groups {text!r}")
  axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
  names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
  ids = np.arange(math.prod(sizes))
  if m.group(2):
    d = re.fullmatch(r"\[([\d,]+)\](?:<=\[([\d,]+)\])?(?:T\(([\d,]+)\))?", m.group(2).strip())
    if not d:
      raise ValueError(f"unreadable device_ids in replica groups {text!r}")
    ids = ids.reshape([int(x) for x in (d.group(2) or d.group(1)).split(",")])
    if d.group(3):
      ids = ids.transpose([int(p) for p in d.group(3).split(",")])
  grouped = re.findall(r"'([^']+)'", m.group(3))
  if any(g not in names for g in grouped):
    raise ValueError(f"unreadable mesh replica groups {text!r} (sub-axes are not read)")
  keep = [names.index(g) for g in grouped]
  rest = [i for i in range(len(names)) if i not in keep]
  return ids.reshape(sizes).transpose(rest + keep).reshape(-1, math.prod(sizes[i] for i in keep))


def replica_groups(attrs: str, num_devices: int) -> np.ndarray:
  """A collective's device groups as a (groups, group size) array of logical device ids (positions in the
  program's device assignment: the mesh's devices in order). Absent or empty: one group of every device."""
  head = _head(attrs)
  i = head.find("replica_groups=")
  if i < 0:
    return np.arange(num_devices).reshape(1, -1)
  text = head[i + len("replica_groups="):]
  if text.startswith("{"):
    groups = [[int(x) for x in g.split(",") if x.strip()]
              for g in re.findall(r"\{([\d,\s]*)\}", text[1:_closing(text, 0) - 1])]
    return np.array(groups) if groups and groups[0] else np.arange(num_devices).reshape(1, -1)
  if text.startswith("["):
    return _iota_groups(re.match(r"\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?", text).group(0))
  if text.startswith("mesh["):
    return _mesh_groups(text[:text.index("}") + 1])
  raise ValueError(f"unreadable replica groups: {text[:120]!r}")


def _source_target_pairs(attrs: str) -> np.ndarray:
  m = re.search(r"source_target_pairs=(\{.*?\}\})", attrs)
  pairs = re.findall(r"\{(\d+),(\d+)\}", m.group(1)) if m else []
  return np.array([[int(a), int(b)] for a, b in pairs], dtype=int).reshape(-1, 2)


@dataclasses.dataclass
class Collective:
  """One collective of the program. groups: (groups, size) logical device ids; collective-permute: (pairs, 2)
  source -> target."""
  kind: str
  name: str
  runs: int            # executions per call of the program (its computation's runs)
  operand_bytes: int   # per chip, one execution
  groups: np.ndarray
  op_name: str         # the JAX operation it came from (metadata)

  @property
  def group_size(self) -> int:
    return 2 if self.kind == "collective-permute" else self.groups.shape[1]

  def bytes_per_chip(self) -> float:
    """Bytes each chip sends (and receives) over ICI in one execution, for ring algorithms over a group of n with
    input x per chip: all-gather (n-1) x, reduce-scatter (n-1)/n x, all-reduce 2 (n-1)/n x (a reduce-scatter and
    an all-gather), all-to-all (n-1)/n x; collective-permute x when some chip sends to another."""
    n, x = self.group_size, self.operand_bytes
    if self.kind == "collective-permute":
      return float(x) if any(a != b for a, b in self.groups) else 0.0
    return {"all-gather": x * (n - 1), "reduce-scatter": x * (n - 1) / n, "all-reduce": 2 * x * (n - 1) / n,
            "all-to-all": x * (n - 1) / n}[self.kind]


def collectives(program: Program, num_devices: int) -> list[Collective]:
  out = []
  for comp, instr, runs in program.instructions("any"):
    kind = COLLECTIVE_KINDS.get(instr.opcode)
    if kind is None or program.kind.get(comp.name) == "applied":
      continue
    groups = (_source_target_pairs(instr.attrs) if kind == "collective-permute" else
              replica_groups(instr.attrs, num_devices))
    size = sum(shape_bytes(comp.instrs[o].shape) for o in instr.operands if o in comp.instrs)
    op = re.search(r'op_name="([^"]*)"', instr.attrs)
    out.append(Collective(kind, instr.name, runs, size, groups, op.group(1) if op else ""))
  return out


_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain"}


def _fusion_bytes(program: Program, comp: Computation, fusion: Instr) -> int:
  """HBM bytes of one fusion: its output and its operands, except that an operand the fusion only slices
  counts its slices, and an output a dynamic-update-slice writes into an operand (in place) counts the update."""
  callee = program.comps[_called(fusion)[0]]
  params = {int(f.literal): f.name for f in callee.instrs.values() if f.opcode == "parameter"}
  users: dict[str, list[Instr]] = {}
  for f in callee.instrs.values():
    for o in f.operands:
      users.setdefault(o, []).append(f)
  root = callee.instrs[callee.root]
  outputs = [callee.instrs[o] for o in root.operands] if root.opcode == "tuple" else [root]
  in_place, total = set(), 0
  for out in outputs:
    if out.opcode == "dynamic-update-slice" and callee.instrs[out.operands[0]].opcode == "parameter":
      in_place.add(out.operands[0])
      total += shape_bytes(callee.instrs[out.operands[1]].shape, padded=True)
    else:
      total += shape_bytes(out.shape, padded=True)
  for i, operand in enumerate(fusion.operands):
    full = shape_bytes(comp.instrs[operand].shape, padded=True) if operand in comp.instrs else 0
    param = params.get(i)
    uses = users.get(param, [])
    if param in in_place and all(u.opcode == "dynamic-update-slice" for u in uses):
      continue
    if uses and all(u.opcode in ("dynamic-slice", "slice") and u.operands[0] == param for u in uses):
      full = min(full, sum(shape_bytes(u.shape, padded=True) for u in uses))
    total += full
  return total


def hbm_bytes(program: Program, *, loops: bool = True) -> int:
  """HBM bytes read and written per call: every scheduled operation (a fusion counts as one) reads its operands
  and writes its output, in the TPU's tiled layouts, times the runs of its computation (loops=False: once, as
  XLA's own cost analysis counts, to compare with its 'bytes accessed')."""
  total = 0
  for comp, instr, runs in program.instructions("control"):
    if instr.opcode in _NO_TRAFFIC:
      continue
    if instr.opcode == "fusion":
      moved = _fusion_bytes(program, comp, instr)
    else:
      moved = shape_bytes(instr.shape, padded=True) + sum(
          shape_bytes(comp.instrs[o].shape, padded=True) for o in instr.operands if o in comp.instrs)
    total += moved * (runs if loops else 1)
  return total


def _links(topology: Topology, coords: np.ndarray) -> int:
  """ICI links per chip a collective over chips at `coords` can use: in every torus dimension the group spans, 2
  when the dimension wraps around and the group covers it whole (a ring: both directions), else 1 (a line: the
  end chips have one neighbour, and they bound the time)."""
  grid = topology.grid + (1,) * (3 - len(topology.grid))
  wrap = _wrap(topology)
  links = 0
  for d in range(coords.shape[1]):
    extent = len(set(coords[:, d].tolist()))
    if extent > 1:
      links += 2 if wrap[d] and extent == grid[d] and extent > 2 else 1
  return max(links, 1)


def part_of(op_name: str) -> str:
  """Which part of the model a collective serves, from its JAX op name."""
  for key, part in (("language_model", "LLM"), ("/vision/", "ViT"), ("qformer", "Q-Former")):
    if key in op_name:
      return part
  return "other"


@dataclasses.dataclass
class Communication:
  """Per-chip ICI traffic of a program per call: each collective's bytes (bytes_per_chip x runs) and time at
  the links its group can use (_links x the chip's published per-link bandwidth); collectives one after another."""
  by_kind: dict[str, dict]      # kind -> {"ops": static count, "runs": executions, "bytes": ..., "seconds": ...}
  by_part: dict[str, float]     # seconds per model part (part_of)
  unknown_loops: list[str]

  @property
  def bytes(self) -> float:
    return sum(v["bytes"] for v in self.by_kind.values())

  @property
  def seconds(self) -> float:
    return sum(v["seconds"] for v in self.by_kind.values())


def communication(program: Program, topology: Topology, devices: list) -> Communication:
  """`devices`: the program's device assignment (the mesh's devices in order): logical id -> physical chip."""
  coords = np.array([list(d.coords) for d in devices])
  by_kind = {k: dict(ops=0, runs=0, bytes=0.0, seconds=0.0) for k in KIND_ORDER}
  by_part: dict[str, float] = {}
  link = topology.chip.ici_link_bandwidth
  for c in collectives(program, len(devices)):
    moved = c.bytes_per_chip() * c.runs
    links = 1 if c.kind == "collective-permute" else _links(topology, coords[c.groups[0]])
    seconds = moved / (links * link) if moved else 0.0
    entry = by_kind[c.kind]
    entry["ops"] += 1
    entry["runs"] += c.runs
    entry["bytes"] += moved
    entry["seconds"] += seconds
    by_part[part_of(c.op_name)] = by_part.get(part_of(c.op_name), 0.0) + seconds
  unknown = [name for name, trips in program.loops if trips is None]
  return Communication(by_kind, by_part, unknown)


# --- compiling and reporting ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
  """One program: XLA's buffer assignment per chip (TPU compile) and its FLOPs per call (see global_flops); for
  the train step also its communication and HBM traffic read from the compiled program (see Program)."""
  what: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  compile_seconds: float
  flops: float | None = None        # FLOPs the whole slice executes per call (remat's recompute included)
  model_flops: float | None = None  # the same without remat's recompute: what MFU counts
  flops_note: str = ""
  batch: int = 0                    # global batch (images per call)
  remat_policy: str = ""
  communication: Communication | None = None
  hbm_bytes: int | None = None           # per chip per call, loops x trip counts (hbm_bytes)
  hbm_bytes_once: int | None = None      # the same with each loop body once
  xla_bytes_accessed: float | None = None  # XLA's cost analysis of the compiled program (loop bodies once)

  @property
  def total_bytes(self) -> int:
    """Peak HBM of the program: arguments + outputs (donated arguments counted once) + scratch + code."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


class DoesNotFit(Exception):
  """XLA refused to compile because the program needs more HBM than the chip has."""


# The libtpu flags MaxText's v5e training recipes export in LIBTPU_INIT_ARGS (AI-Hypercomputer/maxtext,
# src/maxtext/configs/tpu/v5e/*.sh; benchmarks/xla_flags_library.py names them DATA_PARALLEL_OVERLAP and
# CF_FOR_ALL_GATHER): asynchronous all-gathers fused with the compute they overlap ("continuation fusion"), and
# data-parallel all-reduces pipelined across steps. tools/tpu/launch.sh passes the same string to the job.
# With libtpu 0.0.42 they are already the compiler's defaults: the tiny train step compiles to the same program
# with and without them (and differs when they are set to false).
MAXTEXT_LIBTPU_FLAGS = (
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true --xla_tpu_data_parallel_opt_different_sized_ops=true "
    "--xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true "
    "--xla_enable_async_all_gather=true")


def compiler_options(libtpu_flags: str) -> dict[str, str]:
  """'--name=value --name2=value2' (LIBTPU_INIT_ARGS) -> compile options, as the TPU job's libtpu reads them."""
  out = {}
  for token in libtpu_flags.split():
    m = re.fullmatch(r"--([A-Za-z0-9_]+)=(\S+)", token)
    if not m:
      raise ValueError(f"libtpu flag {token!r}: expected --name=value")
    out[m.group(1)] = m.group(2)
  return out


def _compile(lowered, options: dict[str, str] | None = None):
  try:
    return lowered.compile(compiler_options=options) if options else lowered.compile()
  except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED when buffer assignment exceeds HBM
    if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
      raise DoesNotFit(str(e)) from e
    raise


def _memory_report(what: str, lowered, options: dict[str, str] | None = None):
  """(Report with XLA's buffer assignment, the compiled program)."""
  start = time.perf_counter()
  compiled = _compile(lowered, options)
  m = compiled.memory_analysis()
  return Report(what, m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                m.temp_size_in_bytes, m.generated_code_size_in_bytes, time.perf_counter() - start), compiled


def read_traffic(report: Report, compiled, topology: Topology, devices: list, hlo_path: str = "") -> None:
  """Fills the report's communication and HBM traffic from the compiled program (devices: the mesh's, in order);
  hlo_path: also write the program's text there."""
  text = compiled.as_text()
  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(text)
  program = Program.from_text(text)
  del text
  report.communication = communication(program, topology, devices)
  report.hbm_bytes = hbm_bytes(program)
  report.hbm_bytes_once = hbm_bytes(program, loops=False)
  try:
    report.xla_bytes_accessed = float(compiled.cost_analysis()["bytes accessed"])
  except Exception:  # noqa: BLE001 (an estimate to compare with; not every backend gives it)
    report.xla_bytes_accessed = None


def global_flops(lowered) -> float:
  """FLOPs of a program lowered for the host CPU from unsharded shapes: XLA's cost analysis of the program as JAX
  emits it, before partitioning and optimisation (nothing is compiled).

  Why not the TPU compile's own cost analysis: it counts a loop body once, and the TPU compiler adds loops of its
  own to the partitioned program (157 while loops in FlanT5-XL's layer-unrolled ViT on v5e:4x4, one of them over
  the FSDP-sharded patch-embedding kernel), so its count came out 3.4x under 2 * parameters * tokens there. Here
  the model's layer scans are unrolled and the count is taken before any compiler loop exists. It includes what
  remat recomputes (JAX emits the recompute)."""
  return float(lowered.cost_analysis()["flops"])


def _rng(sharding_: NamedSharding | None = None) -> jax.ShapeDtypeStruct:
  rng = jax.eval_shape(jax.random.key, 0)
  return jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=sharding_)


def train_flops(config, cfg, *, batch: int, shapes: Shapes = Shapes()) -> float:
  """FLOPs of one train step on the global batch: forward, backward (with remat's recompute when cfg.text.remat)
  and AdamW, every layer counted (see global_flops)."""
  model = InstructBlip(fully_unrolled(cfg))
  trainable, frozen, opt_state = _abstract_state(config, model)
  step = jax.jit(make_train_step(model, optim.make(config.optim, config.total_steps),
                                 vision_frozen="vision" not in trainable, dropout=config.dropout))
  return global_flops(step.lower(trainable, opt_state, frozen, train_state.batch_spec(cfg, batch, shapes), _rng()))


def _decode_settings(new_tokens: int, num_beams: int) -> dict:
  return dict(num_beams=num_beams, max_new_tokens=new_tokens, min_new_tokens=1, length_penalty=1.0,
              repetition_penalty=1.0, num_return_sequences=1)


def decode_flops(config, cfg, *, batch: int, new_tokens: int = 10, num_beams: int = 1,
                 shapes: Shapes = Shapes()) -> float:
  """FLOPs of generation: the prefill and ONE decoding step (the token loop is a while_loop, counted once)."""
  model = InstructBlip(fully_unrolled(cfg))
  trainable, frozen, _ = _abstract_state(config, model)
  generate = decoding._generate  # noqa: SLF001 (the jitted function iblip_jax.generate calls)
  return global_flops(generate.lower(model, trainable_lib.merge(trainable, frozen),
                                     train_state.batch_spec(cfg, batch, shapes, labels=False),
                                     **_decode_settings(new_tokens, num_beams)))


def compile_train(config, topology: Topology, *, batch: int, mesh_sizes: dict[str, int] | None = None,
                  shapes: Shapes = Shapes(), frozen_dtype: str = "bfloat16", remat: bool = True,
                  remat_policy: str | None = None, libtpu_flags: str = "", devices=None,
                  hlo_path: str = "") -> Report:
  """AOT-compiles the train step for `topology` (memory, communication, HBM traffic) and counts its FLOPs."""
  cfg = tpu_model_config(config, frozen_dtype=frozen_dtype, remat=remat, remat_policy=remat_policy)
  s = setup(config, cfg, devices or topology_devices(topology), mesh_sizes or {})
  trainable, frozen, opt_state = s.abstract()
  args = (trainable, opt_state, frozen, s.batch_spec(batch, shapes), _rng(s.shardings.replicated))
  step = s.train_step(dropout=config.dropout)   # the very step training runs
  with sharding.context(s.mesh, s.rules):
    report, compiled = _memory_report("train step", step.lower(*args), compiler_options(libtpu_flags))
  read_traffic(report, compiled, topology, list(s.mesh.devices.flat), hlo_path)
  del compiled
  report.batch = batch
  report.remat_policy = cfg.text.remat_policy if remat else "none (no remat)"
  report.flops = train_flops(config, cfg, batch=batch, shapes=shapes)
  report.model_flops = train_flops(config, tpu_model_config(config, frozen_dtype=frozen_dtype, remat=False),
                                   batch=batch, shapes=shapes) if remat else report.flops
  report.flops_note = "forward, backward and AdamW"
  return report


def compile_decode(config, topology: Topology, *, batch: int, new_tokens: int = 10, num_beams: int = 1,
                   mesh_sizes: dict[str, int] | None = None, shapes: Shapes = Shapes(),
                   frozen_dtype: str = "bfloat16", libtpu_flags: str = "", devices=None) -> Report:
  """AOT-compiles generation (greedy when num_beams=1) as `iblip_jax.generate` runs it, and counts its FLOPs."""
  cfg = tpu_model_config(config, frozen_dtype=frozen_dtype, remat=False)
  s = setup(config, cfg, devices or topology_devices(topology), mesh_sizes or {})
  trainable, frozen, _ = s.abstract()
  inputs = s.batch_spec(batch, shapes, labels=False)
  search = "greedy" if num_beams == 1 else f"beam search, {num_beams} beams"
  generate = decoding._generate  # noqa: SLF001 (the jitted function iblip_jax.generate calls)
  with sharding.context(s.mesh, s.rules):
    report, _ = _memory_report(f"generate ({search}, {new_tokens} new tokens)",
                               generate.lower(s.model, trainable_lib.merge(trainable, frozen), inputs,
                                              **_decode_settings(new_tokens, num_beams)),
                               compiler_options(libtpu_flags))
  report.flops = report.model_flops = decode_flops(config, cfg, batch=batch, new_tokens=new_tokens,
                                                   num_beams=num_beams, shapes=shapes)
  report.flops_note = "prefill + ONE decoding step: the token loop's body is counted once"
  return report


def fits(report: Report, topology: Topology) -> bool:
  return report.total_bytes <= topology.chip.hbm_bytes


def _flop_text(flops: float) -> str:
  for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
    if flops >= scale:
      return f"{flops / scale:.3g} {unit}"
  return f"{flops:.3g} FLOP"


def _time_text(seconds: float) -> str:
  return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else \
      f"{seconds * 1e6:.3g} us"


# MaxText's published model-FLOPs utilisation of dense LLM training on one v5e-256 slice (its v5e configs'
# README): 16B 61.1%, 32B 66.9%, 64B 59.9%, 128B 56.1%. The step model's default assumes less (50%): these towers'
# matmuls are narrower (d_model 2,048-5,120) and a step here is a few hundred milliseconds.
DEFAULT_MFU = 0.5
MFU_SOURCE = "assumed; MaxText reports 56-67% MFU for dense 16B-128B models on v5e-256 (its v5e README)"


@dataclasses.dataclass(frozen=True)
class StepEstimate:
  """Per-chip time of one train step, three ways; the estimate is the largest (the other two assumed hidden
  behind it: collectives overlapped with compute, HBM traffic with both). `serial` is the sum: nothing
  overlapped, an upper bound of the model."""
  compute_seconds: float   # executed FLOPs per chip / (published peak x assumed utilisation)
  ici_seconds: float       # collectives' bytes per chip / the ICI links their groups can use (Communication)
  hbm_seconds: float       # HBM bytes per chip (hbm_bytes) / published HBM bandwidth

  @property
  def terms(self) -> dict[str, float]:
    return {"compute": self.compute_seconds, "ICI": self.ici_seconds, "HBM": self.hbm_seconds}

  @property
  def seconds(self) -> float:
    return max(self.terms.values())

  @property
  def bound(self) -> str:
    return max(self.terms, key=self.terms.get)

  @property
  def serial(self) -> float:
    return sum(self.terms.values())


def step_estimate(report: Report, topology: Topology, mfu: float = DEFAULT_MFU) -> StepEstimate:
  chip = topology.chip
  return StepEstimate(report.flops / topology.num_chips / (chip.peak_flops * mfu), report.communication.seconds,
                      report.hbm_bytes / chip.hbm_bandwidth)


def _bytes_text(n: float) -> str:
  return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB" if n >= 1e5 else f"{n / 1e3:.3g} kB"


def format_step_model(report: Report, topology: Topology, mfu: float = DEFAULT_MFU) -> list[str]:
  chip, comm = topology.chip, report.communication
  est = step_estimate(report, topology, mfu)
  kinds = "; ".join(f"{k} {v['ops']} ops, {v['runs']} runs, {_bytes_text(v['bytes'])}, {_time_text(v['seconds'])}"
                    for k, v in comm.by_kind.items() if v["ops"])
  parts = ", ".join(f"{k} {_time_text(v)}" for k, v in sorted(comm.by_part.items(), key=lambda kv: -kv[1]))
  xla = (f"; XLA's cost analysis of the same program, each loop body once: {_bytes_text(report.xla_bytes_accessed)}"
         f" (this count, each loop body once: {_bytes_text(report.hbm_bytes_once)})"
         if report.xla_bytes_accessed else "")
  per_chip_images = report.batch / est.seconds / topology.num_chips if report.batch else 0.0
  lines = [
      "  step model (per chip, one step; each term and its source):",
      f"    compute: {_flop_text(report.flops / topology.num_chips)} executed per chip / ({chip.peak_flops / 1e12:.0f}"
      f" TFLOP/s x {100 * mfu:.0f}% utilisation) = {_time_text(est.compute_seconds)}"
      f"  [peak: {chip.source.split(':')[0]}; utilisation {MFU_SOURCE}]",
      f"    ICI: {_bytes_text(comm.bytes)} sent per chip by the compiled program's collectives (loops x trip counts; "
      f"ring algorithms; each collective at {chip.ici_link_bandwidth / 1e9:.0f} GB/s per link each way x the links "
      f"its group spans) = {_time_text(est.ici_seconds)}  [{chip.source}]",
      f"      by kind: {kinds or 'none'}",
      f"      by model part: {parts or 'none'}",
      f"    HBM: {_bytes_text(report.hbm_bytes)} read + written per chip (the compiled program's operations, their "
      f"operands and outputs in tiled layouts, loops x trip counts{xla}) / {chip.hbm_bandwidth / 1e9:.0f} GB/s = "
      f"{_time_text(est.hbm_seconds)}  [{chip.source.split(':')[0]}]",
      f"    estimated step: {_time_text(est.seconds)} ({est.bound}-bound: the largest term, the others overlapped; "
      f"with no overlap {_time_text(est.serial)}); ICI / compute = {est.ici_seconds / est.compute_seconds:.2f}; "
      f"{per_chip_images:.3g} images/s per chip",
  ]
  if comm.unknown_loops:
    lines.append(f"    WARNING: {len(comm.unknown_loops)} while loop(s) with no readable trip count were counted "
                 f"once: {', '.join(comm.unknown_loops[:5])}")
  return lines


def format_report(report: Report, topology: Topology, mfu: float = DEFAULT_MFU) -> str:
  chip = topology.chip
  gib = lambda b: f"{b / GiB:.3f} GiB"
  lines = [
      f"{report.what}: compiled in {report.compile_seconds:.0f} s",
      f"  per-chip memory: arguments {gib(report.argument_bytes)}, outputs {gib(report.output_bytes)} "
      f"(aliased to donated arguments {gib(report.alias_bytes)}), temp {gib(report.temp_bytes)}, "
      f"generated code {gib(report.code_bytes)}",
      f"  total {gib(report.total_bytes)} of {chip.hbm_bytes / GiB:.0f} GiB HBM per {chip.name} chip "
      f"({100 * report.total_bytes / chip.hbm_bytes:.1f}%): {'fits' if fits(report, topology) else 'DOES NOT FIT'}",
  ]
  if report.flops:
    per_chip = report.flops / topology.num_chips
    peak_seconds = per_chip / chip.peak_flops    # every executed FLOP at the published peak
    mfu_ceiling = report.model_flops / report.flops
    lines += [
        f"  FLOPs per call: {_flop_text(report.flops)} executed ({_flop_text(per_chip)} per chip if evenly "
        f"split)" + (f", {_flop_text(report.model_flops)} without remat's recompute" if mfu_ceiling < 1 else "") +
        f" ({report.flops_note}; XLA cost analysis of the unpartitioned program with every layer unrolled)",
        f"  time at the published bf16 peak ({chip.peak_flops / 1e12:.0f} TFLOP/s per chip): at least "
        f"{_time_text(peak_seconds)}, MFU {100 * mfu_ceiling:.0f}%; at 50% of peak {_time_text(2 * peak_seconds)}, "
        f"MFU {50 * mfu_ceiling:.0f}%",
    ]
    if report.remat_policy:
      lines.append(f"  executed / model FLOPs: {report.flops / report.model_flops:.3f} (remat policy "
                   f"{report.remat_policy})")
  if report.flops and report.communication is not None:
    lines += format_step_model(report, topology, mfu)
  return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------------------------


def define_flags() -> None:
  """Only when run as a script: importing this module (tests) must not claim absl's global --config flag."""
  config_flags.DEFINE_config_file("config", None, "Config file (a get_config() module).", lock_config=True)
  flags.DEFINE_string("topology", "v5e:4x4", "TPU slice: v5e:4x4, v4:2x2x4, v5p:2x2x4, v5litepod-16, v4-32, ...")
  flags.DEFINE_integer("batch", None, "Global train batch (default: config.batch_size).")
  flags.DEFINE_string("mesh", "", "Mesh sizes, e.g. data=2,fsdp=8,tensor=1 (default: config.mesh, or the preset's; "
                      "given with --preset, its entries override the preset's).")
  flags.DEFINE_enum("preset", None, list(PRESETS), "Mesh preset: " + "; ".join(f"{k}: {v}" for k, v in
                                                                             PRESETS.items()))
  flags.DEFINE_enum("remat_policy", None, list(model_configs.REMAT_POLICIES),
                    "What LLM remat keeps (default: config.model.text.remat_policy).")
  flags.DEFINE_string("dump_hlo", "", "Write the compiled train step's HLO text to this file.")
  flags.DEFINE_float("mfu", DEFAULT_MFU, "Assumed FLOP utilisation of the step model's compute term.")
  flags.DEFINE_string("libtpu_flags", MAXTEXT_LIBTPU_FLAGS, "libtpu flags (LIBTPU_INIT_ARGS) to compile with, as "
                      "tools/tpu/launch.sh passes them to the job (default: MaxText's v5e recipe); '' for none.")
  flags.DEFINE_list("lengths", ["128", "128", "256"], "Instruction, prompt and target token lengths.")
  flags.DEFINE_integer("decode_batch", None, "Global generation batch (default: the train batch).")
  flags.DEFINE_integer("new_tokens", 10, "Tokens to generate in the decode compile.")
  flags.DEFINE_integer("num_beams", 1, "1 = greedy; >1 compiles beam search.")
  flags.DEFINE_enum("frozen_dtype", "bfloat16", ["bfloat16", "float32"], "ViT and LLM dtype.")
  flags.DEFINE_bool("remat", True, "Rematerialise LLM blocks in the backward pass.")
  flags.DEFINE_bool("decode", True, "Also compile generation.")
  flags.mark_flag_as_required("config")


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  topology = parse_topology(f.topology)
  batch = f.batch or config.batch_size
  decode_batch = f.decode_batch or batch
  shapes = Shapes(*(int(x) for x in f.lengths))
  mesh_sizes = dict(preset_mesh(f.preset, topology) if f.preset else {}, **parse_mesh(f.mesh))
  devices = topology_devices(topology)
  mesh = sharding.make_mesh(dict(config.mesh.to_dict(), **mesh_sizes), devices)
  policy = f.remat_policy or config.model.text.get("remat_policy", "full")
  print(f"topology {topology} = {topology.num_chips} x {devices[0].device_kind}, "
        f"{topology.chip.hbm_bytes / GiB:.0f} GiB HBM per chip; mesh {dict(mesh.shape)}"
        f"{f' (preset {f.preset})' if f.preset else ''}; lengths instruction {shapes.instruction}, prompt "
        f"{shapes.prompt}, target {shapes.target}; frozen towers {f.frozen_dtype}, LLM remat {f.remat}"
        f"{f' (policy {policy})' if f.remat else ''}; libtpu flags: {f.libtpu_flags or 'none'}", flush=True)
  common = dict(mesh_sizes=mesh_sizes, shapes=shapes, frozen_dtype=f.frozen_dtype, libtpu_flags=f.libtpu_flags,
                devices=devices)
  jobs = [(f"global batch {batch} ({batch / topology.num_chips:g} per chip)",
           lambda: compile_train(config, topology, batch=batch, remat=f.remat, remat_policy=f.remat_policy,
                                 hlo_path=f.dump_hlo, **common))]
  if f.decode:
    jobs.append((f"global batch {decode_batch}",
                 lambda: compile_decode(config, topology, batch=decode_batch, new_tokens=f.new_tokens,
                                        num_beams=f.num_beams, **common)))
  ok = True
  for what, job in jobs:
    try:
      report = job()
    except DoesNotFit as e:
      print(f"{what}: DOES NOT FIT on {topology}: XLA ran out of HBM while compiling:\n{e}", flush=True)
      ok = False
      continue
    print(f"{format_report(report, topology, f.mfu)}\n  ({what})", flush=True)
    ok &= fits(report, topology)
  if not ok:
    sys.exit(f"error: does not fit on {topology} ({topology.chip.hbm_bytes / GiB:.0f} GiB HBM per chip); "
             "try more chips, a smaller --batch, or another --mesh / config.sharding_rules")
  print(f"OK: fits on {topology}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
