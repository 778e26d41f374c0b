"""The settings, declared once (run/settings.py): the config a config file edits is built from the declarations,
read back into them checked, and every mistake is reported at once, naming the field."""
import json
import math
import re

import ml_collections
import pytest

import train_helper
from iblip_jax import config_lib
from iblip_jax.demo import word_tokenizers
from iblip_jax.run import settings


def test_the_config_is_the_declarations():
  config = config_lib.base({})
  defaults = settings.config_defaults()
  assert set(config.keys()) == set(defaults)
  assert config.optim.to_dict() == settings.config_defaults(settings.Optim)
  assert config.predict.num_beams == 5 and config.predict.repetition_penalty == 1.5   # LAVIS's, from Decoding
  s = settings.resolve(config, None, "summary")
  assert s.optim == settings.Optim() and s.predict == settings.Predict() and s.trainable == settings.Settings().trainable
  assert s.max_replicated_bytes == 128 * 2**20


def _train_config(tmp_path, **optim) -> ml_collections.ConfigDict:
  config = train_helper.load_config("tiny")
  (tmp_path / "d.jsonl").write_text(json.dumps({"image": "x.png", "text_input": "a", "text_output": "b"}) + "\n")
  word_tokenizers.build(["a", "b"], str(tmp_path / "tok"))
  config.tokenizer = str(tmp_path / "tok")
  config.data.datasets = {"d": {"format": "jsonl", "path": str(tmp_path / "d.jsonl")}}
  config.batch_size, config.mesh.fsdp = 8, -1
  for k, v in optim.items():
    config.optim[k] = v
  return config


def test_the_optimizer_numbers_are_checked(tmp_path):
  """A negative or not finite rate or decay would train for nothing, or backwards, and exit 0."""
  settings.resolve(_train_config(tmp_path), str(tmp_path / "w"), "train")   # the defaults are fine
  for key, value, expected in (("lr", -1e-4, "a positive number"), ("lr", math.nan, "a positive number"),
                               ("warmup_lr", -1.0, "a number >= 0"), ("weight_decay", -5.0, "a number >= 0"),
                               ("min_lr", 1.0, "a number in [0, lr=1e-05]"), ("b2", 1.0, "a number in [0, 1)")):
    with pytest.raises(settings.ConfigError, match=re.escape(f"config.optim.{key}={value!r}: expected {expected}")):
      settings.resolve(_train_config(tmp_path, **{key: value}), str(tmp_path / "w"), "train")
  for optim, expected in (({"schedule": "steps"}, "config.optim.schedule='steps': expected 'smooth' or 'lavis'"),
                          ({"schedule": "lavis", "inner_epoch_steps": 10}, "at least warmup_steps=1000 steps")):
    with pytest.raises(settings.ConfigError, match=re.escape(expected)):
      settings.resolve(_train_config(tmp_path, **optim), str(tmp_path / "w"), "train")
  # every problem at once
  with pytest.raises(settings.ConfigError) as e:
    settings.resolve(_train_config(tmp_path, lr=-1.0, weight_decay=-5.0), str(tmp_path / "w"), "train")
  assert "config.optim.lr=-1.0" in str(e.value) and "config.optim.weight_decay=-5.0" in str(e.value)


def test_unknown_keys_are_named_at_every_level(tmp_path):
  config = _train_config(tmp_path)
  with config.unlocked():
    config.data.shuffle = True
    config.optim.momentum = 0.9
    config.batchsize = 3
  with pytest.raises(settings.ConfigError) as e:
    settings.resolve(config, str(tmp_path / "w"), "train")
  for key in ("config.batchsize", "config.data.shuffle", "config.optim.momentum"):
    assert f"{key}: no such setting of iblip_jax" in str(e.value)


def test_text_processing_is_checked(tmp_path):
  config = _train_config(tmp_path)
  config.text_processing = "blip"
  with pytest.raises(settings.ConfigError, match=re.escape("config.text_processing='blip': expected 'none'")):
    settings.resolve(config, str(tmp_path / "w"), "train")


def test_profile_steps_must_be_steps_of_the_run(tmp_path):
  config = _train_config(tmp_path)
  config.total_steps = 10
  config.profile_steps = (3, 4, 10)
  assert settings.resolve(config, str(tmp_path / "w"), "train").profile_steps == (3, 4, 10)
  config.profile_steps = (0, 4, 11)
  with pytest.raises(settings.ConfigError, match=re.escape("config.profile_steps=(0, 4, 11): [0, 11] are not steps "
                                                           "of this run (whole numbers from 1 to total_steps=10)")):
    settings.resolve(config, str(tmp_path / "w"), "train")


def test_a_peft_adapter_brings_its_own_lora_settings_and_trains_on(tmp_path):
  """config.model_adapter: the model gets the adapter's targets, rank and alpha and the adapters join the trained
  parameters; with config.lora.targets too, or without model_init, or another model's adapter: named errors."""
  import peft
  import oracle
  oracle.tiny_hf_model().save_pretrained(tmp_path / "hf")
  peft.get_peft_model(oracle.tiny_hf_model(), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["q", "query"])) \
      .save_pretrained(str(tmp_path / "adapter"))
  config = train_helper.load_config()
  config.mode = "summary"
  config.model_init, config.model_adapter = str(tmp_path / "hf"), str(tmp_path / "adapter")
  s = settings.resolve(config, None)
  assert (s.model.lora.rank, s.model.lora.alpha) == (3, 6.0) and s.trainable[-1] == r"/lora_[ab]$"
  assert "^language_model/encoder/layers/self_attn/q$" in s.model.lora.targets
  assert "^qformer/layer_0/crossattention/query$" in s.model.lora.targets
  assert s.checkpoint_meaning["lora"]["alpha"] == 6.0
  config.lora.targets = ("query$",)
  with pytest.raises(settings.ConfigError, match="model_adapter=.* and config.lora.targets are both set"):
    settings.resolve(config, None)
  config.lora.targets, config.model_init = (), ""
  with pytest.raises(settings.ConfigError, match="needs config.model_init"):
    settings.resolve(config, None)
  # made for a Q-Former with cross-attention in every layer: layer 1's has no counterpart here
  peft.get_peft_model(oracle.tiny_hf_model(cross_attention_frequency=1), peft.LoraConfig(
      r=3, lora_alpha=6, target_modules=["query"])).save_pretrained(str(tmp_path / "other"))
  config.model_init, config.model_adapter = str(tmp_path / "hf"), str(tmp_path / "other")
  with pytest.raises(settings.ConfigError, match=r"the adapter does not fit this model(.|\n)*not a linear layer of "
                                                 r"this model \(2\): base_model.model.qformer.encoder.layer.1."
                                                 r"crossattention.attention.query.lora_A.weight"):
    settings.resolve(config, None)


def test_every_tower_setting_is_on_the_command_line(tmp_path):
  """The frozen towers' storage settings exist in every config (so `--config.model.text.quantize_group=32` works
  without the config file naming them) and reach the model; a bad group size is a config error naming it."""
  config = train_helper.load_config("tiny")
  assert config.model.vision.quantize_group == config.model.text.quantize_group == 128
  config.model.text.quantize, config.model.text.quantize_group = "int4", 32
  s = settings.resolve(config, None, "summary")
  assert (s.model.text.quantize, s.model.text.quantize_group, s.model.vision.quantize_group) == ("int4", 32, 128)
  config.model.vision.quantize_group = 0
  with pytest.raises(settings.ConfigError, match=re.escape("model.vision.quantize_group=0 must be >= 1")):
    settings.resolve(config, None, "summary")
