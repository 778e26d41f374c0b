"""Decoder-only (LLaMA / Vicuna) generation against transformers' generate on left-padded batches, token for token."""
import numpy as np
import pytest
import torch

import iblip_jax
import oracle

EOS, PAD = 2, 0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  path = tmp_path_factory.mktemp("gen_llama") / "hf"
  hf = oracle.tiny_hf_model(seed=5, llama=True)
  # a sharper distribution with a likelier EOS, so that settings take different paths and some hypotheses end early
  with torch.no_grad():
    hf.language_model.lm_head.weight.mul_(8.0)
    hf.language_model.lm_head.weight[EOS].mul_(4.0)
  hf.save_pretrained(path)
  model, params = iblip_jax.from_pretrained(str(path))
  return hf, model, params


def _left_padded_inputs():
  """Prompts of 3, 6 and 5 tokens, padded on the left as transformers' processor pads for generation."""
  b = oracle.tiny_batch(seed=5)
  lengths = b["attention_mask"].sum(1)
  width = b["input_ids"].shape[1]
  mask = (np.arange(width)[None] >= (width - lengths)[:, None]).astype(np.int64)
  ids = np.zeros_like(b["input_ids"])
  for i, n in enumerate(lengths):
    ids[i, width - n:] = b["input_ids"][i, :n]
  return dict(pixel_values=b["pixel_values"], qformer_input_ids=b["qformer_input_ids"],
              qformer_attention_mask=b["qformer_attention_mask"], input_ids=ids, attention_mask=mask)


def _hf_generate(hf, batch, **kw):
  prompt = oracle.NUM_QUERY + batch["input_ids"].shape[1]
  return oracle.hf_generate(hf, batch, pad_token_id=PAD, eos_token_id=EOS, **kw)[:, prompt:]  # it returns the prompt too


@pytest.mark.parametrize("setting", oracle.DECODING_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_matches_transformers_generate(models, setting):
  hf, model, params = models
  batch = _left_padded_inputs()
  max_new = 12
  ours = iblip_jax.generate(model, params, **batch, max_new_tokens=max_new, **{"min_new_tokens": 0, **setting})
  theirs = _hf_generate(hf, batch, max_new_tokens=max_new, **setting)
  assert ours.shape == (3 * setting.get("num_return_sequences", 1), max_new)
  oracle.assert_same_tokens(ours, theirs, eos=EOS, pad=PAD)


def test_padding_side_does_not_matter(models):
  """Right-padded prompts (as the tokenizers produce) are left-aligned inside generate: same tokens."""
  _, model, params = models
  left = _left_padded_inputs()
  right = dict(left, **{k: v for k, v in oracle.tiny_batch(seed=5).items() if k in ("input_ids", "attention_mask")})
  for beams in (1, 3):
    np.testing.assert_array_equal(iblip_jax.generate(model, params, **left, num_beams=beams, max_new_tokens=8),
                                  iblip_jax.generate(model, params, **right, num_beams=beams, max_new_tokens=8))


def test_some_generations_stop_early(models):
  hf, _, _ = models
  theirs = _hf_generate(hf, _left_padded_inputs(), max_new_tokens=12, num_beams=1)
  assert (theirs == EOS).any(1).any() and not (theirs == EOS).any(1).all()


def test_ranking_equals_transformers_log_likelihoods(models):
  """Each candidate's summed log-probability equals transformers' on the unpadded [image][prompt][candidate]."""
  hf, model, params = models
  batch = oracle.tiny_batch(seed=6)
  inputs = {k: v for k, v in batch.items() if not k.startswith("decoder")}  # right-padded prompts
  rng = np.random.default_rng(0)
  cands = np.full((3, 3, 4), -100, np.int32)
  for i in range(3):
    for j, n in enumerate((1, 4, 3)):
      cands[i, j, :n] = rng.integers(3, 98, n)
  scores, order = iblip_jax.rank(model, params, **inputs, candidate_labels=cands)
  for i in range(3):
    prompt = inputs["input_ids"][i, :inputs["attention_mask"][i].sum()]
    for j in range(3):
      cand = cands[i, j][cands[i, j] != -100]
      ids = np.concatenate([np.full(oracle.NUM_QUERY, oracle.IMAGE_TOKEN), prompt, cand])[None]
      with torch.no_grad():
        logits = hf(pixel_values=torch.from_numpy(inputs["pixel_values"][i:i + 1]).permute(0, 3, 1, 2),
                    qformer_input_ids=torch.from_numpy(inputs["qformer_input_ids"][i:i + 1]),
                    qformer_attention_mask=torch.from_numpy(inputs["qformer_attention_mask"][i:i + 1]),
                    input_ids=torch.from_numpy(ids)).logits[0]
      logp = torch.log_softmax(logits, -1).numpy()
      start = ids.shape[1] - len(cand)
      want = sum(logp[start + t - 1, tok] for t, tok in enumerate(cand))
      assert float(scores[i, j]) == pytest.approx(float(want), rel=1e-5, abs=1e-4)
    np.testing.assert_array_equal(order[i], np.argsort(-np.asarray(scores[i]), kind="stable"))
