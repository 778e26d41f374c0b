"""Tokenisation for the Q-Former (BERT) and the LLM (T5 or Vicuna), with LAVIS's truncation rules and bucketed padding.

- Q-Former instruction and LLM prompt: truncated on the left (the end of an instruction is what matters), 128 tokens.
  The Q-Former's text is further held to `qformer_max_len` (its max_position_embeddings), padding included.
- LLM targets: truncated on the right, 256 tokens; padding positions of labels are -100.
- Decoder-only LLMs (Vicuna) train on one sequence per example, [prompt][target </s>] with the padding moved to the
  end (LAVIS's concat_text_input_output); labels are -100 on the prompt and the padding. Ranking candidates carry
  neither BOS nor EOS (LAVIS).
- Padding goes to the smallest bucket length that fits, so jit sees a few shapes rather than one per batch.
Tokenizers load from local files: a Hugging Face InstructBLIP directory has the LLM tokenizer at its top level
and the Q-Former's in `qformer_tokenizer/`.
"""
import copy
import dataclasses
import json
import logging
import os
from typing import Any, Sequence

import numpy as np

from iblip_jax.errors import UserError
from iblip_jax.losses import IGNORE
from iblip_jax.models.instructblip import InstructBlip

log = logging.getLogger(__name__)

BUCKETS = (8, 16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class Tokenizers:
  qformer: Any                 # truncation on the left
  llm: Any                     # truncation on the left (prompts)
  llm_targets: Any             # the same vocabulary, truncation on the right
  max_input_len: int = 128
  max_output_len: int = 256
  buckets: tuple[int, ...] = BUCKETS
  decoder_only: bool = False   # the LLM is decoder-only: prompt and target form one sequence
  qformer_max_len: int | None = None  # the Q-Former's max_position_embeddings: a cap on its tokens, padding included
  target_buckets: tuple[int, ...] | None = None  # for targets (decoder-only: whole sequences); None = `buckets`

  @property
  def out_buckets(self) -> tuple[int, ...]:
    return self.target_buckets or self.buckets


def load_tokenizers(path: str, *, qformer_path: str | None = None, max_input_len: int = 128,
                    max_output_len: int = 256, buckets: Sequence[int] = BUCKETS,
                    decoder_only: bool = False, qformer_max_len: int | None = None) -> Tokenizers:
  """`qformer_max_len`: the Q-Former's max_position_embeddings (None: no cap beyond max_input_len); longer
  instructions would make the Q-Former raise."""
  qformer_path = qformer_path or os.path.join(path, "qformer_tokenizer")
  for p in (path, qformer_path):
    if not os.path.isdir(p):
      raise FileNotFoundError(f"{p}: no tokenizer directory (a Hugging Face InstructBLIP directory has the LLM "
                              "tokenizer at its top level and the Q-Former's in qformer_tokenizer/)")
  qformer = _tokenizer_class(qformer_path).from_pretrained(qformer_path, truncation_side="left")
  llm = _tokenizer_class(path).from_pretrained(path, truncation_side="left")
  targets = copy.deepcopy(llm)
  targets.truncation_side = "right"
  return Tokenizers(qformer, llm, targets, max_input_len, max_output_len, tuple(sorted(buckets)), decoder_only,
                    qformer_max_len)


def _tokenizer_class(path: str):
  """The class tokenizer_config.json names, else AutoTokenizer. transformers' AutoTokenizer imports torch wherever it
  is installed (1.7 s and ~200 MB of host memory in every job); the tokenizer classes themselves do not."""
  # imported here: transformers' tokenizer machinery takes a second to import, and `import iblip_jax` should not
  import transformers
  try:
    with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
      name = json.load(f).get("tokenizer_class")
  except (OSError, ValueError, AttributeError):
    name = None   # AutoTokenizer finds the class its own way, or says what is wrong
  cls = getattr(transformers, name, None) if isinstance(name, str) else None
  return cls if isinstance(cls, type) and hasattr(cls, "from_pretrained") else transformers.AutoTokenizer


def for_model(path: str, model: InstructBlip) -> tuple[InstructBlip, Tokenizers]:
  """The tokenizers of `path`, checked against the model (an id past an embedding table would silently read NaN),
  and the model with the tokenizer's EOS as the one generation stops at (see align_eos)."""
  tok = load_tokenizers(path, decoder_only=model.config.decoder_only,
                        qformer_max_len=model.config.qformer.max_position_embeddings)
  for name, size, vocab in (("Q-Former", len(tok.qformer), model.config.qformer.vocab_size),
                            ("LLM", len(tok.llm), model.config.text.vocab_size)):
    if size > vocab:
      raise UserError(f"the {name} tokenizer in {path} has {size} tokens but the model's vocabulary has {vocab}: "
                      "tokenizer and checkpoint do not belong together")
  return align_eos(model, tok.llm.eos_token_id, path), tok


def align_eos(model: InstructBlip, eos: int | None, where: str) -> InstructBlip:
  """Targets end with the tokenizer's EOS, so generation must stop there. The Vicuna checkpoints' text_config says
  eos_token_id=1 while their tokenizer's </s> (which LAVIS trains and stops on) is 2: the tokenizer wins, loudly."""
  text = model.config.text
  if eos is None or eos == text.eos_token_id:
    return model
  log.warning("%s: the tokenizer's EOS id is %d but the model config says %d; generation stops at %d",
              where, eos, text.eos_token_id, eos)
  return model.clone(config=model.config.replace(text=dataclasses.replace(text, eos_token_id=eos)))


def bucket(length: int, buckets: Sequence[int]) -> int:
  """Smallest bucket >= length; beyond the largest, the next multiple of it."""
  for b in buckets:
    if length <= b:
      return b
  return -(-length // buckets[-1]) * buckets[-1]


def fit_buckets(lengths: Sequence[int], max_buckets: int, largest: int, multiple: int = 8) -> tuple[int, ...]:
  """At most `max_buckets` bucket lengths that follow the data: the set (multiples of `multiple`, always ending at
  `largest`, what truncation allows) that minimises the padded tokens of `lengths` padded one by one (dynamic
  programming over the distinct rounded lengths). Fewer buckets, fewer compiled programs."""
  rounded = np.minimum(-(-np.maximum(np.asarray(lengths, np.int64), 1) // multiple) * multiple, largest)
  values, counts = np.unique(np.append(rounded, largest), return_counts=True)
  counts[-1] -= 1   # `largest` was added to be a candidate, not as data
  n = len(values)
  below = np.concatenate([[0], np.cumsum(counts)])            # examples up to each value
  tokens = np.concatenate([[0], np.cumsum(counts * values)])  # their real (rounded) tokens

  def waste(i, j):  # values[i..j] padded to values[j]
    return values[j] * (below[j + 1] - below[i]) - (tokens[j + 1] - tokens[i])
  best = {(0, j): (waste(0, j), (j,)) for j in range(n)}
  for k in range(1, max_buckets):
    for j in range(n):
      options = [(best[(k - 1, i)][0] + waste(i + 1, j), best[(k - 1, i)][1] + (j,))
                 for i in range(j) if (k - 1, i) in best]
      if options:
        best[(k, j)] = min(options)
  cost, chosen = min(best[(k, n - 1)] for k in range(max_buckets) if (k, n - 1) in best)
  return tuple(int(values[j]) for j in chosen)


def _pad(rows: list[list[int]], pad: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  ids = np.full((len(rows), length), pad, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  return ids, mask


def _ids(tokenizer, texts: Sequence[str], max_len: int, special: bool = True) -> list[list[int]]:
  return tokenizer(list(texts), truncation=True, max_length=max_len, add_special_tokens=special)["input_ids"]


def _target_ids(tok: Tokenizers, texts: Sequence[str]) -> list[list[int]]:
  """T5: the tokenizer appends </s>. Decoder-only: no BOS, and EOS appended after truncation (LAVIS appends
  "</s>" to the text, which truncation can cut off; the model must always see where an answer ends)."""
  if not tok.decoder_only:
    return _ids(tok.llm_targets, texts, tok.max_output_len)
  return [r + [tok.llm.eos_token_id] for r in _ids(tok.llm_targets, texts, tok.max_output_len - 1, special=False)]


def encode_prompts(tok: Tokenizers, texts: Sequence[str], qformer_texts: Sequence[str] | None = None) -> dict:
  """The instruction goes to both the Q-Former and the LLM (LAVIS); `qformer_texts` may differ (e.g. without
  OCR tokens). Returns qformer_input_ids/attention_mask and input_ids/attention_mask, int32, bucket-padded."""
  l_rows = _ids(tok.llm, texts, tok.max_input_len)
  l_ids, l_mask = _pad(l_rows, tok.llm.pad_token_id, bucket(max(map(len, l_rows)), tok.buckets))
  return dict(_encode_qformer(tok, texts if qformer_texts is None else qformer_texts), input_ids=l_ids,
              attention_mask=l_mask)


def _encode_qformer(tok: Tokenizers, texts: Sequence[str]) -> dict:
  cap = tok.qformer_max_len
  rows = _ids(tok.qformer, texts, tok.max_input_len if cap is None else min(tok.max_input_len, cap))
  length = bucket(max(map(len, rows)), tok.buckets)
  # the bucket is capped too: padding past the Q-Former's positions fails as surely as text does
  ids, mask = _pad(rows, tok.qformer.pad_token_id, length if cap is None else min(length, cap))
  return dict(qformer_input_ids=ids, qformer_attention_mask=mask)


def encode_targets(tok: Tokenizers, texts: Sequence[str]) -> dict:
  """labels (B, T) with -100 on padding, decoder_attention_mask (B, T)."""
  rows = _target_ids(tok, texts)
  ids, mask = _pad(rows, tok.llm.pad_token_id, bucket(max(map(len, rows)), tok.out_buckets))
  return dict(labels=np.where(mask == 1, ids, IGNORE).astype(np.int32), decoder_attention_mask=mask)


def encode_training(tok: Tokenizers, texts_in: Sequence[str], texts_out: Sequence[str],
                    qformer_texts: Sequence[str] | None = None) -> dict:
  """A training batch's token arrays. FlanT5: prompts and (labels, decoder_attention_mask) apart. Decoder-only:
  input_ids / attention_mask hold [prompt][target] and labels (B, L) mark the target tokens."""
  if not tok.decoder_only:
    return dict(encode_prompts(tok, texts_in, qformer_texts), **encode_targets(tok, texts_out))
  prompt_rows, target_rows = _ids(tok.llm, texts_in, tok.max_input_len), _target_ids(tok, texts_out)
  rows = [p + t for p, t in zip(prompt_rows, target_rows)]
  ids, mask = _pad(rows, tok.llm.pad_token_id, bucket(max(map(len, rows)), tok.out_buckets))
  labels = np.full_like(ids, IGNORE)
  for i, (p, t) in enumerate(zip(prompt_rows, target_rows)):
    labels[i, len(p):len(p) + len(t)] = t
  return dict(_encode_qformer(tok, texts_in if qformer_texts is None else qformer_texts), input_ids=ids,
              attention_mask=mask, labels=labels)


def lengths(tok: Tokenizers, texts_in: Sequence[str], texts_out: Sequence[str]) -> np.ndarray:
  """(N, 3) token counts (Q-Former instruction, LLM prompt, target; decoder-only: the whole sequence in the last
  column) of training examples, as encode_training truncates them: what padding is computed from."""
  q = [len(r) for r in _ids(tok.qformer, texts_in, tok.max_input_len)]
  p = [len(r) for r in _ids(tok.llm, texts_in, tok.max_input_len)]
  t = [len(r) for r in _target_ids(tok, texts_out)]
  if tok.decoder_only:
    t = [a + b for a, b in zip(p, t)]
  return np.array([q, p, t], np.int64).T.reshape(-1, 3)


def encode_candidates(tok: Tokenizers, candidates: Sequence[Sequence[str]]) -> np.ndarray:
  """Per-sample candidate answers -> (B, C, N) labels (T5: EOS appended by the tokenizer; decoder-only: no special
  tokens, as LAVIS ranks Vicuna candidates), -100 padded; samples with
  fewer candidates are padded with empty (all -100) candidates, which callers must ignore."""
  c = max(len(x) for x in candidates)
  rows = [_ids(tok.llm_targets, list(x), tok.max_output_len, special=not tok.decoder_only) for x in candidates]
  n = bucket(max(len(r) for rs in rows for r in rs), tok.buckets)
  out = np.full((len(candidates), c, n), IGNORE, np.int32)
  for i, rs in enumerate(rows):
    for j, r in enumerate(rs):
      out[i, j, :len(r)] = r
  return out


def decode(tok: Tokenizers, tokens) -> list[str]:
  return [t.strip() for t in tok.llm.batch_decode(np.asarray(tokens), skip_special_tokens=True)]
