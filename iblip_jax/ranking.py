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

from iblip_jax.losses import sequence_scores
from iblip_jax.models.instructblip import InstructBlip


@functools.partial(jax.jit, static_argnames=("model", "normalize"))
def _scores(model, params, inputs, candidate_labels, normalize):
  b, c, n = candidate_labels.shape
  logits = model.apply({"params": params}, inputs["pixel_values"], inputs["qformer_input_ids"],
                       inputs["qformer_attention_mask"], inputs["input_ids"], inputs["attention_mask"],
                       candidate_labels, method="candidate_logits")   # (B*C, N, V)
  return sequence_scores(logits, candidate_labels.reshape(b * c, n), normalize).reshape(b, c)


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
