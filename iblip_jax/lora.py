"""LoRA adapters as parameters: which leaves they are, their fresh values, and the checks on config.lora.

The layers themselves live in models/layers.Dense (an adapter is `lora_a` (in, r) and `lora_b` (r, out) beside the
kernel it adapts, stacked like it inside scanned towers). Adapters never come from a Hugging Face checkpoint: a
run starts them fresh (B = 0: the model is unchanged until it trains) and keeps them in its checkpoints with the
rest of the trainable tree.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from iblip_jax import trainable as trainable_lib
from iblip_jax.models.configs import LoraConfig
from iblip_jax.models.instructblip import init_fn

ADAPTERS = r"/lora_[ab]$"   # a trainable pattern: every adapter leaf


def split(tree: dict) -> tuple[dict, dict]:
  """(adapters, the rest) of a params tree."""
  return trainable_lib.split(tree, [ADAPTERS])


def init(model, rng, shardings=None) -> dict:
  """Fresh adapters of `model` (A uniform in +-1/sqrt(in), B = 0), created in `shardings` (a tree like the params;
  default: one device). Only the adapters are computed: the rest of the model's init is pruned by the compiler."""
  def adapters(r):
    return split(nn.meta.unbox(init_fn(model)(r)))[0]
  out_shardings = None if shardings is None else split(shardings)[0]
  return jax.jit(adapters, out_shardings=out_shardings)(rng)


def problems(lora: LoraConfig, params_shape: dict) -> list[str]:
  """What is wrong with config.lora for a model whose params (without adapters) have these shapes: a target regex
  that does not compile or matches no Dense layer, a rank above a matched layer's smaller side."""
  where = "config.lora"
  out = []
  if lora.rank < 1:
    out.append(f"{where}.rank={lora.rank}: expected a whole number >= 1")
  if not lora.alpha > 0 or not np.isfinite(lora.alpha):
    out.append(f"{where}.alpha={lora.alpha}: expected a positive number (the update is scaled by alpha / rank)")
  if not 0 <= lora.dropout < 1:
    out.append(f"{where}.dropout={lora.dropout}: expected a number in [0, 1)")
  # Dense kernels are (in, out) (a frozen tower's float weights (out, in)), or (layers, in, out) in a scanned
  # stack; the ViT's patch embedding is a 4-D convolution, which gets no adapter, so a target matching only it
  # matches nothing.
  kernels = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params_shape)[0]:
    name = trainable_lib.param_path(path)
    module, _, leaf_name = name.rpartition("/")
    if leaf_name in ("kernel", "weight") and len(leaf.shape) in (2, 3):
      kernels[module] = leaf.shape[-2:]
  for target in lora.targets:
    try:
      pattern = re.compile(target)
    except re.error as e:
      out.append(f"{where}.targets: {target!r} is not a regular expression ({e})")
      continue
    matched = [p for p in kernels if pattern.search(p)]
    if not matched:
      out.append(f"{where}.targets: {target!r} matches no linear layer; layer paths look like "
                 "'qformer/layer_0/attention/query', 'language_model/encoder/layers/self_attn/q' or "
                 "'language_model/layers/self_attn/q_proj' (LLaMA), 'vision/layers/qkv'")
    too_small = [f"{p} {tuple(kernels[p])}" for p in matched if lora.rank > min(kernels[p])]
    if too_small:
      out.append(f"{where}.rank={lora.rank} is larger than the layer{'s' if len(too_small) > 1 else ''} "
                 f"{', '.join(too_small[:5])}{' ...' if len(too_small) > 5 else ''} that {target!r} matches "
                 "(a rank above min(in, out) adds parameters and no expressiveness)")
  return out


def merged(params: dict, lora: LoraConfig) -> dict:
  """The params with every adapter folded into its kernel (W + (alpha / r) A B) and removed: a plain model's
  weights, in the kernels' dtypes."""
  scale = lora.alpha / lora.rank

  def walk(node):
    out = {k: walk(v) if isinstance(v, dict) else v for k, v in node.items() if k not in ("lora_a", "lora_b")}
    if "lora_a" in node:
      delta = jnp.einsum("...ir,...ro->...io", node["lora_a"], node["lora_b"]) * scale
      name = "kernel" if "kernel" in node else "weight"   # weight: (out, in)
      if name == "weight":
        delta = jnp.swapaxes(delta, -1, -2)
      out[name] = (node[name].astype(jnp.float32) + delta).astype(node[name].dtype)
    return out
  return walk(params)
