"""The optimizer: LAVIS's schedule and weight-decay groups, checked by hand."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from iblip_jax import config_lib, optim


def test_schedule_warmup_then_cosine_to_zero():
  lr = optim.learning_rate(config_lib.optim(), total_steps=10_000)
  assert float(lr(0)) == pytest.approx(1e-8)
  assert float(lr(500)) == pytest.approx(1e-8 + (1e-5 - 1e-8) * 0.5, rel=1e-5)
  assert float(lr(1000)) == pytest.approx(1e-5, rel=1e-6)
  # cosine over the remaining 9,000 steps
  assert float(lr(5500)) == pytest.approx(1e-5 * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-4)
  assert float(lr(10_000)) == pytest.approx(0.0, abs=1e-12)


def test_lavis_schedule_is_a_staircase():
  """LAVIS's runner: warmup inside inner epoch 0 (then flat at lr), then one cosine value per inner epoch.
  Hand-computed for lr 1e-5, warmup 1e-8 over 1,000 steps, 60K steps in inner epochs of 3K (K = 20)."""
  c = config_lib.optim()
  c.schedule, c.inner_epoch_steps = "lavis", 3000
  lr = optim.learning_rate(c, total_steps=60_000)
  assert float(lr(0)) == pytest.approx(1e-8)
  assert float(lr(500)) == pytest.approx(1e-8 + (1e-5 - 1e-8) * 500 / 1000, rel=1e-5)
  assert float(lr(1000)) == pytest.approx(1e-5, rel=1e-6)
  assert float(lr(2999)) == pytest.approx(1e-5, rel=1e-6)          # no decay inside epoch 0 after warmup
  step_1 = 1e-5 * 0.5 * (1 + math.cos(math.pi * 1 / 20))
  assert float(lr(3000)) == pytest.approx(step_1, rel=1e-5)
  assert float(lr(5999)) == pytest.approx(step_1, rel=1e-5)        # constant through inner epoch 1
  assert float(lr(30_000)) == pytest.approx(1e-5 * 0.5, rel=1e-5)  # epoch 10 of 20: cos(pi/2) = 0
  assert float(lr(59_999)) == pytest.approx(1e-5 * 0.5 * (1 + math.cos(math.pi * 19 / 20)), rel=1e-4)


def test_paper_recipe_uses_the_staircase():
  config = config_lib.paper_recipe(config_lib.base({}), batch_size=8)
  assert (config.optim.schedule, config.optim.inner_epoch_steps) == ("lavis", config_lib.PAPER_EVAL_EVERY)


def test_no_weight_decay_for_biases_and_vectors():
  params = {"qformer": {"layer_0": {"attention": {"query": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
                                                  "output_ln": {"scale": jnp.ones(4), "bias": jnp.ones(4)}}}},
            "query_tokens": jnp.ones((1, 3, 4)),
            "vision": {"layers": {"layer_norm1": {"scale": jnp.ones((2, 4))}, "fc1": {"kernel": jnp.ones((2, 4, 4))}}}}
  mask = optim.decay_mask(params)
  assert mask["qformer"]["layer_0"]["attention"]["query"] == {"kernel": True, "bias": False}
  assert mask["qformer"]["layer_0"]["attention"]["output_ln"] == {"scale": False, "bias": False}
  assert mask["query_tokens"] is True
  assert mask["vision"]["layers"] == {"layer_norm1": {"scale": False}, "fc1": {"kernel": True}}  # per layer


def test_one_adamw_step_by_hand():
  """First AdamW step: update = -lr * (g / (|g| + eps) + wd * w) for decayed weights, -lr * sign(g) for biases."""
  c = config_lib.optim()
  c.warmup_steps, c.warmup_lr, c.lr = 1, 1e-3, 1e-3
  tx = optim.make(c, total_steps=100)
  params = {"w": jnp.array([[1.0, -2.0]]), "bias": jnp.array([0.5])}
  grads = {"w": jnp.array([[0.1, -0.3]]), "bias": jnp.array([2.0])}
  updates, _ = tx.update(grads, tx.init(params), params)
  g = np.array([[0.1, -0.3]])
  np.testing.assert_allclose(updates["w"], -1e-3 * (g / (np.abs(g) + 1e-8) + 0.05 * np.array([[1.0, -2.0]])),
                             rtol=1e-5)
  np.testing.assert_allclose(updates["bias"], [-1e-3], rtol=1e-5)


def test_gradient_accumulation_applies_every_k_steps():
  c = config_lib.optim()
  c.warmup_steps, c.warmup_lr, c.lr, c.weight_decay = 1, 1.0, 1.0, 0.0
  c.grad_clip_norm, c.grad_accum_steps = 1.0, 2
  tx = optim.make(c, total_steps=100)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  u1, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
  np.testing.assert_array_equal(u1["w"], [0.0, 0.0])  # first micro-step: nothing applied yet
  u2, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
  np.testing.assert_allclose(u2["w"], [-1.0, -1.0], rtol=1e-5)  # Adam's first step is -lr * sign(g)
