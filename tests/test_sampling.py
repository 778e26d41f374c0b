"""Sampling against independent oracles: transformers' logits processors on the same scores, hand-computed
distributions and transformers' own first-step logits (chi-square), greedy generation (top-k 1, temperature -> 0),
teacher-forced scores (the sequence log-probabilities), and the streamed steps against the plain call."""
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as lp

import iblip_jax
import oracle
from iblip_jax import sampling

INPUT_KEYS = ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask")


def _inputs(batch: int = 3, seed: int = 0) -> dict:
  b = oracle.tiny_batch(seed=seed, batch=batch)
  return {k: b[k] for k in INPUT_KEYS}


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
  path = tmp_path_factory.mktemp("sampling") / "t5"
  hf = oracle.tiny_hf_model(seed=3)
  hf.save_pretrained(path)
  return (hf,) + iblip_jax.from_pretrained(str(path))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  path = tmp_path_factory.mktemp("sampling") / "llama"
  oracle.tiny_hf_model(seed=4, llama=True).save_pretrained(path)
  return iblip_jax.from_pretrained(str(path))


def _chi2_bound(dof: int, z: float = 3.09) -> float:
  """The chi-square distribution's upper 0.1% point (z = 3.09), by the Wilson-Hilferty approximation."""
  return dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3


def _chi2(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> tuple[float, int]:
  """Pearson's statistic and degrees of freedom; bins expected below min_expected are pooled into one."""
  expected = probs * counts.sum()
  small = expected < min_expected
  obs = np.append(counts[~small], counts[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  keep = exp > 0
  return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


# --- processors: each equals transformers' on the same scores ------------------------------------------------------


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8), (0.5, 5, 0.3),
                                                       (2.0, 1, 0.95), (1.0, 60, 0.5)])
def test_processors_equal_transformers(temperature, top_k, top_p):
  rng = np.random.default_rng(0)
  b, v, eos, min_new = 4, 50, 1, 3
  logits = (rng.standard_normal((b, v)) * 3).astype(np.float32)
  prompt = rng.integers(0, v, (b, 4))
  generated = rng.integers(0, v, (b, 2))   # 2 new tokens: EOS still blocked by min_new_tokens=3
  input_ids = np.concatenate([prompt, generated], axis=1)
  seen = np.zeros((b, v), bool)
  np.put_along_axis(seen, input_ids, True, axis=1)
  processors = [lp.RepetitionPenaltyLogitsProcessor(1.3),
                lp.MinNewTokensLengthLogitsProcessor(prompt.shape[1], min_new, eos),
                lp.TemperatureLogitsWarper(temperature)]
  processors += [lp.TopKLogitsWarper(top_k)] if top_k else []
  processors += [lp.TopPLogitsWarper(top_p)] if top_p < 1 else []
  theirs = lp.LogitsProcessorList(processors)(torch.from_numpy(input_ids), torch.from_numpy(logits)).numpy()
  ours = sampling.block_eos(sampling.repetition_penalty(logits, seen, np.float32(1.3)), generated.shape[1],
                            np.int32(min_new), eos)
  ours = np.asarray(sampling.warp(ours, np.float32(temperature), np.int32(top_k), np.float32(top_p)))
  np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
  finite = np.isfinite(theirs)
  np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6)
  assert np.isneginf(ours[:, eos]).all()


def test_top_k_and_top_p_alone_equal_transformers():
  scores = torch.randn(6, 200, generator=torch.Generator().manual_seed(1)) * 2
  for k in (1, 7, 200, 500):
    theirs = lp.TopKLogitsWarper(k)(None, scores.clone()).numpy()
    np.testing.assert_array_equal(np.asarray(sampling.top_k_filter(scores.numpy(), np.int32(k))), theirs)
  for p in (0.01, 0.5, 0.9, 0.999):
    theirs = lp.TopPLogitsWarper(p)(None, scores.clone()).numpy()
    np.testing.assert_array_equal(np.asarray(sampling.top_p_filter(scores.numpy(), np.float32(p))), theirs)
  np.testing.assert_array_equal(np.asarray(sampling.top_p_filter(scores.numpy(), np.float32(1.0))), scores.numpy())


# --- draws follow the distribution ---------------------------------------------------------------------------------


def _hand_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
  """The warped distribution computed by hand, in float64."""
  x = logits.astype(np.float64) / temperature
  if top_k:
    x = np.where(x < np.sort(x)[-top_k], -np.inf, x)
  p = np.exp(x - x.max())
  p /= p.sum()
  order = np.argsort(p)[::-1]              # most likely first: keep the smallest set reaching top_p
  keep = np.cumsum(p[order]) - p[order] < top_p
  mask = np.zeros_like(p, bool)
  mask[order[keep]] = True
  p = np.where(mask, p, 0)
  return p / p.sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.6, 4, 1.0), (1.5, 0, 0.7)])
def test_draw_frequencies_match_the_distribution(temperature, top_k, top_p):
  import jax
  logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)
  n = 20000
  scores = np.broadcast_to(logits, (n, logits.size))
  keys = jax.random.split(jax.random.key(7), n)
  draws = np.asarray(sampling.draw(keys, sampling.warp(scores, np.float32(temperature), np.int32(top_k),
                                                       np.float32(top_p))))
  want = _hand_distribution(logits, temperature, top_k, top_p)
  counts = np.bincount(draws, minlength=logits.size)
  assert counts[want == 0].sum() == 0          # filtered tokens are never drawn
  stat, dof = _chi2(counts[want > 0], want[want > 0])
  assert stat < _chi2_bound(dof), (counts, want * n)


def test_model_samples_follow_transformers_first_step_distribution(t5):
  """The first sampled token of the tiny model, 4000 times at temperature 0.05, against the softmax of transformers'
  first-step logits over 0.05 (an independent implementation of the whole model). The tiny model's logits span only
  ~0.5, so at temperature 1 its distribution is nearly uniform and a wrong temperature goes unseen; at 0.05 the top
  token has p ~0.6 and a 15% temperature error (either way) gives an expected statistic of 300-400 against a bound
  of ~80 (44 dof)."""
  hf, model, params = t5
  temperature = 0.05
  batch = oracle.tiny_batch(seed=2, batch=1)
  dec = dict(batch, decoder_input_ids=np.zeros((1, 1), np.int64), decoder_attention_mask=np.ones((1, 1), np.int64))
  logits = oracle.hf_forward(hf, dec).logits[0, 0].double()
  probs = torch.softmax(logits / temperature, -1).numpy()
  assert probs.max() > 0.5 > np.sort(probs)[-2]   # peaked: the temperature shapes it
  s = sampling.sample(model, params, **{k: batch[k] for k in INPUT_KEYS}, max_new_tokens=1, min_new_tokens=0,
                      temperature=temperature, top_k=0, num_return_sequences=4000, seed=11)
  counts = np.bincount(s.tokens[:, 0], minlength=probs.size)
  stat, dof = _chi2(counts, probs)
  assert dof > 30 and stat < _chi2_bound(dof), (stat, dof)
  # each row's log-probability is its token's under the model itself (the raw logits, not the tempered ones)
  np.testing.assert_allclose(s.logprob, torch.log_softmax(logits, -1).numpy()[s.tokens[:, 0]], rtol=1e-4)


# --- greedy limits, seeds, streaming, scores -----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["t5", "llama"])
def test_top_k_1_and_tiny_temperature_equal_greedy(which, request):
  fixture = request.getfixturevalue(which)
  model, params = fixture[-2:]
  inputs = _inputs()
  settings = dict(max_new_tokens=10, min_new_tokens=2, repetition_penalty=1.4)
  greedy = np.asarray(iblip_jax.generate(model, params, **inputs, num_beams=1, **settings))
  top1 = sampling.sample(model, params, **inputs, top_k=1, temperature=1.7, seed=5, **settings)
  cold = sampling.sample(model, params, **inputs, top_k=0, temperature=1e-4, seed=6, **settings)
  argmax = sampling.sample(model, params, **inputs, greedy=True, width=16, **settings)
  for s in (top1, cold, argmax):
    np.testing.assert_array_equal(s.tokens, greedy)


def test_seed_reproduces_and_items_do_not_depend_on_their_batch(t5):
  _, model, params = t5
  inputs = _inputs()
  settings = dict(max_new_tokens=8, temperature=1.5, top_k=0, num_return_sequences=2)
  a = sampling.sample(model, params, **inputs, seed=3, **settings)
  b = sampling.sample(model, params, **inputs, seed=3, **settings)
  c = sampling.sample(model, params, **inputs, seed=4, **settings)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (a.tokens != c.tokens).any()
  assert (a.tokens[0] != a.tokens[1]).any()   # an item's samples differ from each other
  alone = sampling.sample(model, params, **{k: v[1:2] for k, v in inputs.items()}, seed=3, width=16, **settings)
  np.testing.assert_array_equal(alone.tokens, a.tokens[2:4])
  np.testing.assert_allclose(alone.logprob, a.logprob[2:4], rtol=1e-5)


def test_logprob_is_the_teacher_forced_sequence_score(llama):
  model, params = llama
  inputs = _inputs()
  s = sampling.sample(model, params, **inputs, max_new_tokens=6, temperature=1.2, seed=9, num_return_sequences=2)
  labels = np.where(np.arange(6)[None] < s.length[:, None], s.tokens, -100).reshape(3, 2, 6)
  scores, _ = iblip_jax.rank(model, params, **inputs, candidate_labels=labels)
  np.testing.assert_allclose(s.logprob, np.asarray(scores).reshape(-1), rtol=1e-4, atol=1e-4)


def test_stream_yields_the_steps_of_the_plain_call(t5):
  _, model, params = t5
  inputs = _inputs()
  settings = dict(max_new_tokens=9, temperature=1.1, top_p=0.9, seed=2)
  plain = sampling.sample(model, params, **inputs, **settings)
  sampling.precompile(model, params, inputs, streamed=True, **settings)   # as the engine does: here, not in the thread
  steps = list(sampling.stream(lambda on_token: sampling.sample(model, params, **inputs, on_token=on_token,
                                                                **settings)))
  final = steps.pop()
  np.testing.assert_array_equal(final.tokens, plain.tokens)
  assert [t for t, _, _ in steps] == list(range(len(steps)))
  streamed = np.stack([tokens for _, tokens, _ in steps], axis=1)
  np.testing.assert_array_equal(streamed, plain.tokens[:, :len(steps)])
  for _, tokens, finished in steps:   # a row reports padding once it has finished
    assert (tokens[finished] == model.config.text.pad_token_id).all()


def test_best_of_keeps_the_highest_scoring_samples():
  tokens = np.arange(24).reshape(6, 4)
  # item 1: totals -5, -4, -8 over 2, 1, 4 tokens; each length penalty puts another sample first
  s = sampling.Samples(tokens, np.array([-3.0, -1.0, -2.0, -5.0, -4.0, -8.0]), np.array([1, 1, 1, 2, 1, 4]))
  normalised = sampling.best_of(s, 3, 3, length_penalty=1.0)   # means -2.5, -4, -2: the highest first
  np.testing.assert_array_equal(normalised.tokens, tokens[[1, 2, 0, 5, 3, 4]])
  np.testing.assert_array_equal(normalised.logprob, s.logprob[[1, 2, 0, 5, 3, 4]])
  np.testing.assert_array_equal(normalised.length, s.length[[1, 2, 0, 5, 3, 4]])
  raw = sampling.best_of(s, 3, 3, length_penalty=0.0)          # no normalisation: the highest total first
  np.testing.assert_array_equal(raw.tokens, tokens[[1, 2, 0, 4, 3, 5]])
  half = sampling.best_of(s, 3, 1, length_penalty=0.5)         # -5 / 2**0.5 = -3.54 beats -4 and -8 / 4**0.5
  np.testing.assert_array_equal(half.tokens, tokens[[1, 3]])


def test_settings_out_of_range_are_named(t5):
  _, model, params = t5
  for bad, match in ((dict(temperature=0.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k"),
                     (dict(max_new_tokens=0), "max_new_tokens"), (dict(width=4, max_new_tokens=8), "width")):
    with pytest.raises(ValueError, match=match):
      sampling.sample(model, params, **_inputs(), **bad)
