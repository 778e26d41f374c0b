"""Optional dependencies: what training and inference need is in the core install; situational packages are in
extras (setup.cfg), and code that needs one says which extra to install."""
import importlib

from iblip_jax.errors import UserError


class MissingExtra(UserError):
  """An optional package is not installed; the message names the extra that brings it."""


def require(module: str, extra: str, what: str):
  """`import module`, or MissingExtra: "<what> needs <module>: pip install 'iblip_jax[<extra>]'"."""
  try:
    return importlib.import_module(module)
  except ImportError:
    raise MissingExtra(f"{what} needs {module.split('.')[0]}, which is not installed: "
                       f"pip install 'iblip_jax[{extra}]'") from None
