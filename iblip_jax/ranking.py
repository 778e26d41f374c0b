"""Candidate ranking (the paper's "vocabulary ranking" for multiple choice and classification).

Each candidate answer is scored by its log-likelihood under the LLM given the image and prompt; the vision
tower, Q-Former and T5 encoder run once per sample and the decoder once per candidate, all candidates batched.
`normalize=False` sums token log-probabilities (LAVIS, the default for parity, which favours short candidates);
`normalize=True` divides by the candidate's length.
"""
import functools

import jax
import jax.numpy as jnp

from iblip_jax.models.instructblip import InstructBlip
from iblip_jax.train_step import IGNORE, shift_right


@functools.partial(jax.jit, static_argnames=("model", "normalize"))
def _scores(model, params, inputs, candidate_labels, normalize):
  b, c, n = candidate_labels.shape
  encoded, mask = model.apply({"params": params}, inputs["pixel_values"], inputs["qformer_input_ids"],
                              inputs["qformer_attention_mask"], inputs["input_ids"], inputs["attention_mask"],
                              method="encode")
  labels = candidate_labels.reshape(b * c, n)
  text = model.config.text
  logits = model.apply({"params": params}, shift_right(labels, text.decoder_start_token_id, text.pad_token_id),
                       jnp.repeat(encoded, c, axis=0), jnp.repeat(mask, c, axis=0),
                       (labels != IGNORE).astype(jnp.int32),
                       method=lambda m, *a: m.language_model.decode(*a))  # (B*C, N, V)
  valid = labels != IGNORE
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token_logp = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  total = jnp.where(valid, token_logp, 0.0).sum(-1)
  if normalize:
    total = total / jnp.maximum(valid.sum(-1), 1)
  return total.reshape(b, c)


def rank(model: InstructBlip, params, *, pixel_values, qformer_input_ids, qformer_attention_mask, input_ids,
         attention_mask, candidate_labels, normalize: bool = False):
  """Returns (scores (B, C) log-likelihoods, order (B, C) candidate indices best first).

  candidate_labels: (B, C, N) target token ids of each candidate (with EOS, as the T5 tokenizer appends it),
  padded with -100; or (C, N) candidates shared by the whole batch.
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
