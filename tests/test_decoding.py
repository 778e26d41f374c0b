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
  return oracle.hf_generate(hf, batch, **kw)[:, 1:]  # drop the decoder start token


def _inputs():
  b = oracle.tiny_batch(seed=5)
  return {k: v for k, v in b.items() if not k.startswith("decoder")}




@pytest.mark.parametrize("setting", oracle.DECODING_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_matches_transformers_generate(models, setting):
  hf, model, params = models
  batch = _inputs()
  max_new = 12
  ours = iblip_jax.generate(model, params, **batch, max_new_tokens=max_new,
                            **{"min_new_tokens": 0, **setting})
  theirs = _hf_generate(hf, batch, max_new_tokens=max_new, **setting)
  assert ours.shape == (3 * setting.get("num_return_sequences", 1), max_new)
  oracle.assert_same_tokens(ours, theirs)


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
  start, cache, _ = model.apply({"params": params}, batch["pixel_values"], batch["qformer_input_ids"],
                                batch["qformer_attention_mask"], batch["input_ids"], batch["attention_mask"], 8,
                                method="prefill")   # the generation interface decoding.py uses
  assert (np.asarray(start) == 0).all()
  for t in range(dec.shape[1]):
    logits, cache = model.apply({"params": params}, jnp.asarray(dec[:, t]), t, cache, method="step")
    np.testing.assert_allclose(logits, full[:, t], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_ranking_equals_a_forward_pass_per_candidate(models):
  _, model, params = models
  inputs = _inputs()
  # three candidates of different lengths (EOS = 1 at the end, -100 padding), different per sample
  rng = np.random.default_rng(0)
  cands = np.full((3, 3, 4), -100, np.int32)
  for i in range(3):
    for j, n in enumerate((2, 4, 3)):
      cands[i, j, :n] = np.append(rng.integers(2, 98, n - 1), 1)
  forward = jax.jit(lambda one, dec: model.apply({"params": params}, **one, decoder_input_ids=dec))
  for normalize in (False, True):
    scores, order = iblip_jax.rank(model, params, **inputs, candidate_labels=cands, normalize=normalize)
    for i in range(3):
      for j in range(3):
        labels = cands[i, j][cands[i, j] != -100]
        dec = np.concatenate([[0], labels[:-1]])[None]
        one = {k: v[i:i + 1] for k, v in inputs.items()}
        logits = forward(one, dec)[0]
        logp = jax.nn.log_softmax(logits, axis=-1)[np.arange(len(labels)), labels]
        want = float(logp.sum() / (len(labels) if normalize else 1))
        assert float(scores[i, j]) == pytest.approx(want, rel=1e-5, abs=1e-5)
      np.testing.assert_array_equal(order[i], np.argsort(-np.asarray(scores[i]), kind="stable"))


def test_video_frames_are_encoded_independently_and_concatenated(models):
  _, model, params = models
  b = oracle.tiny_batch(seed=4)
  frames = np.stack([b["pixel_values"], b["pixel_values"][::-1], b["pixel_values"] * 0.5, -b["pixel_values"]], 1)
  video = model.apply({"params": params}, frames, b["qformer_input_ids"], b["qformer_attention_mask"],
                      method="visual_tokens")
  per_frame = [model.apply({"params": params}, frames[:, j], b["qformer_input_ids"], b["qformer_attention_mask"],
                           method="visual_tokens") for j in range(4)]
  assert video.shape == (3, 4 * oracle.NUM_QUERY, 32)
  np.testing.assert_allclose(video, np.concatenate(per_frame, axis=1), atol=1e-5)
  tokens = iblip_jax.generate(model, params, pixel_values=frames, **{k: v for k, v in _inputs().items()
                                                                   if k != "pixel_values"},
                              num_beams=2, max_new_tokens=4)
  assert tokens.shape == (3, 4)


@pytest.mark.slow
def test_generation_on_a_sharded_mesh_matches_one_device(models):
  from iblip_jax import sharding
  from iblip_jax.run import settings
  _, model, params = models
  batch = {k: np.concatenate([v, v[:1]]) for k, v in _inputs().items()}  # 4 rows over data x fsdp = 4
  want = iblip_jax.generate(model, params, **batch, num_beams=3, max_new_tokens=6)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  rules = list(settings.SHARDING_RULES)
  sh = sharding.logical_shardings(iblip_jax.params_shape(model, boxed=True), mesh, rules)
  sharded = jax.device_put(params, sh)
  with sharding.context(mesh, rules):
    got = iblip_jax.generate(model, sharded, **sharding.global_batch(batch, mesh), num_beams=3, max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
