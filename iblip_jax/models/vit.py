"""EVA-CLIP ViT-g/14, the frozen image encoder (transformers' InstructBlipVisionModel, LAVIS eva_vit.py).

Pre-LN blocks, fused qkv projection with bias [q | 0 | v], exact GELU, no final norm: LAVIS's `ln_vision` (HF's
`post_layernorm`) is trainable and therefore lives in `InstructBlip`, not here. Blocks are `nn.scan`ned
(39 in ViT-g), so their parameters carry a leading `layers` axis.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iblip_jax.models import layers
from iblip_jax.models.configs import VisionConfig, dtype_of


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix of torch's bicubic upsampling, align_corners=False, no antialias (A = -0.75).

  HF interpolates the position grid with `F.interpolate(mode="bicubic", align_corners=False)`; jax.image.resize uses
  A = -0.5 and antialiasing, so it would not match the released weights' behaviour. Source coordinates are not
  clamped (torch's cubic path) but the taps are, to the border.
  """
  a = -0.75
  m = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for o in range(out_size):
    src = (o + 0.5) * scale - 0.5
    i0 = int(np.floor(src))
    t = src - i0
    x1, x2 = t + 1.0, 1.0 - t
    weights = (((a * x1 - 5 * a) * x1 + 8 * a) * x1 - 4 * a,   # tap i0 - 1
               ((a + 2) * t - (a + 3)) * t * t + 1,              # tap i0
               ((a + 2) * x2 - (a + 3)) * x2 * x2 + 1,           # tap i0 + 1
               (((a * (x2 + 1)) - 5 * a) * (x2 + 1) + 8 * a) * (x2 + 1) - 4 * a)  # tap i0 + 2
    for k, w in enumerate(weights):
      m[o, min(max(i0 - 1 + k, 0), in_size - 1)] += w
  return m.astype(np.float32)


def interpolate_positions(pos: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """Resizes learned positions (1, 1 + n*n, D) to a (h, w) patch grid; the class position is kept."""
  n = int(round((pos.shape[1] - 1) ** 0.5))
  if grid == (n, n):
    return pos
  cls_pos, patch_pos = pos[:, :1], pos[0, 1:].reshape(n, n, -1)
  rows = jnp.asarray(torch_bicubic_matrix(n, grid[0]))
  cols = jnp.asarray(torch_bicubic_matrix(n, grid[1]))
  hi = jax.lax.Precision.HIGHEST
  patch_pos = jnp.einsum("hi,ijd->hjd", rows, patch_pos.astype(jnp.float32), precision=hi)
  patch_pos = jnp.einsum("wj,hjd->hwd", cols, patch_pos, precision=hi)
  return jnp.concatenate([cls_pos, patch_pos.reshape(1, -1, pos.shape[-1]).astype(pos.dtype)], axis=1)


class VisionEmbeddings(nn.Module):
  config: VisionConfig

  @nn.compact
  def __call__(self, pixel_values):  # (B, H, W, C), normalised
    cfg = self.config
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    d, p = cfg.hidden_size, cfg.patch_size
    patches = nn.Conv(
        d, (p, p), strides=(p, p), padding="VALID", dtype=dtype, param_dtype=pdtype,
        kernel_init=nn.with_logical_partitioning(layers.default_kernel_init, (None, None, None, "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name="patch_embedding")(pixel_values.astype(dtype))  # (B, H/p, W/p, D)
    b, gh, gw, _ = patches.shape
    num_positions = (cfg.image_size // p) ** 2 + 1
    init = nn.with_logical_partitioning(layers.default_kernel_init, (None, None, "embed"))
    cls = self.param("class_embedding", init, (1, 1, d), pdtype)
    pos = self.param("position_embedding", init, (1, num_positions, d), pdtype)
    # Row-major patch order, CLS first: torch's flatten(2).transpose(1, 2) after the conv.
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, d)), patches.reshape(b, gh * gw, d)], axis=1)
    return x + interpolate_positions(pos, (gh, gw)).astype(dtype)  # (B, 1 + gh*gw, D)


class VisionBlock(nn.Module):
  """x + proj(attn(LN1 x)); x + fc2(gelu(fc1(LN2 x)))."""
  config: VisionConfig

  @nn.compact
  def __call__(self, x, _):
    cfg = self.config
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    d, h = cfg.hidden_size, cfg.num_attention_heads
    ln = functools.partial(layers.layer_norm, cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype)
    dense = functools.partial(layers.dense, dtype=dtype, param_dtype=pdtype, **layers.tower_options(cfg))
    x = layers.constrain(x, ("act_batch", "act_length", "act_embed"))

    y = ln(name="layer_norm1")(x)
    # Fused projection: output features are laid out [which (q, k, v)][head][head_dim], as in HF's reshape.
    qkv = dense(3 * d, ("embed", "qkv"), use_bias=cfg.qkv_bias, name="qkv")(y)
    q, k, v = jnp.split(qkv.reshape(*qkv.shape[:2], 3, h, d // h), 3, axis=2)
    attn = layers.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], scale=(d // h) ** -0.5)
    x = x + dense(d, ("heads_joined", "embed"), name="projection")(attn.reshape(attn.shape[:2] + (d,)))

    y = ln(name="layer_norm2")(x)
    y = dense(cfg.intermediate_size, ("embed", "mlp"), name="fc1")(y)
    y = layers.activation(cfg.hidden_act)(y)
    x = x + dense(d, ("mlp", "embed"), name="fc2")(y)
    return x, None


class VisionTransformer(nn.Module):
  """(B, H, W, 3) pixels -> (B, 1 + (H/p)*(W/p), D) tokens, before ln_vision."""
  config: VisionConfig

  @nn.compact
  def __call__(self, pixel_values):
    cfg = self.config
    x = VisionEmbeddings(cfg, name="embeddings")(pixel_values)
    if not cfg.scan_layers:  # one parameter subtree per block (layers_0, ...), e.g. to train only the last ones
      for i in range(cfg.num_hidden_layers):
        x, _ = VisionBlock(cfg, name=f"layers_{i}")(x, None)
      return x
    blocks = nn.scan(
        VisionBlock, variable_axes={"params": 0}, split_rngs={"params": True},
        length=cfg.num_hidden_layers, unroll=cfg.scan_unroll, metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = blocks(cfg, name="layers")(x, None)
    return x
