"""The instruction-aware Q-Former: the part of InstructBLIP that is trained.

A BERT-style post-LN encoder over [Q learned queries ; instruction tokens]:
- the instruction is embedded (word + position from 0) and placed after the queries; one embedding LayerNorm covers
  both (the queries get no position embedding);
- self-attention is bidirectional over queries and instruction, with the instruction's padding masked;
- every `cross_attention_frequency`-th layer (0, f, 2f, ...) the query rows alone cross-attend to the image tokens;
- query rows and text rows have separate feed-forward weights (`*_query` for the queries);
- the output is the query rows of the last layer.
With `instruction_aware=False` the text is dropped and only the queries go through (BLIP-2); the text-side weights
(word/position embeddings, text feed-forward) are then simply not created.

Attention maps (iblip_jax.attention_maps) are opt-in and change nothing otherwise: when the caller makes the
"intermediates" collection mutable or passes a "perturbations" collection, the cross-attention computes its
probabilities explicitly, sows them as intermediates/.../crossattention/attention_probs (B, H, Q, N) and adds the
perturbation of the same name (Flax `perturb`, so that jax.grad gives d output / d probabilities). Without either
collection layers.dot_product_attention runs exactly as before.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from iblip_jax.models import layers
from iblip_jax.models.configs import QFormerConfig, dtype_of


class QFormerAttention(nn.Module):
  """BERT attention + output block: LN(x + dense(attn(x, kv)))."""
  config: QFormerConfig
  kv_features: int
  expose: bool = False   # the cross-attention: probabilities on request (see the module docstring)

  def _asked(self) -> bool:
    """Did the caller ask for the probabilities (mutable intermediates) or their gradient (perturbations)?"""
    if self.is_initializing():   # init makes every collection mutable; the parameters are what it is for
      return False
    return (self.is_mutable_collection("intermediates") or self.is_mutable_collection("perturbations")
            or self.has_variable("perturbations", "attention_probs"))

  def _explicit_attention(self, q, k, v, scale: float):
    """softmax(scale q k^T) v with the probabilities as a value (no mask: image tokens are never padded), so that
    they can be sown and perturbed."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale   # (B, H, Q, N)
    probs = jax.nn.softmax(logits, axis=-1)
    self.sow("intermediates", "attention_probs", probs)
    probs = self.perturb("attention_probs", probs)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)

  @nn.compact
  def __call__(self, x, kv, mask, deterministic: bool):
    cfg = self.config
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    d, h = cfg.hidden_size, cfg.num_attention_heads
    dense = functools.partial(layers.dense, dtype=dtype, param_dtype=pdtype, lora=cfg.lora)
    # cross-attention's keys/values project the image embeddings (ViT width), not the Q-Former's hidden states
    kv_axis = "embed" if self.kv_features == d else "image_embed"
    q = dense(d, ("embed", "heads_joined"), name="query")(x).reshape(*x.shape[:2], h, d // h)
    k = dense(d, (kv_axis, "heads_joined"), name="key")(kv).reshape(*kv.shape[:2], h, d // h)
    v = dense(d, (kv_axis, "heads_joined"), name="value")(kv).reshape(*kv.shape[:2], h, d // h)
    dropout_rng = None if deterministic or cfg.attention_probs_dropout_prob == 0 else self.make_rng("dropout")
    if self.expose and deterministic and mask is None and self._asked():
      y = self._explicit_attention(q, k, v, (d // h) ** -0.5)
    else:
      y = layers.dot_product_attention(q, k, v, mask=mask, scale=(d // h) ** -0.5,
                                       dropout_rate=cfg.attention_probs_dropout_prob, deterministic=deterministic,
                                       dropout_rng=dropout_rng)
    y = dense(d, ("heads_joined", "embed"), name="output")(y.reshape(*y.shape[:2], d))
    y = nn.Dropout(cfg.hidden_dropout_prob)(y, deterministic=deterministic)
    return layers.layer_norm(cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name="output_ln")(y + x)


class QFormerFeedForward(nn.Module):
  """LN(x + out(act(intermediate(x))))."""
  config: QFormerConfig

  @nn.compact
  def __call__(self, x, deterministic: bool):
    cfg = self.config
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    y = layers.dense(cfg.intermediate_size, ("embed", "mlp"), dtype=dtype, param_dtype=pdtype, lora=cfg.lora,
                     name="intermediate")(x)
    y = layers.activation(cfg.hidden_act)(y)
    y = layers.dense(cfg.hidden_size, ("mlp", "embed"), dtype=dtype, param_dtype=pdtype, lora=cfg.lora,
                     name="output")(y)
    y = nn.Dropout(cfg.hidden_dropout_prob)(y, deterministic=deterministic)
    return layers.layer_norm(cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name="output_ln")(y + x)


class QFormerLayer(nn.Module):
  config: QFormerConfig
  has_cross_attention: bool
  has_text: bool

  @nn.compact
  def __call__(self, x, num_queries: int, self_mask, image_embeds, deterministic: bool):
    cfg = self.config
    x = QFormerAttention(cfg, cfg.hidden_size, name="attention")(x, x, self_mask, deterministic)
    queries = x[:, :num_queries]  # (B, Q, D)
    if self.has_cross_attention:
      # Image tokens are never padded, so the cross-attention has no mask.
      queries = QFormerAttention(cfg, cfg.encoder_hidden_size, expose=True, name="crossattention")(
          queries, image_embeds, None, deterministic)
    queries = QFormerFeedForward(cfg, name="ffn_query")(queries, deterministic)
    if not self.has_text:
      return queries
    text = QFormerFeedForward(cfg, name="ffn")(x[:, num_queries:], deterministic)
    return jnp.concatenate([queries, text], axis=1)


class QFormer(nn.Module):
  """(queries (B, Q, D), image_embeds (B, N, Dv), instruction ids/mask (B, L) or None) -> (B, Q, D)."""
  config: QFormerConfig

  @nn.compact
  def __call__(self, query_embeds, image_embeds, input_ids=None, attention_mask=None, deterministic: bool = True):
    cfg = self.config
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    b, num_queries, _ = query_embeds.shape
    x = query_embeds.astype(dtype)
    self_mask = None
    has_text = input_ids is not None
    if has_text:
      if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
      embed = functools.partial(nn.Embed, features=cfg.hidden_size, dtype=dtype, param_dtype=pdtype,
                                embedding_init=nn.with_logical_partitioning(layers.default_kernel_init,
                                                                            ("vocab", "embed")))
      length = input_ids.shape[1]
      if length > cfg.max_position_embeddings:
        raise ValueError(f"instruction has {length} Q-Former tokens, more than "
                         f"max_position_embeddings={cfg.max_position_embeddings}; truncate it (LAVIS: 128)")
      text = (embed(cfg.vocab_size, name="word_embeddings")(input_ids)
              + embed(cfg.max_position_embeddings, name="position_embeddings")(jnp.arange(length))[None])
      x = jnp.concatenate([x, text], axis=1)  # (B, Q + L, D)
      self_mask = layers.padding_mask(jnp.concatenate([jnp.ones((b, num_queries), bool),
                                                       attention_mask.astype(bool)], axis=1))
    x = layers.layer_norm(cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name="embed_ln")(x)
    x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
    image_embeds = image_embeds.astype(dtype)
    for i in range(cfg.num_hidden_layers):
      x = layers.constrain(x, ("act_batch", "act_length", "act_embed"))
      x = QFormerLayer(cfg, has_cross_attention=i % cfg.cross_attention_frequency == 0, has_text=has_text,
                       name=f"layer_{i}")(x, num_queries, self_mask, image_embeds, deterministic)
    return x[:, :num_queries]
