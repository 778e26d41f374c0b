"""Hugging Face InstructBLIP checkpoints (safetensors + config.json) <-> iblip_jax params and config.

The mapping is written once, as a table from our module paths to transformers' state-dict names, and used in both
directions. Scanned layers (ViT blocks, T5 blocks) are stacked on load and split on save. Linear weights are
transposed ((out, in) -> (in, out)), conv kernels go OIHW -> HWIO, embeddings and raw parameters are copied.

Only safetensors is read: pickle files (pytorch_model.bin) can run code when loaded and are refused.
"""
import dataclasses
import json
import os
import re
from typing import Any, Callable

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from iblip_jax.models.configs import (InstructBlipConfig, LlamaConfig, QFormerConfig, T5Config, VisionConfig,
                                     validate)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be loaded; the message names the file and key."""


# --- module path <-> HF name ----------------------------------------------------------------------------------
# (regex over our "/"-joined module path, HF module name). "{i}" stands for the layer index of scanned blocks.
_T5 = "language_model"
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
    (rf"{_T5}/shared", f"{_T5}.shared"),
    (rf"{_T5}/lm_head", f"{_T5}.lm_head"),
    (rf"{_T5}/(encoder|decoder)/relative_attention_bias", rf"{_T5}.\1.block.0.layer.0.SelfAttention.relative_attention_bias"),
    (rf"{_T5}/(encoder|decoder)/final_norm", rf"{_T5}.\1.final_layer_norm"),
    (rf"{_T5}/(encoder|decoder)/layers/self_attn_norm", rf"{_T5}.\1.block.{{i}}.layer.0.layer_norm"),
    (rf"{_T5}/(encoder|decoder)/layers/self_attn/(q|k|v|o)", rf"{_T5}.\1.block.{{i}}.layer.0.SelfAttention.\2"),
    (rf"{_T5}/decoder/layers/cross_attn_norm", rf"{_T5}.decoder.block.{{i}}.layer.1.layer_norm"),
    (rf"{_T5}/decoder/layers/cross_attn/(q|k|v|o)", rf"{_T5}.decoder.block.{{i}}.layer.1.EncDecAttention.\1"),
    (rf"{_T5}/encoder/layers/mlp_norm", rf"{_T5}.encoder.block.{{i}}.layer.1.layer_norm"),
    (rf"{_T5}/encoder/layers/mlp/(wi_0|wi_1|wi|wo)", rf"{_T5}.encoder.block.{{i}}.layer.1.DenseReluDense.\1"),
    (rf"{_T5}/decoder/layers/mlp_norm", rf"{_T5}.decoder.block.{{i}}.layer.2.layer_norm"),
    (rf"{_T5}/decoder/layers/mlp/(wi_0|wi_1|wi|wo)", rf"{_T5}.decoder.block.{{i}}.layer.2.DenseReluDense.\1"),
    # LLaMA: our module names are transformers' own, without its `model.` level
    (rf"{_T5}/embed_tokens", f"{_T5}.model.embed_tokens"),
    (rf"{_T5}/norm", f"{_T5}.model.norm"),
    (rf"{_T5}/layers/(input_layernorm|post_attention_layernorm)", rf"{_T5}.model.layers.{{i}}.\1"),
    (rf"{_T5}/layers/(self_attn|mlp)/(\w+)", rf"{_T5}.model.layers.{{i}}.\1.\2"),
]
_LEAF_MAP = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}

# Keys that may sit in a checkpoint without mapping to a parameter: non-persistent buffers written by old
# transformers versions, and T5's copies of the shared embedding.
_IGNORED = re.compile(r".*(position_ids|inv_freq)$|language_model\.(encoder|decoder)\.embed_tokens\.weight$")
# Text-side Q-Former weights, unused when the Q-Former sees no instruction (instruction_aware=False).
_QFORMER_TEXT = re.compile(r"qformer\.(embeddings\.(word|position)_embeddings\.|encoder\.layer\.\d+\.(intermediate|output)\.)")


@dataclasses.dataclass(frozen=True)
class _Leaf:
  hf_name: str                        # may contain "{i}"
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _leaf_mapping(path: tuple[str, ...], ndim: int) -> _Leaf:
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
  if leaf == "kernel" and core_ndim == 4:      # conv: torch (O, I, kh, kw) <-> flax (kh, kw, I, O)
    return _Leaf(hf_name, lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1))
  if leaf == "kernel":                         # linear: torch (out, in) <-> flax (in, out)
    return _Leaf(hf_name, lambda w: w.T, lambda w: w.T)
  return _Leaf(hf_name, lambda w: w, lambda w: w)


def _flat(tree) -> dict[tuple[str, ...], Any]:
  return {tuple(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(flat: dict[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def hf_names(params_shape) -> dict[str, tuple[str, ...]]:
  """Every HF state-dict name the params tree covers -> our parameter path."""
  out = {}
  for path, leaf in _flat(params_shape).items():
    m = _leaf_mapping(path, len(leaf.shape))
    if "{i}" in m.hf_name:
      out.update({m.hf_name.format(i=i): path for i in range(leaf.shape[0])})
    else:
      out[m.hf_name] = path
  return out


# --- reading safetensors --------------------------------------------------------------------------------------


class SafetensorsReader:
  """Lazy, name-addressed access to one safetensors file or a sharded set (index.json)."""

  def __init__(self, directory: str):
    self.directory = directory
    index_path = os.path.join(directory, INDEX_NAME)
    single = os.path.join(directory, WEIGHTS_NAME)
    if os.path.exists(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index_path}: not a safetensors index with a 'weight_map' ({e})") from None
      files = sorted(set(weight_map.values()))
    elif os.path.exists(single):
      files = [WEIGHTS_NAME]
    else:
      pickles = [n for n in PICKLE_NAMES if os.path.exists(os.path.join(directory, n))]
      if pickles:
        raise CheckpointError(
            f"{directory}: only pickle weights found ({', '.join(pickles)}); iblip_jax reads safetensors only, "
            "because unpickling can run arbitrary code. Convert once with transformers: "
            "InstructBlipForConditionalGeneration.from_pretrained(dir).save_pretrained(dir)")
      raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME}")
    self._handles, self._where = {}, {}
    for name in files:
      path = os.path.join(directory, name)
      if not os.path.exists(path):
        raise CheckpointError(f"{path}: listed in {INDEX_NAME} but missing")
      try:
        handle = safe_open(path, framework="numpy")
        for key in handle.keys():
          self._where[key] = name
      except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); is it truncated or corrupt?") from None
      self._handles[name] = handle

  def keys(self) -> list[str]:
    return list(self._where)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

  def get(self, key: str) -> np.ndarray:
    try:
      return self._handles[self._where[key]].get_tensor(key)
    except SafetensorError as e:
      raise CheckpointError(f"{os.path.join(self.directory, self._where[key])}: cannot read {key!r} ({e})") from None


# --- config.json ----------------------------------------------------------------------------------------------
# transformers' defaults for fields a config.json may omit.
_HF_VISION_DEFAULTS = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                           image_size=224, patch_size=14, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu",
                           qkv_bias=True)
_HF_QFORMER_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                            attention_probs_dropout_prob=0.1, max_position_embeddings=512, layer_norm_eps=1e-12,
                            pad_token_id=0, cross_attention_frequency=2)
_HF_T5_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                       relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
                       layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


_HF_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, hidden_act="silu", rms_norm_eps=1e-6, attention_bias=False,
                          mlp_bias=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def _pick(d: dict, defaults: dict) -> dict:
  return {k: d.get(k, v) if d.get(k) is not None else v for k, v in defaults.items()}


def config_from_hf(hf: dict, *, tied_head: bool) -> InstructBlipConfig:
  """InstructBlipConfig from a transformers config.json dict. `tied_head`: the checkpoint has no lm_head."""
  text = hf.get("text_config") or {}
  model_type = text.get("model_type", "opt")
  if model_type not in ("t5", "llama"):
    raise CheckpointError(f"config.json: text_config.model_type={model_type!r}; iblip_jax loads t5 (FlanT5) and "
                          "llama (Vicuna) language models")
  vision = VisionConfig(**_pick(hf.get("vision_config") or {}, _HF_VISION_DEFAULTS))
  qformer = QFormerConfig(**_pick(hf.get("qformer_config") or {}, _HF_QFORMER_DEFAULTS),
                          encoder_hidden_size=vision.hidden_size)
  if model_type == "llama":
    return _checked(InstructBlipConfig(vision=vision, qformer=qformer, text=_llama_from_hf(text),
                                       num_query_tokens=hf.get("num_query_tokens", 32),
                                       image_token_index=hf.get("image_token_index", hf.get("image_token_id"))))
  t5 = _pick(text, _HF_T5_DEFAULTS)
  ff = text.get("feed_forward_proj", "relu").split("-")
  # An explicit dense_act_fn wins (InstructBLIP's config.json says "gelu": exact GELU, as LAVIS runs FlanT5);
  # otherwise transformers derives it, mapping gated-gelu to the tanh approximation.
  act = text.get("dense_act_fn") or ("gelu_new" if ff == ["gated", "gelu"] else ff[-1])
  tie_flag = text.get("tie_word_embeddings", True)
  t5 = T5Config(**t5, num_decoder_layers=text.get("num_decoder_layers") or t5["num_layers"],
                dense_act_fn=act, is_gated_act=ff[0] == "gated", tie_word_embeddings=tied_head,
                scale_decoder_outputs=bool(text.get("scale_decoder_outputs", tie_flag)),
                bos_token_id=text.get("bos_token_id") if text.get("bos_token_id") is not None else 1)
  return _checked(InstructBlipConfig(vision=vision, qformer=qformer, text=t5,
                                     num_query_tokens=hf.get("num_query_tokens", 32),
                                     image_token_index=hf.get("image_token_index", hf.get("image_token_id"))))


def _checked(cfg: InstructBlipConfig) -> InstructBlipConfig:
  try:
    validate(cfg)
  except ValueError as e:
    raise CheckpointError(f"config.json: {e}") from None
  return cfg


def _llama_from_hf(text: dict) -> LlamaConfig:
  """transformers 5 keeps rope settings in rope_parameters, 4.x in rope_theta / rope_scaling."""
  rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  theta = rope.get("rope_theta", text.get("rope_theta", 10000.0))
  fields = _pick(text, _HF_LLAMA_DEFAULTS)
  pad = text.get("pad_token_id")
  return LlamaConfig(**fields, num_key_value_heads=text.get("num_key_value_heads"), head_dim=text.get("head_dim"),
                     rope_theta=float(theta), rope_type=rope_type, rope_factor=float(rope.get("factor", 1.0)),
                     # no usable pad id (the Vicuna hub config has none or a wrong one): pad with EOS
                     pad_token_id=pad if isinstance(pad, int) and pad >= 0 else fields["eos_token_id"])


def _llama_to_hf(t: LlamaConfig) -> dict:
  rope = {"rope_theta": t.rope_theta, "rope_type": t.rope_type}
  if t.rope_type == "linear":
    rope["factor"] = t.rope_factor
  return dict({k: getattr(t, k) for k in _HF_LLAMA_DEFAULTS}, model_type="llama",
              num_key_value_heads=t.kv_heads, head_dim=t.head_size, pad_token_id=t.pad_token_id,
              rope_parameters=rope, rope_theta=t.rope_theta)


def config_to_hf(cfg: InstructBlipConfig) -> dict:
  """A config.json that transformers' InstructBlipConfig reads back to the same model."""
  v, q, t = cfg.vision, cfg.qformer, cfg.text
  vision = {k: getattr(v, k) for k in _HF_VISION_DEFAULTS}
  qformer = {k: getattr(q, k) for k in _HF_QFORMER_DEFAULTS}
  if cfg.decoder_only:
    text = _llama_to_hf(t)
  else:
    text = {k: getattr(t, k) for k in _HF_T5_DEFAULTS}
    act = "gelu" if t.dense_act_fn in ("gelu_new", "gelu_pytorch_tanh") and t.is_gated_act else t.dense_act_fn
    text.update(model_type="t5", num_decoder_layers=t.num_decoder_layers, bos_token_id=t.bos_token_id,
                feed_forward_proj=("gated-" if t.is_gated_act else "") + act, dense_act_fn=t.dense_act_fn,
                is_gated_act=t.is_gated_act, tie_word_embeddings=t.tie_word_embeddings,
                scale_decoder_outputs=t.scale_decoder_outputs)
  out = {
      "architectures": ["InstructBlipForConditionalGeneration"], "model_type": "instructblip",
      "num_query_tokens": cfg.num_query_tokens, "use_decoder_only_language_model": cfg.decoder_only,
      "vision_config": {"model_type": "instructblip_vision_model", **vision},
      "qformer_config": {"model_type": "instructblip_qformer", "encoder_hidden_size": q.encoder_hidden_size,
                         **qformer},
      "text_config": text,
  }
  if cfg.image_token_index is not None:
    out["image_token_index"] = cfg.image_token_index
  return out


def read_config(directory: str) -> dict:
  path = os.path.join(directory, CONFIG_NAME)
  if not os.path.exists(path):
    raise CheckpointError(f"{directory}: no {CONFIG_NAME}; expected a Hugging Face InstructBLIP directory")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: invalid JSON ({e})") from None


# --- params <-> tensors ---------------------------------------------------------------------------------------


def load_params(params_shape, reader: SafetensorsReader, *, instruction_aware: bool = True) -> dict:
  """Fills a params shape tree (from jax.eval_shape) with numpy arrays read through `reader`.

  Every tensor's shape is checked against the tree before it is read; all missing and unexpected keys are
  reported together.
  """
  flat_shape = _flat(params_shape)
  present = set(reader.keys())
  missing, bad_shapes, used = [], [], set()
  out = {}
  for path, leaf in flat_shape.items():
    m = _leaf_mapping(path, len(leaf.shape))
    stacked = "{i}" in m.hf_name
    names = [m.hf_name.format(i=i) for i in range(leaf.shape[0])] if stacked else [m.hf_name]
    core_shape = leaf.shape[1:] if stacked else leaf.shape
    expected = m.to_hf(np.empty(core_shape, dtype=np.uint8)).shape  # the layout the HF tensor must have
    lacking = [n for n in names if n not in present]
    used.update(n for n in names if n in present)  # so that a partly missing stack is not also "unexpected"
    if lacking:
      missing += lacking
      continue
    wrong = [(n, reader.shape(n)) for n in names if reader.shape(n) != expected]
    if wrong:
      bad_shapes += [f"{n}: {s}, expected {expected} (for {'/'.join(path)})" for n, s in wrong]
      continue
    tensors = [m.to_ours(reader.get(n)).astype(leaf.dtype) for n in names]
    out[path] = np.stack(tensors) if stacked else tensors[0]
  unexpected = sorted(k for k in present - used if not _IGNORED.fullmatch(k)
                      and not (not instruction_aware and _QFORMER_TEXT.match(k)))
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
  if unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
  if bad_shapes:
    problems.append("shape mismatches with config.json:\n    " + "\n    ".join(bad_shapes))
  if problems:
    raise CheckpointError(f"{reader.directory}: checkpoint does not match its config:\n  " + "\n  ".join(problems))
  return _unflat(out)


def params_to_hf(params) -> dict[str, np.ndarray]:
  """Our params (plain or boxed arrays) -> HF state dict (numpy, contiguous)."""
  out = {}
  for path, value in _flat(params).items():
    value = np.asarray(jax.device_get(value))
    m = _leaf_mapping(path, value.ndim)
    if "{i}" in m.hf_name:
      for i in range(value.shape[0]):
        out[m.hf_name.format(i=i)] = np.ascontiguousarray(m.to_hf(value[i]))
    else:
      out[m.hf_name] = np.ascontiguousarray(m.to_hf(value))
  return out


def save_hf(cfg: InstructBlipConfig, params, out_dir: str, *, max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes config.json and model.safetensors (sharded with an index above max_shard_bytes)."""
  os.makedirs(out_dir, exist_ok=True)
  state = params_to_hf(params)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for key in sorted(state):
    nbytes = state[key].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][key] = state[key]
    size += nbytes
  meta = {"format": "pt"}  # transformers refuses safetensors files without this tag
  if len(shards) == 1:
    save_file(shards[0], os.path.join(out_dir, WEIGHTS_NAME), metadata=meta)
  else:
    weight_map = {}
    for n, shard in enumerate(shards, 1):
      name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(out_dir, name), metadata=meta)
      weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for a in state.values())}, "weight_map": weight_map}
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
      json.dump(index, f, indent=2)
  with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
    json.dump(config_to_hf(cfg), f, indent=2)
