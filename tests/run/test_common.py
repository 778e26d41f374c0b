"""What the main job's modes share: the tokenizer/model consistency rules."""
import dataclasses
import logging

import train_helper
from iblip_jax.models import configs as model_configs
from iblip_jax.models.instructblip import InstructBlip
from iblip_jax.run import common


def _vicuna_like(eos: int) -> InstructBlip:
  cfg = model_configs.from_dict(train_helper.load_config("tiny_vicuna").model.to_dict())
  return InstructBlip(cfg.replace(text=dataclasses.replace(cfg.text, eos_token_id=eos)))


def test_tokenizer_eos_wins_with_a_warning(caplog):
  """The Vicuna hub config says eos 1; its tokenizer's </s> is 2 (what LAVIS stops on)."""
  with caplog.at_level(logging.WARNING):
    model = common.align_eos(_vicuna_like(eos=1), 2, "ckpt")
  assert model.config.text.eos_token_id == 2
  assert "EOS id is 2 but the model config says 1" in caplog.text


def test_matching_eos_leaves_the_model_alone(caplog):
  model = _vicuna_like(eos=2)
  with caplog.at_level(logging.WARNING):
    assert common.align_eos(model, 2, "ckpt") is model
  assert not caplog.text
