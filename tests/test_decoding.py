"""Generation against transformers' generate, token for token, and the KV cache against a full forward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import iblip_jax
import oracle


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  path = tmp_path_factory.mktemp("gen") / "hf"
  hf = oracle.tiny_hf_model(seed=3, untie_head=True, tie=False)
  # a sharper output distribution than the re-randomised default, so decoding paths differ between settings,
  # and a likelier EOS, so that some hypotheses end early and others run to max_new_tokens
  with torch.no_grad():
    hf.language_model.lm_head.weight.mul_(8.0)
    hf.language_model.lm_head.weight[1].mul_(1.5)
  hf.save_pretrained(path)
  model, params = iblip_jax.from_pretrained(str(path))
  return hf, model, params


def _hf_generate(hf, batch, **kw):
  t = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
  b = t["input_ids"].shape[0]
  with torch.no_grad():
    out = hf.generate(
        pixel_values=t["pixel_values"].permute(0, 3, 1, 2), qformer_input_ids=t["qformer_input_ids"],
        qformer_attention_mask=t["qformer_attention_mask"],
        input_ids=torch.cat([torch.full((b, oracle.NUM_QUERY), oracle.IMAGE_TOKEN), t["input_ids"]], 1),
        attention_mask=torch.cat([torch.ones(b, oracle.NUM_QUERY, dtype=torch.long), t["attention_mask"]], 1),
        do_sample=False, **kw)
  return out[:, 1:].numpy()  # drop the decoder start token


def _assert_same_tokens(ours, theirs, eos=1, pad=0):
  """Equal up to and including EOS; after EOS ours is padding (transformers fills with whatever it used)."""
  ours = np.asarray(ours)
  assert ours.shape[0] == theirs.shape[0]
  for row_ours, row_theirs in zip(ours, theirs):
    n = len(row_theirs)
    if eos in row_theirs:
      n = int(np.argmax(row_theirs == eos)) + 1
    np.testing.assert_array_equal(row_ours[:n], row_theirs[:n])
    assert (row_ours[n:] == pad).all() or n == len(row_ours)


def _inputs():
  b = oracle.tiny_batch(seed=5)
  return {k: v for k, v in b.items() if not k.startswith("decoder")}


SETTINGS = [
    dict(num_beams=1),
    dict(num_beams=1, repetition_penalty=1.5, min_new_tokens=4),
    dict(num_beams=3),
    dict(num_beams=4, length_penalty=-1.0),
    dict(num_beams=5, length_penalty=1.0, repetition_penalty=1.5),
    dict(num_beams=5, length_penalty=-1.0, repetition_penalty=1.5, min_new_tokens=3, num_return_sequences=3),
    dict(num_beams=3, min_new_tokens=6),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_matches_transformers_generate(models, setting):
  hf, model, params = models
  batch = _inputs()
  max_new = 12
  ours = iblip_jax.generate(model, params, **batch, max_new_tokens=max_new,
                            **{"min_new_tokens": 0, **setting})
  theirs = _hf_generate(hf, batch, max_new_tokens=max_new, **setting)
  assert ours.shape == (3 * setting.get("num_return_sequences", 1), max_new)
  _assert_same_tokens(ours, theirs)


def test_some_generations_stop_early(models):
  """The test model must exercise EOS handling, not only max length."""
  hf, model, params = models
  ours = np.asarray(iblip_jax.generate(model, params, **_inputs(), num_beams=1, max_new_tokens=12,
                                       min_new_tokens=0))
  ended = (ours == 1).any(axis=1)
  assert ended.any() and not ended.all()


def test_cached_decoding_equals_full_forward(models):
  _, model, params = models
  batch = oracle.tiny_batch(seed=2)
  dec = batch["decoder_input_ids"]
  full = model.apply({"params": params}, batch["pixel_values"], batch["qformer_input_ids"],
                     batch["qformer_attention_mask"], batch["input_ids"], batch["attention_mask"], dec)
  encoded, mask = model.apply({"params": params}, batch["pixel_values"], batch["qformer_input_ids"],
                              batch["qformer_attention_mask"], batch["input_ids"], batch["attention_mask"],
                              method="encode")
  cache = model.apply({"params": params}, encoded, 8, method=lambda m, e, n: m.language_model.init_cache(e, n))
  for t in range(dec.shape[1]):
    logits, cache = model.apply({"params": params}, jnp.asarray(dec[:, t]), t, cache, mask,
                                method=lambda m, *a: m.language_model.decode_step(*a))
    np.testing.assert_allclose(logits, full[:, t], atol=1e-5, rtol=1e-5)
