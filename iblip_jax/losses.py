"""Token-level losses and log-likelihoods, shared by the training step and candidate ranking.

Labels use transformers' convention: IGNORE (-100) marks positions that neither count in the loss nor in a
candidate's score (padding, and for decoder-only LLMs the prompt).
"""
import jax
import jax.numpy as jnp

IGNORE = -100


def shift_right(labels: jax.Array, start_id: int, pad_id: int) -> jax.Array:
  """T5 decoder inputs: [start, labels[:-1]] with ignored positions replaced by padding."""
  shifted = jnp.concatenate([jnp.full_like(labels[:, :1], start_id), labels[:, :-1]], axis=1)
  return jnp.where(shifted == IGNORE, pad_id, shifted)


def token_log_probs(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(log-probability of each label under `logits` (f32, 0 where ignored), valid mask), both shaped like labels."""
  valid = labels != IGNORE
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token_logp = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  return jnp.where(valid, token_logp, 0.0), valid


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Token-mean cross-entropy over labels != IGNORE (transformers' CrossEntropyLoss). Returns (loss, tokens)."""
  token_logp, valid = token_log_probs(logits, labels)
  tokens = valid.sum()
  return -token_logp.sum() / jnp.maximum(tokens, 1), tokens


def sequence_scores(logits: jax.Array, labels: jax.Array, normalize: bool = False) -> jax.Array:
  """Sum (or, normalised, mean) of each row's label log-probabilities: a candidate answer's score."""
  token_logp, valid = token_log_probs(logits, labels)
  total = token_logp.sum(-1)
  return total / jnp.maximum(valid.sum(-1), 1) if normalize else total
