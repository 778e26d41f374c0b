"""Ahead-of-time compile of the real train step and greedy decoding for a TPU slice, on a host without TPUs.

  python tools/aot_compile.py --config configs/instructblip_flant5xl.py --topology v5e:4x4 [--batch 192]
      [--mesh data=1,fsdp=16,tensor=1] [--config.x=...]

Needs libtpu installed (it is the TPU compiler; no TPU hardware is touched). Nothing is allocated: parameters,
optimizer state and batches are jax.ShapeDtypeStructs carrying their NamedShardings on a mesh of the topology's
compile-only devices (MaxText's train_compile recipe). The step is the one training runs: frozen ViT and LLM in
bfloat16, trainable tree and AdamW in float32, LLM blocks rematerialised.

Reports per-chip memory from XLA's buffer assignment of the TPU compile (compiled.memory_analysis) against the
chip's HBM; FLOPs per call, counted on the same program with its layer loops unrolled, before partitioning (see
global_flops for why not from the TPU compile); the time those FLOPs take at the chip's published bf16 peak and at
half of it, with the MFU that follows (model FLOPs leave out what remat recomputes). Exits with status 1 when a
program does not fit. The TPU compile of FlanT5-XL's train step at batch 192 took ~10 minutes and ~16 GB of host
memory on a busy 2-core machine.

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
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from iblip_jax import decoding, optim, sharding, train_state  # noqa: E402
from iblip_jax import trainable as trainable_lib  # noqa: E402
from iblip_jax.models import configs as model_configs  # noqa: E402
from iblip_jax.models.instructblip import InstructBlip  # noqa: E402
from iblip_jax.pretrained import params_shape  # noqa: E402
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


# --- compiling and reporting ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
  """One program: XLA's buffer assignment per chip (TPU compile) and its FLOPs per call (see global_flops)."""
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


def _memory_report(what: str, lowered) -> Report:
  start = time.perf_counter()
  m = _compile(lowered).memory_analysis()
  return Report(what, m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                m.temp_size_in_bytes, m.generated_code_size_in_bytes, time.perf_counter() - start)


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
                  devices=None) -> Report:
  """AOT-compiles the train step for `topology` (memory) and counts its FLOPs (train_flops)."""
  cfg = tpu_model_config(config, frozen_dtype=frozen_dtype, remat=remat)
  s = setup(config, cfg, devices or topology_devices(topology), mesh_sizes or {})
  trainable, frozen, opt_state = s.abstract()
  args = (trainable, opt_state, frozen, s.batch_spec(batch, shapes), _rng(s.shardings.replicated))
  step = s.train_step(dropout=config.dropout)   # the very step training runs
  with sharding.context(s.mesh, s.rules):
    report = _memory_report("train step", step.lower(*args))
  report.flops = train_flops(config, cfg, batch=batch, shapes=shapes)
  report.model_flops = train_flops(config, tpu_model_config(config, frozen_dtype=frozen_dtype, remat=False),
                                   batch=batch, shapes=shapes) if remat else report.flops
  report.flops_note = "forward, backward and AdamW"
  return report


def compile_decode(config, topology: Topology, *, batch: int, new_tokens: int = 10, num_beams: int = 1,
                   mesh_sizes: dict[str, int] | None = None, shapes: Shapes = Shapes(),
                   frozen_dtype: str = "bfloat16", devices=None) -> Report:
  """AOT-compiles generation (greedy when num_beams=1) as `iblip_jax.generate` runs it, and counts its FLOPs."""
  cfg = tpu_model_config(config, frozen_dtype=frozen_dtype, remat=False)
  s = setup(config, cfg, devices or topology_devices(topology), mesh_sizes or {})
  trainable, frozen, _ = s.abstract()
  inputs = s.batch_spec(batch, shapes, labels=False)
  search = "greedy" if num_beams == 1 else f"beam search, {num_beams} beams"
  generate = decoding._generate  # noqa: SLF001 (the jitted function iblip_jax.generate calls)
  with sharding.context(s.mesh, s.rules):
    report = _memory_report(f"generate ({search}, {new_tokens} new tokens)",
                            generate.lower(s.model, trainable_lib.merge(trainable, frozen), inputs,
                                           **_decode_settings(new_tokens, num_beams)))
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
  mesh_sizes = parse_mesh(f.mesh)
  devices = topology_devices(topology)
  mesh = sharding.make_mesh(dict(config.mesh.to_dict(), **mesh_sizes), devices)
  print(f"topology {topology} = {topology.num_chips} x {devices[0].device_kind}, "
        f"{topology.chip.hbm_bytes / GiB:.0f} GiB HBM per chip; mesh {dict(mesh.shape)}; lengths instruction "
        f"{shapes.instruction}, prompt {shapes.prompt}, target {shapes.target}; frozen towers {f.frozen_dtype}, "
        f"LLM remat {f.remat}", flush=True)
  common = dict(mesh_sizes=mesh_sizes, shapes=shapes, frozen_dtype=f.frozen_dtype, devices=devices)
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
