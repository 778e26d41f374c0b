"""LLaMA / Vicuna, the frozen decoder-only LLM (transformers' LlamaForCausalLM).

Pre-norm blocks, x + attn(rms(x)) then + mlp(rms(x)); RMSNorm computed in f32, cast back to the input dtype and
only then multiplied by its weight (the reverse of T5's order); SwiGLU MLP down(silu(gate x) * up x); grouped-query
attention scaled by head_size**-0.5 with the softmax in f32; transformers' half-split rotary embeddings
(rotate_half, not interleaved pairs). Blocks are `nn.scan`ned, so block parameters carry a leading `layers` axis;
module names follow transformers' (self_attn/q_proj, mlp/gate_proj, input_layernorm, ...).

One code path serves training, prefill and decoding: without a cache the sequence attends to itself; with one,
the block writes its keys/values at `index` and the queries attend over the whole cache under `mask`.

Shapes: B batch, S sequence, D hidden, H query heads, G key/value heads, K head size, V vocab, T cache length.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from iblip_jax.models import layers
from iblip_jax.models.configs import LlamaConfig, dtype_of


def rope_inv_freq(cfg: LlamaConfig) -> jax.Array:
  """(K/2,) rotary frequencies 1 / theta^(2i/K); "linear" scaling slows them down by rope_factor."""
  k = cfg.head_size
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
  return inv_freq / cfg.rope_factor if cfg.rope_type == "linear" else inv_freq


def rope_tables(cfg: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(cos, sin), each (B, S, 1, K), for positions (B, S): angles in f32, cast to the activations' dtype as
  transformers does; computed once per forward and shared by every layer."""
  angles = positions[..., None].astype(jnp.float32) * rope_inv_freq(cfg)  # (B, S, K/2)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]       # (B, S, 1, K)
  dtype = dtype_of(cfg.dtype)
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
  """x (B, S, H, K) rotated by its positions' (cos, sin): x cos + rotate_half(x) sin (half-split, not pairs)."""
  cos, sin = rope
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def left_align(ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Moves every row's padding to the front, keeping token order (any padding layout in, left padding out), so
  that the last position of every prompt is a real token."""
  order = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)
  return jnp.take_along_axis(ids, order, axis=1), jnp.take_along_axis(mask, order, axis=1)


def positions(mask: jax.Array) -> jax.Array:
  """Positions of a padded (B, S) 0/1 mask, cumsum(mask) - 1 (transformers' generate): padding anywhere does not
  shift the real tokens' positions (padding itself gets 0; it is masked out)."""
  return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)


class RMSNorm(nn.Module):
  """LlamaRMSNorm: normalise in f32, cast back to the input dtype, then * weight."""
  eps: float
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],),
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
    return scale.astype(x.dtype) * y


class LlamaAttention(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, rope, mask, cache, index):
    cfg = self.config
    h, g, k = cfg.num_attention_heads, cfg.kv_heads, cfg.head_size
    dense = functools.partial(layers.dense, use_bias=cfg.attention_bias, dtype=dtype_of(cfg.dtype),
                              param_dtype=dtype_of(cfg.param_dtype))
    b, s = x.shape[:2]
    q = apply_rope(dense(h * k, ("embed", "heads_joined"), name="q_proj")(x).reshape(b, s, h, k), rope)
    key = apply_rope(dense(g * k, ("embed", "kv_joined"), name="k_proj")(x).reshape(b, s, g, k), rope)
    value = dense(g * k, ("embed", "kv_joined"), name="v_proj")(x).reshape(b, s, g, k)
    if cache is not None:  # write this chunk at `index`, attend over the whole cache
      cache = {"k": jax.lax.dynamic_update_slice_in_dim(cache["k"], key.astype(cache["k"].dtype), index, axis=1),
               "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], value.astype(cache["v"].dtype), index, axis=1)}
      key, value = cache["k"], cache["v"]
    # query head j reads key/value head j // (H / G) (transformers' repeat_kv); dot_product_attention groups so
    y = layers.dot_product_attention(q, key, value, mask=mask, scale=k ** -0.5)   # (B, S, H, K)
    return dense(cfg.hidden_size, ("heads_joined", "embed"), name="o_proj")(y.reshape(b, s, h * k)), cache


class LlamaMLP(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = functools.partial(layers.dense, use_bias=cfg.mlp_bias, dtype=dtype_of(cfg.dtype),
                              param_dtype=dtype_of(cfg.param_dtype))
    act = layers.activation(cfg.hidden_act)
    y = act(dense(cfg.intermediate_size, ("embed", "mlp"), name="gate_proj")(x)) * \
        dense(cfg.intermediate_size, ("embed", "mlp"), name="up_proj")(x)
    return dense(cfg.hidden_size, ("mlp", "embed"), name="down_proj")(y)


class LlamaBlock(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, rope, mask, cache, index):
    cfg = self.config
    norm = functools.partial(RMSNorm, cfg.rms_norm_eps, dtype_of(cfg.param_dtype))
    x = layers.constrain(x, ("act_batch", "act_length", "act_embed"))
    y, cache = LlamaAttention(cfg, name="self_attn")(norm(name="input_layernorm")(x), rope, mask, cache, index)
    x = x + y
    x = x + LlamaMLP(cfg, name="mlp")(norm(name="post_attention_layernorm")(x))
    return x, cache


def causal_mask(attention_mask: jax.Array) -> jax.Array:
  """(B, S) 0/1 key mask -> bool (B, 1, S, S): causal and padding."""
  s = attention_mask.shape[1]
  return jnp.logical_and(layers.padding_mask(attention_mask), jnp.tril(jnp.ones((s, s), bool))[None, None])


class Llama(nn.Module):
  """Decoder-only LM over embeddings (the visual tokens go in front of the prompt's token embeddings)."""
  config: LlamaConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype_of(cfg.dtype),
                                 param_dtype=dtype_of(cfg.param_dtype),
                                 embedding_init=nn.with_logical_partitioning(layers.default_kernel_init,
                                                                             ("vocab", "embed")))
    block = nn.remat(LlamaBlock, prevent_cse=False) if cfg.remat else LlamaBlock
    self.layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=cfg.num_hidden_layers,
                          unroll=cfg.scan_unroll, metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
    self.norm = RMSNorm(cfg.rms_norm_eps, dtype_of(cfg.param_dtype))
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=dtype_of(cfg.dtype),
                                  param_dtype=dtype_of(cfg.param_dtype))

  def embed(self, ids):  # (B, S) -> (B, S, D)
    return self.embed_tokens(ids)

  def logits(self, x):
    logits = self.embed_tokens.attend(x) if self.config.tie_word_embeddings else self.lm_head(x)
    return layers.constrain(logits, ("act_batch", "act_length", "act_vocab"))

  def __call__(self, inputs_embeds, attention_mask, position_ids=None):
    """Teacher-forced: (B, S, D) embeddings, (B, S) mask -> (B, S, V) logits. Positions default to arange(S), as
    transformers' forward (with right padding the real tokens' positions are the same either way)."""
    b, s = attention_mask.shape
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(s), (b, s))
    x, _ = self.layers(inputs_embeds, rope_tables(self.config, position_ids), causal_mask(attention_mask), None,
                       None)
    return self.logits(self.norm(x))

  def init_cache(self, batch: int, max_length: int) -> dict:
    """Empty keys/values for `max_length` positions, (layers, B, T, G, K) each."""
    cfg = self.config
    shape = (cfg.num_hidden_layers, batch, max_length, cfg.kv_heads, cfg.head_size)
    zeros = jnp.zeros(shape, dtype_of(cfg.dtype))
    return {"k": zeros, "v": zeros}

  def extend(self, inputs_embeds, position_ids, mask, cache, index):
    """Runs (B, S, D) new embeddings at cache slots [index, index + S) with key mask `mask` (B, 1, S, T) over the
    whole cache -> (logits of the last new position (B, V) f32, updated cache)."""
    x, cache = self.layers(inputs_embeds, rope_tables(self.config, position_ids), mask, cache, index)
    return self.logits(self.norm(x[:, -1:]))[:, 0].astype(jnp.float32), cache

  # --- the generation interface (shared with T5): prefill once, then one token per step -------------------

  def prefill(self, inputs_embeds, mask, max_new_tokens: int) -> dict:
    """[visual][left-aligned prompt] minus its last token goes through the LLM once, filling the cache; decoding
    starts by feeding that last prompt token (always a real token after left alignment) at step 0. Positions are
    cumsum(mask) - 1 (transformers' generate), so padding does not shift the real tokens'. Cache: keys/values
    (layers, B, P - 1 + max_new_tokens, G, K), the prompt's key mask, its last position and its length."""
    b, p = mask.shape
    size = p - 1 + max_new_tokens                                    # cache slots: prompt, then one per step
    pos = positions(mask)
    key_mask = jnp.concatenate([mask[:, :p - 1].astype(bool), jnp.zeros((b, max_new_tokens), bool)], axis=1)
    causal = jnp.arange(size)[None, :] <= jnp.arange(p - 1)[:, None]                  # (P-1, T)
    _, kv = self.extend(inputs_embeds[:, :p - 1], pos[:, :p - 1], key_mask[:, None, None, :] & causal[None, None],
                        self.init_cache(b, size), 0)
    return {**kv, "key_mask": key_mask, "last_position": pos[:, -1], "prompt_length": jnp.int32(p)}

  def step(self, token, t, cache):
    """token (B,) fed as generation input number `t` -> (next-token logits (B, V) f32, updated cache)."""
    index = cache["prompt_length"] - 1 + t
    slots = jnp.arange(cache["key_mask"].shape[1])
    mask = cache["key_mask"] | ((slots >= cache["prompt_length"] - 1) & (slots <= index))[None]
    logits, kv = self.extend(self.embed(token[:, None]), (cache["last_position"] + t)[:, None],
                             mask[:, None, None, :], {"k": cache["k"], "v": cache["v"]}, index)
    return logits, dict(cache, **kv)

  @staticmethod
  def repeat_cache(cache: dict, n: int) -> dict:
    """Each sample's cache n times in a row (its beams)."""
    axes = {"k": 1, "v": 1, "key_mask": 0, "last_position": 0}
    return {k: jnp.repeat(v, n, axis=axes[k]) if k in axes else v for k, v in cache.items()}

  @staticmethod
  def reorder_cache(cache: dict, rows) -> dict:
    """Keys/values follow their beams; the prompt's mask and positions are equal across a sample's beams."""
    return {k: v[:, rows] if k in ("k", "v") else v for k, v in cache.items()}
