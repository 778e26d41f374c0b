"""Sequence packing: rows laid out from the texts, and packed batches computing exactly what the same examples compute
unpacked (per-example losses, the step's loss and gradients, T5 and LLaMA); attention never crosses a segment."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_helper
from iblip_jax import trainable as trainable_lib
from iblip_jax import train_step
from iblip_jax.data import packing, tokenize
from iblip_jax.demo import word_tokenizers
from iblip_jax.errors import UserError
from iblip_jax.losses import IGNORE
from iblip_jax.models import configs as model_configs
from iblip_jax.models import layers
from iblip_jax.models.instructblip import InstructBlip, init_fn, packed_fields

WORDS = "a photo of the cat dog sits on mat what is in image short answer question caption red blue".split()
PROMPTS = ["what is in the image", "a photo", "what is the cat on", "caption", "short answer what is red",
           "question what is blue in the photo of the mat", "a", "the dog sits on the mat what is in the image"]
ANSWERS = ["a cat", "the dog sits on the mat", "mat", "a photo of a red dog", "blue", "red", "a blue cat sits",
           "the mat"]


def _tok(tmp_path_factory, decoder_only):
  path = tmp_path_factory.mktemp("tok")
  word_tokenizers.build(WORDS, str(path), decoder_only=decoder_only)
  return tokenize.load_tokenizers(str(path), max_input_len=12, max_output_len=8, buckets=(4, 8, 16),
                                  decoder_only=decoder_only)


def _model(name):
  cfg = model_configs.from_dict(train_helper.load_config(name).model.to_dict())
  return InstructBlip(cfg)


def _params(model):
  return nn.meta.unbox(init_fn(model)(jax.random.key(1)))


def test_first_fit_is_deterministic_and_respects_every_capacity():
  sizes = np.array([[5, 1], [3, 4], [4, 4], [2, 2], [1, 1], [5, 5]])
  rows = packing.first_fit(sizes, [6, 6])
  assert sorted(i for r in rows for i in r) == list(range(6))           # every example exactly once
  for r in rows:
    assert (sizes[r].sum(0) <= 6).all()
  assert rows == packing.first_fit(sizes, [6, 6])
  with pytest.raises(UserError, match=r"needs \[5, 1\] LLM tokens; packed rows hold \[4, 6\]: raise config.data.packing"):
    packing.first_fit(sizes, [4, 6])


def test_t5_rows_hold_each_example_in_its_own_segment(tmp_path_factory):
  tok = _tok(tmp_path_factory, decoder_only=False)
  v = 3
  out = packing.pack(tokenize.encode_training(tok, PROMPTS, ANSWERS), visual_tokens=v, length=24, row_multiple=4)
  prompts = [tok.llm(p)["input_ids"] for p in PROMPTS]              # tokenised alone: nothing truncated here
  targets = [tok.llm_targets(a)["input_ids"] for a in ANSWERS]
  seg, pos, slots = out["packed_segment_ids"], out["packed_positions"], out["packed_visual_slots"]
  assert seg.shape[0] < len(PROMPTS) and seg.shape[0] % 4 == 0         # examples did share rows; whole blocks
  found = {}
  for r in range(seg.shape[0]):
    for s in range(1, seg[r].max() + 1):
      at = np.flatnonzero(seg[r] == s)
      example = slots[r, at[0]] // v
      found[example] = r
      np.testing.assert_array_equal(pos[r, at], np.arange(len(at)))
      np.testing.assert_array_equal(slots[r, at[:v]], example * v + np.arange(v))
      np.testing.assert_array_equal(out["packed_input_ids"][r, at[v:]], prompts[example])
      dec = np.flatnonzero(out["packed_decoder_segment_ids"][r] == s)
      np.testing.assert_array_equal(out["packed_labels"][r, dec], targets[example])
      np.testing.assert_array_equal(out["packed_decoder_positions"][r, dec], np.arange(len(dec)))
  assert sorted(found) == list(range(len(PROMPTS)))
  assert out["packed_decoder_segment_ids"].shape[1] % packing.TILE == 0
  assert (out["packed_labels"][out["packed_decoder_segment_ids"] == 0] == IGNORE).all()
  assert packing.real_tokens(out) == sum(map(len, prompts)) + sum(map(len, targets))


def _per_example_loss(logits, labels, segments=None):
  """{example key: summed target log-loss}: per row unpacked, per (row, segment) packed."""
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)
  valid = labels != IGNORE
  token = -np.asarray(jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], -1)[..., 0]) * valid
  if segments is None:
    return [token[i].sum() for i in range(len(labels))]
  return {(r, s): token[r][segments[r] == s].sum() for r in range(len(labels)) for s in range(1, segments[r].max() + 1)}


@pytest.mark.parametrize("name", ["tiny", "tiny_vicuna"])
def test_packed_and_unpacked_batches_give_equal_losses_and_gradients(tmp_path_factory, name):
  model = _model(name)
  decoder_only = model.config.decoder_only
  tok = _tok(tmp_path_factory, decoder_only)
  v = model.config.num_query_tokens
  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((len(PROMPTS), 30, 30, 3)).astype(np.float32)
  plain = dict(pixel_values=pixels, **tokenize.encode_training(tok, PROMPTS, ANSWERS))
  length = max(v + 12 + 8, 64)
  packed = dict(pixel_values=pixels, qformer_input_ids=plain["qformer_input_ids"],
                qformer_attention_mask=plain["qformer_attention_mask"],
                **packing.pack(plain, visual_tokens=v, length=length, row_multiple=2))
  assert packed["packed_segment_ids"].shape[0] < len(PROMPTS)

  params = _params(model)
  trainable, frozen = trainable_lib.split(params, trainable_lib.INSTRUCTION_TUNING)

  def loss(t, batch):
    return train_step.loss_fn(model, trainable_lib.merge(t, frozen), batch, None)

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True))   # one compile per layout, not one per operation
  (l_plain, aux_plain), g_plain = grad(trainable, plain)
  (l_packed, aux_packed), g_packed = grad(trainable, packed)
  assert int(aux_plain["tokens"]) == int(aux_packed["tokens"])
  np.testing.assert_allclose(l_packed, l_plain, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_packed), jax.tree.leaves(g_plain), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_plain)) > 1e-3   # gradients are not all ~0

  # per example: each segment's summed loss equals its example's row alone
  p_fields = packed_fields(packed)
  logits = jax.jit(functools.partial(model.apply, method="packed_target_logits"))(
      {"params": params}, pixels, packed["qformer_input_ids"], packed["qformer_attention_mask"], p_fields)
  segments = p_fields["segment_ids"] if decoder_only else p_fields["decoder_segment_ids"]
  if decoder_only:   # a label sits one position before its token: the segment of the token it predicts
    segments = np.where(p_fields["labels"] != IGNORE, np.roll(segments, -1, axis=1), 0)
  per_segment = _per_example_loss(logits, p_fields["labels"], segments)
  plain_logits = jax.jit(functools.partial(model.apply, method="target_logits"))(
      {"params": params}, pixels, plain["qformer_input_ids"], plain["qformer_attention_mask"], plain["input_ids"],
      plain["attention_mask"], plain["labels"], plain.get("decoder_attention_mask"))
  per_row = _per_example_loss(plain_logits, plain["labels"])
  slots = p_fields["visual_slots"]
  for (r, s), got in per_segment.items():
    first = np.flatnonzero(p_fields["segment_ids"][r] == s)[0]
    np.testing.assert_allclose(got, per_row[slots[r, first] // v], rtol=1e-5)
  assert len(per_segment) == len(PROMPTS)


@pytest.mark.parametrize("name", ["tiny", "tiny_vicuna"])
def test_no_attention_probability_crosses_a_segment(tmp_path_factory, monkeypatch, name):
  """The attention probabilities the LLM computes (recorded from the masks and biases its layers pass) are exactly 0
  between two examples of one row, in every stack (T5: encoder, decoder self- and cross-attention)."""
  model = _model(name)
  tok = _tok(tmp_path_factory, model.config.decoder_only)
  v = model.config.num_query_tokens
  unpacked = tokenize.encode_training(tok, PROMPTS, ANSWERS)
  batch = dict(qformer_input_ids=unpacked["qformer_input_ids"],
               qformer_attention_mask=unpacked["qformer_attention_mask"],
               **packing.pack(unpacked, visual_tokens=v, length=64))
  pixels = np.zeros((len(PROMPTS), 30, 30, 3), np.float32)
  params = _params(model)
  recorded = []
  original = layers.dot_product_attention

  def recording(q, k, v_, *, bias=None, mask=None, scale=1.0, **kw):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)) * scale
    if bias is not None:
      logits = logits + bias
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    lq, lk = q.shape[1], k.shape[1]
    jax.debug.callback(lambda p: recorded.append((np.asarray(p), lq, lk)), jax.nn.softmax(logits, -1))
    return original(q, k, v_, bias=bias, mask=mask, scale=scale, **kw)

  monkeypatch.setattr(layers, "dot_product_attention", recording)
  f = packed_fields(batch)
  # jitted (the callbacks fire as the program runs, once per scanned layer): op by op it took ~45 s
  apply = jax.jit(functools.partial(model.apply, method="packed_target_logits"))
  jax.block_until_ready(apply({"params": params}, pixels, batch["qformer_input_ids"], batch["qformer_attention_mask"],
                              f))
  enc, dec = f["segment_ids"], f.get("decoder_segment_ids", f["segment_ids"])
  llm = [(p, lq, lk) for p, lq, lk in recorded if p.shape[0] == enc.shape[0] and lq in (enc.shape[1], dec.shape[1])]
  assert len(llm) >= (2 if model.config.decoder_only else 6)   # every LLM layer's attention was seen
  for p, lq, lk in llm:
    qs = enc if lq == enc.shape[1] else dec
    ks = enc if lk == enc.shape[1] else dec
    crossing = (qs[:, None, :, None] != ks[:, None, None, :]) & (qs[:, None, :, None] > 0)
    assert crossing.any()
    assert (p[np.broadcast_to(crossing, p.shape)] == 0).all()


def test_global_rows_keep_the_examples_and_replace_the_llm_fields(tmp_path_factory):
  """One host: the whole batch's rows, rounded up to the devices sharing it; the per-example fields untouched."""
  tok = _tok(tmp_path_factory, decoder_only=False)
  host = dict(pixel_values=np.zeros((len(PROMPTS), 4, 4, 3), np.float32), **tokenize.encode_training(tok, PROMPTS,
                                                                                                      ANSWERS))
  out = packing.global_rows(host, query_tokens=3, length=24, row_multiple=8)
  assert not set(packing.LLM_FIELDS) & set(out)
  for k in ("pixel_values", "qformer_input_ids", "qformer_attention_mask"):
    assert out[k] is host[k]
  assert out["packed_segment_ids"].shape[0] == 8 and out["packed_segment_ids"][-1].max() == 0   # an empty row
  video = dict(host, pixel_values=np.zeros((len(PROMPTS), 2, 4, 4, 3), np.float32))   # 2 frames: 2 x 3 slots each
  slots = packing.global_rows(video, query_tokens=3, length=32, row_multiple=1)["packed_visual_slots"]
  assert sorted(slots[slots >= 0].tolist()) == list(range(len(PROMPTS) * 6))


def test_a_row_shorter_than_the_longest_example_is_a_config_error():
  from iblip_jax.run.settings import packing_problems
  t5, vicuna = _model("tiny").config, _model("tiny_vicuna").config
  assert packing_problems(0, t5) == [] and packing_problems(138, t5) == []
  (problem,) = packing_problems(137, t5)
  assert problem.startswith("config.data.packing=137:") and "138 LLM tokens (10 query tokens + 128 prompt tokens)" in problem
  (problem,) = packing_problems(138, vicuna)
  assert "394 LLM tokens" in problem and "256 target tokens)" in problem
