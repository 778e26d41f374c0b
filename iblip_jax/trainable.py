"""Which parameters training changes, and the two trees the parameters travel as.

Patterns are regexes over "/"-joined parameter paths ("qformer/layer_0/attention/query/kernel"). The parameters
are split into a `trainable` tree (differentiated, optimised, checkpointed) and a `frozen` one (read-only), and
merged back for a forward pass.
"""
import re
from typing import Sequence

import jax

# What instruction tuning trains: ln_vision, the query tokens, the Q-Former and the projection into the LLM.
# Everything else (ViT, LLM) is frozen.
INSTRUCTION_TUNING = (r"^ln_vision/", r"^query_tokens$", r"^qformer/", r"^language_projection/")


def param_path(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def trainable_mask(params, patterns: Sequence[str]):
  """A tree of bools, True where a parameter's path matches one of `patterns` (re.search)."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(lambda path, _: any(c.search(param_path(path)) for c in compiled), params)


def split(params: dict, patterns: Sequence[str], prefix: str = "") -> tuple[dict, dict]:
  """(trainable, frozen): a nested dict (plain, boxed or shape leaves) split by whether paths match a pattern."""
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


def check(params_shape_tree: dict, patterns: Sequence[str]) -> None:
  """Every pattern must select something: a typo in config.trainable must not silently freeze the model."""
  for pattern in patterns:
    if not split(params_shape_tree, [pattern])[0]:
      raise ValueError(f"config.trainable pattern {pattern!r} matches no parameter; parameter paths look like "
                       "'qformer/layer_0/attention/query/kernel' or 'vision/layers/fc1/weight'")
