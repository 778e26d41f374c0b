"""LoRA adapters in PEFT's format: a directory with adapter_config.json and adapter_model.safetensors, the tensors
named after transformers' modules ("base_model.model.<module>.lora_A.weight", (r, in); "...lora_B.weight",
(out, r)), as `peft.PeftModel.from_pretrained(InstructBlipForConditionalGeneration..., dir)` reads and
`PeftModel.save_pretrained` writes.

Ours are the same numbers in the other layout: lora_a (in, r) = lora_A.T and lora_b (r, out) = lora_B.T beside the
kernel (in, out) = weight.T (a frozen tower's float weight is kept (out, in), as "weight"), stacked over the layers
of a scanned tower. A PEFT adapter that covers only some layers
of a stack is zero (no change) on the others.
"""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from iblip_jax import distributed, lora as lora_lib
from iblip_jax.errors import CheckpointError
from iblip_jax.hf.names import flat, leaf_mapping, unflat
from iblip_jax.hf.safetensors import open_checked, write
from iblip_jax.models import configs as model_configs
from iblip_jax.models.instructblip import InstructBlip, params_shape

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(rf"{re.escape(PREFIX)}(.+)\.lora_([AB])\.weight")
# PEFT LoRA settings that change the maths from y = xW + (alpha / r) dropout(x) A B; any of them set is refused.
_UNSUPPORTED = {"use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "rank_pattern": {},
                "alpha_pattern": {}, "modules_to_save": None, "bias": "none", "layers_to_transform": None,
                "lora_bias": False}


def _modules(model: InstructBlip) -> dict[str, tuple[tuple[str, ...], int | None, tuple[int, int]]]:
  """transformers' name of every linear layer -> (our module path, its layer in a stack or None, (in, out))."""
  out = {}
  base = InstructBlip(model_configs.with_lora(model.config, None))
  for path, leaf in flat(params_shape(base)).items():
    if path[-1] not in ("kernel", "weight") or len(leaf.shape) < 2:
      continue
    m = leaf_mapping(path, len(leaf.shape))
    if path[-1] == "kernel" and m.perm != (1, 0):   # a convolution (the patch embedding): no adapter
      continue
    name = m.hf_name.removesuffix(".weight")
    sizes = tuple(leaf.shape[-2:]) if path[-1] == "kernel" else tuple(leaf.shape[-2:])[::-1]   # weight: (out, in)
    if "{i}" in name:
      out.update({name.format(i=i): (path[:-1], i, sizes) for i in range(leaf.shape[0])})
    else:
      out[name] = (path[:-1], None, sizes)
  return out


def save_adapter(model: InstructBlip, params, out_dir: str) -> None:
  """Writes `params`' adapters (model.config.lora) as a PEFT LoRA directory, local or gs://. Every process calls it
  (adapters are gathered); process 0 writes."""
  lora = model.config.lora
  if lora is None:
    raise ValueError("save_adapter: the model has no LoRA adapters (model.config.lora is None)")
  by_path = {}
  for name, (path, layer, _) in _modules(model).items():
    by_path.setdefault(path, []).append((layer, name))
  adapters = flat(lora_lib.split(params)[0])
  tensors = {}
  for (*module, leaf), value in adapters.items():
    value = np.asarray(distributed.gather(value), np.float32)
    kind = "A" if leaf == "lora_a" else "B"
    for layer, name in by_path[tuple(module)]:
      tensors[f"{PREFIX}{name}.lora_{kind}.weight"] = np.ascontiguousarray((value if layer is None else value[layer]).T)
  targets = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in tensors})
  config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "r": lora.rank,
            "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": targets,
            "init_lora_weights": True, "inference_mode": True, **_UNSUPPORTED}
  if jax.process_index() == 0:
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write(out / WEIGHTS, sorted(tensors.items()), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2))
  distributed.sync("iblip_jax_save_adapter")


def read_config(directory: str) -> model_configs.LoraConfig:
  """The LoRA settings of a PEFT adapter directory (its targets: our paths of the modules it adapts)."""
  path = os.path.join(directory, CONFIG)
  if not os.path.isfile(path):
    raise CheckpointError(f"{directory}: no {CONFIG} there: not a PEFT adapter directory")
  try:
    config = json.loads(epath.Path(path).read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None
  problems = []
  if config.get("peft_type") != "LORA":
    problems.append(f"peft_type={config.get('peft_type')!r}: only LORA adapters are supported")
  for key, plain in _UNSUPPORTED.items():
    if config.get(key, plain) not in (plain, None, {}, False):   # absent, null or empty: the plain maths
      problems.append(f"{key}={config.get(key)!r}: only {plain!r} is supported")
  for key in ("r", "lora_alpha"):
    if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool):
      problems.append(f"{key}={config.get(key)!r}: expected a number")
  if problems:
    raise CheckpointError(f"{path}: " + "; ".join(problems))
  return model_configs.LoraConfig(targets=(), rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                                  dropout=float(config.get("lora_dropout") or 0.0))


def load_adapter(model: InstructBlip, directory: str, shardings=None):
  """(a model with the adapter's LoRA settings, its adapters as a params subtree in float32) for `model` (with or
  without adapters of its own). Every name and shape is checked: names that are not a linear layer of this model
  and shapes that differ are listed together. `shardings`: a tree like the adapted model's params (or its
  adapters) to place them in; default one device."""
  lora = read_config(directory)
  modules = _modules(model)
  weights = os.path.join(directory, WEIGHTS)
  if not os.path.isfile(weights):
    raise CheckpointError(f"{directory}: no {WEIGHTS} there")
  reader = open_checked(weights)
  try:
    found, unknown, bad = {}, [], []
    for key, info in reader.tensors.items():
      m = _KEY.fullmatch(key)
      if not m or m.group(1) not in modules:
        unknown.append(key)
        continue
      name, kind = m.groups()
      _, _, (d_in, d_out) = modules[name]
      want = (lora.rank, d_in) if kind == "A" else (d_out, lora.rank)
      if tuple(info.shape) != want:
        bad.append(f"{key}: {tuple(info.shape)}, expected {want}")
        continue
      found[(name, kind)] = np.asarray(reader.read(key)[0], np.float32)
    missing = sorted(f"{PREFIX}{n}.lora_{'B' if k == 'A' else 'A'}.weight" for n, k in found
                     if (n, "B" if k == "A" else "A") not in found)
  finally:
    reader.close()
  problems = []
  if unknown:
    problems.append(f"not a linear layer of this model ({len(unknown)}): {', '.join(sorted(unknown)[:8])}"
                    + (" ..." if len(unknown) > 8 else ""))
  if bad:
    problems.append(f"shapes differ ({len(bad)}): {'; '.join(bad[:8])}")
  if missing:
    problems.append(f"missing the other half ({len(missing)}): {', '.join(missing[:8])}")
  if not found and not problems:
    problems.append("it holds no lora_A / lora_B tensors")
  if problems:
    raise CheckpointError(f"{directory}: the adapter does not fit this model (another model's adapter?):\n  "
                          + "\n  ".join(problems))
  paths = sorted({modules[n][0] for n, _ in found})
  lora = model_configs.LoraConfig(targets=tuple(f"^{re.escape('/'.join(p))}$" for p in paths), rank=lora.rank,
                                  alpha=lora.alpha, dropout=lora.dropout)
  adapted = InstructBlip(model_configs.with_lora(model.config, lora))
  shapes = flat(lora_lib.split(params_shape(adapted))[0])
  values = {path: np.zeros(leaf.shape, np.float32) for path, leaf in shapes.items()}
  for (name, kind), tensor in found.items():
    module, layer, _ = modules[name]
    target = values[module + ("lora_a" if kind == "A" else "lora_b",)]
    if layer is None:
      target[...] = tensor.T
    else:
      target[layer] = tensor.T
  adapters = unflat(values)
  if shardings is not None:
    return adapted, jax.device_put(adapters, lora_lib.split(shardings)[0])
  return adapted, jax.tree.map(jnp.asarray, adapters)
