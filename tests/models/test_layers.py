"""Shared layers: attention of many rows over keys they share (beams, ranking candidates) equals attention over
per-row copies of those keys."""
import jax.numpy as jnp
import numpy as np

from iblip_jax.models import layers
from iblip_jax.models.llama import Llama
from iblip_jax.models.t5 import T5


def _arrays(seed=0, b=2, g=3, lq=2, h=4, heads=2, d=5, s=6, t=4):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return dict(q=f(b * g, lq, h, d), ks=f(b, s, heads, d), vs=f(b, s, heads, d), ko=f(b * g, t, heads, d),
              vo=f(b * g, t, heads, d), smask=jnp.asarray(rng.random((b, 1, 1, s)) > 0.3),
              omask=jnp.asarray(rng.random((b * g, 1, lq, t)) > 0.3), bias=f(1, h, lq, t),
              ancestry=jnp.asarray(rng.integers(0, g, (b, g, t))), b=b, g=g)


def test_rows_over_shared_and_own_keys_equal_per_row_copies():
  """Each row attends to its sample's shared keys and, through the ancestry table, to own keys written by other
  rows of its sample: the same as building every row's key list explicitly."""
  a = _arrays()
  got = layers.rows_attention(a["q"], shared=(a["ks"], a["vs"], a["smask"]),
                              own=(a["ko"], a["vo"], a["bias"], a["omask"]), ancestry=a["ancestry"], scale=0.3)
  b, g, lq, s, t = a["b"], a["g"], a["q"].shape[1], a["ks"].shape[1], a["ko"].shape[1]
  rows = []
  for r in range(b * g):
    i, j = divmod(r, g)
    src = [i * g + int(a["ancestry"][i, j, p]) for p in range(t)]
    k = jnp.concatenate([a["ks"][i], a["ko"][jnp.array(src), jnp.arange(t)]])[None]
    v = jnp.concatenate([a["vs"][i], a["vo"][jnp.array(src), jnp.arange(t)]])[None]
    mask = jnp.concatenate([jnp.broadcast_to(a["smask"][i], (1, lq, s)), a["omask"][r]], -1)[None]
    bias = jnp.concatenate([jnp.zeros((1, a["q"].shape[2], lq, s)), a["bias"]], -1)
    rows.append(layers.dot_product_attention(a["q"][r:r + 1], k, v, mask=mask, bias=bias, scale=0.3)[0])
  np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.stack(rows)), atol=1e-6)


def test_shared_keys_alone_and_own_keys_alone():
  a = _arrays(seed=1)
  g = a["g"]
  shared = layers.rows_attention(a["q"], shared=(a["ks"], a["vs"], a["smask"]), scale=0.3)
  copied = layers.dot_product_attention(a["q"], jnp.repeat(a["ks"], g, 0), jnp.repeat(a["vs"], g, 0),
                                        mask=jnp.repeat(a["smask"], g, 0), scale=0.3)
  np.testing.assert_allclose(np.asarray(shared), np.asarray(copied), atol=1e-6)
  own = layers.rows_attention(a["q"], own=(a["ko"], a["vo"], a["bias"], a["omask"]), scale=0.3)
  plain = layers.dot_product_attention(a["q"], a["ko"], a["vo"], mask=a["omask"], bias=a["bias"], scale=0.3)
  np.testing.assert_allclose(np.asarray(own), np.asarray(plain), atol=1e-6)


def test_beams_share_what_is_shared_and_reorders_move_no_keys():
  """repeat_cache keeps the encoder's (T5) / prompt's (LLaMA) keys once per sample; reorder_cache changes only
  the ancestry table: the key/value arrays it returns are the very arrays it was given."""
  b, n, layers_, s, t = 2, 5, 3, 7, 4
  zeros = lambda *shape: jnp.zeros(shape)
  t5 = {"self_k": zeros(layers_, b, t, 2, 8), "self_v": zeros(layers_, b, t, 2, 8),
        "cross_k": zeros(layers_, b, s, 2, 8), "cross_v": zeros(layers_, b, s, 2, 8),
        "encoded_mask": jnp.ones((b, s), bool)}
  beams = T5.repeat_cache(t5, n)
  assert beams["cross_k"].shape[1] == b and beams["self_k"].shape[1] == b * n
  rows = jnp.array([1, 1, 0, 4, 2, 9, 9, 5, 6, 8])
  moved = T5.reorder_cache(beams, rows)
  assert moved["self_k"] is beams["self_k"] and moved["cross_k"] is beams["cross_k"]
  np.testing.assert_array_equal(moved["ancestry"][0, :, 0], [1, 1, 0, 4, 2])
  np.testing.assert_array_equal(moved["ancestry"][1, :, 0], [4, 4, 0, 1, 3])
  llama = {"prefix_k": zeros(layers_, b, s, 2, 8), "prefix_v": zeros(layers_, b, s, 2, 8),
           "prefix_mask": jnp.ones((b, s), bool), "last_position": jnp.zeros(b, jnp.int32),
           "k": zeros(layers_, b, t, 2, 8), "v": zeros(layers_, b, t, 2, 8)}
  beams = Llama.repeat_cache(llama, n)
  assert beams["prefix_k"].shape[1] == b and beams["k"].shape[1] == b * n
  assert Llama.reorder_cache(beams, rows)["k"] is beams["k"]
