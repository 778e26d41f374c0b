"""Ahead-of-time compile of the real train step and greedy decoding for a TPU slice, on a host without TPUs, and a
model of the step's time on that slice.

  python tools/aot_compile.py --config configs/instructblip_flant5xl.py --topology v5e:4x4 [--batch 192]
      [--preset fsdp|data_fsdp|tensor4] [--mesh data=1,fsdp=16,tensor=1] [--remat_policy save_dots_no_batch]
      [--mfu 0.5] [--libtpu_flags '...'] [--nodecode | --notrain --decode_batch 256] [--config.x=...]

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

The work is in iblip_jax/aot/ (topology, compile, hlo, step_model); this file is its command line.

Topologies: <chip>:<dims> as libtpu names them, e.g. v5e:4x4 (16 chips), v4:2x2x4 (16 chips), v5p:2x2x4, or a Cloud
TPU accelerator type: v5litepod-16, v4-32, v5p-32 (v4/v5p accelerator types count TensorCores, 2 per chip).
"""
import os
import sys

# Only ever compile here: never try to bring up a local TPU (there is none, and libtpu would complain loudly). Set
# before JAX is imported (iblip_jax imports it).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from iblip_jax import sharding  # noqa: E402
from iblip_jax.aot.compile import MAXTEXT_LIBTPU_FLAGS, Shapes, compile_decode, compile_train  # noqa: E402
from iblip_jax.aot.step_model import DEFAULT_MFU, DoesNotFit, fits, format_report  # noqa: E402
from iblip_jax.aot.topology import GiB, PRESETS, parse_mesh, parse_topology, preset_mesh, topology_devices  # noqa: E402
from iblip_jax.models import configs as model_configs  # noqa: E402


def define_flags() -> None:
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
  flags.DEFINE_bool("train", True, "Compile the train step (--notrain: generation alone, e.g. for annotation).")
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
  jobs = []
  if f.train:
    jobs.append((f"global batch {batch} ({batch / topology.num_chips:g} per chip)",
                 lambda: compile_train(config, topology, batch=batch, remat=f.remat, remat_policy=f.remat_policy,
                                       hlo_path=f.dump_hlo, **common)))
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