"""LoRA adapters (iblip_jax/lora.py, models/layers.Dense): a fresh adapter changes nothing, a trained one is exactly
the low-rank update W + (alpha / r) A B (checked against the plain model with the update folded into its weights in
numpy), gradients match finite differences, only adapters train, sharded equals one device, config mistakes are
named."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iblip_jax
import oracle
import train_helper
from iblip_jax import hf, lora as lora_lib, train_step
from iblip_jax import trainable as trainable_lib
from iblip_jax.models import configs as model_configs
from iblip_jax.models.instructblip import InstructBlip
from iblip_jax.run import settings

# Adapters in all three towers, inside the scanned stacks (ViT, T5/LLaMA) and the unrolled Q-Former layers.
TARGETS = (r"qformer/.*/(query|value)$", r"language_model/.*/(q|v|q_proj|v_proj)$", r"vision/layers/qkv$",
           r"language_model/.*/(wo|down_proj)$")
LORA = model_configs.LoraConfig(targets=TARGETS, rank=4, alpha=6.0)


def _base(kind, tmp_path_factory):
  """(directory, base model, its params, batch) for a tiny transformers checkpoint."""
  d = tmp_path_factory.mktemp(kind) / "hf"
  oracle.tiny_hf_model(llama=kind == "llama").save_pretrained(d)
  model, params = iblip_jax.from_pretrained(str(d))
  batch = oracle.tiny_batch()
  if model.config.decoder_only:
    batch = {k: v for k, v in batch.items() if not k.startswith("decoder_")}
  return str(d), model, params, batch


@pytest.fixture(scope="module", params=["t5", "llama"])
def base(request, tmp_path_factory):
  return _base(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
  return _base("t5", tmp_path_factory)


def _adapted(directory, model):
  lora_model = InstructBlip(model_configs.with_lora(model.config, LORA))
  return lora_model, hf.load_params(directory, lora_model, adapter_rng=jax.random.key(3))


def _random_b(params, seed=0):
  """The adapters as if trained: B random (fresh ones are zero)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype)
      if trainable_lib.param_path(p).endswith("lora_b") else x, params)


def _folded(params):
  """Oracle: every adapter folded into its kernel in numpy float64, adapters removed."""
  def walk(node):
    out = {k: walk(v) if isinstance(v, dict) else v for k, v in node.items() if k not in ("lora_a", "lora_b")}
    if "lora_a" in node:
      a, b = np.asarray(node["lora_a"], np.float64), np.asarray(node["lora_b"], np.float64)
      delta = a @ b * (LORA.alpha / LORA.rank)   # (in, out), as the adapters are stored
      if "kernel" in node:
        out["kernel"] = jnp.asarray(np.asarray(node["kernel"], np.float64) + delta, jnp.float32)
      else:   # a frozen tower's weight is (out, in)
        out["weight"] = jnp.asarray(np.asarray(node["weight"], np.float64) + np.swapaxes(delta, -1, -2), jnp.float32)
    return out
  return walk(params)


def test_fresh_adapters_leave_the_model_unchanged(base):
  directory, model, params, batch = base
  lora_model, lora_params = _adapted(directory, model)
  adapters = lora_lib.split(lora_params)[0]
  paths = [trainable_lib.param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(adapters)]
  assert any(p.startswith("vision/layers/qkv") for p in paths) and any(p.startswith("qformer/") for p in paths)
  assert sum(p.startswith("language_model/") for p in paths) >= 6
  a = next(x for p, x in jax.tree_util.tree_leaves_with_path(adapters) if "vision" in str(p) and "lora_a" in str(p))
  assert a.shape == (2, 32, 4) and 0 < float(jnp.abs(a).max()) <= 1 / np.sqrt(32)   # stacked like the kernel
  assert all(not np.any(np.asarray(x)) for p, x in jax.tree_util.tree_leaves_with_path(adapters) if "lora_b" in str(p))
  # exactly: x W + 0
  np.testing.assert_array_equal(lora_model.apply({"params": lora_params}, **batch),
                                model.apply({"params": params}, **batch))


def test_an_adapter_is_the_low_rank_update_folded_into_its_weights(base):
  directory, model, _, batch = base
  lora_model, lora_params = _adapted(directory, model)
  trained = _random_b(lora_params)
  got = lora_model.apply({"params": trained}, **batch)
  want = model.apply({"params": _folded(trained)}, **batch)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  assert float(jnp.abs(got - model.apply({"params": lora_lib.split(trained)[1]}, **batch)).max()) > 1e-2
  merged = lora_lib.merged(trained, LORA)
  assert not lora_lib.split(merged)[0]
  for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(_folded(trained))):
    np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)


def test_adapter_gradients_match_finite_differences(t5):
  """On the encoder-decoder (the same layers' gradients in LLaMA pass through the same Dense)."""
  directory, model, _, batch = t5
  lora_model, lora_params = _adapted(directory, model)
  adapters, rest = lora_lib.split(_random_b(lora_params))
  batch = dict(batch)
  ids = batch["decoder_input_ids"] if "decoder_input_ids" in batch else batch["input_ids"]
  mask = batch.get("decoder_attention_mask", batch["attention_mask"])
  batch["labels"] = np.where(mask == 1, ids, -100)
  batch.pop("decoder_input_ids", None)

  @jax.jit
  def loss(t):
    return train_step.loss_fn(lora_model, trainable_lib.merge(t, rest), batch, None)[0]
  grads = jax.grad(loss)(adapters)
  for path in (("language_model", "layers" if model.config.decoder_only else "encoder"), ("qformer",)):
    node, g = adapters, grads
    for key in path:
      node, g = node[key], g[key]
    while "lora_a" not in node:   # the first adapter under `path`
      key = sorted(node)[0]
      node, g = node[key], g[key]
    index = np.unravel_index(int(jnp.argmax(jnp.abs(g["lora_a"]))), g["lora_a"].shape)   # the steepest entry
    eps = 1e-2

    def at(delta, node=node, index=index):
      node["lora_a"] = node["lora_a"].at[index].add(delta)
      value = float(loss(adapters))
      node["lora_a"] = node["lora_a"].at[index].add(-delta)
      return value
    numeric = (at(eps) - at(-eps)) / (2 * eps)
    assert abs(float(g["lora_a"][index])) > 1e-4
    np.testing.assert_allclose(float(g["lora_a"][index]), numeric, rtol=2e-2, atol=2e-5)


@pytest.mark.slow
def test_only_adapters_train_and_the_sharded_run_equals_one_device():
  config = train_helper.train_config()
  config.trainable = []
  lora = model_configs.LoraConfig(targets=(r"qformer/.*/(query|value)$", r"language_model/.*/(q|v)$"), rank=2,
                                  alpha=4.0)
  one = train_helper.run_steps((1, 1, 1), config=config, devices=jax.devices()[:1], lora=lora)
  eight = train_helper.run_steps((2, 2, 2), config=config, lora=lora)
  leaves = jax.tree_util.tree_leaves_with_path(one[1])
  assert leaves and all(trainable_lib.param_path(p).endswith(("lora_a", "lora_b")) for p, _ in leaves)
  assert all(np.any(np.asarray(x)) for p, x in leaves if "lora_b" in str(p))   # B left zero: it trained
  assert abs(one[0][0] - one[0][-1]) > 1e-4
  np.testing.assert_allclose(eight[0], one[0], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(eight[1]), jax.tree.leaves(one[1])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lora, message", [
    (dict(targets=["qformer/.*/nope$"]), "config.lora.targets: 'qformer/.*/nope$' matches no linear layer"),
    (dict(targets=["qformer/layer_0/attention/query$"], rank=33), "config.lora.rank=33 is larger than the layer "
     "qformer/layer_0/attention/query (32, 32)"),
    (dict(targets=["("]), "config.lora.targets: '(' is not a regular expression"),
    # the patch embedding is a convolution: it has a kernel, but no adapter would be made for it
    (dict(targets=["patch_embedding$"]), "config.lora.targets: 'patch_embedding$' matches no linear layer"),
    (dict(targets=["query$"], dropout=1.0), "config.lora.dropout=1.0: expected a number in [0, 1)"),
])
def test_config_mistakes_are_named(lora, message):
  config = train_helper.load_config()
  config.mode = "summary"
  for k, v in lora.items():
    config.lora[k] = v
  with pytest.raises(settings.ConfigError) as e:
    settings.resolve(config, None)
  assert message in str(e.value)


def test_the_settings_carry_adapters_to_the_layers_and_the_trainable_tree():
  config = train_helper.load_config()
  config.mode = "summary"
  config.lora.targets = ["qformer/.*/query$"]
  config.lora.rank = 2
  s = settings.resolve(config, None)
  assert s.model.lora == model_configs.LoraConfig(targets=("qformer/.*/query$",), rank=2, alpha=16.0, dropout=0.0)
  assert s.trainable[-1] == lora_lib.ADAPTERS and s.model.text.lora == s.model.qformer.lora
