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
                overrides: dict | None = None) -> InstructBlipConfig:
  """The model config of a local Hugging Face InstructBLIP directory: its config.json is the source of truth for
  the architecture; `dtype` and `instruction_aware` are applied, then `overrides` (a nested dict like
  `config.model.to_dict()`). An override that contradicts the weights' shapes raises a CheckpointError naming
  the field and both values."""
  if not os.path.isdir(path):
    raise hf_checkpoint.CheckpointError(f"{path}: not a directory (expected a local Hugging Face InstructBLIP "
                                        "checkpoint directory; nothing is downloaded)")
  hf_config = hf_checkpoint.read_config(path)
  reader = hf_checkpoint.SafetensorsReader(path)
  # A checkpoint without lm_head has a head tied to the shared embedding (transformers 5 writes tied heads so).
  tied = "language_model.lm_head.weight" not in reader.keys()
  reader.close()
  cfg = hf_checkpoint.config_from_hf(hf_config, tied_head=tied, source=os.path.join(path, hf_checkpoint.CONFIG_NAME))
  cfg = _with_dtype(cfg, dtype).replace(instruction_aware=instruction_aware)
  if overrides:
    try:
      cfg = model_configs.with_overrides(cfg, overrides, os.path.join(path, hf_checkpoint.CONFIG_NAME))
    except ValueError as e:
      raise hf_checkpoint.CheckpointError(str(e)) from None
  return cfg


def load_params(path: str, model: InstructBlip, *, shardings=None, progress: bool = False) -> dict:
  """The weights of a local Hugging Face directory for `model`, as global arrays in `shardings` (a tree like the
  params; default: this process's first device). Each process reads each tensor's part its devices hold, once.
  `progress` shows bytes read with an ETA on process 0 and prints the time and rate at the end."""
  reader = hf_checkpoint.SafetensorsReader(path)
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
  (log.info if progress and jax.process_index() == 0 else log.debug)(message)
  return params


def from_pretrained(path: str, dtype=jnp.float32, *, instruction_aware: bool = True, overrides: dict | None = None,
                    shardings=None, mesh=None, rules=None):
  """Loads a local Hugging Face InstructBLIP directory (config.json + safetensors). Returns (model, params).

  `dtype` is the storage and compute dtype of the frozen ViT and LLM (bfloat16 on TPU); the Q-Former side is always
  float32. `instruction_aware=False` builds the BLIP-2-style Q-Former (the paper's ablation) from the same weights.
  `overrides` are further settings (`{"text": {"remat": True}, "vision": {"scan_layers": False}}`, ...; see
  load_config). Parameters go straight into `shardings`, or into the logical shardings of `mesh` under `rules`
  (see iblip_jax.sharding), or onto one device.
  """
  model = InstructBlip(load_config(path, dtype, instruction_aware=instruction_aware, overrides=overrides))
  if shardings is None and mesh is not None:
    shardings = sharding.logical_shardings(params_shape(model, boxed=True), mesh, rules or ())
  return model, load_params(path, model, shardings=shardings)


def save_pretrained(model: InstructBlip, params, out_dir: str) -> None:
  """Writes `out_dir` in the format transformers' InstructBlipForConditionalGeneration.from_pretrained reads.

  Tensors are written in the dtype they have in `params`.
  """
  if not model.config.instruction_aware:
    raise ValueError("save_pretrained: a model built with instruction_aware=False has no Q-Former text weights, "
                     "so transformers could not load it; rebuild it instruction-aware to export")
  hf_checkpoint.save_hf(model.config, nn.meta.unbox(params), out_dir)
