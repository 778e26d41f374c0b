"""`from_pretrained` / `save_pretrained`: the public way in and out of the Hugging Face format."""
import dataclasses
import logging
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from iblip_jax import hf_checkpoint, sharding
from iblip_jax.models import configs as model_configs
from iblip_jax.models.configs import InstructBlipConfig
from iblip_jax.models.instructblip import InstructBlip

log = logging.getLogger(__name__)


def dummy_inputs(cfg: InstructBlipConfig, batch: int = 1) -> dict[str, jax.Array]:
  """Smallest inputs that touch every parameter (for init and eval_shape)."""
  size = cfg.vision.image_size
  one = jnp.ones((batch, 1), jnp.int32)
  return dict(pixel_values=jnp.zeros((batch, size, size, cfg.vision.num_channels), jnp.float32),
              qformer_input_ids=one, qformer_attention_mask=one, input_ids=one, attention_mask=one,
              decoder_input_ids=None if cfg.decoder_only else one)


def init_fn(model: InstructBlip):
  """rng -> boxed params (with logical axis metadata), for jax.eval_shape or a sharded jax.jit."""
  def init(rng):
    return model.init(rng, **dummy_inputs(model.config))["params"]
  return init


def params_shape(model: InstructBlip, *, boxed: bool = False):
  """The parameter tree as ShapeDtypeStructs, without allocating anything."""
  shape = jax.eval_shape(init_fn(model), jax.random.key(0))
  return shape if boxed else nn.meta.unbox(shape)


def _with_dtype(cfg: InstructBlipConfig, dtype) -> InstructBlipConfig:
  """The frozen towers (ViT, LLM) store and compute in `dtype`; the trainable side stays float32 (master weights)."""
  name = jnp.dtype(dtype).name
  return cfg.replace(vision=dataclasses.replace(cfg.vision, dtype=name, param_dtype=name),
                     text=dataclasses.replace(cfg.text, dtype=name, param_dtype=name))


def load_config(path: str, dtype=jnp.float32, *, instruction_aware: bool = True,
                overrides: dict | None = None, stage1: str | None = None) -> InstructBlipConfig:
  """The model config of a local Hugging Face InstructBLIP directory, or of a BLIP-2 stage-2 directory (with its
  stage-1 directory in `stage1`; see hf_checkpoint's BLIP-2 section): the config.json is the source of truth for
  the architecture; `dtype` and `instruction_aware` are applied, then `overrides` (a nested dict like
  `config.model.to_dict()`). An override that contradicts the weights' shapes raises a CheckpointError naming
  the field and both values."""
  _check_dir(path, "")
  hf_config = hf_checkpoint.parse_config(path)
  source = os.path.join(path, hf_checkpoint.CONFIG_NAME)
  if hf_checkpoint.is_blip2(hf_config):
    if stage1:
      _check_dir(stage1, "_stage1")
    text_sizes = ((overrides or {}).get("qformer") or {}) if not stage1 else None
    hf_config = hf_checkpoint.blip2_config(path, stage1, text_sizes=text_sizes)
    source = f"{source} (BLIP-2 stage 2{' + stage 1 ' + stage1 if stage1 else ''})"
  else:
    if stage1:
      raise hf_checkpoint.CheckpointError(
          f"{path}: an InstructBLIP checkpoint has its Q-Former's text side already; a stage-1 checkpoint "
          f"({stage1}) applies only when config.model_init is a BLIP-2 stage-2 directory")
    hf_config = hf_checkpoint.read_config(path)
  reader = hf_checkpoint.SafetensorsReader(path)
  # A checkpoint without lm_head has a head tied to the shared embedding (transformers 5 writes tied heads so).
  tied = "language_model.lm_head.weight" not in reader.keys()
  reader.close()
  cfg = hf_checkpoint.config_from_hf(hf_config, tied_head=tied, source=source)
  cfg = _with_dtype(cfg, dtype).replace(instruction_aware=instruction_aware)
  if overrides:
    try:
      cfg = model_configs.with_overrides(cfg, overrides, source)
    except ValueError as e:
      raise hf_checkpoint.CheckpointError(str(e)) from None
  return cfg


def _check_dir(path: str, suffix: str) -> None:
  if not os.path.isdir(path):
    raise hf_checkpoint.CheckpointError(f"config.model_init{suffix}={path!r}: not a directory (expected a local "
                                        "Hugging Face InstructBLIP or BLIP-2 checkpoint directory; nothing is "
                                        "downloaded)")


def open_reader(path: str, model: InstructBlip, stage1: str | None = None):
  """The tensors of `path` under InstructBLIP's names: the directory itself (InstructBLIP) or a BLIP-2 start
  (hf_checkpoint.Blip2Reader). Returns (reader, what it holds in one line)."""
  if hf_checkpoint.is_blip2(hf_checkpoint.parse_config(path)):
    reader = hf_checkpoint.Blip2Reader(path, stage1, model.config.qformer,
                                       text_side=model.config.instruction_aware)
    return reader, reader.describe()
  return hf_checkpoint.SafetensorsReader(path), f"InstructBLIP {path} (every part)"


def load_params(path: str, model: InstructBlip, *, shardings=None, progress: bool = False,
                stage1: str | None = None) -> dict:
  """The weights of a local Hugging Face directory for `model`, as global arrays in `shardings` (a tree like the
  params; default: this process's first device). Each process reads each tensor's part its devices hold, once.
  A BLIP-2 stage-2 directory takes its Q-Former text side from `stage1` (or the documented fallback).
  `progress` shows bytes read with an ETA on process 0 and prints the time and rate at the end; one line says what
  was initialised from where."""
  reader, origin = open_reader(path, model, stage1)
  start = time.perf_counter()
  try:
    params = hf_checkpoint.load_params(params_shape(model), reader, shardings=shardings,
                                       instruction_aware=model.config.instruction_aware, progress=progress)
    jax.block_until_ready(params)
  finally:
    reader.close()
  seconds = time.perf_counter() - start
  message = (f"loaded {path}: {len(reader.keys())} tensors, {reader.bytes_read / 1e9:.2f} GB read by this process "
             f"in {seconds:.1f} s ({reader.bytes_read / 1e9 / max(seconds, 1e-9):.2f} GB/s)")
  loud = progress and jax.process_index() == 0
  (log.info if loud else log.debug)(message)
  (log.info if loud else log.debug)("model_init: %s", origin)
  return params


def from_pretrained(path: str, dtype=jnp.float32, *, instruction_aware: bool = True, overrides: dict | None = None,
                    shardings=None, mesh=None, rules=None, stage1: str | None = None):
  """Loads a local Hugging Face InstructBLIP directory (config.json + safetensors). Returns (model, params).

  `dtype` is the storage and compute dtype of the frozen ViT and LLM (bfloat16 on TPU); the Q-Former side is always
  float32. `instruction_aware=False` builds the BLIP-2-style Q-Former (the paper's ablation) from the same weights.
  `overrides` are further settings (`{"text": {"remat": True}, "vision": {"scan_layers": False}}`, ...; see
  load_config). Parameters go straight into `shardings`, or into the logical shardings of `mesh` under `rules`
  (see iblip_jax.sharding), or onto one device.
  `path` may also be a BLIP-2 stage-2 directory (transformers' Blip2ForConditionalGeneration, e.g.
  blip2-flan-t5-xl): the paper's starting point. Its Q-Former text side then comes from `stage1`, a BLIP-2 stage-1
  directory (Blip2ForImageTextRetrieval, blip2-itm-vit-g), as LAVIS does, or from a documented fallback with a
  warning (hf_checkpoint's BLIP-2 section).
  """
  model = InstructBlip(load_config(path, dtype, instruction_aware=instruction_aware, overrides=overrides,
                                   stage1=stage1))
  if shardings is None and mesh is not None:
    shardings = sharding.logical_shardings(params_shape(model, boxed=True), mesh, rules or ())
  return model, load_params(path, model, shardings=shardings, stage1=stage1)


def save_pretrained(model: InstructBlip, params, out_dir: str) -> None:
  """Writes `out_dir` in the format transformers' InstructBlipForConditionalGeneration.from_pretrained reads.

  Tensors are written in the dtype they have in `params`.
  """
  if not model.config.instruction_aware:
    raise ValueError("save_pretrained: a model built with instruction_aware=False has no Q-Former text weights, "
                     "so transformers could not load it; rebuild it instruction-aware to export")
  hf_checkpoint.save_hf(model.config, nn.meta.unbox(params), out_dir)
