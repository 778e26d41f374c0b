"""Ahead-of-time compiles of the real train step and of generation for a TPU topology, from shapes only (MaxText's
train_compile recipe): the training state the main job builds (iblip_jax.train_state) on the topology's
compile-only devices, the libtpu flags the job runs with, per-chip memory from XLA's buffer assignment, FLOPs
counted before partitioning, and the compiled program read back for the step model."""
import dataclasses
import re
import time
from typing import Any

import jax
from jax.sharding import NamedSharding

from iblip_jax import decoding, optim, sharding, train_state
from iblip_jax import trainable as trainable_lib
from iblip_jax.aot.hlo import Program, hbm_bytes
from iblip_jax.aot.step_model import DoesNotFit, Report, communication
from iblip_jax.aot.topology import Topology, topology_devices
from iblip_jax.models.instructblip import InstructBlip, params_shape
from iblip_jax.run import settings
from iblip_jax.step_flops import fully_unrolled, train_step_flops

Shapes = train_state.Lengths   # the batch's sequence lengths (the tokenizers' longest buckets by default)




def tpu_model_config(config, *, frozen_dtype: str = "bfloat16", remat: bool = True, remat_policy: str | None = None):
  """The model config TPU training uses: frozen towers (ViT, LLM) in `frozen_dtype`, the trainable side as
  configured (float32), LLM blocks rematerialised with `remat_policy` (default: config.model.text.remat_policy);
  config.lora's adapters and the towers' quantisation (model.<tower>.quantize) as the job applies them."""
  cfg = settings.for_tools(config).model
  frozen = dict(dtype=frozen_dtype, param_dtype=frozen_dtype)
  text = dict(frozen, remat=remat, **({"remat_policy": remat_policy} if remat_policy else {}))
  return cfg.replace(vision=dataclasses.replace(cfg.vision, **frozen), text=dataclasses.replace(cfg.text, **text))


def _abstract_state(config, model: InstructBlip) -> tuple[dict, dict, Any]:
  """(trainable, frozen, optimizer state) as unsharded ShapeDtypeStructs (for counting FLOPs before partitioning)."""
  trainable, frozen = trainable_lib.split(params_shape(model), settings.for_tools(config).trainable)   # + adapters
  return trainable, frozen, jax.eval_shape(optim.make(config.optim, config.total_steps).init, trainable)


def setup(config, cfg, devices, mesh_sizes: dict[str, int]) -> train_state.TrainSetup:
  """The training state the main job builds (iblip_jax.train_state), on the topology's devices, from shapes only."""
  s = settings.for_tools(config, model=cfg)
  mesh = sharding.make_mesh(dict(s.mesh, **mesh_sizes), devices)
  return train_state.build(InstructBlip(cfg), patterns=s.trainable, optim=s.optim, total_steps=s.total_steps,
                           mesh=mesh, rules=s.sharding_rules, max_replicated_bytes=s.max_replicated_bytes)




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
  and AdamW, every layer counted (iblip_jax.step_flops)."""
  trainable, frozen, opt_state = _abstract_state(config, InstructBlip(cfg))
  return train_step_flops(cfg, optim.make(config.optim, config.total_steps), trainable, opt_state, frozen,
                          train_state.batch_spec(cfg, batch, shapes), dropout=config.dropout)


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


def describe_training(cfg, trainable) -> str:
  """'6,553,600 parameters (with LoRA adapters of rank 8); ViT int8, LLM int8 (weight-only)': what a train-step report
  is about."""
  n = sum(x.size for x in jax.tree.leaves(trainable))
  lora = f" (with LoRA adapters of rank {cfg.lora.rank})" if cfg.lora is not None else ""
  towers = [f"{name} {tower.quantize}" for name, tower in (("ViT", cfg.vision), ("LLM", cfg.text)) if tower.quantize]
  return f"{n:,} parameters{lora}" + (f"; {', '.join(towers)} (weight-only)" if towers else "")


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
  report.trainable = describe_training(cfg, trainable)
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
