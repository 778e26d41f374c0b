"""`from_pretrained` / `save_pretrained`: the public way in and out of the Hugging Face format."""
import dataclasses
import functools
import logging
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from iblip_jax import lora, sharding
from iblip_jax import trainable as trainable_lib
from iblip_jax.errors import CheckpointError
from iblip_jax.hf import blip2, peft, params as hf_params
from iblip_jax.hf.config import config_from_hf, parse_config, read_config
from iblip_jax.hf.names import CONFIG_NAME
from iblip_jax.hf.safetensors import SafetensorsReader
from iblip_jax.models import configs as model_configs
from iblip_jax.models import quantize
from iblip_jax.models.configs import InstructBlipConfig
from iblip_jax.models.instructblip import InstructBlip, params_shape

log = logging.getLogger(__name__)


def _with_dtype(cfg: InstructBlipConfig, dtype) -> InstructBlipConfig:
  """The frozen towers (ViT, LLM) store and compute in `dtype`; the trainable side stays float32 (master weights)."""
  name = jnp.dtype(dtype).name
  return cfg.replace(vision=dataclasses.replace(cfg.vision, dtype=name, param_dtype=name),
                     text=dataclasses.replace(cfg.text, dtype=name, param_dtype=name))


def load_config(path: str, dtype=jnp.float32, *, instruction_aware: bool = True,
                overrides: dict | None = None, stage1: str | None = None) -> InstructBlipConfig:
  """The model config of a local Hugging Face InstructBLIP directory, or of a BLIP-2 stage-2 directory (with its
  stage-1 directory in `stage1`; see hf/blip2.py): the config.json is the source of truth for the architecture;
  `dtype` and `instruction_aware` are applied, then `overrides` (a nested dict like `config.model.to_dict()`).
  An override that contradicts the weights' shapes raises a CheckpointError naming the field and both values."""
  _check_dir(path, "InstructBLIP or BLIP-2")
  hf_config = parse_config(path)
  source = os.path.join(path, CONFIG_NAME)
  if blip2.is_blip2(hf_config):
    if stage1:
      _check_dir(stage1, "BLIP-2 stage-1")
    text_sizes = ((overrides or {}).get("qformer") or {}) if not stage1 else None
    hf_config = blip2.blip2_config(path, stage1, text_sizes=text_sizes)
    source = f"{source} (BLIP-2 stage 2{' + stage 1 ' + stage1 if stage1 else ''})"
  else:
    if stage1:
      raise CheckpointError(
          f"{path}: an InstructBLIP checkpoint has its Q-Former's text side already; a stage-1 checkpoint "
          f"({stage1}) applies only to a BLIP-2 stage-2 directory")
    hf_config = read_config(path)
  reader = SafetensorsReader(path)
  # A checkpoint without lm_head has a head tied to the shared embedding (transformers 5 writes tied heads so).
  tied = "language_model.lm_head.weight" not in reader.keys()
  reader.close()
  cfg = config_from_hf(hf_config, tied_head=tied, source=source)
  cfg = _with_dtype(cfg, dtype).replace(instruction_aware=instruction_aware)
  if overrides:
    try:
      cfg = model_configs.with_overrides(cfg, overrides, source)
    except ValueError as e:
      raise CheckpointError(str(e)) from None
  return cfg


def _check_dir(path: str, what: str) -> None:
  if not os.path.isdir(path):
    raise CheckpointError(f"{path!r}: not a directory (expected a local Hugging Face {what} checkpoint directory; "
                          "nothing is downloaded)")


def open_reader(path: str, model: InstructBlip, stage1: str | None = None):
  """The tensors of `path` under InstructBLIP's names: the directory itself (InstructBLIP) or a BLIP-2 start
  (hf.blip2.Blip2Reader). Returns (reader, what it holds in one line)."""
  if blip2.is_blip2(parse_config(path)):
    reader = blip2.Blip2Reader(path, stage1, model.config.qformer,
                               text_side=model.config.instruction_aware)
    return reader, reader.describe()
  return SafetensorsReader(path), f"InstructBLIP {path} (every part)"


def load_params(path: str, model: InstructBlip, *, shardings=None, progress: bool = False,
                stage1: str | None = None, adapter_rng=None) -> dict:
  """The weights of a local Hugging Face directory for `model`, as global arrays in `shardings` (a tree like the
  params; default: this process's first device). Each process reads each tensor's part its devices hold, once.
  A BLIP-2 stage-2 directory takes its Q-Former text side from `stage1` (or the documented fallback).
  `progress` shows bytes read with an ETA on process 0 and prints the time and rate at the end; one line says what
  was initialised from where. A model with LoRA adapters (model.config.lora) gets them fresh (lora.init, from
  `adapter_rng`, default key 0): a Hugging Face checkpoint holds none."""
  reader, origin = open_reader(path, model, stage1)
  start = time.perf_counter()
  shape = params_shape(model)
  adapters, base_shape = lora.split(shape)
  if shardings is None:   # one device, as load_params' own default, so that quantising places its output there too
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: one, shape)
  base_shardings = lora.split(shardings)[1]
  load_shape, on_leaf = _quantize_on_load(model, base_shape, base_shardings)
  try:
    params = hf_params.load_params(load_shape, reader, shardings=base_shardings,
                                   instruction_aware=model.config.instruction_aware, progress=progress,
                                   on_leaf=on_leaf)
    if adapters:
      rng = jax.random.key(0) if adapter_rng is None else adapter_rng
      params = trainable_lib.merge(params, lora.init(model, rng, shardings))
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


def _with_quantize(overrides: dict | None, quantize: str | dict | None) -> dict | None:
  if not quantize:
    return overrides
  per_tower = quantize if isinstance(quantize, dict) else {"vision": quantize, "text": quantize}
  unknown = sorted(set(per_tower) - {"vision", "text"})
  if unknown:
    raise ValueError(f"quantize={quantize!r}: towers {unknown} cannot be quantised; expected 'vision' and/or 'text'")
  out = dict(overrides or {})
  for tower, mode in per_tower.items():
    out[tower] = {**dict(out.get(tower) or {}), "quantize": mode}
  return out


def _quantize_on_load(model: InstructBlip, shape: dict, shardings: dict):
  """(the shapes to read, a per-leaf hook) for a model with quantised towers: each quantised kernel is read as a
  float tensor in its tower's compute dtype (its regions, into its shardings, like any leaf) and quantised there and
  then into the integer kernel and scale, so that a tower never exists whole in floating point."""
  flat_shape, flat_sh = hf_params.flat(shape), hf_params.flat(shardings)
  modes = {path: quantize.mode_of(leaf.dtype) for path, leaf in flat_shape.items() if path[-1] == "kernel"}
  modes = {path: mode for path, mode in modes.items() if mode}
  if not modes:
    return shape, None
  towers = {"vision": model.config.vision}
  read = {path: (jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(towers.get(path[0], model.config.text).dtype))
                 if path in modes else leaf)
          for path, leaf in flat_shape.items() if path[-1] != "kernel_scale" or path[:-1] + ("kernel",) not in modes}

  def on_leaf(path, value):
    if path not in modes:
      return {path: value}
    scale_path = path[:-1] + ("kernel_scale",)
    group = towers.get(path[0], model.config.text).quantize_group
    q, scale = _quantizer(modes[path], group, flat_sh[path], flat_sh[scale_path])(value)
    return {path: q, scale_path: scale}
  return hf_params.unflat(read), on_leaf


@functools.lru_cache(maxsize=64)
def _quantizer(mode: str, group: int, kernel_sharding, scale_sharding):
  """quantize.quantize compiled for these shardings (one program per kernel shape, reused across layers)."""
  return jax.jit(lambda w: quantize.quantize(w, mode, group), out_shardings=(kernel_sharding, scale_sharding))


def from_pretrained(path: str, dtype=jnp.float32, *, instruction_aware: bool = True, overrides: dict | None = None,
                    shardings=None, mesh=None, rules=None, stage1: str | None = None, adapter: str | None = None,
                    quantize: str | dict | None = None):
  """Loads a local Hugging Face InstructBLIP directory (config.json + safetensors). Returns (model, params).

  `dtype` is the storage and compute dtype of the frozen ViT and LLM (bfloat16 on TPU); the Q-Former side is always
  float32. `instruction_aware=False` builds the BLIP-2-style Q-Former (the paper's ablation) from the same weights.
  `overrides` are further settings (`{"text": {"remat": True}, "vision": {"scan_layers": False}}`, ...; see
  load_config). Parameters go straight into `shardings`, or into the logical shardings of `mesh` under `rules`
  (see iblip_jax.sharding), or onto one device.
  `path` may also be a BLIP-2 stage-2 directory (transformers' Blip2ForConditionalGeneration, e.g.
  blip2-flan-t5-xl): the paper's starting point. Its Q-Former text side then comes from `stage1`, a BLIP-2 stage-1
  directory (Blip2ForImageTextRetrieval, blip2-itm-vit-g), as LAVIS does, or from a documented fallback with a
  warning (iblip_jax/hf/blip2.py).
  `adapter`: a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors, as peft's save_pretrained
  writes for transformers' InstructBLIP) applied on top: the model gets its adapters (iblip_jax/hf/peft.py).
  `quantize`: "int8" or "int4" for both frozen towers, or {"vision": ..., "text": ...}; each linear layer's weight
  is quantised as it is read (models/quantize.py), the Q-Former side and the LM head stay float.
  """
  overrides = _with_quantize(overrides, quantize)
  model = InstructBlip(load_config(path, dtype, instruction_aware=instruction_aware, overrides=overrides,
                                   stage1=stage1))
  if adapter:   # read and checked before the weights: the adapted model's shapes decide the shardings
    model, adapters = peft.load_adapter(model, adapter)
  if shardings is None and mesh is not None:
    shardings = sharding.logical_shardings(params_shape(model, boxed=True), mesh, rules or ())
  params = load_params(path, model, shardings=shardings, stage1=stage1)
  if adapter:   # the fresh adapters replaced by the loaded ones
    if shardings is not None:
      adapters = jax.device_put(adapters, lora.split(shardings)[0])
    params = trainable_lib.merge(lora.split(params)[1], adapters)
  return model, params


def save_pretrained(model: InstructBlip, params, out_dir: str) -> None:
  """Writes `out_dir` in the format transformers' InstructBlipForConditionalGeneration.from_pretrained reads.

  Tensors are written in the dtype they have in `params`.
  """
  if not model.config.instruction_aware:
    raise ValueError("save_pretrained: a model built with instruction_aware=False has no Q-Former text weights, "
                     "so transformers could not load it; rebuild it instruction-aware to export")
  hf_params.save_hf(model.config, nn.meta.unbox(params), out_dir)
