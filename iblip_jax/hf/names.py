"""The name table between iblip_jax's parameter paths and transformers' state-dict names, written once and used in
both directions. Scanned layers (ViT blocks, T5 and LLaMA blocks) are one stacked parameter here and one tensor per
layer there ("{i}"); a linear "kernel" (the Q-Former side's, the LM heads', a quantised tower's) is the weight
transposed ((out, in) -> (in, out)), a frozen tower's float "weight" is the weight as it is (layers.Dense.out_in),
conv kernels go OIHW -> HWIO, embeddings and raw parameters are copied.
"""
import dataclasses
import re
from typing import Any

import jax
import numpy as np

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")

# (regex over our "/"-joined module path, HF module name). "{i}" stands for the layer index of scanned blocks.
_LM = "language_model"   # T5 and LLaMA rows alike
_MODULE_MAP: list[tuple[str, str]] = [
    (r"vision/embeddings/patch_embedding", "vision_model.embeddings.patch_embedding"),
    (r"vision/embeddings", "vision_model.embeddings"),  # raw class_embedding / position_embedding
    (r"vision/layers/(layer_norm1|layer_norm2)", r"vision_model.encoder.layers.{i}.\1"),
    (r"vision/layers/(qkv|projection)", r"vision_model.encoder.layers.{i}.self_attn.\1"),
    (r"vision/layers/(fc1|fc2)", r"vision_model.encoder.layers.{i}.mlp.\1"),
    (r"vision/layers_(\d+)/(layer_norm1|layer_norm2)", r"vision_model.encoder.layers.\1.\2"),
    (r"vision/layers_(\d+)/(qkv|projection)", r"vision_model.encoder.layers.\1.self_attn.\2"),
    (r"vision/layers_(\d+)/(fc1|fc2)", r"vision_model.encoder.layers.\1.mlp.\2"),
    (r"ln_vision", "vision_model.post_layernorm"),
    (r"", ""),  # raw top-level query_tokens
    (r"language_projection", "language_projection"),
    (r"qformer/word_embeddings", "qformer.embeddings.word_embeddings"),
    (r"qformer/position_embeddings", "qformer.embeddings.position_embeddings"),
    (r"qformer/embed_ln", "qformer.embeddings.layernorm"),
    (r"qformer/layer_(\d+)/(attention|crossattention)/(query|key|value)", r"qformer.encoder.layer.\1.\2.attention.\3"),
    (r"qformer/layer_(\d+)/(attention|crossattention)/output", r"qformer.encoder.layer.\1.\2.output.dense"),
    (r"qformer/layer_(\d+)/(attention|crossattention)/output_ln", r"qformer.encoder.layer.\1.\2.output.LayerNorm"),
    (r"qformer/layer_(\d+)/ffn/intermediate", r"qformer.encoder.layer.\1.intermediate.dense"),
    (r"qformer/layer_(\d+)/ffn/output", r"qformer.encoder.layer.\1.output.dense"),
    (r"qformer/layer_(\d+)/ffn/output_ln", r"qformer.encoder.layer.\1.output.LayerNorm"),
    (r"qformer/layer_(\d+)/ffn_query/intermediate", r"qformer.encoder.layer.\1.intermediate_query.dense"),
    (r"qformer/layer_(\d+)/ffn_query/output", r"qformer.encoder.layer.\1.output_query.dense"),
    (r"qformer/layer_(\d+)/ffn_query/output_ln", r"qformer.encoder.layer.\1.output_query.LayerNorm"),
    (rf"{_LM}/shared", f"{_LM}.shared"),
    (rf"{_LM}/lm_head", f"{_LM}.lm_head"),
    (rf"{_LM}/(encoder|decoder)/relative_attention_bias", rf"{_LM}.\1.block.0.layer.0.SelfAttention.relative_attention_bias"),
    (rf"{_LM}/(encoder|decoder)/final_norm", rf"{_LM}.\1.final_layer_norm"),
    (rf"{_LM}/(encoder|decoder)/layers/self_attn_norm", rf"{_LM}.\1.block.{{i}}.layer.0.layer_norm"),
    (rf"{_LM}/(encoder|decoder)/layers/self_attn/(q|k|v|o)", rf"{_LM}.\1.block.{{i}}.layer.0.SelfAttention.\2"),
    (rf"{_LM}/decoder/layers/cross_attn_norm", rf"{_LM}.decoder.block.{{i}}.layer.1.layer_norm"),
    (rf"{_LM}/decoder/layers/cross_attn/(q|k|v|o)", rf"{_LM}.decoder.block.{{i}}.layer.1.EncDecAttention.\1"),
    (rf"{_LM}/encoder/layers/mlp_norm", rf"{_LM}.encoder.block.{{i}}.layer.1.layer_norm"),
    (rf"{_LM}/encoder/layers/mlp/(wi_0|wi_1|wi|wo)", rf"{_LM}.encoder.block.{{i}}.layer.1.DenseReluDense.\1"),
    (rf"{_LM}/decoder/layers/mlp_norm", rf"{_LM}.decoder.block.{{i}}.layer.2.layer_norm"),
    (rf"{_LM}/decoder/layers/mlp/(wi_0|wi_1|wi|wo)", rf"{_LM}.decoder.block.{{i}}.layer.2.DenseReluDense.\1"),
    # LLaMA: our module names are transformers' own, without its `model.` level
    (rf"{_LM}/embed_tokens", f"{_LM}.model.embed_tokens"),
    (rf"{_LM}/norm", f"{_LM}.model.norm"),
    (rf"{_LM}/layers/(input_layernorm|post_attention_layernorm)", rf"{_LM}.model.layers.{{i}}.\1"),
    (rf"{_LM}/layers/(self_attn|mlp)/(\w+)", rf"{_LM}.model.layers.{{i}}.\1.\2"),
]
_LEAF_MAP = {"kernel": "weight", "weight": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}

# Keys that may sit in a checkpoint without mapping to a parameter: non-persistent buffers written by old
# transformers versions, and T5's copies of the shared embedding.
IGNORED = re.compile(r".*(position_ids|inv_freq)$|language_model\.(encoder|decoder)\.embed_tokens\.weight$")
# Text-side Q-Former weights, unused when the Q-Former sees no instruction (instruction_aware=False).
QFORMER_TEXT = re.compile(r"qformer\.(embeddings\.(word|position)_embeddings\.|encoder\.layer\.\d+\.(intermediate|output)\.)")


@dataclasses.dataclass(frozen=True)
class Leaf:
  hf_name: str                        # may contain "{i}"
  perm: tuple[int, ...] | None        # ours = hf.transpose(perm) (None: the same layout)

  def to_ours(self, w: np.ndarray) -> np.ndarray:
    return w if self.perm is None else w.transpose(self.perm)

  def to_hf(self, w: np.ndarray) -> np.ndarray:
    return w if self.perm is None else w.transpose(np.argsort(self.perm))


def leaf_mapping(path: tuple[str, ...], ndim: int) -> Leaf:
  module, leaf = "/".join(path[:-1]), path[-1]
  for pattern, hf_module in _MODULE_MAP:
    if re.fullmatch(pattern, module):
      hf_module = re.sub(pattern, hf_module, module) if pattern else ""
      break
  else:
    raise KeyError(f"no Hugging Face name for parameter {'/'.join(path)}")
  stacked = "{i}" in hf_module
  if leaf in _LEAF_MAP:
    hf_name = f"{hf_module}.{_LEAF_MAP[leaf]}"
  else:  # raw parameters keep their name
    hf_name = f"{hf_module}.{leaf}" if hf_module else leaf
  core_ndim = ndim - stacked
  if leaf == "kernel" and core_ndim == 4:      # conv: torch (O, I, kh, kw) -> flax (kh, kw, I, O)
    return Leaf(hf_name, (2, 3, 1, 0))
  if leaf == "kernel":                         # linear: torch (out, in) -> flax (in, out)
    return Leaf(hf_name, (1, 0))
  return Leaf(hf_name, None)


def flat(tree) -> dict[tuple[str, ...], Any]:
  return {tuple(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflat(flat: dict[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree



def hf_names(m: Leaf, shape: tuple[int, ...]) -> list[str]:
  """The HF tensor names of a parameter of `shape` (one per layer for a stacked one)."""
  return [m.hf_name.format(i=i) for i in range(shape[0])] if "{i}" in m.hf_name else [m.hf_name]


def hf_tensors(path: tuple[str, ...], value: np.ndarray) -> dict[str, np.ndarray]:
  """One parameter's value as its HF tensors (contiguous, in the HF layout)."""
  m = leaf_mapping(path, value.ndim)
  if "{i}" in m.hf_name:
    return {m.hf_name.format(i=i): np.ascontiguousarray(m.to_hf(value[i])) for i in range(value.shape[0])}
  return {m.hf_name: np.ascontiguousarray(m.to_hf(value))}
