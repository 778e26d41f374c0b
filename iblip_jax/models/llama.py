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
  def __call__(self, x, rope, mask, cache, index, prefix=None, prefix_mask=None, ancestry=None):
    """x (R, S, D) -> ((R, S, D), cache). Without a cache: self-attention under `mask`. With one: this chunk's
    keys/values are written at `index` and the queries attend over the whole cache under `mask`. With a `prefix`
    ((k, v), (B, P, G, K), and its (B, 1, 1, P) mask): a prompt shared by each sample's R / B rows (beams,
    candidates), attended together with the rows' own keys (the cache, or this chunk's when there is none);
    `ancestry` maps beams to where their history was written (layers.rows_attention)."""
    cfg = self.config
    h, g, k = cfg.num_attention_heads, cfg.kv_heads, cfg.head_size
    dense = functools.partial(layers.dense, use_bias=cfg.attention_bias, dtype=dtype_of(cfg.dtype),
                              param_dtype=dtype_of(cfg.param_dtype), **layers.tower_options(cfg))
    b, s = x.shape[:2]
    q = apply_rope(dense(h * k, ("embed", "heads_joined"), name="q_proj")(x).reshape(b, s, h, k), rope)
    key = apply_rope(dense(g * k, ("embed", "kv_joined"), name="k_proj")(x).reshape(b, s, g, k), rope)
    value = dense(g * k, ("embed", "kv_joined"), name="v_proj")(x).reshape(b, s, g, k)
    if cache is not None:  # write this chunk at `index`, attend over the whole cache
      if jnp.ndim(index) == 0:   # a chunk of S positions from `index`
        cache = {"k": jax.lax.dynamic_update_slice_in_dim(cache["k"], key.astype(cache["k"].dtype), index, axis=1),
                 "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], value.astype(cache["v"].dtype), index, axis=1)}
      else:                      # one position per row, each row's own (continuous batching)
        cache = {"k": layers.write_at(cache["k"], key, index), "v": layers.write_at(cache["v"], value, index)}
      key, value = cache["k"], cache["v"]
    if prefix is not None:
      y = layers.rows_attention(q, shared=(prefix[0], prefix[1], prefix_mask), own=(key, value, None, mask),
                                ancestry=ancestry, scale=k ** -0.5)
    else:
      # query head j reads key/value head j // (H / G) (transformers' repeat_kv); dot_product_attention groups so
      y = layers.dot_product_attention(q, key, value, mask=mask, scale=k ** -0.5)   # (B, S, H, K)
    return dense(cfg.hidden_size, ("heads_joined", "embed"), name="o_proj")(y.reshape(b, s, h * k)), cache


class LlamaMLP(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = functools.partial(layers.dense, use_bias=cfg.mlp_bias, dtype=dtype_of(cfg.dtype),
                              param_dtype=dtype_of(cfg.param_dtype), **layers.tower_options(cfg))
    act = layers.activation(cfg.hidden_act)
    y = act(dense(cfg.intermediate_size, ("embed", "mlp"), name="gate_proj")(x)) * \
        dense(cfg.intermediate_size, ("embed", "mlp"), name="up_proj")(x)
    return dense(cfg.hidden_size, ("mlp", "embed"), name="down_proj")(y)


class LlamaBlock(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, rope, mask, cache, index, prefix, prefix_mask, ancestry):
    cfg = self.config
    norm = functools.partial(RMSNorm, cfg.rms_norm_eps, dtype_of(cfg.param_dtype))
    x = layers.constrain(x, ("act_batch", "act_length", "act_embed"))
    y, cache = LlamaAttention(cfg, name="self_attn")(norm(name="input_layernorm")(x), rope, mask, cache, index,
                                                     prefix, prefix_mask, ancestry)
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
    self.embed_tokens = layers.embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), dtype=dtype_of(cfg.dtype),
                                     param_dtype=dtype_of(cfg.param_dtype))
    block = layers.remat(LlamaBlock, cfg.remat_policy) if cfg.remat else LlamaBlock
    self.layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, 0, nn.broadcast, nn.broadcast),
                          length=cfg.num_hidden_layers,
                          unroll=cfg.scan_unroll, metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
    self.norm = RMSNorm(cfg.rms_norm_eps, dtype_of(cfg.param_dtype))
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=dtype_of(cfg.dtype),
                                  param_dtype=dtype_of(cfg.param_dtype), lora=cfg.lora)

  def embed(self, ids):  # (B, S) -> (B, S, D)
    return self.embed_tokens(ids)

  def logits(self, x):
    logits = self.embed_tokens.attend(x) if self.config.tie_word_embeddings else self.lm_head(x)
    return layers.constrain(logits, ("act_batch", "act_length", "act_vocab"))

  def __call__(self, inputs_embeds, attention_mask, position_ids=None, segment_ids=None):
    """Teacher-forced: (B, S, D) embeddings, (B, S) mask -> (B, S, V) logits. Positions default to arange(S), as
    transformers' forward (with right padding the real tokens' positions are the same either way). Packed rows
    (data/packing.py): `segment_ids` (B, S) (0 = padding) in place of the mask, and position_ids restarting at
    each example: a token attends causally within its own example only."""
    b, s = inputs_embeds.shape[:2]
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(s), (b, s))
    if segment_ids is None:
      mask = causal_mask(attention_mask)
    else:
      mask = jnp.logical_and(layers.segment_mask(segment_ids, segment_ids), jnp.tril(jnp.ones((s, s), bool)))
    x, _ = self.layers(inputs_embeds, rope_tables(self.config, position_ids), mask, None, None, None, None, None)
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
    x, cache = self.layers(inputs_embeds, rope_tables(self.config, position_ids), mask, cache, index, None, None,
                           None)
    return self.logits(self.norm(x[:, -1:]))[:, 0].astype(jnp.float32), cache

  def prompt(self, inputs_embeds, mask) -> tuple[jax.Array, dict]:
    """[visual][left-aligned prompt] (B, P, D) through the LLM once -> (the last position's logits (B, V) f32, the
    prompt's keys/values (layers, B, P, G, K) with its mask (B, P) and its last position (B,)). Positions are
    cumsum(mask) - 1 (transformers' generate), so padding does not shift the real tokens'."""
    b, p = mask.shape
    pos = positions(mask)
    logits, kv = self.extend(inputs_embeds, pos, causal_mask(mask), self.init_cache(b, p), 0)
    return logits, {"prefix_k": kv["k"], "prefix_v": kv["v"], "prefix_mask": mask.astype(bool),
                    "last_position": pos[:, -1]}

  def _rows(self, inputs_embeds, position_ids, own_mask, prompt: dict, own_cache, index, ancestry):
    """R rows (a multiple of the prompt's B samples) attending to their sample's prompt and their own keys."""
    return self.layers(inputs_embeds, rope_tables(self.config, position_ids), own_mask, own_cache, index,
                       (prompt["prefix_k"], prompt["prefix_v"]), prompt["prefix_mask"][:, None, None, :], ancestry)

  # --- the generation interface (shared with T5): prefill once, then one token per step -------------------

  def prefill(self, inputs_embeds, mask, max_new_tokens: int) -> dict:
    """[visual][left-aligned prompt] minus its last token goes through the LLM once, its keys/values kept once per
    sample (beams share them); decoding starts by feeding that last prompt token (always a real token after left
    alignment) at step 0. Cache: the prompt's (prompt()), and each row's own keys/values for the new tokens
    (layers, B, max_new_tokens, G, K)."""
    _, prompt = self.prompt(inputs_embeds[:, :-1], mask[:, :-1])
    b = mask.shape[0]
    own = self.init_cache(b, max_new_tokens)
    return {**prompt, "last_position": positions(mask)[:, -1], "k": own["k"], "v": own["v"]}

  def step(self, token, t, cache):
    """token (R,) fed as generation input number `t` -> (next-token logits (R, V) f32, updated cache). R may be a
    multiple of the prompt's samples (repeat_cache). `t` may be (R,), each row at its own step (continuous batching:
    one row per sample, no beams)."""
    ancestry = cache.get("ancestry")
    if ancestry is not None:   # this step's key is each row's own
      ancestry = ancestry.at[:, :, t].set(jnp.arange(ancestry.shape[1])[None])
    r, b = token.shape[0], cache["last_position"].shape[0]
    position = jnp.repeat(cache["last_position"], r // b) + t
    own_mask = layers.written(t, cache["k"].shape[2])
    x, kv = self._rows(self.embed(token[:, None]), position[:, None], own_mask, cache,
                       {"k": cache["k"], "v": cache["v"]}, t, ancestry)
    out = dict(cache, **kv)
    if ancestry is not None:
      out["ancestry"] = ancestry
    return self.logits(self.norm(x))[:, 0].astype(jnp.float32), out

  def continuation_logits(self, prompt: dict, inputs_embeds, mask) -> jax.Array:
    """Teacher-forced continuations of each sample's prompt: R = B x C rows of (R, N, D) embeddings with key mask
    (R, N), after the prompt (prompt()) -> logits (R, N, V) of every continuation position."""
    r, n = mask.shape
    b = prompt["last_position"].shape[0]
    position = jnp.repeat(prompt["last_position"], r // b)[:, None] + 1 + jnp.arange(n)[None]
    x, _ = self._rows(inputs_embeds, position, causal_mask(mask), prompt, None, None, None)
    return self.logits(self.norm(x))

  @staticmethod
  def repeat_cache(cache: dict, n: int) -> dict:
    """n rows per sample: each with its own keys/values for the new tokens; the prompt's stay once per sample."""
    return layers.repeat_cache(cache, n, ("k", "v"), cache["last_position"].shape[0])

  reorder_cache = staticmethod(layers.reorder_cache)
