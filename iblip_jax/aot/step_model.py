"""A step's time on a slice, modelled from its compiled program: compute at an assumed utilisation, the bytes its
collectives move over the ICI links their groups span, the HBM bytes its operations move; the report printed."""
import dataclasses

import numpy as np

from iblip_jax.aot.hlo import KIND_ORDER, Program, collectives
from iblip_jax.aot.topology import GiB, Topology, wrap

def _links(topology: Topology, coords: np.ndarray) -> int:
  """ICI links per chip a collective over chips at `coords` can use: in every torus dimension the group spans, 2
  when the dimension wraps around and the group covers it whole (a ring: both directions), else 1 (a line: the
  end chips have one neighbour, and they bound the time)."""
  grid = topology.grid + (1,) * (3 - len(topology.grid))
  wraps = wrap(topology)
  links = 0
  for d in range(coords.shape[1]):
    extent = len(set(coords[:, d].tolist()))
    if extent > 1:
      links += 2 if wraps[d] and extent == grid[d] and extent > 2 else 1
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
  trainable: str = ""               # what the train step trains: parameter count, adapters, quantised towers
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
  if report.trainable:
    lines.append(f"  trains {report.trainable}")
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
