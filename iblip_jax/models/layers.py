"""Building blocks shared by the towers: logically-partitioned Dense/LayerNorm, activations, attention core.

Every parameter carries logical axis names (t5x/MaxText idiom); `iblip_jax.sharding` maps them to mesh axes.
Without active rules the annotations are no-ops, so the same modules run unsharded in tests.
"""
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# Initialisers only matter for fresh (trainable) weights; pretrained ones are loaded over them.
default_kernel_init = nn.initializers.normal(stddev=0.02)


def activation(name: str) -> Callable[[Array], Array]:
  """transformers' ACT2FN for the names our checkpoints use ("gelu" is exact erf GELU)."""
  return {
      "gelu": functools.partial(jax.nn.gelu, approximate=False),
      "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
      "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
      "relu": jax.nn.relu,
      "silu": jax.nn.silu,
  }[name]


def dense(features: int, axes: tuple[str, str], *, use_bias: bool = True, dtype: Any, param_dtype: Any,
          name: str | None = None, kernel_init=default_kernel_init) -> nn.Dense:
  """nn.Dense whose kernel (in, out) and bias (out,) carry logical axis names."""
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
      name=name,
  )


def layer_norm(eps: float, *, dtype: Any, param_dtype: Any, axis_name: str = "embed",
               name: str | None = None) -> nn.LayerNorm:
  """LayerNorm with statistics in f32 (nn.LayerNorm upcasts internally) and named scale/bias."""
  return nn.LayerNorm(
      epsilon=eps,
      dtype=dtype,
      param_dtype=param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis_name,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis_name,)),
      name=name,
  )


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
  """Logical sharding constraint on an activation (a no-op without axis rules)."""
  return nn.with_logical_constraint(x, tuple(axes))


def dot_product_attention(q: Array, k: Array, v: Array, *, bias: Array | None = None, mask: Array | None = None,
                          scale: float = 1.0, dropout_rate: float = 0.0, deterministic: bool = True,
                          dropout_rng: Array | None = None) -> Array:
  """softmax(scale * q k^T + bias, masked) v, with the softmax in f32.

  q: (B, Lq, H, D), k/v: (B, Lk, H, D), bias: broadcastable to (B, H, Lq, Lk), mask: bool broadcastable to
  (B, H, Lq, Lk), True = attend. Returns (B, Lq, H, D).
  """
  if dropout_rate == 0.0 or deterministic:
    # XLA's fused attention: ~3x faster on CPU than the einsum path below (f32 logits and softmax as well).
    if bias is not None:
      bias = bias.astype(jnp.float32)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale).astype(v.dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale  # (B, H, Lq, Lk)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    # finfo.min rather than -inf: a row with every key masked then gives a uniform softmax, not NaN.
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout_rate > 0.0 and not deterministic:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def padding_mask(attention_mask: Array) -> Array:
  """(B, Lk) 0/1 key mask -> bool (B, 1, 1, Lk) attention mask."""
  return attention_mask.astype(bool)[:, None, None, :]
