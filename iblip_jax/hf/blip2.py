"""BLIP-2 checkpoints, where the paper's instruction tuning starts: an InstructBLIP model assembled from a BLIP-2
stage-2 directory and its stage-1 Q-Former (or a documented fallback), read through the same interface as an
InstructBLIP directory (Blip2Reader).
"""
import logging
import os

import numpy as np

from iblip_jax.errors import CheckpointError
from iblip_jax.hf.config import HF_QFORMER_DEFAULTS, QFORMER_FIELDS, field_problems, parse_config
from iblip_jax.hf.names import CONFIG_NAME
from iblip_jax.hf.safetensors import SafetensorsReader
from iblip_jax.models.configs import QFormerConfig

log = logging.getLogger(__name__)

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
                          "the stage-1 checkpoint (stage1=, config.model_init_stage1) must be a BLIP-2 stage-1 "
                          f"checkpoint ({STAGE1_CLASS}, e.g. Salesforce/blip2-itm-vit-g)")
  q1 = hf.get("qformer_config") or {}
  problems = field_problems(q1, QFORMER_FIELDS, "qformer_config.")
  problems += [f"qformer_config.{k} = {q1.get(k)!r} but the stage-2 checkpoint's Q-Former has {stage2_q.get(k)!r}"
               for k in _QFORMER_SHARED_SIZES if q1.get(k, HF_QFORMER_DEFAULTS[k])
               != stage2_q.get(k, HF_QFORMER_DEFAULTS[k])]
  if problems:
    raise CheckpointError(f"{path}: not the stage 1 of this BLIP-2:\n  " + "\n  ".join(problems))
  reader = SafetensorsReader(stage1)
  try:
    missing = [k for k in _STAGE1_EMBEDDINGS.values() if k not in reader.keys()]
    if missing:
      raise CheckpointError(f"{stage1}: no {', '.join(missing)}: not a {STAGE1_CLASS} checkpoint (its Q-Former's "
                            "text side is what the stage-1 checkpoint is for)")
    words, positions = (reader.shape(k) for k in _STAGE1_EMBEDDINGS.values())
  finally:
    reader.close()
  return {"vocab_size": words[0], "max_position_embeddings": positions[0]}


def blip2_config(stage2: str, stage1: str | None = None, *, text_sizes: dict | None = None) -> dict:
  """The InstructBLIP config.json (as a dict) of the model that starts from the BLIP-2 checkpoint in `stage2`:
  vision, Q-Former and LLM sizes from stage 2, the Q-Former's text-side sizes (vocabulary, positions) from the
  stage-1 tensors, or else from `text_sizes` (the user's Q-Former settings), or else stage 2's config.json."""
  path = os.path.join(stage2, CONFIG_NAME)
  hf = parse_config(stage2)
  if _architecture(hf) == STAGE1_CLASS:
    raise CheckpointError(f"{path}: a BLIP-2 stage-1 ({STAGE1_CLASS}) checkpoint has no language model; pass it as "
                          f"the stage-1 checkpoint (stage1=, config.model_init_stage1) and the stage-2 "
                          f"({STAGE2_CLASS}) directory as the checkpoint")
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
      log.warning("%s: no BLIP-2 stage-1 checkpoint (stage1=, config.model_init_stage1): the Q-Former's text "
                  "feed-forward starts as a copy of its query feed-forward and its word/position embeddings are random "
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

  def read_into(self, key: str, blocks, *, wait: bool = True) -> None:
    s = self._source(key)
    if isinstance(s, _Drawn):
      for region, dest in blocks:
        dest[...] = s.value() if region is None else s.value()[tuple(region)]
    else:
      s[0].read_into(s[1], blocks, wait=wait)

  def flush(self) -> None:
    for r in self._readers:
      r.flush()

  def read_ahead(self, reads) -> None:
    """SafetensorsReader.read_ahead, each directory's reads to its own reader (drawn tensors read nothing)."""
    sources = [(self._source(key), regions) for key, regions in reads]
    for r in self._readers:
      r.read_ahead([(s[1], regions) for s, regions in sources if not isinstance(s, _Drawn) and s[0] is r])

  @property
  def bytes_read(self) -> int:
    """Bytes read from the checkpoint files (the fallback's drawn tensors read nothing)."""
    return sum(r.bytes_read for r in self._readers)

  def close(self) -> None:
    for r in self._readers:
      r.close()
