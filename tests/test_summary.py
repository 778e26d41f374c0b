"""Parameter counts of the real configs, against the paper's table and transformers' own model definitions."""
import pytest
import torch
from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

from iblip_jax.run import settings, summary
from train_helper import load_config


def _totals(name):
  rows = summary.count_params(settings.resolve(load_config(name), None, "summary"))
  return sum(r[1] for r in rows), sum(r[2] for r in rows)


def _transformers_count(config) -> int:
  """transformers' InstructBLIP built on the meta device (no memory); + a separate LM head as in the checkpoints,
  because transformers 5 always ties T5's head to `shared` when it builds from a config."""
  t = config.model.text
  text = dict(model_type="t5", vocab_size=t.vocab_size, d_model=t.d_model, d_kv=t.d_kv, d_ff=t.d_ff,
              num_layers=t.num_layers, num_decoder_layers=t.num_decoder_layers, num_heads=t.num_heads,
              relative_attention_num_buckets=t.get("relative_attention_num_buckets", 32),
              feed_forward_proj="gated-gelu", dense_act_fn="gelu")
  cfg = InstructBlipConfig(vision_config=dict(config.model.vision), qformer_config=dict(config.model.qformer),
                           text_config=text, num_query_tokens=config.model.num_query_tokens)
  with torch.device("meta"):
    model = InstructBlipForConditionalGeneration(cfg)
  return sum(p.numel() for p in model.parameters()) + t.vocab_size * t.d_model


def test_flant5xl_counts_match_the_paper_table():
  assert _totals("instructblip_flant5xl") == (4_022_969_088, 187_262_464)


def test_flant5xxl_trainable_matches_the_paper_table():
  assert _totals("instructblip_flant5xxl")[1] == 188_837_376


@pytest.mark.parametrize("name", ["instructblip_vicuna7b", "instructblip_vicuna13b"])
def test_vicuna_counts_match_the_paper_table(name):
  assert _totals(name) == {"instructblip_vicuna7b": (7_913_210_624, 188_837_376),
                           "instructblip_vicuna13b": (14_191_448_832, 189_624_832)}[name]


@pytest.mark.parametrize("name", ["instructblip_flant5xl", "instructblip_flant5xxl", "tiny"])
def test_totals_match_transformers_model_definitions(name):
  config = load_config(name)
  assert _totals(name)[0] == _transformers_count(config)


def test_vicuna7b_total_matches_transformers_model_definition():
  config = load_config("instructblip_vicuna7b")
  t = config.model.text
  text = dict(model_type="llama", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
              intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
              num_attention_heads=t.num_attention_heads, tie_word_embeddings=False)
  cfg = InstructBlipConfig(vision_config=dict(config.model.vision), qformer_config=dict(config.model.qformer),
                           text_config=text, num_query_tokens=config.model.num_query_tokens)
  with torch.device("meta"):
    model = InstructBlipForConditionalGeneration(cfg)
  assert _totals("instructblip_vicuna7b")[0] == sum(p.numel() for p in model.parameters())
