"""The sharded training step: only the trainable tree (default: the Q-Former side) is differentiated and optimised.

The parameters travel as two trees: `trainable` (differentiated, donated, optimised, checkpointed) and `frozen`
(a read-only argument: no gradient, no optimizer state, never donated, never written). Gradients still flow
*through* the frozen LLM back to the projection and Q-Former; only its weights are not differentiated.

Batch (global arrays, leading dim sharded over data x fsdp):
  pixel_values (B, H, W, 3) f32, qformer_input_ids / qformer_attention_mask (B, Lq),
  input_ids / attention_mask (B, L), labels (B, T) with -100 = ignored, decoder_attention_mask (B, T).
  Decoder-only LLMs: input_ids / attention_mask hold [prompt][target] and labels (B, L) the target positions.
"""
import dataclasses
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from iblip_jax import sharding
from iblip_jax.models.instructblip import InstructBlip
from iblip_jax.pretrained import init_fn, params_shape

IGNORE = -100


# --- trainable / frozen split ---------------------------------------------------------------------------------


def split(params: dict, patterns: Sequence[str], prefix: str = "") -> tuple[dict, dict]:
  """Splits a nested dict (plain, boxed or shape leaves) by whether "/"-joined paths match any pattern."""
  compiled = [re.compile(p) for p in patterns]
  def walk(node, path):
    train, frozen = {}, {}
    for k, v in node.items():
      p = f"{path}/{k}" if path else k
      if isinstance(v, dict):
        t, f = walk(v, p)
        if t:
          train[k] = t
        if f:
          frozen[k] = f
      elif any(c.search(p) for c in compiled):
        train[k] = v
      else:
        frozen[k] = v
    return train, frozen
  return walk(dict(params), prefix)


def merge(a: dict, b: dict) -> dict:
  """Inverse of `split`: the union of two disjoint nested dicts."""
  out = dict(a)
  for k, v in b.items():
    out[k] = merge(out[k], v) if k in out else v
  return out


def check_trainable(params_shape_tree: dict, patterns: Sequence[str]) -> None:
  """Every pattern must select something: a typo in config.trainable must not silently freeze the model."""
  for pattern in patterns:
    if not split(params_shape_tree, [pattern])[0]:
      raise ValueError(f"config.trainable pattern {pattern!r} matches no parameter; parameter paths look like "
                       "'qformer/layer_0/attention/query/kernel' or 'vision/layers/fc1/kernel'")


# --- loss -----------------------------------------------------------------------------------------------------


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
  """Token-mean cross-entropy over labels != -100 (transformers' CrossEntropyLoss). Returns (loss, tokens)."""
  token_logp, valid = token_log_probs(logits, labels)
  tokens = valid.sum()
  return -token_logp.sum() / jnp.maximum(tokens, 1), tokens


def loss_fn(model: InstructBlip, params: dict, batch: dict, rng: jax.Array | None) -> tuple[jax.Array, dict]:
  text = model.config.text
  deterministic = rng is None
  if model.config.decoder_only:  # input_ids = [prompt][target]: no separate decoder inputs
    decoder = {}
  else:
    decoder = dict(decoder_input_ids=shift_right(batch["labels"], text.decoder_start_token_id, text.pad_token_id),
                   decoder_attention_mask=batch.get("decoder_attention_mask"))
  logits = model.apply(
      {"params": params}, batch["pixel_values"], batch["qformer_input_ids"], batch["qformer_attention_mask"],
      batch["input_ids"], batch["attention_mask"], **decoder, deterministic=deterministic,
      rngs=None if deterministic else {"dropout": rng})
  if model.config.decoder_only:
    # the logit before each token predicts it, and the V visual tokens in front shift everything by V
    v = logits.shape[1] - batch["input_ids"].shape[1]
    logits = logits[:, v - 1:-1]
  loss, tokens = cross_entropy(logits, batch["labels"])
  return loss, {"tokens": tokens}


# --- the step -------------------------------------------------------------------------------------------------


def make_train_step(model: InstructBlip, tx: optax.GradientTransformation, *, vision_frozen: bool = True,
                    dropout: bool = True) -> Callable:
  """(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics); not yet jitted."""
  model = model.clone(stop_vision_gradient=vision_frozen)

  def step(trainable, opt_state, frozen, batch, rng):
    def objective(t):
      return loss_fn(model, merge(t, frozen), batch, rng if dropout else None)
    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": aux["tokens"]}

  return step


@dataclasses.dataclass(frozen=True)
class Shardings:
  trainable: Any
  frozen: Any
  opt_state: Any
  batch: Any
  replicated: Any


def state_shardings(model: InstructBlip, tx: optax.GradientTransformation, patterns: Sequence[str], mesh, rules,
                    max_replicated_bytes: int | None = None) -> Shardings:
  """Shardings of both parameter trees and the optimizer state, from shapes only (jax.eval_shape)."""
  boxed = params_shape(model, boxed=True)
  check_trainable(nn.meta.unbox(boxed), patterns)
  with nn.logical_axis_rules(rules):
    param_sh = sharding.logical_shardings(boxed, mesh, rules)
  if max_replicated_bytes is not None:
    sharding.check_sharded(nn.meta.unbox(boxed), param_sh, max_replicated_bytes)
  train_sh, frozen_sh = split(param_sh, patterns)
  train_shape = split(nn.meta.unbox(boxed), patterns)[0]
  opt_shape = jax.eval_shape(tx.init, train_shape)
  repl = sharding.replicated(mesh)
  # Adam moments take their parameter's sharding; counters and other scalars are replicated.
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_shape, train_sh, transform_non_params=lambda _: repl,
                                 is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  return Shardings(train_sh, frozen_sh, opt_sh, sharding.batch_sharding(mesh), repl)


def init_random(model: InstructBlip, patterns: Sequence[str], sh: Shardings, rng) -> tuple[dict, dict]:
  """Fresh (trainable, frozen) params, created directly in their shardings (nothing full-size on one device)."""
  def init(r):
    return split(nn.meta.unbox(init_fn(model)(r)), patterns)
  return jax.jit(init, out_shardings=(sh.trainable, sh.frozen))(rng)


def place(tree: dict, shardings: Any) -> dict:
  """Host arrays (e.g. a loaded checkpoint) -> global arrays; each device receives only its own slices."""
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), tree, shardings)


def jit_state_check(model: InstructBlip, sh: Shardings) -> Callable:
  """(trainable, frozen, batch) -> (the state's deterministic loss on the batch, whether every trainable value is
  finite): what training checks before it saves a state."""
  def check(trainable, frozen, batch):
    loss, _ = loss_fn(model, merge(trainable, frozen), batch, None)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trainable)]))
    return loss, finite
  return jax.jit(check, in_shardings=(sh.trainable, sh.frozen, sh.batch),
                 out_shardings=(sh.replicated, sh.replicated))


def jit_train_step(step: Callable, sh: Shardings) -> Callable:
  """jax.jit with explicit in/out shardings; the trainable tree and optimizer state are donated."""
  return jax.jit(step, in_shardings=(sh.trainable, sh.opt_state, sh.frozen, sh.batch, sh.replicated),
                 out_shardings=(sh.trainable, sh.opt_state, sh.replicated), donate_argnums=(0, 1))
