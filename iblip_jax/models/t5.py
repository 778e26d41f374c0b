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
  """Multi-head attention without biases or 1/sqrt(K) scaling."""
  config: T5Config

  @nn.compact
  def __call__(self, x, kv, bias, mask, deterministic: bool):
    cfg = self.config
    dense = functools.partial(layers.dense, use_bias=False, dtype=dtype_of(cfg.dtype),
                              param_dtype=dtype_of(cfg.param_dtype))
    h, k = cfg.num_heads, cfg.d_kv
    q = dense(h * k, ("embed", "heads_joined"), name="q")(x).reshape(*x.shape[:2], h, k)    # (B, T, H, K)
    kk = dense(h * k, ("embed", "heads_joined"), name="k")(kv).reshape(*kv.shape[:2], h, k)  # (B, S, H, K)
    v = dense(h * k, ("embed", "heads_joined"), name="v")(kv).reshape(*kv.shape[:2], h, k)
    rng = None if deterministic or cfg.dropout_rate == 0 else self.make_rng("dropout")
    y = layers.dot_product_attention(q, kk, v, bias=bias, mask=mask, dropout_rate=cfg.dropout_rate,
                                     deterministic=deterministic, dropout_rng=rng)
    return dense(cfg.d_model, ("heads_joined", "embed"), name="o")(y.reshape(*y.shape[:2], h * k))


class T5FeedForward(nn.Module):
  """wo(dropout(act(wi_0 x) * wi_1 x)) (gated) or wo(dropout(act(wi x)))."""
  config: T5Config

  @nn.compact
  def __call__(self, x, deterministic: bool):
    cfg = self.config
    dense = functools.partial(layers.dense, use_bias=False, dtype=dtype_of(cfg.dtype),
                              param_dtype=dtype_of(cfg.param_dtype))
    act = layers.activation(cfg.dense_act_fn)
    if cfg.is_gated_act:
      y = act(dense(cfg.d_ff, ("embed", "mlp"), name="wi_0")(x)) * dense(cfg.d_ff, ("embed", "mlp"), name="wi_1")(x)
    else:
      y = act(dense(cfg.d_ff, ("embed", "mlp"), name="wi")(x))
    y = nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    return dense(cfg.d_model, ("mlp", "embed"), name="wo")(y)


class T5Block(nn.Module):
  """Pre-norm residual sublayers: self-attention, [cross-attention,] feed-forward."""
  config: T5Config
  decoder: bool
  deterministic: bool

  @nn.compact
  def __call__(self, x, bias, mask, encoded, encoded_mask):
    cfg = self.config
    norm = functools.partial(RMSNorm, cfg.layer_norm_epsilon, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype))
    drop = nn.Dropout(cfg.dropout_rate)
    det = self.deterministic
    x = layers.constrain(x, ("act_batch", "act_length", "act_embed"))
    y = norm(name="self_attn_norm")(x)
    x = x + drop(T5Attention(cfg, name="self_attn")(y, y, bias, mask, det), deterministic=det)
    if self.decoder:  # cross-attention has no position bias, only the encoder's padding mask
      y = norm(name="cross_attn_norm")(x)
      x = x + drop(T5Attention(cfg, name="cross_attn")(y, encoded, None, encoded_mask, det), deterministic=det)
    y = norm(name="mlp_norm")(x)
    x = x + drop(T5FeedForward(cfg, name="mlp")(y, det), deterministic=det)
    return x, None


class T5Stack(nn.Module):
  """Encoder (decoder=False) or decoder stack over already-embedded inputs."""
  config: T5Config
  decoder: bool

  @nn.compact
  def __call__(self, x, mask, encoded=None, encoded_mask=None, deterministic: bool = True):
    cfg = self.config
    length = x.shape[1]
    # (L, L) relative positions key - query -> buckets -> (1, H, L, L) bias shared by every block.
    rel = jnp.arange(length)[None, :] - jnp.arange(length)[:, None]
    buckets = relative_position_bucket(rel, bidirectional=not self.decoder,
                                       num_buckets=cfg.relative_attention_num_buckets,
                                       max_distance=cfg.relative_attention_max_distance)
    table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, dtype=dtype_of(cfg.dtype),
                     param_dtype=dtype_of(cfg.param_dtype),
                     embedding_init=nn.with_logical_partitioning(layers.default_kernel_init,
                                                                 ("relpos_buckets", "heads")),
                     name="relative_attention_bias")
    bias = jnp.transpose(table(buckets), (2, 0, 1))[None]  # (1, H, L, L)
    if self.decoder:
      mask = jnp.logical_and(mask, jnp.tril(jnp.ones((length, length), bool))[None, None])
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    block = T5Block
    if cfg.remat:
      block = nn.remat(block, prevent_cse=False)
    blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                     in_axes=(nn.broadcast,) * 4,
                     length=cfg.num_decoder_layers if self.decoder else cfg.num_layers,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = blocks(cfg, self.decoder, deterministic, name="layers")(x, bias, mask, encoded, encoded_mask)
    x = RMSNorm(cfg.layer_norm_epsilon, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype), name="final_norm")(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class T5(nn.Module):
  """Encoder-decoder with a shared token embedding. `encode` takes embeddings (visual tokens go in front)."""
  config: T5Config

  def setup(self):
    cfg = self.config
    self.shared = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype_of(cfg.dtype),
                           param_dtype=dtype_of(cfg.param_dtype),
                           embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                       ("vocab", "embed")))
    self.encoder = T5Stack(cfg, decoder=False)
    self.decoder = T5Stack(cfg, decoder=True)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=dtype_of(cfg.dtype),
                                  param_dtype=dtype_of(cfg.param_dtype))

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
