"""The training step's maths: only the trainable tree (default: the Q-Former side) is differentiated and optimised.
(Its state, shardings and jit: iblip_jax.train_state.)

The parameters travel as two trees: `trainable` (differentiated, donated, optimised, checkpointed) and `frozen`
(a read-only argument: no gradient, no optimizer state, never donated, never written). Gradients still flow
*through* the frozen LLM back to the projection and Q-Former; only its weights are not differentiated.

Batch (global arrays, leading dim sharded over data x fsdp):
  pixel_values (B, H, W, 3) f32, qformer_input_ids / qformer_attention_mask (B, Lq),
  input_ids / attention_mask (B, L), labels (B, T) with -100 = ignored, decoder_attention_mask (B, T).
  Decoder-only LLMs: input_ids / attention_mask hold [prompt][target] and labels (B, L) the target positions.
  Packed (config.data.packing): the LLM fields are replaced by packed_* rows (data/packing.py).
"""
from typing import Callable

import jax
import optax

from iblip_jax import trainable as trainable_lib
from iblip_jax.losses import cross_entropy
from iblip_jax.models.instructblip import InstructBlip, packed_fields


def loss_fn(model: InstructBlip, params: dict, batch: dict, rng: jax.Array | None) -> tuple[jax.Array, dict]:
  """Token-mean cross-entropy of the batch's labels (dropout on when `rng` is given). A packed batch
  (data/packing.py) gives the same mean over the same label tokens: packing changes where they sit, not the sum."""
  deterministic = rng is None
  rngs = None if deterministic else {"dropout": rng}
  packed = packed_fields(batch)
  if packed is not None:
    logits = model.apply({"params": params}, batch["pixel_values"], batch["qformer_input_ids"],
                         batch["qformer_attention_mask"], packed, deterministic=deterministic, rngs=rngs,
                         method="packed_target_logits")
    loss, tokens = cross_entropy(logits, packed["labels"])
    return loss, {"tokens": tokens}
  logits = model.apply(
      {"params": params}, batch["pixel_values"], batch["qformer_input_ids"], batch["qformer_attention_mask"],
      batch["input_ids"], batch["attention_mask"], batch["labels"], batch.get("decoder_attention_mask"),
      deterministic=deterministic, rngs=rngs, method="target_logits")
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
