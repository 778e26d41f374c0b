"""config.json <-> InstructBlipConfig: every field checked before use (a CheckpointError names the file and each bad
field), transformers' defaults for what a file omits, unknown fields reported, and the file written back so that
transformers reads the same model.
"""
import dataclasses
import functools
import json
import logging
import math
import os

from iblip_jax.errors import CheckpointError
from iblip_jax.hf.names import CONFIG_NAME
from iblip_jax.models.configs import (ACTIVATIONS, InstructBlipConfig, LlamaConfig, QFormerConfig, T5Config,
                                      VisionConfig, validate)

log = logging.getLogger(__name__)

# transformers' defaults for fields a config.json may omit.
HF_VISION_DEFAULTS = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                          image_size=224, patch_size=14, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu",
                          qkv_bias=True)
HF_QFORMER_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                           attention_probs_dropout_prob=0.1, max_position_embeddings=512, layer_norm_eps=1e-12,
                           pad_token_id=0, cross_attention_frequency=2)
HF_T5_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
                      layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


HF_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
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
                   num_query_tokens="count", image_token_index="id?", image_token_id="id?",
                   video_token_index="id?", video_token_id="id?")
VIDEO_MODEL_TYPE = "instructblipvideo"   # transformers' InstructBlipVideoForConditionalGeneration
_VISION_FIELDS = dict(hidden_size="count", intermediate_size="count", num_hidden_layers="count",
                      num_attention_heads="count", image_size="count", patch_size="count", num_channels="count",
                      layer_norm_eps="positive", hidden_act="act", qkv_bias="bool")
QFORMER_FIELDS = dict(vocab_size="count", hidden_size="count", num_hidden_layers="count", num_attention_heads="count",
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


def field_problems(d: dict, fields: dict[str, str], where: str) -> list[str]:
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
  problems = field_problems(hf, _TOP_FIELDS, "")
  sections = {"vision_config": _VISION_FIELDS, "qformer_config": QFORMER_FIELDS, "text_config": None}
  for section, fields in sections.items():
    d = hf.get(section)
    if isinstance(d, dict):  # a wrong type or null was dealt with above
      problems += field_problems(d, fields or _text_fields(d), f"{section}.")
  text = hf.get("text_config")
  for rope in ("rope_parameters", "rope_scaling"):
    if isinstance(text, dict) and text.get("model_type") == "llama" and isinstance(text.get(rope), dict):
      problems += field_problems(text[rope], _ROPE_FIELDS, f"text_config.{rope}.")
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
# Keys transformers 5 writes into these configs that iblip_jax has no use for: with them known here, a config.json
# saved by transformers is checked without importing transformers' config classes (2.4 s of every job's start-up).
_UNUSED_FIELDS = {
    "": frozenset(("architectures", "dtype", "transformers_version", "initializer_range", "initializer_factor",
                   "use_decoder_only_language_model")),
    "vision_config": frozenset(("attention_dropout", "initializer_range")),
    "qformer_config": frozenset(("initializer_range",)),
    "t5": frozenset(("classifier_dropout", "initializer_factor", "is_gated_act")),
    "llama": frozenset(("attention_dropout", "initializer_range", "max_position_embeddings", "pretraining_tp"))}


@functools.cache
def _transformers_fields() -> dict[str, frozenset[str]]:
  """Per section, the keys transformers' own config classes write or accept (their fields, what to_dict() writes,
  attribute aliases, the generation settings older versions kept in config.json); {} without transformers."""
  try:
    # imported here: transformers (with torch, where installed) takes seconds to load, and only this report uses it
    from transformers import (GenerationConfig, InstructBlipConfig, InstructBlipQFormerConfig,
                              InstructBlipVideoConfig, InstructBlipVisionConfig, LlamaConfig, T5Config)
    generation = set(GenerationConfig().to_dict())

    def keys(cls) -> frozenset[str]:
      names = set(cls().to_dict()) | set(getattr(cls, "attribute_map", {})) | generation
      return frozenset(names | ({f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()))

    return {"": keys(InstructBlipConfig), VIDEO_MODEL_TYPE: keys(InstructBlipVideoConfig),
            "vision_config": keys(InstructBlipVisionConfig),
            "qformer_config": keys(InstructBlipQFormerConfig), "t5": keys(T5Config), "llama": keys(LlamaConfig)}
  except Exception as e:  # noqa: BLE001 - the report is advice; it must never stop a load
    log.info("cannot list transformers' config fields (%s); unknown-field report from iblip_jax's own list", e)
    return {}


def _unknown_fields(hf: dict) -> list[str]:
  """Keys of a checked config.json that neither iblip_jax nor transformers knows (dotted paths). transformers' lists
  are consulted only for keys iblip_jax's own do not have."""
  unknown = _unknown_fields_by(hf, {})
  return _unknown_fields_by(hf, _transformers_fields()) if unknown else []


def _unknown_fields_by(hf: dict, known: dict[str, frozenset[str]]) -> list[str]:
  text = hf.get("text_config") or {}
  sections = {"": (hf, _TOP_FIELDS), "vision_config": (hf.get("vision_config") or {}, _VISION_FIELDS),
              "qformer_config": (hf.get("qformer_config") or {}, QFORMER_FIELDS),
              "text_config": (text, _text_fields(text))}
  unknown = []
  for section, (d, ours) in sections.items():
    kind = text.get("model_type") if section == "text_config" else section
    if kind not in ("", "vision_config", "qformer_config", "t5", "llama"):
      continue  # a language model config_from_hf refuses
    if kind == "" and _is_video(hf):
      kind = VIDEO_MODEL_TYPE
    allowed = (known.get(kind, frozenset()) | set(ours) | _LEGACY_FIELDS | _UNUSED_FIELDS.get(kind, frozenset())
               | {"model_type"})
    unknown += [f"{section}.{k}" if section else k for k in sorted(d) if k not in allowed]
  return unknown


def _is_video(hf: dict) -> bool:
  return hf.get("model_type") == VIDEO_MODEL_TYPE


def _placeholders(hf: dict) -> dict:
  """The placeholder ids and the format (InstructBLIP or InstructBLIP-Video) of a config.json."""
  out = dict(image_token_index=hf.get("image_token_index", hf.get("image_token_id")))
  if _is_video(hf):
    out.update(video_format=True, video_token_index=hf.get("video_token_index", hf.get("video_token_id")))
  return out


def config_from_hf(hf: dict, *, tied_head: bool, source: str = CONFIG_NAME) -> InstructBlipConfig:
  """InstructBlipConfig from a transformers config.json dict. `tied_head`: the checkpoint has no lm_head.
  `source`: the file the dict came from, named in errors (a CheckpointError for any bad field)."""
  _check_config(hf, source)
  text = hf.get("text_config") or {}
  model_type = text.get("model_type", "opt")
  if model_type not in ("t5", "llama"):
    raise CheckpointError(f"{source}: text_config.model_type={model_type!r}; iblip_jax loads t5 (FlanT5) and "
                          "llama (Vicuna) language models")
  vision = VisionConfig(**_pick(hf.get("vision_config") or {}, HF_VISION_DEFAULTS))
  qformer = QFormerConfig(**_pick(hf.get("qformer_config") or {}, HF_QFORMER_DEFAULTS),
                          encoder_hidden_size=vision.hidden_size)
  if model_type == "llama":
    return _checked(InstructBlipConfig(vision=vision, qformer=qformer, text=_llama_from_hf(text),
                                       num_query_tokens=hf.get("num_query_tokens", 32), **_placeholders(hf)),
                    source)
  t5 = _pick(text, HF_T5_DEFAULTS)
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
                                     num_query_tokens=hf.get("num_query_tokens", 32), **_placeholders(hf)),
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
  fields = _pick(text, HF_LLAMA_DEFAULTS)
  pad = text.get("pad_token_id")
  return LlamaConfig(**fields, num_key_value_heads=text.get("num_key_value_heads"), head_dim=text.get("head_dim"),
                     rope_theta=float(theta), rope_type=rope_type, rope_factor=float(rope.get("factor", 1.0)),
                     # no usable pad id (the Vicuna hub config has none or a wrong one): pad with EOS
                     pad_token_id=pad if isinstance(pad, int) and pad >= 0 else fields["eos_token_id"])


def _llama_to_hf(t: LlamaConfig) -> dict:
  rope = {"rope_theta": t.rope_theta, "rope_type": t.rope_type}
  if t.rope_type == "linear":
    rope["factor"] = t.rope_factor
  return dict({k: getattr(t, k) for k in HF_LLAMA_DEFAULTS}, model_type="llama",
              num_key_value_heads=t.kv_heads, head_dim=t.head_size, pad_token_id=t.pad_token_id,
              rope_parameters=rope, rope_theta=t.rope_theta)


def config_to_hf(cfg: InstructBlipConfig) -> dict:
  """A config.json that transformers' InstructBlipConfig (InstructBlipVideoConfig for a model loaded from that
  format) reads back to the same model."""
  v, q, t = cfg.vision, cfg.qformer, cfg.text
  vision = {k: getattr(v, k) for k in HF_VISION_DEFAULTS}
  qformer = {k: getattr(q, k) for k in HF_QFORMER_DEFAULTS}
  if cfg.decoder_only:
    text = _llama_to_hf(t)
  else:
    text = {k: getattr(t, k) for k in HF_T5_DEFAULTS}
    act = "gelu" if t.dense_act_fn in ("gelu_new", "gelu_pytorch_tanh") and t.is_gated_act else t.dense_act_fn
    text.update(model_type="t5", num_decoder_layers=t.num_decoder_layers, bos_token_id=t.bos_token_id,
                feed_forward_proj=("gated-" if t.is_gated_act else "") + act, dense_act_fn=t.dense_act_fn,
                is_gated_act=t.is_gated_act, tie_word_embeddings=t.tie_word_embeddings,
                scale_decoder_outputs=t.scale_decoder_outputs)
  kind, architecture = ((VIDEO_MODEL_TYPE, "InstructBlipVideoForConditionalGeneration") if cfg.video_format
                        else ("instructblip", "InstructBlipForConditionalGeneration"))
  out = {
      "architectures": [architecture], "model_type": kind,
      "num_query_tokens": cfg.num_query_tokens, "use_decoder_only_language_model": cfg.decoder_only,
      "vision_config": {"model_type": f"{kind}_vision_model", **vision},
      "qformer_config": {"model_type": f"{kind}_qformer", "encoder_hidden_size": q.encoder_hidden_size, **qformer},
      "text_config": text,
  }
  for name in ("image_token_index", "video_token_index"):
    if getattr(cfg, name) is not None:
      out[name] = getattr(cfg, name)
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
