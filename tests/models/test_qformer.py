"""The Q-Former's instruction handling: padding, instruction-awareness and the BLIP-2 ablation."""
import numpy as np
import torch

import iblip_jax
import oracle


def _load(tmp_path):
  hf = oracle.tiny_hf_model()
  hf.save_pretrained(tmp_path / "hf")
  return hf, iblip_jax.from_pretrained(str(tmp_path / "hf"))


def test_extra_padding_leaves_queries_unchanged(tmp_path):
  _, (model, params) = _load(tmp_path)
  b = oracle.tiny_batch()
  pad = 9
  ids = np.concatenate([b["qformer_input_ids"], np.zeros((3, pad), np.int64)], 1)
  mask = np.concatenate([b["qformer_attention_mask"], np.zeros((3, pad), np.int64)], 1)
  # different garbage under the padding must not matter either
  ids_noise = ids.copy()
  ids_noise[:, -pad:] = 17
  short = model.apply({"params": params}, b["pixel_values"], b["qformer_input_ids"], b["qformer_attention_mask"],
                      method="image_features")["query_output"]
  for padded_ids in (ids, ids_noise):
    long = model.apply({"params": params}, b["pixel_values"], padded_ids, mask, method="image_features")
    np.testing.assert_allclose(long["query_output"], short, atol=1e-5, rtol=0)


def test_instruction_changes_the_visual_features(tmp_path):
  _, (model, params) = _load(tmp_path)
  b = oracle.tiny_batch()
  other = (b["qformer_input_ids"] + 5) % 99 * b["qformer_attention_mask"]
  f = lambda ids: model.apply({"params": params}, b["pixel_values"], ids, b["qformer_attention_mask"],
                              method="image_features")["query_output"]
  assert np.abs(np.asarray(f(b["qformer_input_ids"])) - np.asarray(f(other))).max() > 1e-2


def test_blip2_ablation_matches_queries_only_qformer(tmp_path):
  """instruction_aware=False: the Q-Former sees only the queries, as transformers' Q-Former without input_ids."""
  hf, _ = _load(tmp_path)
  model, params = iblip_jax.from_pretrained(str(tmp_path / "hf"), instruction_aware=False)
  assert "word_embeddings" not in params["qformer"]
  b = oracle.tiny_batch()
  got = model.apply({"params": params}, b["pixel_values"], b["qformer_input_ids"], b["qformer_attention_mask"],
                    method="image_features")["query_output"]
  with torch.no_grad():
    image = hf.vision_model(torch.from_numpy(b["pixel_values"]).permute(0, 3, 1, 2)).last_hidden_state
    queries = hf.query_tokens.expand(3, -1, -1)
    want = hf.qformer(input_ids=None, query_embeds=queries, encoder_hidden_states=image).last_hidden_state
  np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
