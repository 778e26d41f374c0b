"""The sharded training step on an emulated 8-device CPU mesh, against one device and against transformers."""
import json
import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import iblip_jax
import main_job
import oracle
import train_helper
from iblip_jax import optim, sharding, train_state
from iblip_jax import train_step as ts
from iblip_jax.models import configs as model_configs
from iblip_jax.models.instructblip import InstructBlip
from iblip_jax import trainable as trainable_lib

HERE = os.path.dirname(__file__)


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


@pytest.fixture(scope="module")
def one_device():
  losses, trainable, *_ = train_helper.run_steps((1, 1, 1), devices=jax.devices()[:1])
  return losses, _host(trainable)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [(2, 2, 2), (8, 1, 1), (1, 4, 2)])
def test_mesh_matches_one_device(one_device, mesh):
  losses, trainable, *_ = train_helper.run_steps(mesh)
  want_losses, want = one_device
  assert abs(want_losses[0] - want_losses[-1]) > 1e-4  # the steps did train (much more than the tolerance)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  # Adam moves a weight whose gradient is ~0 by up to lr per step, so summation-order noise in such a gradient
  # shows up at the scale of the step: allow 0.1% of the distance three steps can move a weight.
  atol = 1e-3 * train_helper.train_config().optim.lr * len(losses)
  for got, ref in zip(jax.tree.leaves(_host(trainable)), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=atol)


@pytest.mark.slow
def test_decoder_only_mesh_matches_one_device():
  """Vicuna-style training (tiny LLaMA, grouped-query heads split over `tensor`) on a 2x2x2 mesh = one device."""
  config = train_helper.train_config("tiny_vicuna")
  want_losses, want, *_ = train_helper.run_steps((1, 1, 1), config=config, devices=jax.devices()[:1])
  losses, trainable, frozen_before, frozen_after, sh, _ = train_helper.run_steps((2, 2, 2), config=config)
  assert abs(want_losses[0] - want_losses[-1]) > 1e-4
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  atol = 1e-3 * config.optim.lr * len(losses)
  for got, ref in zip(jax.tree.leaves(_host(trainable)), jax.tree.leaves(_host(want)), strict=True):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=atol)
  for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(_host(frozen_after)), strict=True):
    np.testing.assert_array_equal(a, b)
  q_proj = sh.frozen["language_model"]["layers"]["self_attn"]["q_proj"]["weight"].spec
  assert "tensor" in tuple(q_proj)   # heads are tensor-parallel


@pytest.mark.slow
def test_frozen_weights_never_move_and_have_no_optimizer_state():
  _, trainable, before, after, _, opt_state = train_helper.run_steps((2, 2, 2))
  assert set(trainable) == {"ln_vision", "query_tokens", "qformer", "language_projection"}
  assert set(after) == {"vision", "language_model"}
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(_host(after))):
    np.testing.assert_array_equal(a, b)
  n_params = sum(x.size for x in jax.tree.leaves(trainable))
  n_state = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
  assert n_state == 2 * n_params  # Adam's mu and nu, for trainable leaves only


def test_adam_moments_of_the_real_flant5xl_config():
  config = train_helper.load_config("instructblip_flant5xl")
  model = InstructBlip(model_configs.from_dict(config.model.to_dict()))
  trainable = trainable_lib.split(iblip_jax.params_shape(model), config.trainable)[0]
  opt_state = jax.eval_shape(optim.make(config.optim, 100).init, trainable)
  assert sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0) == 2 * 187_262_464


@pytest.mark.slow
def test_loss_equals_transformers_loss(tmp_path):
  hf = oracle.tiny_hf_model()
  hf.save_pretrained(tmp_path / "hf")
  model, params = iblip_jax.from_pretrained(str(tmp_path / "hf"))
  batch = oracle.tiny_batch()
  labels = np.where(batch["decoder_attention_mask"] == 1, batch["decoder_input_ids"], -100)
  ours = {k: v for k, v in batch.items() if k != "decoder_input_ids"}
  ours["labels"] = labels
  loss, aux = ts.loss_fn(model, params, ours, None)
  want = oracle.hf_forward(hf, {**batch, "decoder_input_ids": None}, labels=torch.from_numpy(labels)).loss
  assert int(aux["tokens"]) == (labels != -100).sum()
  np.testing.assert_allclose(float(loss), want.item(), rtol=1e-5)


def test_decoder_only_loss_equals_transformers_loss(tmp_path):
  """[visual][prompt][target] with right padding; transformers gets full-length labels, -100 on the image tokens."""
  hf = oracle.tiny_hf_model(llama=True)
  hf.save_pretrained(tmp_path / "hf")
  model, params = iblip_jax.from_pretrained(str(tmp_path / "hf"))
  batch = {k: v for k, v in oracle.tiny_batch().items() if not k.startswith("decoder")}
  prompt_len = np.array([2, 3, 1])  # the first tokens of each row are prompt, the rest up to the mask is target
  real = batch["attention_mask"] == 1
  labels = np.where(real & (np.arange(6)[None] >= prompt_len[:, None]), batch["input_ids"], -100)
  loss, aux = ts.loss_fn(model, params, {**batch, "labels": labels}, None)
  full = np.concatenate([np.full((3, oracle.NUM_QUERY), -100), labels], 1)
  want = oracle.hf_forward(hf, batch, labels=torch.from_numpy(full)).loss
  assert int(aux["tokens"]) == (labels != -100).sum() == 8
  np.testing.assert_allclose(float(loss), want.item(), rtol=1e-5)


def _step_flops(config, trainable_patterns) -> float:
  config.trainable = trainable_patterns
  model = InstructBlip(model_configs.from_dict(config.model.to_dict()))
  tx = optim.make(config.optim, 10)
  trainable, frozen = trainable_lib.split(iblip_jax.params_shape(model), trainable_patterns)
  step = jax.jit(ts.make_train_step(model, tx, vision_frozen="vision" not in trainable, dropout=False))
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), train_helper.make_batch())
  opt = jax.eval_shape(tx.init, trainable)
  return step.lower(trainable, opt, frozen, batch, jax.random.key(0)).compile().cost_analysis()["flops"]


@pytest.mark.slow
def test_compiled_step_has_no_vision_backward():
  """The vision tower's backward costs about twice its forward; the default step must not contain it."""
  config = train_helper.train_config()
  config.model.vision.num_hidden_layers = 4  # make the vision tower the dominant cost
  vision_fwd = jax.jit(lambda p, x: InstructBlip(model_configs.from_dict(config.model.to_dict())).apply(
      {"params": p}, x, method=lambda m, x: m.vision(x)))
  model = InstructBlip(model_configs.from_dict(config.model.to_dict()))
  shapes = iblip_jax.params_shape(model)
  fwd = vision_fwd.lower(shapes, jax.ShapeDtypeStruct((8, 30, 30, 3), jnp.float32)).compile().cost_analysis()["flops"]
  default = _step_flops(config, list(config.trainable))
  with_vision = _step_flops(config, list(config.trainable) + [r"^vision/"])
  assert with_vision - default > 1.5 * fwd  # the measure sees a vision backward when there is one
  assert default < with_vision - 1.5 * fwd


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "save_dots", "save_dots_no_batch"])
def test_remat_gives_the_same_loss_and_gradients(policy):
  config = train_helper.train_config()
  config.model.text.remat_policy = policy
  batch = train_helper.make_batch()
  def loss_and_grads(remat):
    config.model.text.remat = remat
    model = InstructBlip(model_configs.from_dict(config.model.to_dict()))
    inputs = iblip_jax.models.instructblip.dummy_inputs(model.config)
    params = jax.jit(lambda r: nn.meta.unbox(model.init(r, **inputs)))(
        jax.random.key(0))["params"]
    trainable, frozen = trainable_lib.split(params, config.trainable)
    f = lambda t: ts.loss_fn(model, trainable_lib.merge(t, frozen), batch, None)[0]
    return jax.jit(jax.value_and_grad(f))(trainable)
  (l0, g0), (l1, g1) = loss_and_grads(False), loss_and_grads(True)
  assert float(l0) == pytest.approx(float(l1), rel=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "tiny_vicuna"])
def test_bfloat16_frozen_towers_train_float32_side(name):
  config = train_helper.train_config(name)
  for tower in ("vision", "text"):
    config.model[tower].dtype = config.model[tower].param_dtype = "bfloat16"
  losses, trainable, _, frozen, *_ = train_helper.run_steps((2, 2, 2), config=config)
  assert all(np.isfinite(losses)) and abs(losses[0] - losses[-1]) > 1e-4
  assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype("bfloat16")}


@pytest.mark.slow
def test_last_vision_block_can_be_trained_by_config_alone():
  config = train_helper.train_config()
  config.model.vision.scan_layers = False
  config.trainable = list(config.trainable) + [r"^vision/layers_1/"]
  _, trainable, before, after, *_ = train_helper.run_steps((2, 2, 2), config=config)
  assert set(trainable["vision"]) == {"layers_1"}
  assert set(after["vision"]) == {"embeddings", "layers_0"}
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(_host(after))):
    np.testing.assert_array_equal(a, b)


def test_trainable_pattern_that_matches_nothing_is_an_error():
  config = train_helper.train_config()
  config.trainable = [r"^qformer/", r"^q_former_typo/"]
  with pytest.raises(ValueError, match="q_former_typo"):
    train_helper.run_steps((1, 1, 1), config=config, devices=jax.devices()[:1])


def test_partition_specs_golden_file():
  """Per-parameter PartitionSpecs of the tiny config on the 2x2x2 mesh. Regenerate with IBLIP_UPDATE_GOLDEN=1."""
  config = train_helper.train_config()
  model = InstructBlip(model_configs.from_dict(config.model.to_dict()))
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  tree = train_state.build(model, patterns=config.trainable, optim=config.optim, total_steps=10, mesh=mesh,
                           rules=config.sharding_rules).param_shardings
  got = {jax.tree_util.keystr(p, simple=True, separator="/"): str(s.spec)
         for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]}
  path = os.path.join(HERE, "golden", "tiny_2x2x2_partition_specs.json")
  if os.environ.get("IBLIP_UPDATE_GOLDEN"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(got, f, indent=1, sort_keys=True)
  with open(path) as f:
    assert got == json.load(f)


def test_replicated_large_tensor_is_caught():
  config = train_helper.train_config()
  model = InstructBlip(model_configs.from_dict(config.model.to_dict()))
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  no_rules = [(name, None) for name, _ in config.sharding_rules]
  with pytest.raises(ValueError, match="language_model/shared/embedding"):
    train_state.build(model, patterns=config.trainable, optim=config.optim, total_steps=10, mesh=mesh, rules=no_rules,
                      max_replicated_bytes=10_000)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, one_device):
  """Two processes on localhost, 4 CPU devices each, one 2x2x2 mesh over both: same losses and params."""
  port = _free_port()
  env = {**os.environ, "XLA_FLAGS": main_job.xla_flags(4), "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multiprocess_worker.py"), str(i), str(port),
                             str(tmp_path / f"out{i}.npz")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
  want_losses, want = one_device
  got = np.load(tmp_path / "out0.npz")
  np.testing.assert_allclose(got["losses"], want_losses, rtol=1e-5)
  atol = 1e-3 * train_helper.train_config().optim.lr * len(want_losses)  # as in test_mesh_matches_one_device
  for i, ref in enumerate(jax.tree.leaves(want)):
    np.testing.assert_allclose(got[f"leaf{i}"], ref, rtol=1e-5, atol=atol)
