"""FlanT5 (T5 v1.1), the frozen encoder-decoder LLM (transformers' T5ForConditionalGeneration).

RMSNorm without bias or mean, no attention-logit scaling, relative position buckets (bidirectional in the encoder,
causal in the decoder) computed once per stack from the stack's `relative_attention_bias` table (HF keeps that table
in block 0; we keep it beside the scanned blocks), gated feed-forward, optional tied head with the d_model**-0.5
rescale. Blocks are `nn.scan`ned, so block parameters carry a leading `layers` axis.

Shapes: B batch, L encoder length, T decoder length, D d_model, H heads, K d_kv, V vocab.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from iblip_jax.models import layers
from iblip_jax.models.configs import T5Config, dtype_of


def relative_position_bucket(relative_position, *, bidirectional: bool, num_buckets: int, max_distance: int):
  """T5's bucketing of key_pos - query_pos (same float32 arithmetic as transformers, so buckets agree)."""
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative_position > 0).astype(relative_position.dtype) * num_buckets
    relative_position = jnp.abs(relative_position)
  else:
    relative_position = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = relative_position < max_exact
  # Positions >= max_exact share logarithmically wider buckets up to max_distance.
  large = max_exact + (jnp.log(relative_position.astype(jnp.float32) / max_exact)
                       / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(relative_position.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, relative_position, large)


class RMSNorm(nn.Module):
  """T5LayerNorm: x * rsqrt(mean(x^2) + eps) in f32, then * scale."""
  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],),
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (scale.astype(self.dtype) * y.astype(self.dtype)).astype(self.dtype)


class T5Attention(nn.Module):
  """Multi-head attention without biases or 1/sqrt(K) scaling.

  `kv` projects keys/values on their own, so decoding can project the encoder output once and cache it.
  """
  config: T5Config

  def setup(self):
    cfg = self.config
    dense = functools.partial(layers.dense, cfg.num_heads * cfg.d_kv, ("embed", "heads_joined"), use_bias=False,
                              dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
                              **layers.tower_options(cfg))
    self.q, self.k, self.v = dense(), dense(), dense()
    self.o = layers.dense(cfg.d_model, ("heads_joined", "embed"), use_bias=False, dtype=dtype_of(cfg.dtype),
                          param_dtype=dtype_of(cfg.param_dtype), **layers.tower_options(cfg))

  def _heads(self, x):  # (B, L, H*K) -> (B, L, H, K)
    return x.reshape(*x.shape[:2], self.config.num_heads, self.config.d_kv)

  def kv(self, kv):
    return self._heads(self.k(kv)), self._heads(self.v(kv))

  def __call__(self, x, kv, bias, mask, deterministic: bool, cached_kv=None, ancestry=None):
    """x (R, T, D) attends to kv (B, S, D), or to `cached_kv` = (keys, values) (B, S, H, K) when given. When the
    keys have fewer rows than x (B samples, R = B x g rows: beams, ranking candidates), each sample's keys are
    shared by its g rows (projected and read once); `ancestry` (B, g, T) maps a row's cached positions to the rows
    that wrote them (beam search without cache copies; see layers.rows_attention)."""
    cfg = self.config
    q = self._heads(self.q(x))                                         # (R, T, H, K)
    k, v = self.kv(kv) if cached_kv is None else cached_kv             # (B or R, S, H, K)
    if k.shape[0] != q.shape[0]:
      y = layers.rows_attention(q, shared=(k, v, mask))
    elif ancestry is not None:
      y = layers.rows_attention(q, own=(k, v, bias, mask), ancestry=ancestry)
    else:
      rng = None if deterministic or cfg.dropout_rate == 0 else self.make_rng("dropout")
      y = layers.dot_product_attention(q, k, v, bias=bias, mask=mask, dropout_rate=cfg.dropout_rate,
                                       deterministic=deterministic, dropout_rng=rng)
    return self.o(y.reshape(*y.shape[:2], cfg.num_heads * cfg.d_kv))


class T5FeedForward(nn.Module):
  """wo(dropout(act(wi_0 x) * wi_1 x)) (gated) or wo(dropout(act(wi x)))."""
  config: T5Config

  @nn.compact
  def __call__(self, x, deterministic: bool):
    cfg = self.config
    dense = functools.partial(layers.dense, use_bias=False, dtype=dtype_of(cfg.dtype),
                              param_dtype=dtype_of(cfg.param_dtype), **layers.tower_options(cfg))
    act = layers.activation(cfg.dense_act_fn)
    if cfg.is_gated_act:
      y = act(dense(cfg.d_ff, ("embed", "mlp"), name="wi_0")(x)) * dense(cfg.d_ff, ("embed", "mlp"), name="wi_1")(x)
    else:
      y = act(dense(cfg.d_ff, ("embed", "mlp"), name="wi")(x))
    y = nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    return dense(cfg.d_model, ("mlp", "embed"), name="wo")(y)


class T5Block(nn.Module):
  """Pre-norm residual sublayers: self-attention, [cross-attention,] feed-forward.

  Three uses, all with the same parameters: teacher-forced (`cache` None), one decoding step (`cache` holds this
  layer's keys/values, updated at `index`), and `cross_kv_only` (project the encoder output for the cache).
  """
  config: T5Config
  decoder: bool
  deterministic: bool
  cross_kv_only: bool = False

  @nn.compact
  def __call__(self, x, bias, mask, encoded, encoded_mask, cache, index, ancestry):
    cfg = self.config
    norm = functools.partial(RMSNorm, cfg.layer_norm_epsilon, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype))
    drop = nn.Dropout(cfg.dropout_rate)
    det = self.deterministic
    self_attn = T5Attention(cfg, name="self_attn")
    cross_attn = T5Attention(cfg, name="cross_attn") if self.decoder else None
    if self.cross_kv_only:
      k, v = cross_attn.kv(encoded)
      return x, {"cross_k": k, "cross_v": v}

    x = layers.constrain(x, ("act_batch", "act_length", "act_embed"))
    y = norm(name="self_attn_norm")(x)
    if cache is None:
      x = x + drop(self_attn(y, y, bias, mask, det), deterministic=det)
    else:  # write this step's key/value at `index`, attend over the whole (masked) cache
      k, v = self_attn.kv(y)
      cache = dict(cache, self_k=layers.write_at(cache["self_k"], k, index),
                   self_v=layers.write_at(cache["self_v"], v, index))
      x = x + drop(self_attn(y, None, bias, mask, det, cached_kv=(cache["self_k"], cache["self_v"]),
                             ancestry=ancestry), deterministic=det)
    if self.decoder:  # cross-attention has no position bias, only the encoder's padding mask
      y = norm(name="cross_attn_norm")(x)
      cached = None if cache is None else (cache["cross_k"], cache["cross_v"])
      x = x + drop(cross_attn(y, encoded, None, encoded_mask, det, cached_kv=cached), deterministic=det)
    y = norm(name="mlp_norm")(x)
    x = x + drop(T5FeedForward(cfg, name="mlp")(y, det), deterministic=det)
    return x, cache


class T5Stack(nn.Module):
  """Encoder (decoder=False) or decoder stack over already-embedded inputs."""
  config: T5Config
  decoder: bool

  def _bias(self, query_positions, key_length):
    """(1, H, Tq, Tk) relative position bias, from this stack's bucket table (HF: block 0's)."""
    cfg = self.config
    rel = jnp.arange(key_length)[None, :] - query_positions[:, None]   # key - query
    buckets = relative_position_bucket(rel, bidirectional=not self.decoder,
                                       num_buckets=cfg.relative_attention_num_buckets,
                                       max_distance=cfg.relative_attention_max_distance)
    table = layers.embed(cfg.relative_attention_num_buckets, cfg.num_heads, ("relpos_buckets", "heads"),
                         dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
                         name="relative_attention_bias")
    return jnp.transpose(table(buckets), (2, 0, 1))[None]

  def _blocks(self, deterministic: bool, cross_kv_only: bool = False):
    cfg = self.config
    block = T5Block
    if cfg.remat:
      block = layers.remat(block, cfg.remat_policy)
    scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * 4 + (0, nn.broadcast, nn.broadcast),
                      length=cfg.num_decoder_layers if self.decoder else cfg.num_layers,
                      unroll=cfg.scan_unroll, metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(cfg, self.decoder, deterministic, cross_kv_only, name="layers")

  def _final_norm(self, x):
    cfg = self.config
    return RMSNorm(cfg.layer_norm_epsilon, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype), name="final_norm")(x)

  @nn.compact
  def __call__(self, x, mask, encoded=None, encoded_mask=None, deterministic: bool = True, cache=None,
               index=None, cross_kv_only: bool = False, ancestry=None):
    """Teacher-forced: x (B, L, D), mask (B, 1, 1, L) -> (B, L, D).
    One decoding step (cache given): x (B, 1, D) at position `index` -> ((B, 1, D), updated cache).
    cross_kv_only: encoded (B, S, D) -> {"cross_k", "cross_v"} (layers, B, S, H, K)."""
    if cross_kv_only:
      return self._blocks(True, cross_kv_only=True)(None, None, None, encoded, None, None, None, None)[1]
    if cache is None:
      length = x.shape[1]
      bias = self._bias(jnp.arange(length), length)
      if self.decoder:
        mask = jnp.logical_and(mask, jnp.tril(jnp.ones((length, length), bool))[None, None])
    else:
      max_length = cache["self_k"].shape[2]
      if jnp.ndim(index) == 0:
        bias = self._bias(jnp.reshape(index, (1,)), max_length)               # (1, H, 1, T)
      else:   # each row at its own position (B,): (1, H, B, T) -> (B, H, 1, T)
        bias = self._bias(index, max_length).transpose(2, 1, 0, 3)
      mask = layers.written(index, max_length)                                 # keys written so far
    x = nn.Dropout(self.config.dropout_rate)(x, deterministic=deterministic)
    x, cache = self._blocks(deterministic)(x, bias, mask, encoded, encoded_mask, cache, index, ancestry)
    x = nn.Dropout(self.config.dropout_rate)(self._final_norm(x), deterministic=deterministic)
    return x if cache is None else (x, cache)


class T5(nn.Module):
  """Encoder-decoder with a shared token embedding. `encode` takes embeddings (visual tokens go in front)."""
  config: T5Config

  def setup(self):
    cfg = self.config
    self.shared = layers.embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), dtype=dtype_of(cfg.dtype),
                               param_dtype=dtype_of(cfg.param_dtype), init=nn.initializers.normal(1.0))
    self.encoder = T5Stack(cfg, decoder=False)
    self.decoder = T5Stack(cfg, decoder=True)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=dtype_of(cfg.dtype),
                                  param_dtype=dtype_of(cfg.param_dtype), lora=cfg.lora)

  def embed(self, ids):  # (B, L) -> (B, L, D); not scaled by sqrt(D)
    return self.shared(ids)

  def encode(self, inputs_embeds, attention_mask, deterministic: bool = True):
    """(B, L, D) embeddings, (B, L) mask -> (B, L, D) encoder states."""
    return self.encoder(inputs_embeds, layers.padding_mask(attention_mask), deterministic=deterministic)

  def decode(self, decoder_input_ids, encoded, attention_mask, decoder_attention_mask=None,
             deterministic: bool = True):
    """Teacher-forced decoder: (B, T) ids -> (B, T, V) logits."""
    if decoder_attention_mask is None:
      decoder_attention_mask = jnp.ones_like(decoder_input_ids)
    x = self.decoder(self.embed(decoder_input_ids), layers.padding_mask(decoder_attention_mask), encoded,
                     layers.padding_mask(attention_mask), deterministic=deterministic)
    return self.logits(x)

  def packed_logits(self, inputs_embeds, segment_ids, decoder_input_ids, decoder_segment_ids,
                    deterministic: bool = True):
    """Teacher-forced over packed rows (several examples per row, data/packing.py): encoder rows (R, L, D) with
    segment ids (R, L) (0 = padding), decoder rows (R, T) with theirs, an example's decoder segment carrying its
    encoder segment's id -> (R, T, V). Self-attention stays within a segment in both stacks (causal in the decoder),
    cross-attention reads only the example's own encoder segment. The relative position bias needs no per-example
    positions: it depends on key - query only, which is the same inside a contiguous segment as in the example
    alone."""
    encoded = self.encoder(inputs_embeds, layers.segment_mask(segment_ids, segment_ids), deterministic=deterministic)
    x = self.decoder(self.embed(decoder_input_ids), layers.segment_mask(decoder_segment_ids, decoder_segment_ids),
                     encoded, layers.segment_mask(decoder_segment_ids, segment_ids), deterministic=deterministic)
    return self.logits(x)

  # --- the generation interface (shared with Llama): prefill once, then one token per step -------------------

  def prefill(self, encoded, encoded_mask, max_new_tokens: int) -> dict:
    """The decoding cache for `max_new_tokens` steps: the encoder's projected cross-attention keys/values
    (computed once per sample), empty self-attention keys/values, each (layers, B, S or T, H, K), and the encoder
    mask (B, S)."""
    cfg = self.config
    cross = self.decoder(None, None, encoded, cross_kv_only=True)
    shape = (cfg.num_decoder_layers, encoded.shape[0], max_new_tokens, cfg.num_heads, cfg.d_kv)
    zeros = jnp.zeros(shape, cross["cross_k"].dtype)
    return {"self_k": zeros, "self_v": zeros, **cross, "encoded_mask": encoded_mask.astype(bool)}

  def step(self, token, t, cache):
    """token (R,) fed as decoder input number `t` -> (next-token logits (R, V) f32, updated cache). R may be a
    multiple of the cache's samples (repeat_cache): the rows of a sample share its encoder keys/values. `t` may be
    (R,), each row at its own step (continuous batching: one row per sample, no beams)."""
    ancestry = cache.get("ancestry")
    if ancestry is not None:   # this step's key is each row's own
      ancestry = ancestry.at[:, :, t].set(jnp.arange(ancestry.shape[1])[None])
    layers_cache = {k: cache[k] for k in ("self_k", "self_v", "cross_k", "cross_v")}
    x, layers_cache = self.decoder(self.embed(token[:, None]), None, None,
                                   layers.padding_mask(cache["encoded_mask"]), cache=layers_cache, index=t,
                                   ancestry=ancestry)
    out = dict(cache, **layers_cache)
    if ancestry is not None:
      out["ancestry"] = ancestry
    return self.logits(x)[:, 0].astype(jnp.float32), out

  @staticmethod
  def repeat_cache(cache: dict, n: int) -> dict:
    """n rows per sample: each with its own self-attention cache; the encoder's keys/values stay once per sample."""
    return layers.repeat_cache(cache, n, ("self_k", "self_v"), cache["encoded_mask"].shape[0])

  reorder_cache = staticmethod(layers.reorder_cache)

  def logits(self, x):
    cfg = self.config
    if cfg.scale_decoder_outputs:
      x = x * cfg.d_model ** -0.5
    if cfg.tie_word_embeddings:
      logits = self.shared.attend(x)
    else:
      logits = self.lm_head(x)
    return layers.constrain(logits, ("act_batch", "act_length", "act_vocab"))

  def __call__(self, inputs_embeds, attention_mask, decoder_input_ids, decoder_attention_mask=None,
               deterministic: bool = True):
    encoded = self.encode(inputs_embeds, attention_mask, deterministic)
    return self.decode(decoder_input_ids, encoded, attention_mask, decoder_attention_mask, deterministic)
