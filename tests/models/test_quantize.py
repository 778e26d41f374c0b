"""Weight-only int8 / int4 towers (models/quantize.py, layers.Dense): the integers and scales are the textbook
symmetric ones (numpy oracle), a quantised model computes exactly the float model with the weights rounded the same
way, quantising while loading equals quantising the loaded model, the error against float stays within stated bounds,
and LoRA over quantised towers (QLoRA) trains its adapters alone."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iblip_jax
import oracle
import train_helper
from iblip_jax import lora as lora_lib, train_step
from iblip_jax import trainable as trainable_lib
from iblip_jax.hf import names
from iblip_jax.models import configs as model_configs
from iblip_jax.models import quantize
from iblip_jax.models.instructblip import InstructBlip
from iblip_jax.run import settings

GROUP = 8   # small groups, so that int4's group-wise scales are exercised at the tiny widths (32 = 4 groups)


def _numpy_quantize(w: np.ndarray, mode: str, group: int):
  """The oracle: symmetric rounding of w (in, out), one scale per column (int8) or per column and group (int4)."""
  qmax = 127 if mode == "int8" else 7
  g = 1 if mode == "int8" or w.shape[0] % group or group >= w.shape[0] else w.shape[0] // group
  blocks = w.astype(np.float64).reshape(g, -1, w.shape[1])
  scale = np.abs(blocks).max(axis=1) / qmax
  scale[scale == 0] = 1
  q = np.clip(np.round(blocks / scale[:, None]), -qmax, qmax)
  return q.reshape(w.shape), scale


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_integers_and_scales_are_the_symmetric_ones(mode):
  w = np.random.default_rng(0).normal(0, 0.1, (32, 6)).astype(np.float32)
  w[:, 2] = 0   # an all-zero column
  q, scale = quantize.quantize(jnp.asarray(w), mode, GROUP)
  want_q, want_scale = _numpy_quantize(w, mode, GROUP)
  assert q.dtype == quantize.DTYPES[mode] and scale.shape == want_scale.shape == ((1 if mode == "int8" else 4), 6)
  np.testing.assert_array_equal(np.asarray(q, np.int32), want_q)
  np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
  back = np.asarray(quantize.dequantize(q, scale, jnp.float32))
  assert np.abs(back - w).max() <= want_scale.max() / 2 + 1e-7 and not back[:, 2].any()


@pytest.fixture(scope="module", params=["t5", "llama"])
def base(request, tmp_path_factory):
  llama = request.param == "llama"
  d = tmp_path_factory.mktemp(request.param) / "hf"
  oracle.tiny_hf_model(llama=llama).save_pretrained(d)
  batch = oracle.tiny_batch()
  if llama:
    batch = {k: v for k, v in batch.items() if not k.startswith("decoder_")}
  model, params = iblip_jax.from_pretrained(str(d))
  return str(d), model, params, batch, np.asarray(model.apply({"params": params}, **batch))


GROUPS = {"vision": {"quantize_group": GROUP}, "text": {"quantize_group": GROUP}}


@pytest.mark.parametrize("mode, bound", [("int8", 0.05), ("int4", 0.5)])
def test_a_quantised_model_is_the_float_model_with_rounded_weights(base, mode, bound):
  directory, model, params, batch, want = base
  qmodel, qparams = iblip_jax.from_pretrained(directory, quantize=mode, overrides=GROUPS)
  flat_q, flat_f = names.flat(qparams), names.flat(params)
  quantised = [p for p, v in flat_q.items() if p[-1] == "kernel" and quantize.mode_of(v.dtype) == mode]
  # every linear layer of both frozen towers but the LM head; nothing of the Q-Former side
  assert any(p[0] == "vision" for p in quantised) and any(p[0] == "language_model" for p in quantised)
  assert not any(p[0] in ("qformer", "language_projection") or "lm_head" in p for p in quantised)
  # the oracle: the float model with each such kernel rounded in numpy
  rounded = dict(flat_f)
  for p in quantised:
    pw = p[:-1] + ("weight",)   # the float model keeps a tower's weight (out, in); quantised, it is a kernel (in, out)
    w = np.swapaxes(np.asarray(flat_f[pw]), -1, -2)
    q, scale = zip(*(_numpy_quantize(x, mode, GROUP) for x in (w if w.ndim == 3 else w[None])))
    deq = np.stack([qi.reshape(scale_i.shape[0], -1, qi.shape[1]) * scale_i[:, None] for qi, scale_i in zip(q, scale)])
    rounded[pw] = jnp.asarray(np.swapaxes(deq.reshape(w.shape), -1, -2), jnp.float32)
    # quantised while loading = quantising the loaded model
    got_q, got_s = quantize.quantize(jnp.swapaxes(flat_f[pw], -1, -2), mode, GROUP)
    np.testing.assert_array_equal(np.asarray(flat_q[p], np.int32), np.asarray(got_q, np.int32))
    np.testing.assert_array_equal(flat_q[p[:-1] + ("kernel_scale",)], got_s)
  got = np.asarray(qmodel.apply({"params": qparams}, **batch))
  np.testing.assert_allclose(got, model.apply({"params": names.unflat(rounded)}, **batch), atol=1e-5, rtol=0)
  # against float: within the stated share of the logits' range, and not exact
  err = np.abs(got - want).max() / np.abs(want).max()
  assert 0 < err <= bound, err


def test_lora_over_quantised_towers_trains_the_adapters_alone(base):
  directory, model, _, batch, _ = base
  lora = model_configs.LoraConfig(targets=(r"language_model/.*/(q|v|q_proj|v_proj)$", r"qformer/.*/query$"), rank=2,
                                  alpha=4.0)
  qmodel, qparams = iblip_jax.from_pretrained(directory, quantize="int8", overrides=GROUPS)
  adapted = InstructBlip(model_configs.with_lora(qmodel.config, lora))
  params = trainable_lib.merge(qparams, lora_lib.init(adapted, jax.random.key(0)))
  np.testing.assert_array_equal(adapted.apply({"params": params}, **batch), qmodel.apply({"params": qparams}, **batch))
  adapters, frozen = lora_lib.split(params)
  batch = dict(batch)
  ids = batch.pop("decoder_input_ids") if "decoder_input_ids" in batch else batch["input_ids"]
  batch["labels"] = np.where(batch.get("decoder_attention_mask", batch["attention_mask"]) == 1, ids, -100)
  grads = jax.jit(jax.grad(lambda t: train_step.loss_fn(adapted, trainable_lib.merge(t, frozen), batch, None)[0]))(
      adapters)
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert leaves and all(np.isfinite(np.asarray(g)).all() for _, g in leaves)
  # B = 0: A gets no gradient yet, B does (through the int8 kernels' dequantised matmuls)
  assert all(np.any(np.asarray(g)) == trainable_lib.param_path(p).endswith("lora_b") for p, g in leaves)


@pytest.mark.parametrize("edit, message", [
    ({"model.text.quantize": "int3"}, "model.text.quantize='int3'; expected '' (none), 'int8' or 'int4'"),
    ({"model.vision.quantize": "int8", "trainable": (r"^qformer/", r"^vision/layers/fc1")},
     "config.trainable pattern '^vision/layers/fc1' matches quantised weights (1, e.g. vision/layers/fc1/kernel"),
])
def test_config_mistakes_are_named(edit, message):
  config = train_helper.load_config()
  config.mode = "summary"
  for key, value in edit.items():
    *parents, last = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[last] = value
  with pytest.raises(settings.ConfigError) as e:
    settings.resolve(config, None)
  assert message in str(e.value)
