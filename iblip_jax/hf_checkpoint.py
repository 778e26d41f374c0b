"""Hugging Face InstructBLIP checkpoints (safetensors + config.json) <-> iblip_jax params and config.

The mapping is written once, as a table from our module paths to transformers' state-dict names, and used in both
directions. Scanned layers (ViT blocks, T5 blocks) are stacked on load and split on save. Linear weights are
transposed ((out, in) -> (in, out)), conv kernels go OIHW -> HWIO, embeddings and raw parameters are copied.

Only safetensors is read: pickle files (pytorch_model.bin) can run code when loaded and are refused.
"""
import dataclasses
import functools
import json
import logging
import math
import os
import re
from typing import Any

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from iblip_jax import safetensors_io
from iblip_jax.errors import UserError
from iblip_jax.models.configs import (ACTIVATIONS, InstructBlipConfig, LlamaConfig, QFormerConfig, T5Config,
                                     VisionConfig, validate)

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


class CheckpointError(UserError):
  """A checkpoint directory that cannot be loaded; the message names the file and key."""


# --- module path <-> HF name ----------------------------------------------------------------------------------
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
_LEAF_MAP = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}

# Keys that may sit in a checkpoint without mapping to a parameter: non-persistent buffers written by old
# transformers versions, and T5's copies of the shared embedding.
_IGNORED = re.compile(r".*(position_ids|inv_freq)$|language_model\.(encoder|decoder)\.embed_tokens\.weight$")
# Text-side Q-Former weights, unused when the Q-Former sees no instruction (instruction_aware=False).
_QFORMER_TEXT = re.compile(r"qformer\.(embeddings\.(word|position)_embeddings\.|encoder\.layer\.\d+\.(intermediate|output)\.)")


@dataclasses.dataclass(frozen=True)
class _Leaf:
  hf_name: str                        # may contain "{i}"
  perm: tuple[int, ...] | None        # ours = hf.transpose(perm) (None: the same layout)

  def to_ours(self, w: np.ndarray) -> np.ndarray:
    return w if self.perm is None else w.transpose(self.perm)

  def to_hf(self, w: np.ndarray) -> np.ndarray:
    return w if self.perm is None else w.transpose(np.argsort(self.perm))


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
  if leaf == "kernel" and core_ndim == 4:      # conv: torch (O, I, kh, kw) -> flax (kh, kw, I, O)
    return _Leaf(hf_name, (2, 3, 1, 0))
  if leaf == "kernel":                         # linear: torch (out, in) -> flax (in, out)
    return _Leaf(hf_name, (1, 0))
  return _Leaf(hf_name, None)


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


# --- reading safetensors --------------------------------------------------------------------------------------


class SafetensorsReader:
  """Name-addressed, region-addressed reads over one safetensors file or a sharded set (index.json).

  `bytes_read` counts the tensor bytes read so far (tools/bench_load.py and the tests check it)."""

  def __init__(self, directory: str):
    self.directory = directory
    index_path = os.path.join(directory, INDEX_NAME)
    single = os.path.join(directory, WEIGHTS_NAME)
    if os.path.exists(index_path):
      files = _index_files(index_path)
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
    self._files: dict[str, safetensors_io.File] = {}
    self._where: dict[str, str] = {}
    self.bytes_read = 0
    for name in files:
      path = os.path.join(directory, name)
      if not os.path.exists(path):
        raise CheckpointError(f"{path}: listed in {INDEX_NAME} but missing")
      try:
        handle = safetensors_io.File(path)
      except (safetensors_io.FormatError, OSError) as e:
        raise CheckpointError(f"not a readable safetensors file: {e}; is it truncated or corrupt?") from None
      for key in handle.tensors:
        if key in self._where:
          raise CheckpointError(f"{path}: tensor {key!r} is also in {self._where[key]}")
        self._where[key] = name
      self._files[name] = handle

  def keys(self) -> list[str]:
    return list(self._where)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._files[self._where[key]].tensors[key].shape

  def dtype(self, key: str) -> np.dtype:
    return self._files[self._where[key]].tensors[key].dtype

  def nbytes(self, key: str) -> int:
    info = self._files[self._where[key]].tensors[key]
    return info.end - info.begin

  def get(self, key: str, region: tuple[slice, ...] | None = None) -> np.ndarray:
    """The tensor `key` (or its region: one slice with explicit bounds per dimension), in its stored dtype."""
    try:
      array, n = self._files[self._where[key]].read(key, region)
    except (safetensors_io.FormatError, OSError) as e:
      raise CheckpointError(f"{os.path.join(self.directory, self._where[key])}: cannot read {key!r} ({e})") from None
    self.bytes_read += n
    return array

  def close(self) -> None:
    for handle in self._files.values():
      handle.close()


def _index_files(index_path: str) -> list[str]:
  try:
    with open(index_path) as f:
      index = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{index_path}: not valid JSON ({e})") from None
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
    raise CheckpointError(f"{index_path}: expected an object with a 'weight_map' object of tensor name -> file "
                          f"name, got {type(weight_map if isinstance(index, dict) else index).__name__}")
  bad = sorted({v for v in weight_map.values() if os.path.basename(v) != v})
  if bad:
    raise CheckpointError(f"{index_path}: weight_map names files outside the directory: {bad[:3]}")
  return sorted(set(weight_map.values()))


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


# --- config.json checks ---------------------------------------------------------------------------------------
# Every field config_from_hf reads is checked before use, so that a bad config.json is a CheckpointError naming the
# file and the field rather than a TypeError or a shape error deep inside the model. JSON true/false are never
# numbers (Python's bool is an int). null is accepted only where transformers' own config declares the field optional
# and gives None a meaning: a sub-config (transformers' defaults), a derived value (num_decoder_layers,
# num_key_value_heads, head_dim, dense_act_fn, rope settings) or a token id (ours: the checkpoint family's id, as
# before). Elsewhere, num_query_tokens or a size included, null is an error: transformers cannot build it either.


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_ff_proj(v) -> bool:
  parts = v.split("-") if isinstance(v, str) else []
  return len(parts) == 1 or (len(parts) == 2 and parts[0] == "gated")


# kind -> (test, what it expects); a kind ending in "?" also accepts null
_KINDS = {
    "count": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "id": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "int": (_is_int, "an integer"),
    "positive": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "rate": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "act": (lambda v: isinstance(v, str) and v in ACTIVATIONS, f"one of {sorted(ACTIVATIONS)}"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "ff_proj": (_is_ff_proj, 'a string "ACT" or "gated-ACT"'),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "object": (lambda v: isinstance(v, dict), "an object"),
}
_TOP_FIELDS = dict(vision_config="object?", qformer_config="object?", text_config="object?",
                   num_query_tokens="count", image_token_index="id?", image_token_id="id?")
_VISION_FIELDS = dict(hidden_size="count", intermediate_size="count", num_hidden_layers="count",
                      num_attention_heads="count", image_size="count", patch_size="count", num_channels="count",
                      layer_norm_eps="positive", hidden_act="act", qkv_bias="bool")
_QFORMER_FIELDS = dict(vocab_size="count", hidden_size="count", num_hidden_layers="count", num_attention_heads="count",
                       intermediate_size="count", hidden_act="act", hidden_dropout_prob="rate",
                       attention_probs_dropout_prob="rate", max_position_embeddings="count",
                       layer_norm_eps="positive", pad_token_id="id?", cross_attention_frequency="count",
                       encoder_hidden_size="count")
_T5_FIELDS = dict(model_type="str", vocab_size="count", d_model="count", d_kv="count", d_ff="count",
                  num_layers="count", num_decoder_layers="count?", num_heads="count",
                  relative_attention_num_buckets="count", relative_attention_max_distance="count", dropout_rate="rate",
                  layer_norm_epsilon="positive", pad_token_id="id?", eos_token_id="id?", bos_token_id="id?",
                  decoder_start_token_id="id?", feed_forward_proj="ff_proj", dense_act_fn="act?",
                  tie_word_embeddings="bool", scale_decoder_outputs="bool")
_LLAMA_FIELDS = dict(model_type="str", vocab_size="count", hidden_size="count", intermediate_size="count",
                     num_hidden_layers="count", num_attention_heads="count", num_key_value_heads="count?",
                     head_dim="count?", hidden_act="act", rms_norm_eps="positive", attention_bias="bool",
                     mlp_bias="bool", tie_word_embeddings="bool", bos_token_id="id?", eos_token_id="id?",
                     pad_token_id="int?",  # negative: no pad id (the Vicuna hub config), EOS pads
                     rope_theta="positive", rope_parameters="object?", rope_scaling="object?")
_ROPE_FIELDS = dict(rope_type="str", type="str", rope_theta="positive", factor="positive")


def _field_problems(d: dict, fields: dict[str, str], where: str) -> list[str]:
  problems = []
  for name, kind in fields.items():
    if name not in d or (d[name] is None and kind.endswith("?")):
      continue
    test, expected = _KINDS[kind.rstrip("?")]
    if not test(d[name]):
      shown = json.dumps(d[name])
      shown = shown if len(shown) <= 40 else shown[:37] + "..."
      problems.append(f"{where}{name} = {shown}; expected {expected}")
  return problems


def _text_fields(text: dict) -> dict[str, str]:
  """{} for language models config_from_hf refuses (it names the model_type)."""
  return {"t5": _T5_FIELDS, "llama": _LLAMA_FIELDS}.get(text.get("model_type"), {})


def _check_config(hf, source: str) -> None:
  """CheckpointError listing every field of `hf` (a parsed config.json) of the wrong type or range."""
  if not isinstance(hf, dict):
    raise CheckpointError(f"{source}: the top level is {type(hf).__name__}; expected a JSON object")
  problems = _field_problems(hf, _TOP_FIELDS, "")
  sections = {"vision_config": _VISION_FIELDS, "qformer_config": _QFORMER_FIELDS, "text_config": None}
  for section, fields in sections.items():
    d = hf.get(section)
    if isinstance(d, dict):  # a wrong type or null was dealt with above
      problems += _field_problems(d, fields or _text_fields(d), f"{section}.")
  text = hf.get("text_config")
  for rope in ("rope_parameters", "rope_scaling"):
    if isinstance(text, dict) and text.get("model_type") == "llama" and isinstance(text.get(rope), dict):
      problems += _field_problems(text[rope], _ROPE_FIELDS, f"text_config.{rope}.")
  if problems:
    raise CheckpointError(f"{source}: invalid config:\n  " + "\n  ".join(problems))


# Standard attributes that transformers 4.x wrote into every (sub-)config and transformers 5 no longer declares
# (it still accepts them), and keys renamed since: such a config.json, e.g. the released InstructBLIP ones, is normal.
_LEGACY_FIELDS = frozenset((
    "torchscript", "torch_dtype", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "tie_word_embeddings",
    "is_decoder", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "finetuning_task",
    "tokenizer_class", "prefix", "bos_token_id", "pad_token_id", "eos_token_id", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "use_cache", "output_attentions", "num_labels", "_commit_hash",
    "_attn_implementation_autoset", "attn_implementation", "name_or_path", "rope_scaling", "rope_theta",
    "position_embedding_type"))


@functools.cache
def _transformers_fields() -> dict[str, frozenset[str]]:
  """Per section, the keys transformers' own config classes write or accept (their fields, what to_dict() writes,
  attribute aliases, the generation settings older versions kept in config.json); {} without transformers."""
  try:
    # imported here: transformers (with torch, where installed) takes seconds to load, and only this report uses it
    from transformers import (GenerationConfig, InstructBlipConfig, InstructBlipQFormerConfig,
                              InstructBlipVisionConfig, LlamaConfig, T5Config)
    generation = set(GenerationConfig().to_dict())

    def keys(cls) -> frozenset[str]:
      names = set(cls().to_dict()) | set(getattr(cls, "attribute_map", {})) | generation
      return frozenset(names | ({f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()))

    return {"": keys(InstructBlipConfig), "vision_config": keys(InstructBlipVisionConfig),
            "qformer_config": keys(InstructBlipQFormerConfig), "t5": keys(T5Config), "llama": keys(LlamaConfig)}
  except Exception as e:  # noqa: BLE001 - the report is advice; it must never stop a load
    log.info("cannot list transformers' config fields (%s); unknown-field report from iblip_jax's own list", e)
    return {}


def _unknown_fields(hf: dict) -> list[str]:
  """Keys of a checked config.json that neither iblip_jax nor transformers knows (dotted paths)."""
  known = _transformers_fields()
  text = hf.get("text_config") or {}
  sections = {"": (hf, _TOP_FIELDS), "vision_config": (hf.get("vision_config") or {}, _VISION_FIELDS),
              "qformer_config": (hf.get("qformer_config") or {}, _QFORMER_FIELDS),
              "text_config": (text, _text_fields(text))}
  unknown = []
  for section, (d, ours) in sections.items():
    kind = text.get("model_type") if section == "text_config" else section
    if kind not in ("", "vision_config", "qformer_config", "t5", "llama"):
      continue  # a language model config_from_hf refuses
    allowed = known.get(kind, frozenset()) | set(ours) | _LEGACY_FIELDS | {"model_type"}
    unknown += [f"{section}.{k}" if section else k for k in sorted(d) if k not in allowed]
  return unknown


def config_from_hf(hf: dict, *, tied_head: bool, source: str = CONFIG_NAME) -> InstructBlipConfig:
  """InstructBlipConfig from a transformers config.json dict. `tied_head`: the checkpoint has no lm_head.
  `source`: the file the dict came from, named in errors (a CheckpointError for any bad field)."""
  _check_config(hf, source)
  text = hf.get("text_config") or {}
  model_type = text.get("model_type", "opt")
  if model_type not in ("t5", "llama"):
    raise CheckpointError(f"{source}: text_config.model_type={model_type!r}; iblip_jax loads t5 (FlanT5) and "
                          "llama (Vicuna) language models")
  vision = VisionConfig(**_pick(hf.get("vision_config") or {}, _HF_VISION_DEFAULTS))
  qformer = QFormerConfig(**_pick(hf.get("qformer_config") or {}, _HF_QFORMER_DEFAULTS),
                          encoder_hidden_size=vision.hidden_size)
  if model_type == "llama":
    return _checked(InstructBlipConfig(vision=vision, qformer=qformer, text=_llama_from_hf(text),
                                       num_query_tokens=hf.get("num_query_tokens", 32),
                                       image_token_index=hf.get("image_token_index", hf.get("image_token_id"))),
                    source)
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
                                     image_token_index=hf.get("image_token_index", hf.get("image_token_id"))),
                  source)


def _checked(cfg: InstructBlipConfig, source: str) -> InstructBlipConfig:
  try:
    validate(cfg)
  except ValueError as e:
    raise CheckpointError(f"{source}: {e}") from None
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


def parse_config(directory: str) -> dict:
  """The parsed config.json of `directory`, unchecked (InstructBLIP or BLIP-2: see is_blip2)."""
  path = os.path.join(directory, CONFIG_NAME)
  if not os.path.exists(path):
    raise CheckpointError(f"{directory}: no {CONFIG_NAME}; expected a Hugging Face InstructBLIP (or BLIP-2) "
                          "directory")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: invalid JSON ({e})") from None
  except UnicodeDecodeError as e:
    raise CheckpointError(f"{path}: not UTF-8 (byte {e.start}: {e.reason})") from None


def read_config(directory: str) -> dict:
  """The parsed config.json, its fields checked (a CheckpointError names the file and every bad field); keys that
  neither iblip_jax nor transformers knows are logged as a warning (a typo, or a setting nothing would apply)."""
  path = os.path.join(directory, CONFIG_NAME)
  hf = parse_config(directory)
  _check_config(hf, path)
  unknown = _unknown_fields(hf)
  if unknown:
    log.warning("%s: unknown field(s) %s, ignored: neither iblip_jax nor transformers reads them", path,
                    ", ".join(unknown))
  return hf


# --- params <-> tensors ---------------------------------------------------------------------------------------


def _names(m: _Leaf, shape: tuple[int, ...]) -> list[str]:
  return [m.hf_name.format(i=i) for i in range(shape[0])] if "{i}" in m.hf_name else [m.hf_name]


def check_params(params_shape, reader: SafetensorsReader, *, instruction_aware: bool = True) -> None:
  """Every parameter's tensors exist with the layout its shape implies, and nothing unknown is left over; all
  missing, unexpected and mis-shaped keys are reported together, before anything is read."""
  present = set(reader.keys())
  missing, bad_shapes, used = [], [], set()
  for path, leaf in _flat(params_shape).items():
    m = _leaf_mapping(path, len(leaf.shape))
    names = _names(m, leaf.shape)
    core_shape = leaf.shape[1:] if "{i}" in m.hf_name else leaf.shape
    expected = m.to_hf(np.empty(core_shape, dtype=np.uint8)).shape  # the layout the HF tensor must have
    missing += [n for n in names if n not in present]
    used.update(n for n in names if n in present)  # so that a partly missing stack is not also "unexpected"
    bad_shapes += [f"{n}: {reader.shape(n)}, expected {expected} (for {'/'.join(path)})"
                   for n in names if n in present and reader.shape(n) != expected]
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


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
  return tuple(slice(*s.indices(d)[:2]) for s, d in zip(index, shape))


def _hf_sharding(sharding, perm: tuple[int, ...] | None):
  """The sharding of the HF-layout array whose transpose(perm) is laid out as `sharding`: HF axis perm[j] is split
  like our axis j, so each device can transpose its own block without talking to the others."""
  if perm is None or not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  spec = tuple(sharding.spec) + (None,) * (len(perm) - len(sharding.spec))
  hf = [None] * len(perm)
  for j, a in enumerate(perm):
    hf[a] = spec[j]
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*hf))


@functools.lru_cache(maxsize=None)
def _converter(perm: tuple[int, ...] | None, dtype: np.dtype, sharding):
  """HF layout and stored dtype -> ours, on the devices: numpy's strided transpose of a (out, in) kernel runs at
  ~0.25 GB/s on a CPU host, the compiled one at several GB/s (and on TPU it costs nothing)."""
  return jax.jit(lambda x: (x if perm is None else x.transpose(perm)).astype(dtype), out_shardings=sharding)


def _load_leaf(reader: SafetensorsReader, path: tuple[str, ...], leaf, sharding) -> jax.Array:
  """One parameter as a global array in `sharding`. This process reads, in the HF layout and stored dtype, the
  smallest box that covers its devices' blocks (each HF tensor's bytes once), hands each device its block, and the
  devices transpose and cast their own blocks (see _converter)."""
  m = _leaf_mapping(path, len(leaf.shape))
  names = _names(m, leaf.shape)
  stacked = "{i}" in m.hf_name
  perm = None if m.perm is None else ((0,) + tuple(p + 1 for p in m.perm) if stacked else m.perm)
  hf_shape = leaf.shape if perm is None else tuple(leaf.shape[perm.index(a)] for a in range(len(perm)))
  hf_sharding = _hf_sharding(sharding, perm)
  slices = [_bounds(idx, hf_shape) for idx in hf_sharding.addressable_devices_indices_map(hf_shape).values()]
  box = tuple(slice(min(s[d].start for s in slices), max(s[d].stop for s in slices)) for d in range(len(hf_shape)))
  if stacked:  # one HF tensor per layer; the layer axis comes first
    host = np.empty(tuple(s.stop - s.start for s in box), reader.dtype(names[0]))
    for j, i in enumerate(range(box[0].start, box[0].stop)):
      host[j] = reader.get(names[i], box[1:])
  else:
    host = reader.get(names[0], box or None)

  def local(index):
    index = _bounds(index, hf_shape)
    return host[tuple(slice(i.start - b.start, i.stop - b.start) for i, b in zip(index, box))]
  array = jax.make_array_from_callback(hf_shape, hf_sharding, local)
  if perm is None and array.dtype == leaf.dtype:
    return array
  return _converter(perm, np.dtype(leaf.dtype), sharding)(array)


def load_params(params_shape, reader: SafetensorsReader, *, shardings=None, instruction_aware: bool = True,
                progress: bool = False) -> dict:
  """Fills a params shape tree (from jax.eval_shape) with global arrays read through `reader`.

  `shardings` (a matching tree of jax.sharding.Sharding) places every parameter straight into its devices: a
  process reads only what its devices hold and nothing passes through one device whole. Without it, everything
  goes to this process's first device. Tensors are cast to the tree's dtypes as they are read (the frozen towers
  to bfloat16 on TPU, say); everything is checked (check_params) before the first byte is read.
  """
  check_params(params_shape, reader, instruction_aware=instruction_aware)
  flat_shape = _flat(params_shape)
  if shardings is None:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    flat_sh = {path: one for path in flat_shape}
  else:
    flat_sh = _flat(shardings)
  total = sum(reader.nbytes(k) for k in reader.keys())
  out = {}
  # A real-size checkpoint takes minutes: show bytes read and an ETA (process 0, on a terminal or a log).
  with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {os.path.basename(reader.directory)}",
            disable=not progress or jax.process_index() != 0, dynamic_ncols=True, mininterval=2.0) as bar:
    for path, leaf in flat_shape.items():
      before = reader.bytes_read
      out[path] = _load_leaf(reader, path, leaf, flat_sh[path])
      bar.update(reader.bytes_read - before)
  return _unflat(out)


def _host_value(x) -> np.ndarray:
  """A parameter as one host array on every process (a collective for arrays spread over several processes)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def params_to_hf(params) -> dict[str, np.ndarray]:
  """Our params (plain or boxed arrays) -> HF state dict (numpy, contiguous)."""
  out = {}
  for path, value in _flat(params).items():
    out.update(_hf_tensors(path, _host_value(value)))
  return out


def _hf_tensors(path: tuple[str, ...], value: np.ndarray) -> dict[str, np.ndarray]:
  m = _leaf_mapping(path, value.ndim)
  if "{i}" in m.hf_name:
    return {m.hf_name.format(i=i): np.ascontiguousarray(m.to_hf(value[i])) for i in range(value.shape[0])}
  return {m.hf_name: np.ascontiguousarray(m.to_hf(value))}


def save_hf(cfg: InstructBlipConfig, params, out_dir: str, *, max_shard_bytes: int = 4 * 2**30) -> None:
  """Writes config.json and model.safetensors (sharded with an index above max_shard_bytes) to `out_dir`, a local
  path or gs://. Parameters may be global arrays spread over several processes: every process must call this
  (each parameter is gathered in turn); process 0 writes, holding at most one shard in host memory."""
  from jax.experimental import multihost_utils
  flat = _flat(params)
  writer = jax.process_index() == 0
  # The plan from shapes alone: which shard each parameter's tensors go to (a stack stays in one shard).
  plan, size = [[]], 0
  for path, value in flat.items():
    nbytes = int(np.prod(value.shape)) * np.dtype(value.dtype).itemsize
    if plan[-1] and size + nbytes > max_shard_bytes:
      plan.append([])
      size = 0
    plan[-1].append(path)
    size += nbytes
  out = epath.Path(out_dir)
  if writer:
    out.mkdir(parents=True, exist_ok=True)
  names = [WEIGHTS_NAME] if len(plan) == 1 else [f"model-{n:05d}-of-{len(plan):05d}.safetensors"
                                                 for n in range(1, len(plan) + 1)]
  meta = {"format": "pt"}  # transformers refuses safetensors files without this tag
  weight_map, total = {}, 0
  for name, paths in zip(names, plan):
    shard = {}
    for path in paths:
      value = _host_value(flat[path])
      if writer:
        shard.update(_hf_tensors(path, value))
      del value
    if writer:
      safetensors_io.write(out / name, sorted(shard.items()), metadata=meta)
      weight_map.update({k: name for k in shard})
      total += sum(a.nbytes for a in shard.values())
    del shard
  if writer:
    if len(names) > 1:
      index = {"metadata": {"total_size": total}, "weight_map": weight_map}
      (out / INDEX_NAME).write_text(json.dumps(index, indent=2))
    (out / CONFIG_NAME).write_text(json.dumps(config_to_hf(cfg), indent=2))
  if jax.process_count() > 1:  # the directory is complete when any process returns
    multihost_utils.sync_global_devices("iblip_jax_save_hf")


# --- BLIP-2 checkpoints: where the paper's instruction tuning starts --------------------------------------------
# InstructBLIP is initialised from BLIP-2 (paper section 2.6). BLIP-2's stage-2 checkpoints drop the Q-Former's text
# side (LAVIS blip2_t5.py sets word/position embeddings and every layer's text feed-forward to None), so LAVIS loads
# the stage-1 Q-Former (all parts) and then overwrites it with the stage-2 checkpoint of the matching LLM
# (lavis_instructblip.md section 2). In transformers' format the two are
#   stage 2: Blip2ForConditionalGeneration (blip2-flan-t5-xl/xxl): vision_model (the frozen ViT and ln_vision as its
#            post_layernorm), query_tokens, qformer (its `layernorm` is InstructBLIP's qformer.embeddings.layernorm,
#            the LayerNorm that queries and text share), language_projection, language_model;
#   stage 1: Blip2ForImageTextRetrieval (blip2-itm-vit-g, qformer_config.use_qformer_text_input=True): the same
#            Q-Former with its text side: embeddings.word_embeddings / position_embeddings at the top level and
#            qformer.encoder.layer.N.intermediate / output.
# Taken from stage 1: the text side only (what stage 2 lacks). Everything stage 2 has wins, as LAVIS's second load
# overwrites the first: the self-attention blocks, which queries and text share, come from stage 2.
#
# Without stage 1 (the documented fallback, with a warning): the text feed-forward of each layer starts as a copy of
# that layer's query feed-forward (same shapes; LAVIS's stage 1 went the other way, initialising the query
# feed-forward from BERT's text one, Blip2Qformer.__init__), and the word and position embeddings are drawn from
# BERT's initialiser, N(0, 0.02) with the padding row zero, from a fixed seed (every process draws the same). The
# Q-Former then has to learn to read instructions from scratch: a different start from the paper's.
BLIP2_MODEL_TYPE = "blip-2"
STAGE1_CLASS, STAGE2_CLASS = "Blip2ForImageTextRetrieval", "Blip2ForConditionalGeneration"
FALLBACK_INIT_STD, FALLBACK_SEED = 0.02, 0
_QFORMER_SHARED_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_STAGE1_EMBEDDINGS = {"qformer.embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
                      "qformer.embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight"}


def is_blip2(hf: dict) -> bool:
  """A BLIP-2 config.json (either stage), as opposed to an InstructBLIP one."""
  return isinstance(hf, dict) and hf.get("model_type") == BLIP2_MODEL_TYPE


def _architecture(hf: dict) -> str | None:
  arch = hf.get("architectures")
  return arch[0] if isinstance(arch, list) and arch and isinstance(arch[0], str) else None


def _stage1_text_sizes(stage1: str, stage2_q: dict) -> dict:
  """vocab_size / max_position_embeddings of the stage-1 text side (from its tensors), after checking that stage 1
  is a retrieval checkpoint whose Q-Former has stage 2's sizes."""
  path = os.path.join(stage1, CONFIG_NAME)
  hf = parse_config(stage1)
  if not is_blip2(hf) or _architecture(hf) not in (None, STAGE1_CLASS):
    raise CheckpointError(f"{path}: model_type={hf.get('model_type')!r}, architectures={hf.get('architectures')}; "
                          f"config.model_init_stage1 must be a BLIP-2 stage-1 checkpoint ({STAGE1_CLASS}, e.g. "
                          "Salesforce/blip2-itm-vit-g)")
  q1 = hf.get("qformer_config") or {}
  problems = _field_problems(q1, _QFORMER_FIELDS, "qformer_config.")
  problems += [f"qformer_config.{k} = {q1.get(k)!r} but the stage-2 checkpoint's Q-Former has {stage2_q.get(k)!r}"
               for k in _QFORMER_SHARED_SIZES if q1.get(k, _HF_QFORMER_DEFAULTS[k])
               != stage2_q.get(k, _HF_QFORMER_DEFAULTS[k])]
  if problems:
    raise CheckpointError(f"{path}: not the stage 1 of this BLIP-2:\n  " + "\n  ".join(problems))
  reader = SafetensorsReader(stage1)
  try:
    missing = [k for k in _STAGE1_EMBEDDINGS.values() if k not in reader.keys()]
    if missing:
      raise CheckpointError(f"{stage1}: no {', '.join(missing)}: not a {STAGE1_CLASS} checkpoint (its Q-Former's "
                            "text side is what config.model_init_stage1 is for)")
    words, positions = (reader.shape(k) for k in _STAGE1_EMBEDDINGS.values())
  finally:
    reader.close()
  return {"vocab_size": words[0], "max_position_embeddings": positions[0]}


def blip2_config(stage2: str, stage1: str | None = None, *, text_sizes: dict | None = None) -> dict:
  """The InstructBLIP config.json (as a dict) of the model that starts from the BLIP-2 checkpoint in `stage2`:
  vision, Q-Former and LLM sizes from stage 2, the Q-Former's text-side sizes (vocabulary, positions) from the
  stage-1 tensors, or else from `text_sizes` (the user's config.model.qformer), or else stage 2's config.json."""
  path = os.path.join(stage2, CONFIG_NAME)
  hf = parse_config(stage2)
  if _architecture(hf) == STAGE1_CLASS:
    raise CheckpointError(f"{path}: a BLIP-2 stage-1 ({STAGE1_CLASS}) checkpoint has no language model; pass it as "
                          f"config.model_init_stage1 and the stage-2 ({STAGE2_CLASS}) directory as config.model_init")
  q2 = dict(hf.get("qformer_config") or {})
  q2.pop("use_qformer_text_input", None)
  if stage1:
    q2.update(_stage1_text_sizes(stage1, q2))
  else:
    q2.update({k: v for k, v in (text_sizes or {}).items() if k in ("vocab_size", "max_position_embeddings")})
  return {k: hf[k] for k in ("vision_config", "text_config", "num_query_tokens", "image_token_index",
                             "image_token_id") if k in hf} | {"qformer_config": q2}


class _Drawn:
  """A tensor of the fallback: N(0, std) from a fixed seed, the padding row zero; drawn once, on first read."""

  def __init__(self, shape: tuple[int, ...], pad_row: int | None):
    self.shape, self.dtype, self._pad, self._value = shape, np.dtype(np.float32), pad_row, None

  def value(self) -> np.ndarray:
    if self._value is None:
      rng = np.random.default_rng([FALLBACK_SEED, *self.shape])
      self._value = (rng.standard_normal(self.shape, dtype=np.float32) * FALLBACK_INIT_STD).astype(np.float32)
      if self._pad is not None and 0 <= self._pad < self.shape[0]:
        self._value[self._pad] = 0
    return self._value


class Blip2Reader:
  """SafetensorsReader's interface over a BLIP-2 start: InstructBLIP tensor names, each served from the stage-2
  directory, the stage-1 directory or the fallback (see the section comment). `origin` says which for each name;
  `describe()` is the one-line summary the loader logs. Region reads go to the underlying files, so every process
  still reads only its devices' part of each tensor (the fallback's feed-forward copies re-read stage-2 tensors)."""

  def __init__(self, stage2: str, stage1: str | None, qformer: QFormerConfig, *, text_side: bool = True):
    self.directory, self.stage1 = stage2, stage1
    self._readers = [SafetensorsReader(stage2)] + ([SafetensorsReader(stage1)] if stage1 else [])
    two = self._readers[0]
    self._map: dict[str, tuple] = {}
    self.origin: dict[str, str] = {}
    for key in two.keys():  # every stage-2 tensor, so that check_params reports anything it does not expect
      ours = key.replace("qformer.layernorm.", "qformer.embeddings.layernorm.", 1)
      self._add(ours, (two, key), "stage 2")
    self.fallback = text_side and not self._has_text_side(qformer) and not stage1
    if stage1 and text_side:
      self._add_stage1(self._readers[1], qformer)
    elif self.fallback:
      self._add_fallback(qformer)
      log.warning("%s: no BLIP-2 stage-1 checkpoint (config.model_init_stage1): the Q-Former's text feed-forward "
                  "starts as a copy of its query feed-forward and its word/position embeddings are random "
                  "(N(0, %.2f), seed %d), so it must learn to read instructions from scratch; the paper starts from "
                  "the stage-1 Q-Former (Salesforce/blip2-itm-vit-g)", stage2, FALLBACK_INIT_STD, FALLBACK_SEED)

  def _add(self, ours: str, source, origin: str) -> None:
    self._map[ours] = source
    self.origin[ours] = origin

  def _has_text_side(self, qformer: QFormerConfig) -> bool:
    return all(k in self._map for k in _STAGE1_EMBEDDINGS) and all(
        f"qformer.encoder.layer.{i}.intermediate.dense.weight" in self._map for i in range(qformer.num_hidden_layers))

  def _add_stage1(self, one: SafetensorsReader, qformer: QFormerConfig) -> None:
    wanted = dict(_STAGE1_EMBEDDINGS)
    for i in range(qformer.num_hidden_layers):
      for part in ("intermediate.dense", "output.dense", "output.LayerNorm"):
        for leaf in ("weight", "bias"):
          name = f"qformer.encoder.layer.{i}.{part}.{leaf}"
          wanted[name] = name
    missing = sorted(k for k in wanted.values() if k not in one.keys())
    if missing:
      raise CheckpointError(f"{one.directory}: the stage-1 Q-Former lacks its text side: {', '.join(missing[:6])}"
                            f"{' ...' if len(missing) > 6 else ''} (is it a {STAGE1_CLASS} checkpoint?)")
    for ours, theirs in wanted.items():
      if ours not in self._map:   # a stage 2 that kept its text side wins, as LAVIS's second load does
        self._add(ours, (one, theirs), "stage 1")

  def _add_fallback(self, qformer: QFormerConfig) -> None:
    d = qformer.hidden_size
    self._add("qformer.embeddings.word_embeddings.weight", _Drawn((qformer.vocab_size, d), qformer.pad_token_id),
              "fallback")
    self._add("qformer.embeddings.position_embeddings.weight", _Drawn((qformer.max_position_embeddings, d), None),
              "fallback")
    for i in range(qformer.num_hidden_layers):
      for ours, theirs in (("intermediate.dense", "intermediate_query.dense"), ("output.dense", "output_query.dense"),
                           ("output.LayerNorm", "output_query.LayerNorm")):
        for leaf in ("weight", "bias"):
          source = self._map.get(f"qformer.encoder.layer.{i}.{theirs}.{leaf}")
          if source is not None:   # a missing query tensor is reported by check_params under its own name
            self._add(f"qformer.encoder.layer.{i}.{ours}.{leaf}", source, "fallback")

  def describe(self) -> str:
    """Which parts came from where, in one line."""
    if self.stage1 and any(o == "stage 1" for o in self.origin.values()):
      text = f"Q-Former text side (word/position embeddings, text feed-forward) from BLIP-2 stage 1 {self.stage1}"
    elif self.fallback:
      text = "Q-Former text side from the fallback (text feed-forward = query feed-forward, random embeddings)"
    elif any(k in self._map for k in _STAGE1_EMBEDDINGS):
      text = "Q-Former text side from stage 2 itself"
    else:
      text = "no Q-Former text side (instruction_aware=False)"
    return (f"BLIP-2 stage 2 {self.directory} (ViT, ln_vision, query tokens, Q-Former attention and query "
            f"feed-forward, projection, LLM); {text}")

  # SafetensorsReader's interface
  def keys(self) -> list[str]:
    return list(self._map)

  def _source(self, key: str):
    return self._map[key]

  def shape(self, key: str) -> tuple[int, ...]:
    s = self._source(key)
    return s.shape if isinstance(s, _Drawn) else s[0].shape(s[1])

  def dtype(self, key: str) -> np.dtype:
    s = self._source(key)
    return s.dtype if isinstance(s, _Drawn) else s[0].dtype(s[1])

  def nbytes(self, key: str) -> int:
    s = self._source(key)
    return int(np.prod(s.shape)) * s.dtype.itemsize if isinstance(s, _Drawn) else s[0].nbytes(s[1])

  def get(self, key: str, region: tuple[slice, ...] | None = None) -> np.ndarray:
    s = self._source(key)
    if isinstance(s, _Drawn):
      return s.value() if region is None else s.value()[region]
    return s[0].get(s[1], region)

  @property
  def bytes_read(self) -> int:
    """Bytes read from the checkpoint files (the fallback's drawn tensors read nothing)."""
    return sum(r.bytes_read for r in self._readers)

  def close(self) -> None:
    for r in self._readers:
      r.close()
