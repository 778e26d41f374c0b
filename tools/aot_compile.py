"""Ahead-of-time compile of the real train step and greedy decoding for a TPU slice, on a host without TPUs.

  python tools/aot_compile.py --config configs/instructblip_flant5xl.py --topology v5e:4x4 [--batch 192]
      [--mesh data=1,fsdp=16,tensor=1] [--config.x=...]

Needs libtpu installed (it is the TPU compiler; no TPU hardware is touched). Nothing is allocated: parameters,
optimizer state and batches are jax.ShapeDtypeStructs carrying their NamedShardings on a mesh of the topology's
compile-only devices (MaxText's train_compile recipe). The step is the one training runs: frozen ViT and LLM in
bfloat16, trainable tree and AdamW in float32, T5 blocks rematerialised.

Reports, per chip: memory from XLA's buffer assignment (compiled.memory_analysis) against the chip's HBM; FLOPs
from XLA's cost analysis, which counts a loop body once, so by default two more compiles with the layer scans
unrolled two layers per trip scale the count to every layer (--flops); the time those FLOPs take at the chip's
published bf16 peak and at 50% / 35% MFU; XLA's own cost-model time estimate. Exits with status 1 when a program
does not fit. Each compile of a FlanT5-XL-sized program takes minutes of CPU and several GB of host memory.

Loading libtpu on a machine without TPUs prints warnings about TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES
("could not determine TPU accelerator type", "unexpected worker hostname"): they are harmless here.

Topologies: <chip>:<dims> as libtpu names them, e.g. v5e:4x4 (16 chips), v4:2x2x4 (16 chips), v5p:2x2x4, or a Cloud
TPU accelerator type: v5litepod-16, v4-32, v5p-32 (v4/v5p accelerator types count TensorCores, 2 per chip).
"""
import dataclasses
import math
import os
import sys
import time
from typing import Any

# Only ever compile here: never try to bring up a local TPU (there is none, and libtpu would complain loudly).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from ml_collections import config_flags  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from iblip_jax import decoding, optim, sharding  # noqa: E402
from iblip_jax import train_step as ts  # noqa: E402
from iblip_jax.models import configs as model_configs  # noqa: E402
from iblip_jax.models.instructblip import InstructBlip  # noqa: E402
from iblip_jax.pretrained import params_shape  # noqa: E402

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


CHIPS = {
    "v5e": Chip("v5e", "v5e", "default", 16 * GiB, 197e12, 2),
    "v4": Chip("v4", "v4", "megacore", 32 * GiB, 275e12, 3),
    "v5p": Chip("v5p", "v5", "megacore", 95 * GiB, 459e12, 3),
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


# --- the model and its abstract inputs ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Sequence lengths of one batch; defaults are the tokenizers' longest buckets (LAVIS's truncation lengths)."""
  instruction: int = 128   # Q-Former instruction tokens
  prompt: int = 128        # LLM prompt tokens (the Q visual tokens go in front of them)
  target: int = 256        # LLM target tokens


def tpu_model_config(config, *, frozen_dtype: str = "bfloat16", remat: bool = True):
  """The model config TPU training uses: frozen towers (ViT, T5) in `frozen_dtype`, the trainable side as configured
  (float32), T5 blocks rematerialised."""
  d = config.model.to_dict()
  d["vision"] = dict(d.get("vision", {}), dtype=frozen_dtype, param_dtype=frozen_dtype)
  d["text"] = dict(d.get("text", {}), dtype=frozen_dtype, param_dtype=frozen_dtype, remat=remat)
  return model_configs.from_dict(d)


def with_unroll(cfg, *, vision: int | None = None, text: int | None = None):
  """The same model (parameters and maths) with its layer scans unrolled `vision` / `text` layers at a time."""
  if vision is not None:
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, scan_unroll=vision))
  if text is not None:
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, scan_unroll=text))
  return cfg


def fully_unrolled(cfg):
  return with_unroll(cfg, vision=cfg.vision.num_hidden_layers,
                     text=max(cfg.text.num_layers, cfg.text.num_decoder_layers))


def _abstract(shapes: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def batch_specs(cfg, batch: int, shapes: Shapes, batch_sharding: NamedSharding, *, labels: bool = True) -> dict:
  """The train (or, without labels, decode) batch as sharded ShapeDtypeStructs."""
  v = cfg.vision
  ids = lambda n: jax.ShapeDtypeStruct((batch, n), jnp.int32, sharding=batch_sharding)
  out = dict(pixel_values=jax.ShapeDtypeStruct((batch, v.image_size, v.image_size, v.num_channels), jnp.float32,
                                               sharding=batch_sharding),
             qformer_input_ids=ids(shapes.instruction), qformer_attention_mask=ids(shapes.instruction),
             input_ids=ids(shapes.prompt), attention_mask=ids(shapes.prompt))
  if labels:
    out.update(labels=ids(shapes.target), decoder_attention_mask=ids(shapes.target))
  return out


@dataclasses.dataclass
class Setup:
  model: InstructBlip
  mesh: Any
  rules: list
  shardings: ts.Shardings
  trainable: dict      # ShapeDtypeStructs with shardings
  frozen: dict
  opt_state: Any
  tx: Any


def setup(config, cfg, devices, mesh_sizes: dict[str, int]) -> Setup:
  """Mesh, shardings and the abstract parameter / optimizer trees, from shapes only."""
  model = InstructBlip(cfg)
  tx = optim.make(config.optim, config.total_steps)
  mesh_config = dict(config.mesh.to_dict(), **mesh_sizes)
  mesh = sharding.make_mesh(mesh_config, devices)
  rules = [tuple(r) for r in config.sharding_rules]
  sh = ts.state_shardings(model, tx, config.trainable, mesh, rules,
                          max_replicated_bytes=int(config.max_replicated_mb * 2**20))
  train_shape, frozen_shape = ts.split(params_shape(model), config.trainable)
  opt_shape = jax.eval_shape(tx.init, train_shape)
  return Setup(model, mesh, rules, sh, _abstract(train_shape, sh.trainable), _abstract(frozen_shape, sh.frozen),
               _abstract(opt_shape, sh.opt_state), tx)


# --- compiling and reporting ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
  """One compiled program, per chip: XLA's buffer assignment and cost analysis."""
  what: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  compile_seconds: float
  flops: float | None = None           # per chip (the partitioned program runs on each chip)
  cost_seconds: float | None = None    # XLA's TPU cost model: its estimate of the program's run time
  cost_note: str = "not counted"

  @property
  def total_bytes(self) -> int:
    """Peak HBM of the program: arguments + outputs (donated arguments counted once) + scratch + code."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


class DoesNotFit(Exception):
  """XLA refused to compile because the program needs more HBM than the chip has."""


def _compile(lowered):
  try:
    return lowered.compile()
  except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED when buffer assignment exceeds HBM
    if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
      raise DoesNotFit(str(e)) from e
    raise


def _cost(compiled) -> tuple[float | None, float | None]:
  """(flops, optimal_seconds) from XLA's cost analysis; either may be missing on some backends."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per executable
    cost = cost[0] if cost else None
  cost = cost or {}
  flops, seconds = (float(cost[k]) if k in cost else None for k in ("flops", "optimal_seconds"))
  # XLA reports a negative optimal_seconds when its cost model has no estimate for some op of the program.
  return flops, seconds if seconds is not None and seconds > 0 else None


def _train_lowered(s: Setup, config, batch: int, shapes: Shapes):
  vision_frozen = "vision" not in s.trainable
  step = ts.jit_train_step(ts.make_train_step(s.model, s.tx, vision_frozen=vision_frozen, dropout=config.dropout),
                           s.shardings)
  rng = jax.eval_shape(jax.random.key, 0)
  args = (s.trainable, s.opt_state, s.frozen,
          batch_specs(s.model.config, batch, shapes, s.shardings.batch),
          jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=s.shardings.replicated))
  with sharding.context(s.mesh, s.rules):
    return step.lower(*args)


def _decode_lowered(s: Setup, batch: int, shapes: Shapes, new_tokens: int, num_beams: int):
  params = ts.merge(s.trainable, s.frozen)
  inputs = batch_specs(s.model.config, batch, shapes, s.shardings.batch, labels=False)
  with sharding.context(s.mesh, s.rules):
    return decoding._generate.lower(  # noqa: SLF001 (the jitted function generate() calls, lowered as is)
        s.model, params, inputs, num_beams=num_beams, max_new_tokens=new_tokens, min_new_tokens=1,
        length_penalty=1.0, repetition_penalty=1.0, num_return_sequences=1)


FLOP_METHODS = ("extrapolated", "unrolled", "scanned")


def counted_layers(length: int, unroll: int) -> int:
  """Layers of a `length`-layer scan that XLA's cost analysis sees when jax unrolls it `unroll` at a time: the loop
  body (counted once, however many trips) plus the remainder jax emits after the loop; with at most one trip
  there is no loop left (jax/_src/lax/control_flow/loops.py, _scan_impl)."""
  trips, remainder = divmod(length, unroll)
  return length if trips <= 1 else unroll + remainder


def _extrapolate(cfg, base, vision2, text2):
  """Per-chip (flops, seconds) of the whole model from three compiles: every scan one layer at a time (`base`),
  the ViT two at a time (`vision2`) and the T5 stacks two at a time (`text2`). Each scanned layer adds the same
  cost, so the differences give one layer's cost per stack, which scales to the real depth."""
  v, t = cfg.vision.num_hidden_layers, cfg.text.num_layers
  if cfg.text.num_decoder_layers != t:
    raise ValueError("--flops=extrapolated needs as many T5 decoder as encoder layers; use --flops=unrolled")
  def total(i):
    if any(c[i] is None for c in (base, vision2, text2)):
      return None
    out = base[i]
    for length, twin in ((v, vision2), (t, text2)):
      extra = counted_layers(length, 2) - counted_layers(length, 1)
      if extra:
        out += (twin[i] - base[i]) / extra * (length - counted_layers(length, 1))
    return out
  return total(0), total(1)


def _compile_program(what: str, lower, cfg, flops: str) -> Report:
  """Memory from the real (scanned) program `lower(cfg)`. FLOPs and XLA's time estimate per `flops`, because XLA's
  cost analysis counts a loop body once: "unrolled" compiles a fully unrolled twin (slow, memory hungry),
  "extrapolated" two twins with two layers per loop trip (see _extrapolate), "scanned" reads the real program."""
  if flops not in FLOP_METHODS:
    raise ValueError(f"flops={flops!r}; expected one of {FLOP_METHODS}")
  start = time.perf_counter()
  compiled = _compile(lower(cfg))
  m = compiled.memory_analysis()
  report = Report(what, m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                  m.temp_size_in_bytes, m.generated_code_size_in_bytes, time.perf_counter() - start)
  if flops == "scanned":
    report.flops, report.cost_seconds = _cost(compiled)
    report.cost_note = "XLA cost analysis of the scanned program: ONE layer per stack (an undercount)"
  elif flops == "unrolled":
    report.flops, report.cost_seconds = _cost(_compile(lower(fully_unrolled(cfg))))
    report.cost_note = "XLA cost analysis of the same program with every layer scan unrolled"
  else:
    twins = [_cost(_compile(lower(with_unroll(cfg, **kw)))) for kw in (dict(vision=2), dict(text=2))]
    report.flops, report.cost_seconds = _extrapolate(cfg, _cost(compiled), *twins)
    report.cost_note = "XLA cost analysis, scaled to all layers from compiles with 1 and 2 layers per scan trip"
  return report


def compile_train(config, topology: Topology, *, batch: int, mesh_sizes: dict[str, int] | None = None,
                  shapes: Shapes = Shapes(), flops: str = "extrapolated", frozen_dtype: str = "bfloat16",
                  remat: bool = True, devices=None) -> Report:
  """AOT-compiles the train step for `topology` (its FLOPs include the T5 forward that remat recomputes)."""
  devices = devices or topology_devices(topology)
  lower = lambda cfg: _train_lowered(setup(config, cfg, devices, mesh_sizes or {}), config, batch, shapes)
  report = _compile_program("train step", lower, tpu_model_config(config, frozen_dtype=frozen_dtype, remat=remat),
                            flops)
  if remat:
    report.cost_note += "; includes the T5 forward that remat recomputes"
  return report


def compile_decode(config, topology: Topology, *, batch: int, new_tokens: int = 10, num_beams: int = 1,
                   mesh_sizes: dict[str, int] | None = None, shapes: Shapes = Shapes(), flops: str = "extrapolated",
                   frozen_dtype: str = "bfloat16", devices=None) -> Report:
  """AOT-compiles jitted generation (greedy when num_beams=1). Its FLOPs are the prefill plus ONE decoding step:
  the token loop is a while_loop, whose body the cost analysis counts once."""
  devices = devices or topology_devices(topology)
  lower = lambda cfg: _decode_lowered(setup(config, cfg, devices, mesh_sizes or {}), batch, shapes, new_tokens,
                                      num_beams)
  search = "greedy" if num_beams == 1 else f"beam search, {num_beams} beams"
  report = _compile_program(f"generate ({search}, {new_tokens} new tokens)", lower,
                            tpu_model_config(config, frozen_dtype=frozen_dtype, remat=False), flops)
  report.cost_note += "; prefill + one decoding step"
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


def format_report(report: Report, topology: Topology) -> str:
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
    peak_seconds = report.flops / chip.peak_flops
    lines += [
        f"  FLOPs: {_flop_text(report.flops)} per chip, {_flop_text(report.flops * topology.num_chips)} on "
        f"{topology.num_chips} chips ({report.cost_note})",
        f"  time at the published bf16 peak ({chip.peak_flops / 1e12:.0f} TFLOP/s per chip): "
        f"{_time_text(peak_seconds)}; at 50% MFU {_time_text(peak_seconds / 0.5)}, at 35% MFU "
        f"{_time_text(peak_seconds / 0.35)}",
    ]
    if report.cost_seconds:
      lines.append(f"  XLA cost-model time: {_time_text(report.cost_seconds)}, i.e. "
                   f"{100 * peak_seconds / report.cost_seconds:.0f}% of peak (optimal_seconds of XLA's cost "
                   "analysis: an estimate, not a measurement)")
  return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------------------------


def define_flags() -> None:
  """Only when run as a script: importing this module (tests) must not claim absl's global --config flag."""
  config_flags.DEFINE_config_file("config", None, "Config file (a get_config() module).", lock_config=True)
  flags.DEFINE_string("topology", "v5e:4x4", "TPU slice: v5e:4x4, v4:2x2x4, v5p:2x2x4, v5litepod-16, v4-32, ...")
  flags.DEFINE_integer("batch", None, "Global train batch (default: config.batch_size).")
  flags.DEFINE_string("mesh", "", "Mesh sizes, e.g. data=2,fsdp=8,tensor=1 (default: config.mesh).")
  flags.DEFINE_list("lengths", ["128", "128", "256"], "Instruction, prompt and target token lengths.")
  flags.DEFINE_integer("decode_batch", None, "Global generation batch (default: the train batch).")
  flags.DEFINE_integer("new_tokens", 10, "Tokens to generate in the decode compile.")
  flags.DEFINE_integer("num_beams", 1, "1 = greedy; >1 compiles beam search.")
  flags.DEFINE_enum("frozen_dtype", "bfloat16", ["bfloat16", "float32"], "ViT and LLM dtype.")
  flags.DEFINE_bool("remat", True, "Rematerialise T5 blocks in the backward pass.")
  flags.DEFINE_enum("flops", "extrapolated", list(FLOP_METHODS), "How to count FLOPs past XLA's count-a-loop-once "
                    "cost analysis: extrapolated (2 extra compiles), unrolled (1 extra compile; for FlanT5-XL it "
                    "ran past 30 min and 22 GB of host memory on 2 cores), scanned (no extra compile; counts one "
                    "layer per stack only).")
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
  mesh_sizes = parse_mesh(f.mesh)
  devices = topology_devices(topology)
  mesh = sharding.make_mesh(dict(config.mesh.to_dict(), **mesh_sizes), devices)
  print(f"topology {topology} = {topology.num_chips} x {devices[0].device_kind}, "
        f"{topology.chip.hbm_bytes / GiB:.0f} GiB HBM per chip; mesh {dict(mesh.shape)}; lengths instruction "
        f"{shapes.instruction}, prompt {shapes.prompt}, target {shapes.target}; frozen towers {f.frozen_dtype}, "
        f"T5 remat {f.remat}", flush=True)
  common = dict(mesh_sizes=mesh_sizes, shapes=shapes, flops=f.flops,
                frozen_dtype=f.frozen_dtype, devices=devices)
  jobs = [(f"global batch {batch} ({batch / topology.num_chips:g} per chip)",
           lambda: compile_train(config, topology, batch=batch, remat=f.remat, **common))]
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
    print(f"{format_report(report, topology)}\n  ({what})", flush=True)
    ok &= fits(report, topology)
  if not ok:
    sys.exit(f"error: does not fit on {topology} ({topology.chip.hbm_bytes / GiB:.0f} GiB HBM per chip); "
             "try more chips, a smaller --batch, or another --mesh / config.sharding_rules")
  print(f"OK: fits on {topology}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
