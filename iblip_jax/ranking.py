"""Candidate ranking (the paper's "vocabulary ranking" for multiple choice and classification).

Each candidate answer is scored by its log-likelihood under the LLM given the image and prompt; the vision
tower, Q-Former and T5 encoder run once per sample and the decoder once per candidate, all candidates batched
(a decoder-only LLM runs [visual][prompt][candidate] once per candidate).
`normalize=False` sums token log-probabilities (LAVIS, the default for parity, which favours short candidates);
`normalize=True` divides by the candidate's length.
"""
import functools

import jax
import jax.numpy as jnp

from iblip_jax.decoding import left_align
from iblip_jax.models import llama
from iblip_jax.models.instructblip import InstructBlip
from iblip_jax.train_step import IGNORE, shift_right, token_log_probs


def _candidate_logits_decoder_only(model, params, inputs, labels, c):
  """[visual][left-aligned prompt][candidate] per (sample, candidate), positions cumsum(mask) - 1 (the same
  positions as LAVIS's right-padded concatenation) -> logits that predict each candidate token (B*C, N, V)."""
  ids, mask = left_align(inputs["input_ids"], inputs["attention_mask"])
  embeds, mask = model.apply({"params": params}, inputs["pixel_values"], inputs["qformer_input_ids"],
                             inputs["qformer_attention_mask"], ids, mask, method="llm_inputs")
  p, n = mask.shape[1], labels.shape[1]
  valid = labels != IGNORE
  def run(m):
    cand = m.language_model.embed(jnp.where(valid, labels, model.config.text.pad_token_id))
    full = jnp.concatenate([jnp.repeat(embeds, c, axis=0), cand], axis=1)
    full_mask = jnp.concatenate([jnp.repeat(mask, c, axis=0), valid.astype(mask.dtype)], axis=1)
    return m.language_model(full, full_mask, llama.positions(full_mask))
  return model.apply({"params": params}, method=run)[:, p - 1:p + n - 1]


@functools.partial(jax.jit, static_argnames=("model", "normalize"))
def _scores(model, params, inputs, candidate_labels, normalize):
  b, c, n = candidate_labels.shape
  if model.config.decoder_only:
    labels = candidate_labels.reshape(b * c, n)
    return _total(_candidate_logits_decoder_only(model, params, inputs, labels, c), labels, normalize).reshape(b, c)
  encoded, mask = model.apply({"params": params}, inputs["pixel_values"], inputs["qformer_input_ids"],
                              inputs["qformer_attention_mask"], inputs["input_ids"], inputs["attention_mask"],
                              method="encode")
  labels = candidate_labels.reshape(b * c, n)
  text = model.config.text
  logits = model.apply({"params": params}, shift_right(labels, text.decoder_start_token_id, text.pad_token_id),
                       jnp.repeat(encoded, c, axis=0), jnp.repeat(mask, c, axis=0),
                       (labels != IGNORE).astype(jnp.int32),
                       method=lambda m, *a: m.language_model.decode(*a))  # (B*C, N, V)
  return _total(logits, labels, normalize).reshape(b, c)


def _total(logits, labels, normalize):
  """Sum (or mean) of the candidate tokens' log-probabilities, (B*C,)."""
  token_logp, valid = token_log_probs(logits, labels)
  total = token_logp.sum(-1)
  return total / jnp.maximum(valid.sum(-1), 1) if normalize else total


def rank(model: InstructBlip, params, *, pixel_values, qformer_input_ids, qformer_attention_mask, input_ids,
         attention_mask, candidate_labels, normalize: bool = False):
  """Returns (scores (B, C) log-likelihoods, order (B, C) candidate indices best first).

  candidate_labels: (B, C, N) target token ids of each candidate (T5: with EOS, as its tokenizer appends it;
  decoder-only: no special tokens, as LAVIS), padded with -100; or (C, N) candidates shared by the whole batch.
  """
  candidate_labels = jnp.asarray(candidate_labels)
  b = input_ids.shape[0]
  if candidate_labels.ndim == 2:
    candidate_labels = jnp.broadcast_to(candidate_labels, (b,) + candidate_labels.shape)
  if candidate_labels.ndim != 3 or candidate_labels.shape[0] != b:
    raise ValueError(f"candidate_labels must be (B, C, N) or (C, N) with B={b}, got {candidate_labels.shape}")
  inputs = dict(pixel_values=pixel_values, qformer_input_ids=qformer_input_ids,
                qformer_attention_mask=qformer_attention_mask, input_ids=input_ids, attention_mask=attention_mask)
  scores = _scores(model, params, inputs, candidate_labels, normalize)
  # stable: among equal scores the earlier candidate ranks first (as torch.argsort of the loss would, mostly)
  return scores, jnp.argsort(-scores, axis=1, stable=True)
