"""Model configs: frozen dataclasses (hashable, so Linen modules can hold them).

Field names follow transformers' InstructBlip{Vision,QFormer}Config and T5Config, so that `from_hf` / `to_hf`
are plain renames and a reader can look a field up in either code base. `dtype` is the compute dtype and
`param_dtype` the storage dtype of a tower; both are strings ("float32", "bfloat16") to stay hashable and
printable in configs.
"""
import dataclasses
import re
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA adapters on the Dense layers whose module path ("language_model/encoder/layers/self_attn/q",
  "qformer/layer_0/attention/query", "vision/layers/qkv") matches one of `targets` (re.search). Every tower holds
  the same one; layers.Dense asks it whether to add an adapter."""
  targets: tuple[str, ...] = ()
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0

  def targets_path(self, path: str) -> bool:
    return any(re.search(t, path) for t in self.targets)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """EVA-CLIP ViT (InstructBlipVisionModel)."""
  hidden_size: int = 1408
  intermediate_size: int = 6144
  num_hidden_layers: int = 39
  num_attention_heads: int = 16
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu"
  qkv_bias: bool = True
  scan_layers: bool = True  # False: unrolled blocks with their own parameter paths (slower to compile)
  scan_unroll: int = 1      # blocks per scan iteration in the compiled loop (same parameters either way)
  dtype: str = "float32"
  param_dtype: str = "float32"
  lora: LoraConfig | None = None  # adapters (with_lora sets the same one on every tower)
  # weight-only quantisation of this frozen tower's linear layers (not the LM head): "", "int8" (a scale per
  # output channel) or "int4" (a scale per output channel and group of quantize_group inputs); models/quantize.py
  quantize: str = ""
  quantize_group: int = 128


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  """BERT-style Q-Former (InstructBlipQFormerModel)."""
  vocab_size: int = 30523
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  cross_attention_frequency: int = 2
  encoder_hidden_size: int = 1408  # = vision hidden_size; InstructBlipConfig enforces it
  dtype: str = "float32"
  param_dtype: str = "float32"
  lora: LoraConfig | None = None  # adapters (with_lora sets the same one on every tower)


@dataclasses.dataclass(frozen=True)
class T5Config:
  """T5 v1.1 / FlanT5 (T5ForConditionalGeneration, gated-gelu)."""
  vocab_size: int = 32128
  d_model: int = 2048
  d_kv: int = 64
  d_ff: int = 5120
  num_layers: int = 24
  num_decoder_layers: int = 24
  num_heads: int = 32
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  dense_act_fn: str = "gelu"  # InstructBLIP uses exact GELU (LAVIS and the HF conversion force it)
  is_gated_act: bool = True
  # tie_word_embeddings: the head is `shared` (no lm_head parameter). scale_decoder_outputs: multiply the decoder
  # output by d_model**-0.5 before the head (transformers does this for tied heads).
  tie_word_embeddings: bool = False
  scale_decoder_outputs: bool = False
  pad_token_id: int = 0
  eos_token_id: int = 1
  bos_token_id: int = 1
  decoder_start_token_id: int = 0
  remat: bool = False  # rematerialise each block in the backward pass (training through the frozen LLM)
  remat_policy: str = "full"  # what remat keeps: REMAT_POLICIES below
  scan_unroll: int = 1  # blocks per scan iteration in the compiled loop (same parameters either way)
  dtype: str = "float32"
  param_dtype: str = "float32"
  lora: LoraConfig | None = None  # adapters (with_lora sets the same one on every tower)
  # weight-only quantisation of this frozen tower's linear layers (not the LM head): "", "int8" (a scale per
  # output channel) or "int4" (a scale per output channel and group of quantize_group inputs); models/quantize.py
  quantize: str = ""
  quantize_group: int = 128


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """LLaMA / Vicuna (LlamaForCausalLM), the decoder-only LLM. Defaults: Vicuna-7B v1.1 as InstructBLIP uses it."""
  vocab_size: int = 32001            # LLaMA's 32000 + LAVIS's [PAD]
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None  # None = num_attention_heads (no grouping)
  head_dim: int | None = None             # None = hidden_size // num_attention_heads
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "default"         # "default" or "linear" (positions divided by rope_factor)
  rope_factor: float = 1.0
  attention_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  pad_token_id: int = 32000          # LAVIS's [PAD] (the hub config's 0 / -1 is wrong, transformers#25426)
  bos_token_id: int = 2              # LAVIS prepends </s> as BOS
  eos_token_id: int = 2
  remat: bool = False
  remat_policy: str = "full"  # what remat keeps: REMAT_POLICIES below
  scan_unroll: int = 1
  dtype: str = "float32"
  param_dtype: str = "float32"
  lora: LoraConfig | None = None  # adapters (with_lora sets the same one on every tower)
  # weight-only quantisation of this frozen tower's linear layers (not the LM head): "", "int8" (a scale per
  # output channel) or "int4" (a scale per output channel and group of quantize_group inputs); models/quantize.py
  quantize: str = ""
  quantize_group: int = 128

  @property
  def d_model(self) -> int:  # the width the projection maps the queries to (same name as T5's)
    return self.hidden_size

  @property
  def kv_heads(self) -> int:
    return self.num_key_value_heads or self.num_attention_heads

  @property
  def head_size(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class InstructBlipConfig:
  vision: VisionConfig = VisionConfig()
  qformer: QFormerConfig = QFormerConfig()
  text: T5Config | LlamaConfig = T5Config()
  num_query_tokens: int = 32
  # False = BLIP-2 behaviour: the Q-Former sees only its queries (the paper's "w/o instruction-aware" ablation).
  instruction_aware: bool = True
  image_token_index: int | None = None  # only carried through for newer transformers configs
  # transformers' InstructBLIP-Video format (model_type "instructblipvideo") and the placeholder id of its frames'
  # query outputs. The model is the same (a video: frames through the ViT and Q-Former, concatenated); these keep
  # the format on export, and the id counts as seen by the repetition penalty, as in transformers' generate.
  video_format: bool = False
  video_token_index: int | None = None

  def replace(self, **kw) -> "InstructBlipConfig":
    return dataclasses.replace(self, **kw)

  @property
  def decoder_only(self) -> bool:
    return isinstance(self.text, LlamaConfig)

  @property
  def lora(self) -> LoraConfig | None:
    return self.vision.lora


def with_lora(cfg: InstructBlipConfig, lora: LoraConfig | None) -> InstructBlipConfig:
  """`cfg` with LoRA adapters (None: without) on the layers `lora.targets` names, in any tower."""
  return cfg.replace(vision=dataclasses.replace(cfg.vision, lora=lora),
                     qformer=dataclasses.replace(cfg.qformer, lora=lora),
                     text=dataclasses.replace(cfg.text, lora=lora))


def dtype_of(name: str) -> Any:
  return jnp.dtype(name)


# --- construction from plain dicts (ml_collections configs, JSON) ---------------------------------------------


def _build(cls, d: dict[str, Any], where: str):
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(names)}")
  return cls(**d)


def _frozen_tower(d: dict[str, Any]) -> dict[str, Any]:
  """A frozen tower (ViT, LLM) stores its weights in its compute dtype unless told otherwise: there is no master
  copy to keep in float32, and bfloat16 storage halves the memory. (Training such a tower: set param_dtype.)"""
  if "dtype" in d and "param_dtype" not in d:
    d = dict(d, param_dtype=d["dtype"])
  return d


def from_dict(d: dict[str, Any]) -> InstructBlipConfig:
  """Builds the model config from a nested dict (e.g. `config.model.to_dict()` of an ml_collections config)."""
  d = dict(d)
  vision = _build(VisionConfig, _frozen_tower(dict(d.pop("vision", {}))), "model.vision")
  qformer = dict(d.pop("qformer", {}))
  qformer.setdefault("encoder_hidden_size", vision.hidden_size)
  qformer = _build(QFormerConfig, qformer, "model.qformer")
  text = dict(d.pop("text", {}))
  model_type = text.pop("model_type", "t5")
  if model_type not in TEXT_MODELS:
    raise ValueError(f"model.text.model_type={model_type!r}; expected one of {sorted(TEXT_MODELS)}")
  text = _build(TEXT_MODELS[model_type], _frozen_tower(text), "model.text")
  cfg = _build(InstructBlipConfig, {**d, "vision": vision, "qformer": qformer, "text": text}, "model")
  validate(cfg)
  return cfg


# The fields that fix the weights' shapes. A config may restate them over a checkpoint but not change them;
# every other field (dtypes, remat, scan settings, token ids, the instruction-aware switch, ...) is a setting that
# the config applies on top of the checkpoint's config.json.
SHAPE_FIELDS = {
    VisionConfig: {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                   "patch_size", "num_channels", "qkv_bias"},
    QFormerConfig: {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings", "cross_attention_frequency", "encoder_hidden_size"},
    T5Config: {"vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
               "relative_attention_num_buckets", "is_gated_act", "tie_word_embeddings"},
    LlamaConfig: {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "attention_bias", "mlp_bias", "tie_word_embeddings"},
    InstructBlipConfig: {"num_query_tokens"},
}


def with_overrides(cfg: InstructBlipConfig, overrides: dict[str, Any], source: str) -> InstructBlipConfig:
  """`cfg` (from a checkpoint's config.json, `source`) with the settings of `overrides` (a nested dict such as
  `config.model.to_dict()`) applied. Raises ValueError listing every override that contradicts the weights or
  names no field."""
  problems = []

  def merge(obj, d: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in d.items():
      have = getattr(obj, key, None)
      if key not in names:
        problems.append(f"{where}.{key}: no such field (fields: {', '.join(sorted(names))})")
      elif key in SHAPE_FIELDS[type(obj)] and value != have:
        problems.append(f"{where}.{key}={value!r} but {source} says {have!r}: the config describes another model "
                        "than the weights")
      elif not dataclasses.is_dataclass(have):
        changes[key] = value
    return dataclasses.replace(obj, **changes)

  d = dict(overrides)
  vision = merge(cfg.vision, _frozen_tower(dict(d.pop("vision", {}) or {})), "model.vision")
  qformer = merge(cfg.qformer, dict(d.pop("qformer", {}) or {}), "model.qformer")
  text = dict(d.pop("text", {}) or {})
  model_type = text.pop("model_type", None)
  have_type = "llama" if cfg.decoder_only else "t5"
  if model_type is not None and model_type != have_type:
    problems.append(f"model.text.model_type={model_type!r} but {source} holds a {have_type} language model")
    text = {}
  text = merge(cfg.text, _frozen_tower(text), "model.text")
  top = merge(cfg, d, "model")
  if problems:
    raise ValueError("config.model contradicts the checkpoint:\n  " + "\n  ".join(problems))
  out = dataclasses.replace(top, vision=vision, qformer=qformer, text=text)
  validate(out)
  return out


def validate(cfg: InstructBlipConfig) -> None:
  """Catches inconsistent sizes before anything is built; each message names the field."""
  v, q = cfg.vision, cfg.qformer
  problems = []
  if v.hidden_size % v.num_attention_heads:
    problems.append(f"model.vision.hidden_size={v.hidden_size} is not divisible by "
                    f"num_attention_heads={v.num_attention_heads}")
  if v.image_size % v.patch_size:
    problems.append(f"model.vision.image_size={v.image_size} is not divisible by patch_size={v.patch_size}")
  if q.hidden_size % q.num_attention_heads:
    problems.append(f"model.qformer.hidden_size={q.hidden_size} is not divisible by "
                    f"num_attention_heads={q.num_attention_heads}")
  if q.encoder_hidden_size != v.hidden_size:
    problems.append(f"model.qformer.encoder_hidden_size={q.encoder_hidden_size} must equal "
                    f"model.vision.hidden_size={v.hidden_size}")
  if q.cross_attention_frequency < 1:
    problems.append(f"model.qformer.cross_attention_frequency={q.cross_attention_frequency} must be >= 1")
  if cfg.num_query_tokens < 1:
    problems.append(f"model.num_query_tokens={cfg.num_query_tokens} must be >= 1")
  problems += _validate_llama(cfg.text) if cfg.decoder_only else _validate_t5(cfg.text)
  if cfg.text.remat_policy not in REMAT_POLICIES:
    problems.append(f"model.text.remat_policy={cfg.text.remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}")
  for name, tower in (("vision", v), ("text", cfg.text)):
    if tower.quantize not in ("",) + QUANTIZE_MODES:
      problems.append(f"model.{name}.quantize={tower.quantize!r}; expected '' (none), 'int8' or 'int4'")
    if tower.quantize_group < 1:
      problems.append(f"model.{name}.quantize_group={tower.quantize_group} must be >= 1")
  for name, tower in (("vision", v), ("qformer", q), ("text", cfg.text)):
    for field in ("dtype", "param_dtype"):
      if getattr(tower, field) not in ("float32", "bfloat16", "float16"):
        problems.append(f"model.{name}.{field}={getattr(tower, field)!r}; expected float32, bfloat16 or float16")
  if problems:
    raise ValueError("invalid model config:\n  " + "\n  ".join(problems))


# transformers' ACT2FN names used by these checkpoints. "gelu" is exact (erf), "gelu_new" the tanh approximation.
ACTIVATIONS = {"gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"}


def _validate_t5(t: T5Config) -> list[str]:
  if t.dense_act_fn not in ACTIVATIONS:
    return [f"model.text.dense_act_fn={t.dense_act_fn!r}; expected one of {sorted(ACTIVATIONS)}"]
  return []


def _validate_llama(t: LlamaConfig) -> list[str]:
  problems = []
  if t.hidden_act not in ACTIVATIONS:
    problems.append(f"model.text.hidden_act={t.hidden_act!r}; expected one of {sorted(ACTIVATIONS)}")
  if t.head_dim is None and t.hidden_size % t.num_attention_heads:
    problems.append(f"model.text.hidden_size={t.hidden_size} is not divisible by "
                    f"num_attention_heads={t.num_attention_heads} (or set head_dim)")
  if t.num_attention_heads % t.kv_heads:
    problems.append(f"model.text.num_attention_heads={t.num_attention_heads} is not a multiple of "
                    f"num_key_value_heads={t.kv_heads}")
  if t.head_size % 2:
    problems.append(f"model.text head size {t.head_size} must be even for rotary embeddings")
  if t.rope_type not in ("default", "linear"):
    problems.append(f"model.text.rope_type={t.rope_type!r}; supported: 'default', 'linear'")
  return problems


TEXT_MODELS = {"t5": T5Config, "llama": LlamaConfig}
QUANTIZE_MODES = ("int8", "int4")   # models/quantize.py

# What a rematerialised LLM block keeps for the backward pass (MaxText's names where they exist): "full" keeps only
# the block's input and recomputes everything; "save_dots" keeps every matmul output (no matmul recomputed, the most
# memory); "save_dots_no_batch" keeps the matmuls with no batch dimension (the weight projections; attention's
# scores and outputs are recomputed).
REMAT_POLICIES = ("full", "save_dots", "save_dots_no_batch")
