"""LoRA adapters in PEFT's format (iblip_jax/hf/peft.py), with the real `peft` package as the oracle: ours exported
and loaded by peft.PeftModel over transformers' InstructBLIP give our logits; peft's (get_peft_model, trained B)
loaded by from_pretrained(adapter=...) give peft's logits; T5 and LLaMA, float32. An adapter that does not fit is
refused with what does not fit."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import iblip_jax
import oracle
from iblip_jax import hf, lora as lora_lib
from iblip_jax import trainable as trainable_lib
from iblip_jax.errors import CheckpointError
from iblip_jax.hf import peft as hf_peft
from iblip_jax.models import configs as model_configs
from iblip_jax.models.instructblip import InstructBlip

TOL = 1e-5


@pytest.fixture(scope="module", params=["t5", "llama"])
def base(request, tmp_path_factory):
  llama = request.param == "llama"
  d = tmp_path_factory.mktemp(request.param)
  oracle.tiny_hf_model(llama=llama).save_pretrained(d / "hf")
  batch = oracle.tiny_batch()
  if llama:
    batch = {k: v for k, v in batch.items() if not k.startswith("decoder_")}
  return d, llama, batch


def test_our_adapters_load_in_peft_with_our_logits(base):
  d, llama, batch = base
  lora = model_configs.LoraConfig(targets=(r"qformer/.*/(query|value)$", r"language_model/.*/(q|v|q_proj|v_proj)$",
                                           r"vision/layers/qkv$"), rank=4, alpha=8.0, dropout=0.1)
  model, _ = iblip_jax.from_pretrained(str(d / "hf"))
  adapted = InstructBlip(model_configs.with_lora(model.config, lora))
  params = hf.load_params(str(d / "hf"), adapted, adapter_rng=jax.random.key(1))
  rng = np.random.default_rng(0)   # as if trained: B off zero
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype)
      if trainable_lib.param_path(p).endswith("lora_b") else x, params)
  hf_peft.save_adapter(adapted, params, str(d / "ours"))
  config = json.loads((d / "ours" / "adapter_config.json").read_text())
  assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.1)
  theirs = peft.PeftModel.from_pretrained(oracle.tiny_hf_model(llama=llama), str(d / "ours")).eval()
  n_adapted = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in theirs.modules())
  assert n_adapted == len(config["target_modules"]) and n_adapted >= 3 * 2 + 2
  got = np.asarray(adapted.apply({"params": params}, **batch))
  np.testing.assert_allclose(got, oracle.hf_forward(theirs, batch).logits.numpy(), atol=TOL, rtol=0)
  plain = oracle.hf_forward(oracle.tiny_hf_model(llama=llama), batch).logits.numpy()
  assert np.abs(got - plain).max() > 1e-2   # the adapters do change the answer


def test_peft_adapters_load_here_with_peft_logits(base):
  d, llama, batch = base
  config = peft.LoraConfig(r=3, lora_alpha=5, lora_dropout=0.0,
                           target_modules=["query", "value", "q", "v", "q_proj", "v_proj", "qkv", "o"])
  theirs = peft.get_peft_model(oracle.tiny_hf_model(llama=llama), config).eval()
  with torch.no_grad():
    for name, p in theirs.named_parameters():
      if "lora_B" in name:
        p.normal_(0, 0.1)
  theirs.save_pretrained(str(d / "theirs"))
  want = oracle.hf_forward(theirs, batch).logits.numpy()
  model, params = iblip_jax.from_pretrained(str(d / "hf"), adapter=str(d / "theirs"))
  assert model.config.lora.rank == 3 and model.config.lora.alpha == 5.0
  np.testing.assert_allclose(model.apply({"params": params}, **batch), want, atol=TOL, rtol=0)
  # and back: exported again, peft reads the same numbers
  hf_peft.save_adapter(model, params, str(d / "again"))
  again = peft.PeftModel.from_pretrained(oracle.tiny_hf_model(llama=llama), str(d / "again")).eval()
  np.testing.assert_allclose(oracle.hf_forward(again, batch).logits.numpy(), want, atol=TOL, rtol=0)


def test_an_adapter_that_does_not_fit_is_refused_naming_what(base, tmp_path):
  d, llama, _ = base
  config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"])
  theirs = peft.get_peft_model(oracle.tiny_hf_model(llama=llama), config)
  theirs.save_pretrained(str(tmp_path / "a"))
  model, _ = iblip_jax.from_pretrained(str(d / "hf"))
  # another model: the Q-Former 48 wide instead of 32
  other = model.config.replace(qformer=model.config.qformer.__class__(
      **{**model.config.qformer.__dict__, "hidden_size": 48, "intermediate_size": 37}))
  with pytest.raises(CheckpointError) as e:
    hf_peft.load_adapter(InstructBlip(other), str(tmp_path / "a"))
  assert "the adapter does not fit this model" in str(e.value) and "shapes differ" in str(e.value)
  assert "qformer.encoder.layer.0.attention.attention.query.lora_A.weight: (2, 32), expected (2, 48)" in str(e.value)
  # module names this model does not have
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
  tensors["base_model.model.qformer.encoder.layer.9.attention.attention.query.lora_A.weight"] = np.zeros((2, 32),
                                                                                                       np.float32)
  save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match=r"not a linear layer of this model \(1\): base_model.model.qformer."
                                            r"encoder.layer.9.attention"):
    hf_peft.load_adapter(model, str(tmp_path / "a"))
  # a variant of LoRA whose maths differ
  cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
  (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(cfg, use_dora=True)))
  with pytest.raises(CheckpointError, match="use_dora=True: only False is supported"):
    hf_peft.load_adapter(model, str(tmp_path / "a"))
  with pytest.raises(CheckpointError, match="no adapter_config.json there"):
    hf_peft.load_adapter(model, str(tmp_path))


def test_folding_equals_peft_merge_and_unload(base):
  """Export's folded weights (lora.merged) against peft's own merge_and_unload."""
  d, llama, batch = base
  config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["query", "v", "v_proj"])
  theirs = peft.get_peft_model(oracle.tiny_hf_model(llama=llama, seed=1), config).eval()
  with torch.no_grad():
    for name, p in theirs.named_parameters():
      if "lora_B" in name:
        p.normal_(0, 0.1)
  theirs.save_pretrained(str(d / "fold"))
  oracle.tiny_hf_model(llama=llama, seed=1).save_pretrained(d / "hf1")
  model, params = iblip_jax.from_pretrained(str(d / "hf1"), adapter=str(d / "fold"))
  merged = theirs.merge_and_unload().state_dict()
  plain_model = InstructBlip(model_configs.with_lora(model.config, None))
  folded = lora_lib.merged(params, model.config.lora)
  np.testing.assert_allclose(plain_model.apply({"params": folded}, **batch),
                             oracle.hf_forward(theirs, batch).logits.numpy(), atol=TOL, rtol=0)
  name = "qformer.encoder.layer.1.attention.attention.query.weight"
  np.testing.assert_allclose(np.asarray(folded["qformer"]["layer_1"]["attention"]["query"]["kernel"]).T,
                             merged[name].numpy(), atol=1e-6, rtol=0)
