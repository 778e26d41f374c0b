"""Which parameters instruction tuning trains: regexes over "/"-joined parameter paths."""
import re
from typing import Sequence

import jax


def param_path(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def trainable_mask(params, patterns: Sequence[str]):
  """A tree of bools, True where a parameter's path matches one of `patterns` (re.search)."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(lambda path, _: any(c.search(param_path(path)) for c in compiled), params)
