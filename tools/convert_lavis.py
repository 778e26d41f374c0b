"""Converts Salesforce LAVIS's own InstructBLIP / BLIP-2 checkpoints (.pth) into a Hugging Face InstructBLIP directory
(transformers' names: model.safetensors + config.json) that iblip_jax.from_pretrained and transformers load.

  python -m tools.convert_lavis --lavis instruct_blip_flanxl_trimmed.pth \\
      --frozen-from /ckpt/instructblip-flan-t5-xl --out /ckpt/flanxl-from-lavis
  # the paper's initialisation for instruction tuning: BLIP-2 stage 1 (whole Q-Former), then stage 2 on top
  python -m tools.convert_lavis --lavis blip2_pretrained.pth --lavis blip2_pretrained_flant5xl.pth \\
      --frozen-from /ckpt/instructblip-flan-t5-xl --out /ckpt/blip2-flanxl-init

Run it from the repository root as a module (tools/ has no __init__.py; Python reads it as a namespace package), or
as `python tools/convert_lavis.py` with iblip_jax installed (pip install -e .); it adds nothing to sys.path.

What the LAVIS files hold. LAVIS saves only what was trained (runner_base._save_checkpoint drops every parameter
with requires_grad=False), so:
- instruct_blip_{flanxl,flanxxl,vicuna7b,vicuna13b}_trimmed.pth: ln_vision, query_tokens, the whole Q-Former
  (Qformer.bert.*) and t5_proj / llm_proj;
- blip2_pretrained_flant5{xl,xxl}.pth (stage 2): the same without the Q-Former's text side (word / position
  embeddings, the text FFN `intermediate` / `output`; blip2_t5.py sets them to None);
- blip2_pretrained.pth (stage 1): ln_vision, query_tokens, the whole Q-Former, and the stage-1 heads (ignored).
The frozen towers, EVA ViT-g (LAVIS loads it from eva_vit_g.pth) and the LLM (from Hugging Face), are in none of
them: --frozen-from names a Hugging Face InstructBLIP directory (e.g. Salesforce/instructblip-flan-t5-xl, downloaded
beforehand) whose vision tower (vision_model.*, without post_layernorm = ln_vision) and language model
(language_model.*) are copied, with its config.json (the Q-Former sizes, query count and projection are then taken
from the LAVIS tensors and checked against the towers) and its tokenizer files. Nothing else is taken from it: a
Q-Former part missing from the LAVIS files is an error, never filled from another model. Without --frozen-from,
--config gives config.json for a LAVIS file that holds everything; --partial writes the converted tensors alone.

Several --lavis files are applied in order, a later file's tensors replacing an earlier one's key by key; the
summary says which file each part came from.

Safety: files are read with torch.load(weights_only=True), which rebuilds tensors, numbers, strings and containers
only. A pickle that would import or call anything else (code) is refused with an error saying so.

Every LAVIS key is mapped or listed in IGNORED with the reason; any other key stops the conversion (no silent drop).
The written directory is checked against its config.json with iblip_jax's loader before the tool reports success.
"""
import argparse
import dataclasses
import json
import os
import pickle
import re
import shutil
import sys

import ml_dtypes
import numpy as np

from iblip_jax import hf
from iblip_jax.errors import CheckpointError
from iblip_jax.hf import config as hf_config, names as hf_names, params as hf_params
from iblip_jax.hf import safetensors as hf_safetensors
from iblip_jax.models import instructblip


class ConversionError(ValueError):
  """A conversion that cannot be done; the message names the file, the keys and what was expected."""


# --- LAVIS name -> Hugging Face name ----------------------------------------------------------------------------
# Derived from LAVIS's module attributes: eva_vit.py (VisionTransformer: cls_token, pos_embed, patch_embed.proj,
# blocks.N.{norm1, attn.{qkv, q_bias, v_bias, proj}, norm2, mlp.{fc1, fc2}}), blip2.py (ln_vision), Qformer.py
# (BertEmbeddings, BertLayer with attention / crossattention .self.{query,key,value} .output.{dense,LayerNorm},
# intermediate(_query).dense, output(_query).{dense,LayerNorm}), blip2_*_instruct.py (t5_proj / llm_proj, t5_model /
# llm_model: transformers modules, whose names HF InstructBLIP keeps under language_model).
_Q = r"Qformer\.bert\.encoder\.layer\.(\d+)"
RULES: list[tuple[str, str]] = [
    (r"visual_encoder\.cls_token", "vision_model.embeddings.class_embedding"),
    (r"visual_encoder\.pos_embed", "vision_model.embeddings.position_embedding"),
    (r"visual_encoder\.patch_embed\.proj\.(weight|bias)", r"vision_model.embeddings.patch_embedding.\1"),
    (r"visual_encoder\.blocks\.(\d+)\.norm([12])\.(weight|bias)", r"vision_model.encoder.layers.\1.layer_norm\2.\3"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight", r"vision_model.encoder.layers.\1.self_attn.qkv.weight"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)",
     r"vision_model.encoder.layers.\1.self_attn.projection.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"vision_model.encoder.layers.\1.mlp.\2.\3"),
    (r"ln_vision\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    (r"query_tokens", "query_tokens"),
    (r"Qformer\.bert\.embeddings\.(word|position)_embeddings\.weight", r"qformer.embeddings.\1_embeddings.weight"),
    (r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)", r"qformer.embeddings.layernorm.\1"),
    (_Q + r"\.(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.attention.\3.\4"),
    (_Q + r"\.(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.output.\3.\4"),
    (_Q + r"\.(intermediate|intermediate_query)\.dense\.(weight|bias)", r"qformer.encoder.layer.\1.\2.dense.\3"),
    (_Q + r"\.(output|output_query)\.(dense|LayerNorm)\.(weight|bias)", r"qformer.encoder.layer.\1.\2.\3.\4"),
    (r"(?:t5_proj|llm_proj)\.(weight|bias)", r"language_projection.\1"),
    (r"(?:t5_model|llm_model)\.(.+)", r"language_model.\1"),
]
# EVA's attention has no k bias: LAVIS keeps q_bias and v_bias, HF one qkv.bias = cat(q_bias, zeros, v_bias).
QV_BIAS = re.compile(r"visual_encoder\.blocks\.(\d+)\.attn\.(q|v)_bias")

# LAVIS keys with no HF InstructBLIP counterpart, left out on purpose (first match wins).
IGNORED: list[tuple[str, str]] = [
    (r"Qformer\.bert\.embeddings\.position_ids", "a buffer (0..max_position-1), rebuilt from the config"),
    (r"Qformer\.cls\..+", "the stage-1 Q-Former language-model head (image-grounded text generation); InstructBLIP "
                          "deletes it (Qformer.cls = None) and HF has none"),
    (r"(vision_proj|text_proj|itm_head)\.(weight|bias)|temp",
     "a stage-1 image-text contrastive / matching head; unused by InstructBLIP"),
    (r"t5_model\.(encoder|decoder)\.embed_tokens\.weight", "T5's copy of t5_model.shared (tied on load)"),
    (r"llm_model\..*rotary_emb\.inv_freq", "a rotary-embedding buffer, rebuilt from the config"),
]

# Parts of the HF state dict, for reports of what is missing and where each part came from.
FROZEN = re.compile(r"vision_model\.(embeddings|encoder)\..+|language_model\..+")
_QFORMER_TEXT = re.compile(r"qformer\.(embeddings\.(word|position)_embeddings\.|encoder\.layer\.\d+\.(intermediate|"
                           r"output)\.)")
PARTS = [
    ("vision tower (EVA ViT: LAVIS's visual_encoder.*)", re.compile(r"vision_model\.(embeddings|encoder)\.")),
    ("language model (t5_model.* / llm_model.*)", re.compile(r"language_model\.")),
    ("ln_vision", re.compile(r"vision_model\.post_layernorm\.")),
    ("query_tokens", re.compile(r"query_tokens$")),
    ("Q-Former text side (word/position embeddings, text FFN)", _QFORMER_TEXT),
    ("Q-Former query side (embedding LayerNorm, attention, query FFN)", re.compile(r"qformer\.")),
    ("projection (t5_proj / llm_proj)", re.compile(r"language_projection\.")),
]


def part_of(hf_name: str) -> str:
  return next(name for name, pattern in PARTS if pattern.match(hf_name))


def hf_name(lavis_name: str) -> str | None:
  """The HF name of a LAVIS key (None for q_bias / v_bias, merged apart, and for ignored keys)."""
  for pattern, reason in IGNORED:
    if re.fullmatch(pattern, lavis_name):
      return None
  if QV_BIAS.fullmatch(lavis_name):
    return None
  for pattern, target in RULES:
    if re.fullmatch(pattern, lavis_name):
      return re.sub(pattern, target, lavis_name)
  raise KeyError(lavis_name)


def ignored_reason(lavis_name: str) -> str | None:
  return next((reason for pattern, reason in IGNORED if re.fullmatch(pattern, lavis_name)), None)


# --- reading LAVIS files --------------------------------------------------------------------------------------


def _numpy(tensor) -> np.ndarray:
  import torch  # the only place torch is needed
  t = tensor.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:  # numpy has no bfloat16: the same bits as ml_dtypes'
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def load_lavis(path: str) -> dict[str, np.ndarray]:
  """The state dict of a LAVIS checkpoint ({"model": state_dict, "optimizer", "config", ...} or a bare state dict)
  as numpy arrays. Only tensor data is unpickled; anything else is refused."""
  import torch
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such file")
  try:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    # torch's weights-only unpickler names the global it refused to import; other failures are malformed data
    if not re.search(r"global", str(e), re.IGNORECASE):
      detail = " ".join(str(e).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].split())
      raise ConversionError(f"{path}: not a readable PyTorch checkpoint (unpickling failed: {detail[:200]})") from None
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    what = f" ({found.group(1)})" if found else ""
    raise ConversionError(
        f"{path}: refused: the pickle would import or call code{what} when loaded, not just rebuild tensors. LAVIS "
        "checkpoints hold tensors, numbers and strings only; this file is not one, or it was tampered with. It was "
        "not loaded (torch.load weights_only=True); load it with weights_only=False only if you trust its origin"
    ) from None
  except (RuntimeError, EOFError, OSError, ValueError) as e:
    raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
  state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
  if not isinstance(state, dict) or not state:
    raise ConversionError(f"{path}: expected a LAVIS checkpoint, a dict whose 'model' entry is the state dict (or a "
                          f"state dict itself); got {type(state).__name__}")
  bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
  if bad:
    top = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else []
    raise ConversionError(f"{path}: {len(bad)} entries of the state dict are not tensors (first: {bad[:3]}); "
                          f"expected the 'model' entry of a LAVIS checkpoint (top-level keys: {top})")
  return {k: _numpy(v) for k, v in state.items()}


def convert(state: dict[str, np.ndarray], source: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(HF tensors, {ignored LAVIS key: reason}); a ConversionError lists every key that maps nowhere."""
  out, ignored, unknown = {}, {}, []
  for key, value in state.items():
    reason = ignored_reason(key)
    if reason:
      ignored[key] = reason
      continue
    try:
      name = hf_name(key)
    except KeyError:
      unknown.append(key)
      continue
    if name is not None:
      out[name] = value
  unknown += _merge_qv_bias(state, out, source)
  if unknown:
    raise ConversionError(f"{source}: {len(unknown)} key(s) with no Hugging Face InstructBLIP counterpart (a "
                          f"different architecture or a newer LAVIS?): {', '.join(sorted(unknown))}")
  return out, ignored


def _merge_qv_bias(state: dict, out: dict, source: str) -> list[str]:
  """Writes qkv.bias = cat(q_bias, zeros, v_bias) per block; returns the keys of blocks with only one of the two."""
  blocks: dict[str, dict[str, np.ndarray]] = {}
  for key, value in state.items():
    m = QV_BIAS.fullmatch(key)
    if m:
      blocks.setdefault(m.group(1), {})[m.group(2)] = value
  lonely = []
  for block, biases in blocks.items():
    if set(biases) != {"q", "v"}:
      lonely += [f"visual_encoder.blocks.{block}.attn.{k}_bias (without its {'v' if k == 'q' else 'q'}_bias)"
                 for k in biases]
      continue
    q, v = biases["q"], biases["v"]
    if q.shape != v.shape or q.ndim != 1:
      raise ConversionError(f"{source}: visual_encoder.blocks.{block}.attn q_bias {q.shape} / v_bias {v.shape}: "
                            "expected two vectors of the same size")
    out[f"vision_model.encoder.layers.{block}.self_attn.qkv.bias"] = np.concatenate([q, np.zeros_like(q), v])
  return lonely


# --- config.json ----------------------------------------------------------------------------------------------


def _shape(tensors: dict, name: str, what: str) -> tuple[int, ...]:
  if name not in tensors:
    raise ConversionError(f"cannot infer {what}: {name} is missing")
  return tuple(tensors[name].shape)


def infer_qformer(tensors: dict[str, np.ndarray]) -> dict:
  """The Q-Former sizes, query count and projection width the converted tensors imply (heads excepted: no shape
  shows them; the base config's count is kept and checked to divide the width)."""
  _, n_query, hidden = _shape(tensors, "query_tokens", "the query count")
  layers = sorted({int(m.group(1)) for k in tensors for m in [re.match(r"qformer\.encoder\.layer\.(\d+)\.", k)] if m})
  if not layers:
    raise ConversionError("no Q-Former layers (Qformer.bert.encoder.layer.*) in the LAVIS file(s)")
  cross = sorted({int(m.group(1)) for k in tensors
                  for m in [re.match(r"qformer\.encoder\.layer\.(\d+)\.crossattention\.", k)] if m})
  frequency = cross[1] - cross[0] if len(cross) > 1 else len(layers)
  if not cross or cross != list(range(0, len(layers), frequency)):
    raise ConversionError(f"Q-Former cross-attention in layers {cross} of {len(layers)}: expected every n-th layer "
                          "from layer 0 (LAVIS's cross_attention_freq)")
  q = dict(hidden_size=hidden, num_hidden_layers=len(layers), cross_attention_frequency=frequency,
           intermediate_size=_shape(tensors, "qformer.encoder.layer.0.intermediate_query.dense.weight",
                                    "the Q-Former FFN width")[0],
           encoder_hidden_size=_shape(tensors, "qformer.encoder.layer.0.crossattention.attention.key.weight",
                                      "the image width")[1])
  if "qformer.embeddings.word_embeddings.weight" in tensors:
    q["vocab_size"] = tensors["qformer.embeddings.word_embeddings.weight"].shape[0]
  if "qformer.embeddings.position_embeddings.weight" in tensors:
    q["max_position_embeddings"] = tensors["qformer.embeddings.position_embeddings.weight"].shape[0]
  projection = _shape(tensors, "language_projection.weight", "the projection width")[0]
  return dict(qformer=q, num_query_tokens=n_query, projection=projection)


def merged_config(base: dict, tensors: dict[str, np.ndarray], source: str) -> dict:
  """`base` (a config.json) with the Q-Former sizes and query count of the converted tensors; a ConversionError
  when they do not fit the towers the base describes."""
  inferred = infer_qformer(tensors)
  config = json.loads(json.dumps(base))
  qformer = config.setdefault("qformer_config", {})
  qformer.update(inferred["qformer"])
  config["num_query_tokens"] = inferred["num_query_tokens"]
  vision = (config.get("vision_config") or {}).get("hidden_size", 1408)
  text = config.get("text_config") or {}
  llm = text.get("d_model", text.get("hidden_size"))
  heads = qformer.get("num_attention_heads", 12)
  problems = []
  if inferred["qformer"]["encoder_hidden_size"] != vision:
    problems.append(f"the Q-Former cross-attends to width {inferred['qformer']['encoder_hidden_size']} but "
                    f"vision_config.hidden_size is {vision}")
  if llm is not None and inferred["projection"] != llm:
    problems.append(f"the projection (t5_proj / llm_proj) outputs {inferred['projection']} but the language model's "
                    f"width is {llm}: a checkpoint of another LLM size")
  if inferred["qformer"]["hidden_size"] % heads:
    problems.append(f"Q-Former width {inferred['qformer']['hidden_size']} is not a multiple of "
                    f"qformer_config.num_attention_heads={heads}")
  if problems:
    raise ConversionError(f"the LAVIS file(s) do not fit {source}:\n  " + "\n  ".join(problems))
  return config


# --- the conversion -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
  tensors: dict            # HF name -> np.ndarray (converted) or _Lazy (from --frozen-from)
  origin: dict[str, str]   # part -> where it came from
  ignored: dict[str, str]  # LAVIS key -> reason
  config: dict | None

  def close(self) -> None:
    for reader in {t.reader for t in self.tensors.values() if isinstance(t, _Lazy)}:
      reader.close()


class _Lazy:
  """A tensor of the --frozen-from directory, read when it is written (one at a time, never all in memory)."""

  def __init__(self, reader: hf_safetensors.SafetensorsReader, key: str):
    self.reader, self.key = reader, key
    self.dtype, self.shape = reader.dtype(key), reader.shape(key)
    self.nbytes = reader.nbytes(key)

  def __array__(self, dtype=None, copy=None):
    array = self.reader.get(self.key)
    return array if dtype is None else array.astype(dtype)


def plan(lavis_files, frozen_from: str | None = None, config_path: str | None = None,
         partial: bool = False) -> Plan:
  converted, origin, ignored = {}, {}, {}
  for path in lavis_files:
    tensors, skipped = convert(load_lavis(path), path)
    converted.update(tensors)
    ignored.update(skipped)
    for name in tensors:
      origin[part_of(name)] = os.path.basename(path)
  if not converted:
    raise ConversionError(f"{', '.join(lavis_files)}: no InstructBLIP tensors (only ignored keys)")
  tensors = dict(converted)
  base, base_source = None, None
  if frozen_from:
    reader = hf_safetensors.SafetensorsReader(frozen_from)
    taken = [k for k in reader.keys() if FROZEN.fullmatch(k) and k not in converted]
    tensors.update({k: _Lazy(reader, k) for k in taken})
    for name in taken:
      origin.setdefault(part_of(name), frozen_from)
    base, base_source = hf_config.read_config(frozen_from), os.path.join(frozen_from, hf_names.CONFIG_NAME)
  if config_path:
    with open(config_path, encoding="utf-8") as f:
      base, base_source = json.load(f), config_path
  missing = _missing_parts(tensors)
  if missing and not partial:
    raise ConversionError(_missing_message(missing, lavis_files, frozen_from))
  config = merged_config(base, converted, base_source) if base is not None and not missing else None
  if config is None and not partial:
    raise ConversionError("the LAVIS file(s) hold every part, but config.json needs sizes no tensor shows (attention "
                          "heads, the LLM's settings): pass --config CONFIG_JSON (or --frozen-from HF_DIR)")
  return Plan(tensors, origin, ignored, config)


def _missing_parts(tensors: dict) -> list[str]:
  present = {part_of(k) for k in tensors}
  missing = [name for name, _ in PARTS if name not in present]
  layers = {m.group(1) for k in tensors for m in [re.match(r"qformer\.encoder\.layer\.(\d+)\.", k)] if m}
  text = [f"qformer.embeddings.{w}_embeddings.weight" for w in ("word", "position")] + [
      f"qformer.encoder.layer.{i}.{m}" for i in sorted(layers, key=int)
      for m in ("intermediate.dense.weight", "output.dense.weight", "output.LayerNorm.weight")]
  part = "Q-Former text side (word/position embeddings, text FFN)"
  if part not in missing and any(k not in tensors for k in text):
    missing.append(part + f" (incomplete: {', '.join(k for k in text if k not in tensors)})")
  return missing


def _missing_message(missing: list[str], lavis_files, frozen_from) -> str:
  hints = []
  if any(m.startswith("vision tower") or m.startswith("language model") for m in missing) and not frozen_from:
    hints.append("LAVIS saves only trained tensors: the frozen ViT and LLM are in no .pth; pass --frozen-from with a "
                 "Hugging Face InstructBLIP directory of the same LLM (e.g. Salesforce/instructblip-flan-t5-xl)")
  if any(m.startswith("Q-Former text side") for m in missing):
    hints.append("BLIP-2 stage-2 files (blip2_pretrained_flant5*.pth) drop the Q-Former's text side: pass the "
                 "stage-1 blip2_pretrained.pth first (--lavis blip2_pretrained.pth --lavis <stage-2 file>), as "
                 "LAVIS's InstructBLIP from_config does")
  hints.append("or --partial to write only the converted tensors")
  return (f"{', '.join(lavis_files)}{' + ' + frozen_from if frozen_from else ''}: cannot build a complete "
          f"checkpoint; missing:\n  " + "\n  ".join(missing) + "\n" + "\n".join(hints))


def write(p: Plan, out: str, frozen_from: str | None = None, max_shard_bytes: int = 4 * 2**30) -> list[str]:
  """Writes the safetensors file(s) (+ config.json and the tokenizer files of --frozen-from); returns the files."""
  os.makedirs(out, exist_ok=True)
  names = sorted(p.tensors)
  shards, size = [[]], 0
  for name in names:
    if shards[-1] and size + p.tensors[name].nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += p.tensors[name].nbytes
  files = [hf_names.WEIGHTS_NAME] if len(shards) == 1 else [
      f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
  for file, shard in zip(files, shards):
    hf_safetensors.write(os.path.join(out, file), [(k, p.tensors[k]) for k in shard], metadata={"format": "pt"})
  if len(files) > 1:
    index = {"metadata": {"total_size": sum(p.tensors[k].nbytes for k in names)},
             "weight_map": {k: f for f, shard in zip(files, shards) for k in shard}}
    with open(os.path.join(out, hf_names.INDEX_NAME), "w") as f:
      json.dump(index, f, indent=2)
  if p.config is not None:
    with open(os.path.join(out, hf_names.CONFIG_NAME), "w") as f:
      json.dump(p.config, f, indent=2)
    files.append(hf_names.CONFIG_NAME)
  if frozen_from:
    files += _copy_tokenizers(frozen_from, out)
  return files


def _copy_tokenizers(src: str, out: str) -> list[str]:
  """Everything of the --frozen-from directory that is not weights or config.json (tokenizers, processor)."""
  weights = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack)$|.*\.index\.json$|config\.json$")
  copied = []
  for name in sorted(os.listdir(src)):
    source = os.path.join(src, name)
    if os.path.isdir(source) and name == "qformer_tokenizer":
      shutil.copytree(source, os.path.join(out, name), dirs_exist_ok=True)
      copied.append(name + "/")
    elif os.path.isfile(source) and not weights.fullmatch(name):
      shutil.copy2(source, os.path.join(out, name))
      copied.append(name)
  return copied


def verify(out: str) -> None:
  """The directory loads as iblip_jax loads it: every parameter's tensor present with its shape, nothing left over."""
  from iblip_jax.models.instructblip import InstructBlip
  model = InstructBlip(hf.load_config(out))
  reader = hf_safetensors.SafetensorsReader(out)
  try:
    hf_params.check_params(instructblip.params_shape(model), reader)
  finally:
    reader.close()


def summary(p: Plan) -> str:
  lines = [f"  {part}: {where}" for part, where in sorted(p.origin.items())]
  reasons: dict[str, list[str]] = {}
  for key, reason in p.ignored.items():
    reasons.setdefault(reason, []).append(key)
  lines += [f"  ignored {len(keys)} key(s), {reason}: {', '.join(sorted(keys)[:3])}{' ...' if len(keys) > 3 else ''}"
            for reason, keys in reasons.items()]
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lavis", action="append", required=True, metavar="PTH",
                      help="a LAVIS checkpoint; repeat to apply several in order (stage 1, then stage 2)")
  parser.add_argument("--frozen-from", metavar="HF_DIR",
                      help="Hugging Face InstructBLIP directory giving the frozen ViT and LLM, config.json, tokenizers")
  parser.add_argument("--config", metavar="CONFIG_JSON", help="config.json to use (default: --frozen-from's)")
  parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
  parser.add_argument("--partial", action="store_true",
                      help="write the converted tensors even when parts are missing (no config.json)")
  args = parser.parse_args(argv)
  try:
    if os.path.isdir(args.out) and os.listdir(args.out):  # old shards beside new ones would make a mixed checkpoint
      raise ConversionError(f"{args.out}: not empty; write to a new directory")
    p = plan(args.lavis, args.frozen_from, args.config, args.partial)
    try:
      files = write(p, args.out, args.frozen_from)
    finally:
      p.close()
    if p.config is not None:
      verify(args.out)
  except (ConversionError, CheckpointError, OSError, json.JSONDecodeError) as e:
    print(f"convert_lavis: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.out}: {', '.join(files)}\n{summary(p)}")
  if p.config is None:
    print("partial: no config.json; missing:\n  " + "\n  ".join(_missing_parts(p.tensors)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
