"""The optimizer for the trainable tree (LAVIS/paper defaults).

AdamW (0.9, 0.999, eps 1e-8), weight decay 0.05 on matrices only (biases and 1-D parameters such as LayerNorm
scales are not decayed, as in LAVIS's get_optimizer_params), linear warmup from 1e-8 to 1e-5 over 1,000 steps then
cosine to 0, optional global-norm clipping and gradient accumulation.

Two shapes of "warmup then cosine" (config.optim.schedule):
- "lavis": LAVIS's LinearWarmupCosineLRScheduler as its iteration runner drives it (lavis/common/optims.py,
  runners/runner_iter.py): training is cut into inner epochs of `inner_epoch_steps`; in inner epoch 0 the rate
  rises linearly from warmup_lr and stays at lr once there (min(lr, warmup_lr + (lr - warmup_lr) * step /
  warmup_steps)); in inner epoch k > 0 it is min_lr + (lr - min_lr) / 2 * (1 + cos(pi k / K)), constant through
  the epoch, K = total_steps // inner_epoch_steps: a staircase. What the paper's recipe uses.
- "smooth": optax's warmup_cosine_decay_schedule, the same rates decaying every step (no staircase).

Only the trainable tree is ever given to this optimizer, so frozen weights have no state and cannot move; that is
stronger than `optax.masked`, which would pass frozen leaves' raw gradients through as updates.
"""
import jax
import jax.numpy as jnp
import optax

from iblip_jax.trainable import param_path


def learning_rate(optim_config, total_steps: int) -> optax.Schedule:
  c = optim_config
  if c.schedule == "lavis":
    return lavis_schedule(c, total_steps)
  warmup = min(c.warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(init_value=c.warmup_lr, peak_value=c.lr, warmup_steps=warmup,
                                            decay_steps=max(total_steps, warmup + 1), end_value=c.min_lr)


def lavis_schedule(c, total_steps: int) -> optax.Schedule:
  """LAVIS's staircase (see the module docstring); `step` counts updates from 0, as LAVIS's scheduler is stepped
  before each iteration."""
  inner = c.inner_epoch_steps
  epochs = max(1, total_steps // inner)   # LAVIS: int(max_iters / iters_per_inner_epoch)

  def schedule(step):
    epoch = step // inner
    warm = jnp.minimum(c.lr, c.warmup_lr + (c.lr - c.warmup_lr) * step / max(c.warmup_steps, 1))
    cosine = c.min_lr + (c.lr - c.min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))
    return jnp.where(epoch == 0, warm, cosine)
  return schedule


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
