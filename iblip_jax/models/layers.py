"""Building blocks shared by the towers: logically-partitioned Dense/LayerNorm, activations, attention core.

Every parameter carries logical axis names (t5x/MaxText idiom); `iblip_jax.sharding` maps them to mesh axes.
Without active rules the annotations are no-ops, so the same modules run unsharded in tests.
"""
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iblip_jax.models import quantize as quantize_lib

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


class Dense(nn.Module):
  """y = x W + b, plus a LoRA update (alpha / r) * dropout(x) A B when `lora` targets this layer's path.

  LoRA (Hu et al., 2021) as PEFT does it: A (in, r) starts uniform in +-1/sqrt(in) (PEFT's kaiming_uniform with
  a=sqrt(5)), B (r, out) at zero, so a fresh adapter leaves the layer unchanged. A and B carry the kernel's logical
  axes on their outer sides ("lora_rank" inside, replicated), so they shard with the layer. LoRA dropout acts when
  a "dropout" rng is given (training), like the towers' own dropout.
  """
  features: int
  axes: tuple[str, str]
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable = default_kernel_init
  lora: Any = None   # models.configs.LoraConfig or None
  quantize: str = ""  # "" (float kernel), "int8" or "int4": a frozen weight stored as integers (quantize.py)
  quantize_group: int = 128
  # A float weight stored (out, in) as "weight", the layout of torch and of the released checkpoints, instead of
  # "kernel" (in, out): the frozen towers' weights then load as they lie on disk, with no transpose (a real-size
  # tower's transposes cost more than reading it), and the matmul contracts the weight's second axis, which XLA
  # does as cheaply as the first.
  out_in: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    contract = 0                                                              # the kernel's `in` axis
    if self.quantize:
      kernel = self._quantized_kernel(x.shape[-1])
    elif self.out_in:
      kernel = self.param("weight", nn.with_logical_partitioning(self.kernel_init, self.axes[::-1]),
                          (self.features, x.shape[-1]), self.param_dtype)
      contract = 1
    else:
      kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                          (x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                      (self.features,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    # (..., in) x (in, out), or (..., in) x (out, in) contracting `in`
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (contract,)), ((), ())))
    if bias is not None:
      y = y + bias
    if self.lora is not None and self.lora.targets_path("/".join(self.path)):
      y = y + self._lora(x)
    return y

  def _quantized_kernel(self, d_in: int) -> Array:
    """The kernel (in, out) dequantised for the matmul: integers (in, out) times a float32 scale per output column
    and group of inputs (quantize.py); XLA fuses the product into the dot's operand."""
    groups = quantize_lib.groups(self.quantize, d_in, self.quantize_group)
    q = self.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros, self.axes), (d_in, self.features),
                   quantize_lib.DTYPES[self.quantize])
    scale_init = nn.with_logical_partitioning(nn.initializers.ones, ("quant_groups", self.axes[1]))
    scale = self.param("kernel_scale", scale_init, (groups, self.features), jnp.float32)
    return quantize_lib.dequantize(q, scale, self.dtype)

  def _lora(self, x: Array) -> Array:
    r, d_in = self.lora.rank, x.shape[-1]
    bound = 1.0 / np.sqrt(d_in)
    a = self.param("lora_a", nn.with_logical_partitioning(
        lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound), (self.axes[0], "lora_rank")),
        (d_in, r), jnp.float32)
    b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", self.axes[1])),
                   (r, self.features), jnp.float32)
    if self.lora.dropout and self.has_rng("dropout"):
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.lora.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.lora.dropout), 0)
    x, a, b = nn.dtypes.promote_dtype(x, a, b, dtype=self.dtype)
    return (x @ a @ b) * (self.lora.alpha / r)                                # (..., in) (in, r) (r, out)


def dense(features: int, axes: tuple[str, str], *, use_bias: bool = True, dtype: Any, param_dtype: Any,
          name: str | None = None, kernel_init=default_kernel_init, lora=None, quantize: str = "",
          quantize_group: int = 128, out_in: bool = False) -> Dense:
  """A Dense layer whose kernel (in, out) (or weight (out, in), `out_in`) and bias (out,) carry logical axis names;
  `lora` (a LoraConfig) adds an adapter when its targets match the layer's path; `quantize` stores a frozen kernel
  as int8 / int4."""
  return Dense(features, axes, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
               lora=lora, quantize=quantize, quantize_group=quantize_group, out_in=out_in, name=name)


def tower_options(cfg) -> dict:
  """The Dense options of a frozen tower's layers (ViT, LLM; not their LM head): its LoRA adapters, weight
  quantisation, and float weights stored (out, in) as the checkpoints hold them (Dense.out_in)."""
  return dict(lora=cfg.lora, quantize=cfg.quantize, quantize_group=cfg.quantize_group, out_in=True)


def embed(num: int, features: int, axes: tuple[str, str], *, dtype: Any, param_dtype: Any,
          init=default_kernel_init, name: str | None = None) -> nn.Embed:
  """nn.Embed whose table (num, features) carries logical axis names."""
  return nn.Embed(num, features, dtype=dtype, param_dtype=param_dtype,
                  embedding_init=nn.with_logical_partitioning(init, axes), name=name)


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


def remat(block, policy: str):
  """nn.remat of a block with a named policy (configs.REMAT_POLICIES)."""
  policies = {"full": None, "save_dots": jax.checkpoint_policies.checkpoint_dots,
              "save_dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}
  return nn.remat(block, prevent_cse=False, policy=policies[policy])


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
  """Logical sharding constraint on an activation (a no-op without axis rules)."""
  return nn.with_logical_constraint(x, tuple(axes))


def dot_product_attention(q: Array, k: Array, v: Array, *, bias: Array | None = None, mask: Array | None = None,
                          scale: float = 1.0, dropout_rate: float = 0.0, deterministic: bool = True,
                          dropout_rng: Array | None = None) -> Array:
  """softmax(scale * q k^T + bias, masked) v, with the logits and the softmax in f32.

  q: (B, Lq, H, D), k/v: (B, Lk, G, D) with G dividing H (query head j reads key/value head j // (H / G), as
  transformers' repeat_kv), bias: broadcastable to (B, H, Lq, Lk), mask: bool broadcastable to (B, H, Lq, Lk),
  True = attend. Returns (B, Lq, H, D).

  Heads are moved in front of the tokens before the two matmuls, so that each is a plain batched matmul over
  (B, H): on XLA's CPU backend that ran the ViT-B/16 attention 1.5x faster forward and 1.3x backward than
  jax.nn.dot_product_attention, the Q-Former's cross-attention 1.8x and 1.7x, its self-attention 1.2x and 1.1x
  (tools/bench_shapes.py, BENCHMARKS.md).
  """
  b, lq, h, d = q.shape
  g = k.shape[2]
  # the H/G query heads of a key/value head stack along the query axis: one (B, G) batched matmul either way
  qh = q.transpose(0, 2, 1, 3).reshape(b, g, h // g * lq, d)                   # (B, G, H/G x Lq, D)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                    # (B, G, Lk, D)
  logits = jnp.einsum("bgqd,bgkd->bgqk", qh, kh, preferred_element_type=jnp.float32)
  logits = logits.reshape(b, h, lq, -1) * scale                                 # (B, H, Lq, Lk)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    # finfo.min rather than -inf: a row with every key masked then gives a uniform softmax, not NaN.
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout_rate > 0.0 and not deterministic:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  probs = probs.astype(v.dtype).reshape(b, g, h // g * lq, -1)
  y = jnp.einsum("bgqk,bgkd->bgqd", probs, vh)                                  # (B, G, H/G x Lq, D)
  return y.reshape(b, h, lq, d).transpose(0, 2, 1, 3)


def _per_row(x: Array, lq: int, lk: int, b: int, g: int, heads: tuple[int, int]) -> Array:
  """A 4-D mask or bias broadcastable to (R, H, Lq, Lk) -> (B, g, G, rep, Lq, Lk) (a size-1 head axis is kept)."""
  one_head = x.shape[1] == 1
  x = jnp.broadcast_to(x, (b * g, 1 if one_head else heads[0] * heads[1], lq, lk))
  return x.reshape(b, g, *((1, 1) if one_head else heads), lq, lk)


def rows_attention(q: Array, *, shared=None, own=None, ancestry: Array | None = None, scale: float = 1.0) -> Array:
  """Attention of R = B x g query rows (the beams of B samples, or the candidates ranked for them) over two key sets,
  with one softmax (f32) over both:
    shared = (k, v, mask): each sample's keys (B, S, G, D), read once for all its g rows (an encoder output, a
      prompt) instead of being copied per row; mask (B, 1, 1, S) or None;
    own = (k, v, bias, mask): each row's own keys (R, T, G, D) (its generated or candidate tokens), bias/mask
      broadcastable to (R, H, Lq, T);
    ancestry (B, g, T): row j of sample b reads its own-key position t from row ancestry[b, j, t] of its sample, so
      beams that trade places keep reading their history where it was written: no cache copy when beams reorder.
  q: (R, Lq, H, D), H a multiple of G (grouped-query attention). Returns (R, Lq, H, D) in v's dtype."""
  r, lq, h, d = q.shape
  ref = shared[0] if shared is not None else own[0]
  g_heads = ref.shape[2]
  b = shared[0].shape[0] if shared is not None else (ancestry.shape[0] if ancestry is not None else r)
  g = r // b
  heads = (g_heads, h // g_heads)
  qg = q.reshape(b, g, lq, *heads, d)
  logits, sizes = [], []
  if shared is not None:
    k, _, mask = shared
    x = jnp.einsum("bjqgrd,bsgd->bjgrqs", qg, k).astype(jnp.float32) * scale
    if mask is not None:
      x = jnp.where(mask.reshape(b, 1, 1, 1, 1, -1), x, jnp.finfo(jnp.float32).min)
    logits.append(x)
    sizes.append(k.shape[1])
  if own is not None:
    k, _, bias, mask = own
    t = k.shape[1]
    kg = k.reshape(b, g, t, *k.shape[2:])
    if ancestry is None:
      x = jnp.einsum("bjqgrd,bjtgd->bjgrqt", qg, kg).astype(jnp.float32) * scale
    else:  # each (row, position) key from the row its ancestry names: one non-zero term per position
      pick = jax.nn.one_hot(ancestry, g, dtype=bool).transpose(0, 1, 3, 2)           # (B, j, i, T)
      every = jnp.einsum("bjqgrd,bitgd->bjigrqt", qg, kg).astype(jnp.float32) * scale
      x = jnp.where(pick[:, :, :, None, None, None, :], every, 0.0).sum(axis=2)
    if bias is not None:
      x = x + _per_row(bias.astype(jnp.float32), lq, t, b, g, heads)
    if mask is not None:
      x = jnp.where(_per_row(mask, lq, t, b, g, heads), x, jnp.finfo(jnp.float32).min)
    logits.append(x)
    sizes.append(t)
  probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
  parts = jnp.split(probs, np.cumsum(sizes)[:-1], axis=-1)
  out = 0.0
  if shared is not None:
    v = shared[1]
    out = out + jnp.einsum("bjgrqs,bsgd->bjqgrd", parts[0].astype(v.dtype), v)
  if own is not None:
    v = own[1]
    vg = v.reshape(b, g, v.shape[1], *v.shape[2:])
    p = parts[-1].astype(v.dtype)
    if ancestry is None:
      out = out + jnp.einsum("bjgrqt,bjtgd->bjqgrd", p, vg)
    else:
      weights = jnp.where(pick[:, :, :, None, None, None, :], p[:, :, None], 0)   # (B, j, i, G, rep, Lq, T)
      out = out + jnp.einsum("bjigrqt,bitgd->bjqgrd", weights, vg)
  return out.reshape(r, lq, h, d).astype(ref.dtype)


def write_at(cache: Array, new: Array, index) -> Array:
  """cache (B, T, ...) with new (B, 1, ...) written at position `index`: the same position for every row (a scalar:
  the decoding loops), or each row's own ((B,): continuous batching's slots, each at its own step)."""
  if jnp.ndim(index) == 0:
    return jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), index, axis=1)
  hit = jnp.arange(cache.shape[1])[None, :] == index[:, None]                        # (B, T)
  return jnp.where(hit.reshape(hit.shape + (1,) * (cache.ndim - 2)), new.astype(cache.dtype), cache)


def written(index, length: int) -> Array:
  """The key mask of the cache positions written up to `index`: (1, 1, 1, T) for a scalar, (B, 1, 1, T) per row."""
  if jnp.ndim(index) == 0:
    return (jnp.arange(length) <= index)[None, None, None, :]
  return (jnp.arange(length)[None, :] <= index[:, None])[:, None, None, :]


def repeat_cache(cache: dict, n: int, own: Sequence[str], batch: int) -> dict:
  """n rows per sample (beams, samples drawn) of a decoding cache: each row gets its own copy of the `own` arrays
  (keys/values of new tokens, (layers, B, T, ...) -> (layers, B * n, T, ...)); everything else (the encoder's or the
  prompt's keys/values) stays once per sample and its rows share it (rows_attention). With n > 1, an ancestry table
  (B, n, T) says which row holds each position of a row's history, so that reorder_cache moves no keys/values."""
  if n == 1:
    return cache
  t = cache[own[0]].shape[2]
  out = dict(cache, **{name: jnp.repeat(cache[name], n, axis=1) for name in own})
  out["ancestry"] = jnp.broadcast_to(jnp.arange(n)[None, :, None], (batch, n, t)).astype(jnp.int32)
  return out


def reorder_cache(cache: dict, rows: Array) -> dict:
  """Rows take the histories of `rows` (R,) (beam search): only the ancestry table changes, each row keeps reading
  its history where it was written."""
  ancestry = cache["ancestry"]
  b, g, t = ancestry.shape
  return dict(cache, ancestry=ancestry.reshape(b * g, t)[rows].reshape(b, g, t))


def segment_mask(q_segments: Array, k_segments: Array) -> Array:
  """Packed rows (several examples per row): (R, Lq), (R, Lk) segment ids, 0 = padding -> bool (R, 1, Lq, Lk),
  True where query and key belong to the same example: attention never crosses an example's segment."""
  same = q_segments[:, :, None] == k_segments[:, None, :]
  return jnp.logical_and(same, k_segments[:, None, :] != 0)[:, None]


def padding_mask(attention_mask: Array) -> Array:
  """(B, Lk) 0/1 key mask -> bool (B, 1, 1, Lk) attention mask."""
  return attention_mask.astype(bool)[:, None, None, :]
