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
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from iblip_jax import sharding
from iblip_jax import trainable as trainable_lib
from iblip_jax.losses import cross_entropy
from iblip_jax.models.instructblip import InstructBlip
from iblip_jax.pretrained import init_fn, params_shape

def loss_fn(model: InstructBlip, params: dict, batch: dict, rng: jax.Array | None) -> tuple[jax.Array, dict]:
  """Token-mean cross-entropy of the batch's labels (dropout on when `rng` is given)."""
  deterministic = rng is None
  logits = model.apply(
      {"params": params}, batch["pixel_values"], batch["qformer_input_ids"], batch["qformer_attention_mask"],
      batch["input_ids"], batch["attention_mask"], batch["labels"], batch.get("decoder_attention_mask"),
      deterministic=deterministic, rngs=None if deterministic else {"dropout": rng}, method="target_logits")
  loss, tokens = cross_entropy(logits, batch["labels"])
  return loss, {"tokens": tokens}


# --- the step -------------------------------------------------------------------------------------------------


def make_train_step(model: InstructBlip, tx: optax.GradientTransformation, *, vision_frozen: bool = True,
                    dropout: bool = True) -> Callable:
  """(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics); not yet jitted."""
  model = model.clone(stop_vision_gradient=vision_frozen)

  def step(trainable, opt_state, frozen, batch, rng):
    def objective(t):
      return loss_fn(model, trainable_lib.merge(t, frozen), batch, rng if dropout else None)
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
  trainable_lib.check(nn.meta.unbox(boxed), patterns)
  with nn.logical_axis_rules(rules):
    param_sh = sharding.logical_shardings(boxed, mesh, rules)
  if max_replicated_bytes is not None:
    sharding.check_sharded(nn.meta.unbox(boxed), param_sh, max_replicated_bytes)
  train_sh, frozen_sh = trainable_lib.split(param_sh, patterns)
  train_shape = trainable_lib.split(nn.meta.unbox(boxed), patterns)[0]
  opt_shape = jax.eval_shape(tx.init, train_shape)
  repl = sharding.replicated(mesh)
  # Adam moments take their parameter's sharding; counters and other scalars are replicated.
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_shape, train_sh, transform_non_params=lambda _: repl,
                                 is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  return Shardings(train_sh, frozen_sh, opt_sh, sharding.batch_sharding(mesh), repl)


def init_random(model: InstructBlip, patterns: Sequence[str], sh: Shardings, rng) -> tuple[dict, dict]:
  """Fresh (trainable, frozen) params, created directly in their shardings (nothing full-size on one device)."""
  def init(r):
    return trainable_lib.split(nn.meta.unbox(init_fn(model)(r)), patterns)
  return jax.jit(init, out_shardings=(sh.trainable, sh.frozen))(rng)


def place(tree: dict, shardings: Any) -> dict:
  """Host arrays (e.g. a loaded checkpoint) -> global arrays; each device receives only its own slices."""
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), tree, shardings)


def jit_state_check(model: InstructBlip, sh: Shardings) -> Callable:
  """(trainable, frozen, batch) -> (the state's deterministic loss on the batch, whether every trainable value is
  finite): what training checks before it saves a state."""
  def check(trainable, frozen, batch):
    loss, _ = loss_fn(model, trainable_lib.merge(trainable, frozen), batch, None)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trainable)]))
    return loss, finite
  return jax.jit(check, in_shardings=(sh.trainable, sh.frozen, sh.batch),
                 out_shardings=(sh.replicated, sh.replicated))


def jit_train_step(step: Callable, sh: Shardings) -> Callable:
  """jax.jit with explicit in/out shardings; the trainable tree and optimizer state are donated."""
  return jax.jit(step, in_shardings=(sh.trainable, sh.opt_state, sh.frozen, sh.batch, sh.replicated),
                 out_shardings=(sh.trainable, sh.opt_state, sh.replicated), donate_argnums=(0, 1))
