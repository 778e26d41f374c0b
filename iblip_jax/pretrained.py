"""`from_pretrained` / `save_pretrained`: the public way in and out of the Hugging Face format."""
import dataclasses
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from iblip_jax import hf_checkpoint
from iblip_jax.models.configs import InstructBlipConfig
from iblip_jax.models.instructblip import InstructBlip


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


def from_pretrained(path: str, dtype=jnp.float32, *, instruction_aware: bool = True, text_remat: bool = False,
                    scan_vision: bool = True):
  """Loads a local Hugging Face InstructBLIP directory (config.json + safetensors). Returns (model, params).

  `dtype` is the storage and compute dtype of the frozen ViT and LLM (bfloat16 on TPU); the Q-Former side is always
  float32. `instruction_aware=False` builds the BLIP-2-style Q-Former (the paper's ablation) from the same weights.
  `text_remat` rematerialises T5 blocks in the backward pass; `scan_vision=False` unrolls the ViT blocks so that
  single blocks can be trained (their paths become vision/layers_<i>/...).
  """
  if not os.path.isdir(path):
    raise hf_checkpoint.CheckpointError(f"{path}: not a directory (expected a local Hugging Face InstructBLIP "
                                        "checkpoint directory; nothing is downloaded)")
  hf_config = hf_checkpoint.read_config(path)
  reader = hf_checkpoint.SafetensorsReader(path)
  # A checkpoint without lm_head has a head tied to the shared embedding (transformers 5 writes tied heads so).
  tied = "language_model.lm_head.weight" not in reader.keys()
  cfg = hf_checkpoint.config_from_hf(hf_config, tied_head=tied)
  cfg = _with_dtype(cfg, dtype).replace(instruction_aware=instruction_aware)
  cfg = cfg.replace(text=dataclasses.replace(cfg.text, remat=text_remat),
                    vision=dataclasses.replace(cfg.vision, scan_layers=scan_vision))
  model = InstructBlip(cfg)
  params = hf_checkpoint.load_params(params_shape(model), reader, instruction_aware=instruction_aware)
  logging.info("loaded %s (%d tensors)", path, len(reader.keys()))
  return model, jax.tree.map(jnp.asarray, params)


def save_pretrained(model: InstructBlip, params, out_dir: str) -> None:
  """Writes `out_dir` in the format transformers' InstructBlipForConditionalGeneration.from_pretrained reads.

  Tensors are written in the dtype they have in `params`.
  """
  if not model.config.instruction_aware:
    raise ValueError("save_pretrained: a model built with instruction_aware=False has no Q-Former text weights, "
                     "so transformers could not load it; rebuild it instruction-aware to export")
  hf_checkpoint.save_hf(model.config, nn.meta.unbox(params), out_dir)
