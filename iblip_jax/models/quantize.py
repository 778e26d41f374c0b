"""Weight-only quantisation of frozen kernels: symmetric integers times a float32 scale, dequantised in the matmul.

  int8  one scale per output column (per-channel, LLM.int8()'s weight side without the outlier split):
        scale = max|w[:, j]| / 127, q = round(w / scale) in [-127, 127]
  int4  one scale per output column and group of `group` consecutive inputs (group-wise absmax, as GPTQ/AWQ store
        int4; QLoRA's NF4 is a non-uniform code book instead):
        scale = max|w[g, j]| / 7, q in [-7, 7]; a width that `group` does not divide gets one group

A kernel (in, out) becomes q (in, out) in int8 / int4 and `kernel_scale` (groups, out) in float32. Nothing here
trains: a quantised kernel is frozen (settings refuse a trainable one); LoRA adapters over it stay float (QLoRA).
"""
import jax
import jax.numpy as jnp

MODES = ("int8", "int4")
DTYPES = {"int8": jnp.int8, "int4": jnp.int4}
_QMAX = {"int8": 127.0, "int4": 7.0}


def groups(mode: str, d_in: int, group: int) -> int:
  """How many input groups share a scale: 1 for int8; d_in / group for int4 when group divides d_in, else 1."""
  if mode == "int8" or group <= 0 or d_in % group or group >= d_in:
    return 1
  return d_in // group


def quantize(w: jax.Array, mode: str, group: int = 128) -> tuple[jax.Array, jax.Array]:
  """(q (in, out) int8/int4, scale (groups, out) float32) of a kernel w (..., in, out); leading axes (a scanned
  stack's layers) are kept, and quantised one layer at a time, so that the float32 working copy is one layer's (a
  FlanT5-XL stack of 24 feed-forward kernels is 1 GB in float32)."""
  q, scale = _quantize_int8(w, mode, group)
  # the integers cast to int4 once, the whole stack: lax.map writing each layer into an int4 stack ran ~6x slower on
  # XLA's CPU than into an int8 one (sub-byte slices), and float32 -> int4 4x slower than through int8 (exact: q
  # holds whole numbers within +-127); the int8 copy is half the size of the bfloat16 input
  return q.astype(DTYPES[mode]), scale


def _quantize_int8(w: jax.Array, mode: str, group: int) -> tuple[jax.Array, jax.Array]:
  """quantize() with q held in int8 whatever the mode; a stack one layer at a time."""
  if w.ndim > 2:
    return jax.lax.map(lambda layer: _quantize_int8(layer, mode, group), w)
  d_in, d_out = w.shape
  g = groups(mode, d_in, group)
  wg = w.astype(jnp.float32).reshape(g, d_in // g, d_out)                       # (G, in/G, out)
  scale = jnp.max(jnp.abs(wg), axis=-2) / _QMAX[mode]                           # (G, out)
  scale = jnp.where(scale == 0, 1.0, scale)   # an all-zero column: any scale; 1 keeps the division finite
  q = jnp.clip(jnp.round(wg / scale[:, None, :]), -_QMAX[mode], _QMAX[mode])
  return q.reshape(d_in, d_out).astype(jnp.int8), scale


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  """The kernel (in, out) in `dtype` from q (in, out) and scale (groups, out)."""
  d_in, d_out = q.shape[-2:]
  g = scale.shape[-2]
  w = q.astype(jnp.float32).reshape(*q.shape[:-2], g, d_in // g, d_out) * scale[..., None, :]
  return w.reshape(q.shape).astype(dtype)


def mode_of(dtype) -> str | None:
  """The quantisation mode a kernel's dtype says, or None for a float kernel."""
  return next((m for m, d in DTYPES.items() if jnp.dtype(d) == jnp.dtype(dtype)), None)
