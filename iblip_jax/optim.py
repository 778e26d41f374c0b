"""The optimizer for the trainable tree (LAVIS/paper defaults).

AdamW (0.9, 0.999, eps 1e-8), weight decay 0.05 on matrices only (biases and 1-D parameters such as LayerNorm
scales are not decayed, as in LAVIS's get_optimizer_params), linear warmup from 1e-8 to 1e-5 over 1,000 steps then
cosine to 0, optional global-norm clipping and gradient accumulation.

Only the trainable tree is ever given to this optimizer, so frozen weights have no state and cannot move; that is
stronger than `optax.masked`, which would pass frozen leaves' raw gradients through as updates.
"""
import jax
import optax

from iblip_jax.trainable import param_path


def learning_rate(optim_config, total_steps: int) -> optax.Schedule:
  c = optim_config
  warmup = min(c.warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(init_value=c.warmup_lr, peak_value=c.lr, warmup_steps=warmup,
                                            decay_steps=max(total_steps, warmup + 1), end_value=c.min_lr)


def decay_mask(params):
  """True for parameters that get weight decay: not biases, not 1-D (per layer, for scanned stacks)."""
  def decays(path, x):
    name = param_path(path)
    core_ndim = x.ndim - (1 if "/layers/" in f"/{name}/" else 0)
    return not name.endswith("bias") and core_ndim > 1
  return jax.tree_util.tree_map_with_path(decays, params)


def make(optim_config, total_steps: int) -> optax.GradientTransformation:
  c = optim_config
  tx = optax.adamw(learning_rate(c, total_steps), b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                   mask=decay_mask)
  if c.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), tx)
  if c.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=c.grad_accum_steps)
  return tx
