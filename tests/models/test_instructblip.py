"""Whole-model parity with transformers' PyTorch InstructBLIP (T5), fp32, re-randomised weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iblip_jax
import oracle

TOL = 1e-4

CONFIGS = {
    "tied_freq2": dict(tie=True, cross_attention_frequency=2),
    "untied_freq1": dict(tie=False, untie_head=True, cross_attention_frequency=1),
    "deeper_decoder": dict(tie=False, untie_head=True, num_decoder_layers=3),
    "tanh_gelu": dict(tie=True, dense_act_fn="gelu_new"),
}


def _load(tmp_path, **kw):
  hf = oracle.tiny_hf_model(**kw)
  hf.save_pretrained(tmp_path / "hf")
  model, params = iblip_jax.from_pretrained(str(tmp_path / "hf"))
  return hf, model, params


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_transformers(tmp_path, name):
  hf, model, params = _load(tmp_path, **CONFIGS[name])
  batch = oracle.tiny_batch()
  want = oracle.hf_forward(hf, batch)
  feats = model.apply({"params": params}, batch["pixel_values"], batch["qformer_input_ids"],
                      batch["qformer_attention_mask"], method="image_features")
  np.testing.assert_allclose(feats["image_embeds"], want.vision_outputs.last_hidden_state.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(feats["query_output"],
                             want.qformer_outputs.last_hidden_state[:, :oracle.NUM_QUERY].numpy(), atol=TOL, rtol=0)
  logits = model.apply({"params": params}, **batch)
  assert logits.shape == want.logits.shape
  np.testing.assert_allclose(logits, want.logits.numpy(), atol=TOL, rtol=0)


def test_config_read_from_checkpoint(tmp_path):
  _, model, _ = _load(tmp_path, **CONFIGS["untied_freq1"])
  cfg = model.config
  assert (cfg.qformer.cross_attention_frequency, cfg.num_query_tokens, cfg.text.tie_word_embeddings) == (1, 10, False)
  assert cfg.text.dense_act_fn == "gelu" and cfg.image_token_index == oracle.IMAGE_TOKEN


@pytest.mark.slow
def test_dropout_only_in_training_mode(tmp_path):
  _, model, params = _load(tmp_path)
  batch = oracle.tiny_batch()
  eval_logits = model.apply({"params": params}, **batch)
  train = lambda seed: model.apply({"params": params}, **batch, deterministic=False,
                                   rngs={"dropout": jax.random.key(seed)})
  assert not np.allclose(train(0), eval_logits, atol=1e-3)  # dropout 0.1 in the Q-Former and T5 is applied
  np.testing.assert_array_equal(train(0), train(0))          # and reproducible from the rng
  no_dropout = model.clone(config=model.config.replace(
      qformer=model.config.qformer.__class__(**{**model.config.qformer.__dict__, "hidden_dropout_prob": 0.0,
                                                 "attention_probs_dropout_prob": 0.0}),
      text=model.config.text.__class__(**{**model.config.text.__dict__, "dropout_rate": 0.0})))
  np.testing.assert_allclose(no_dropout.apply({"params": params}, **batch, deterministic=False,
                                              rngs={"dropout": jax.random.key(0)}), eval_logits, atol=1e-6)


def test_bfloat16_towers_stay_close(tmp_path):
  """dtype=bfloat16 stores and runs the frozen towers in bf16; the Q-Former side stays f32."""
  hf = oracle.tiny_hf_model()
  hf.save_pretrained(tmp_path / "hf")
  model, params = iblip_jax.from_pretrained(str(tmp_path / "hf"), dtype=jnp.bfloat16)
  assert params["vision"]["layers"]["fc1"]["weight"].dtype == jnp.bfloat16
  assert params["language_model"]["shared"]["embedding"].dtype == jnp.bfloat16
  assert params["qformer"]["embed_ln"]["scale"].dtype == jnp.float32
  batch = oracle.tiny_batch()
  want = oracle.hf_forward(hf, batch).logits.numpy()
  got = np.asarray(model.apply({"params": params}, **batch), np.float32)
  assert np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_one_image_asked_several_prompts_equals_the_image_repeated(tmp_path):
  """Bulk annotation's layout (models/instructblip._per_row): N images and K consecutive prompts each give the same
  logits as the N x K batch with each image repeated, for an instruction-aware and a plain Q-Former."""
  hf, model, params = _load(tmp_path, **CONFIGS["tied_freq2"])
  two = oracle.tiny_batch(seed=0), oracle.tiny_batch(seed=1)
  batch = {k: np.concatenate([two[0][k], two[1][k]]) for k in two[0]}   # 6 rows
  grouped = {**batch, "pixel_values": batch["pixel_values"][::2]}   # rows 0, 1 ask image 0; rows 2, 3 image 2 ...
  repeated = {**batch, "pixel_values": np.repeat(grouped["pixel_values"], 2, axis=0)}
  assert not np.array_equal(repeated["pixel_values"], batch["pixel_values"])
  for m in (model, model.clone(config=model.config.replace(instruction_aware=False))):
    want = m.apply({"params": params}, **repeated)
    np.testing.assert_allclose(m.apply({"params": params}, **grouped), want, atol=1e-6, rtol=0)
  with pytest.raises(ValueError, match="4 images for 6 prompts"):
    model.apply({"params": params}, **{**batch, "pixel_values": batch["pixel_values"][:4]})
