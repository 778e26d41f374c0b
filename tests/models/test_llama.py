"""Decoder-only InstructBLIP (LLaMA / Vicuna) against transformers' PyTorch implementation, fp32, re-randomised."""
import jax
import numpy as np
import pytest

import iblip_jax
import oracle

TOL = 1e-4

CONFIGS = {
    "gqa": dict(kv_heads=2),
    "mha": dict(kv_heads=4),
    "mqa_linear_rope": dict(kv_heads=1, rope={"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0}),
}


def _load(tmp_path, **kw):
  hf = oracle.tiny_hf_model(llama=True, **kw)
  hf.save_pretrained(tmp_path / "hf")
  model, params = iblip_jax.from_pretrained(str(tmp_path / "hf"))
  return hf, model, params


def _prompt_batch():
  """[prompt][target] as training feeds them: real tokens first, padding on the right."""
  batch = oracle.tiny_batch()
  return {k: v for k, v in batch.items() if not k.startswith("decoder")}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
  hf, model, params = _load(tmp_path, **CONFIGS[name])
  assert model.config.decoder_only and model.config.text.kv_heads == CONFIGS[name]["kv_heads"]
  batch = _prompt_batch()
  want = oracle.hf_forward(hf, batch).logits.numpy()
  got = np.asarray(model.apply({"params": params}, **batch))
  assert got.shape == want.shape == (3, oracle.NUM_QUERY + 6, 99)
  real = np.concatenate([np.ones((3, oracle.NUM_QUERY)), batch["attention_mask"]], 1).astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=0)


def test_config_read_from_checkpoint(tmp_path):
  _, model, _ = _load(tmp_path, **CONFIGS["mqa_linear_rope"])
  t = model.config.text
  assert (t.num_key_value_heads, t.rope_type, t.rope_factor, t.rope_theta) == (1, "linear", 2.0, 10000.0)
  assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (1, 2, 0)


def test_export_round_trip(tmp_path):
  """save_pretrained -> transformers loads it and computes the same logits; our reload is bit-identical."""
  from transformers import InstructBlipForConditionalGeneration
  _, model, params = _load(tmp_path, **CONFIGS["gqa"])
  iblip_jax.save_pretrained(model, params, str(tmp_path / "out"))
  again, params2 = iblip_jax.from_pretrained(str(tmp_path / "out"))
  assert again.config == model.config
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
    np.testing.assert_array_equal(a, b)
  hf = InstructBlipForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
  hf.set_attn_implementation("eager")
  batch = _prompt_batch()
  want = oracle.hf_forward(hf, batch).logits.numpy()
  got = np.asarray(model.apply({"params": params}, **batch))
  real = np.concatenate([np.ones((3, oracle.NUM_QUERY)), batch["attention_mask"]], 1).astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=0)
