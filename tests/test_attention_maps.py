"""Attention maps on a tiny model: the explicit cross-attention path computes what the fused kernel computes, maps have
their shapes and sum to 1, depend on the instruction, the probabilities, their gradient and the relevance equal
transformers' (PyTorch autograd on the same checkpoint), and the gradient equals finite differences."""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import iblip_jax
import oracle
from iblip_jax import attention_maps
from iblip_jax.data import tokenize
from iblip_jax.demo import word_tokenizers

WORDS = "what color is the cat dog red blue a picture of where left right sky".split()
PROMPTS = ["what color is the cat", "where is the dog"]
ANSWERS = ["red", "left of the sky"]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """transformers' model and the directory it was saved to (with word-level tokenizers)."""
  path = tmp_path_factory.mktemp("maps") / "hf"
  model = oracle.tiny_hf_model(seed=1)
  model.save_pretrained(path)
  word_tokenizers.build(WORDS, str(path))
  return model, path


@pytest.fixture(scope="module")
def setup(hf):
  path = hf[1]
  model, params = iblip_jax.from_pretrained(str(path))
  pixels = np.repeat(oracle.tiny_batch(seed=1, batch=1)["pixel_values"], 2, axis=0)
  return model, params, tokenize.load_tokenizers(str(path)), pixels


def test_explicit_path_only_on_request_and_equal_to_the_fused_kernel(setup):
  model, params, _, pixels = setup
  b = oracle.tiny_batch(seed=1)
  args = (b["pixel_values"], b["qformer_input_ids"], b["qformer_attention_mask"])
  fused = jax.jit(lambda p: model.apply({"params": p}, *args, method="image_features"))(params)["query_output"]
  explicit, state = jax.jit(lambda p: model.apply({"params": p}, *args, method="image_features",
                                                  mutable=["intermediates"]))(params)
  np.testing.assert_allclose(explicit["query_output"], fused, atol=2e-6, rtol=0)
  cross = attention_maps.cross_attention_layers(model)
  assert cross == (0, 2)   # cross_attention_frequency=2 over 3 layers
  assert sorted(state["intermediates"]["qformer"]) == [f"layer_{i}" for i in cross]
  # init is unchanged: parameters only, no perturbations or intermediates
  inputs = iblip_jax.models.instructblip.dummy_inputs(model.config)
  init = jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs))
  assert set(init) == {"params"}


def test_shapes_sums_and_instruction_dependence(setup):
  model, params, tok, pixels = setup
  maps = attention_maps.compute(model, params, tok, pixels, PROMPTS, ANSWERS)
  q, cfg = model.config.num_query_tokens, model.config.qformer
  side = model.config.vision.image_size // model.config.vision.patch_size
  for m in maps:
    assert m.probs.shape == m.grad.shape == (2, cfg.num_attention_heads, q, 1 + side * side)
    assert m.grid == (side, side) and m.layers == (0, 2)
    np.testing.assert_allclose(m.probs.sum(-1), 1.0, atol=1e-5)   # over the image tokens ([CLS] + patches)
    assert m.mean.shape == m.relevance.shape == (side, side)
    assert m.per_query.shape == (q, side, side) and m.per_layer.shape == (2, side, side)
    np.testing.assert_allclose(m.mean.sum() + m.cls, 1.0, atol=1e-5)
    assert (m.relevance >= 0).all() and m.relevance.max() > 0
  # the same image under two instructions: the Q-Former's queries look elsewhere
  uniform = 1 / maps[0].probs.shape[-1]
  # layer 0 too (through the self-attention before it; less so with random weights), far above float noise (~1e-9)
  for layer, share in ((0, 0.01), (1, 0.05)):
    assert np.abs(maps[0].probs[layer] - maps[1].probs[layer]).max() > share * uniform
  assert np.abs(maps[0].mean - maps[1].mean).max() > 0.01 * uniform
  assert np.abs(maps[0].relevance - maps[1].relevance).max() > 0.1 * maps[0].relevance.max()


def _hf_maps(hf, batch: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
  """transformers' cross-attention probabilities (B, L, H, Q, N) as its eager attention returns them (the tensor
  multiplied into the values), their gradient by autograd of the sum of the items' answer log-likelihoods (teacher
  forced, -100 labels left out), the log-likelihoods (B,) and the cross-attention layers' indices."""
  layers = [i for i, layer in enumerate(hf.qformer.encoder.layer) if layer.has_cross_attention]
  probs = []
  hooks = [hf.qformer.encoder.layer[i].crossattention.attention.register_forward_hook(
      lambda module, args, out: probs.append(out[1])) for i in layers]
  try:
    out = hf(**oracle.hf_inputs({k: v if v.dtype == np.float32 else v.astype(np.int64) for k, v in batch.items()}))
  finally:
    for hook in hooks:
      hook.remove()
  for p in probs:
    p.retain_grad()
  labels = torch.from_numpy(batch["labels"]).long()
  token_logp = torch.log_softmax(out.logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
  loglik = torch.where(labels != -100, token_logp, 0.0).sum(-1)
  loglik.sum().backward()   # items are independent: each probability's gradient is its own item's
  return (torch.stack(probs, 1).detach().numpy(), torch.stack([p.grad for p in probs], 1).numpy(),
          loglik.detach().numpy(), tuple(layers))


def test_probabilities_gradient_and_relevance_equal_transformers(hf, setup):
  """probs, d log p(answer) / d probs and the relevance map against transformers' PyTorch model on the checkpoint the
  JAX model was loaded from: its eager cross-attention weights (a forward hook), their gradient by autograd, and the
  relevance computed from them (mean over layers, heads and queries of max(probs * grad, 0), patches only)."""
  model, params, tok, pixels = setup
  maps = attention_maps.compute(model, params, tok, pixels, PROMPTS, ANSWERS)
  batch = dict(pixel_values=pixels, **tokenize.encode_training(tok, PROMPTS, ANSWERS))
  probs, grad, loglik, layers = _hf_maps(hf[0], batch)
  side = model.config.vision.image_size // model.config.vision.patch_size
  for i, m in enumerate(maps):
    assert m.layers == layers
    np.testing.assert_allclose(m.logprob, loglik[i], rtol=1e-5)
    np.testing.assert_allclose(m.probs, probs[i], rtol=0, atol=1e-6)
    # tolerances scaled to each array: the gradient is ~1e-2, the relevance ~1e-5
    np.testing.assert_allclose(m.grad, grad[i], rtol=0, atol=1e-4 * np.abs(grad[i]).max())
    relevance = np.maximum(probs[i] * grad[i], 0)[..., 1:].mean(axis=(0, 1, 2)).reshape(side, side)
    assert relevance.max() > 0 and (probs[i] * grad[i] < 0).mean() > 0.1   # the positive part is a real choice
    np.testing.assert_allclose(m.relevance, relevance, rtol=0, atol=1e-4 * relevance.max())


def test_gradient_equals_finite_differences(setup):
  """d log p(answer) / d probs, along random directions, against central differences of the log-likelihood with
  the probabilities perturbed by the same mechanism (Flax perturbations, passed as values)."""
  model, params, tok, pixels = setup
  maps = attention_maps.compute(model, params, tok, pixels[:1], PROMPTS[:1], ANSWERS[:1])[0]
  batch = dict(pixel_values=pixels[:1], **tokenize.encode_training(tok, PROMPTS[:1], ANSWERS[:1]))
  layers = maps.layers

  @jax.jit
  def loglik(eps, direction):
    perturbations = {"qformer": {f"layer_{i}": {"crossattention": {"attention_probs": eps * direction[j][None]}}
                                 for j, i in enumerate(layers)}}
    logits, _ = attention_maps._apply(model, params, perturbations, batch)
    return iblip_jax.losses.sequence_scores(logits, batch["labels"])[0]

  rng = np.random.default_rng(0)
  assert np.isclose(float(loglik(0.0, jnp.zeros_like(maps.probs))), maps.logprob, rtol=1e-5)
  for trial in range(3):
    direction = rng.standard_normal(maps.probs.shape).astype(np.float32)
    if trial == 2:   # concentrated on the patches the relevance map ranks highest
      direction = direction * (maps.probs * maps.grad > np.quantile(maps.probs * maps.grad, 0.9))
    direction /= np.linalg.norm(direction)
    eps = 1e-2
    fd = (float(loglik(eps, direction)) - float(loglik(-eps, direction))) / (2 * eps)
    analytic = float((maps.grad * direction).sum())
    assert abs(fd - analytic) <= 2e-3 * max(1.0, abs(analytic)), (trial, fd, analytic)


def test_render_draws_one_column_per_instruction(setup):
  model, params, tok, pixels = setup
  maps = attention_maps.compute(model, params, tok, pixels, PROMPTS, ANSWERS)
  image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
  one = Image.open(io.BytesIO(attention_maps.render(image, maps[:1])))
  two = Image.open(io.BytesIO(attention_maps.render(image, maps, per_layer=True)))
  assert one.format == two.format == "PNG"
  assert two.width > 1.6 * one.width and two.height > 1.6 * one.height   # 2 columns; 4 rows instead of 2


def test_blip2_ablation_is_refused(setup, tmp_path):
  model, params, tok, pixels = setup
  blip2 = model.clone(config=model.config.replace(instruction_aware=False))
  with pytest.raises(ValueError, match="instruction_aware=False"):
    attention_maps.compute(blip2, params, tok, pixels, PROMPTS, ANSWERS)
