"""`--config.mode=summary`: parameter counts per tower, from shapes only (jax.eval_shape; nothing is allocated)."""
import math

import jax

from iblip_jax.models.instructblip import InstructBlip, params_shape
from iblip_jax.run.settings import Settings
from iblip_jax.trainable import trainable_mask


def count_params(s: Settings) -> list[tuple[str, int, int]]:
  """[(top-level module, parameters, trainable parameters)] (the checkpoint's architecture with model_init)."""
  shapes = params_shape(InstructBlip(s.model))
  mask = trainable_mask(shapes, s.trainable)
  rows = []
  for name in shapes:
    sizes = [math.prod(x.shape) for x in jax.tree.leaves(shapes[name])]
    flags = jax.tree.leaves(mask[name])
    rows.append((name, sum(sizes), sum(n for n, t in zip(sizes, flags) if t)))
  return rows


def run(s: Settings) -> None:
  rows = count_params(s)
  width = max(len(r[0]) for r in rows)
  print(f"{'module':<{width}}  {'parameters':>15}  {'trainable':>15}")
  for name, n, t in rows:
    print(f"{name:<{width}}  {n:>15,}  {t:>15,}")
  total, trainable = sum(r[1] for r in rows), sum(r[2] for r in rows)
  print(f"{'total':<{width}}  {total:>15,}  {trainable:>15,}")
  print(f"total_params={total} trainable_params={trainable}")
