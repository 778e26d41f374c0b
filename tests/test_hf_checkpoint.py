"""Loading and exporting the Hugging Face format: round trips through transformers, and clear errors."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import InstructBlipForConditionalGeneration

import iblip_jax
import oracle
from iblip_jax.errors import CheckpointError
from iblip_jax.hf import config as hf_config, names as hf_names, params as hf_params


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt") / "hf"
  oracle.tiny_hf_model(untie_head=True, tie=False).save_pretrained(path)
  return path


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


@pytest.mark.parametrize("untie", [True, False])
def test_round_trip_through_transformers(tmp_path, untie):
  """transformers -> iblip_jax -> save_pretrained -> transformers loads -> same weights and logits."""
  hf = oracle.tiny_hf_model(untie_head=untie, tie=not untie, cross_attention_frequency=1)
  hf.save_pretrained(tmp_path / "a")
  model, params = iblip_jax.from_pretrained(str(tmp_path / "a"))
  iblip_jax.save_pretrained(model, params, str(tmp_path / "b"))
  back = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "b").eval()
  back.set_attn_implementation("eager")
  want, got = hf.state_dict(), back.state_dict()
  assert set(want) == set(got)
  for k in want:
    torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
  batch = oracle.tiny_batch()
  np.testing.assert_array_equal(oracle.hf_forward(back, batch).logits.numpy(),
                                oracle.hf_forward(hf, batch).logits.numpy())
  # and the exported directory loads back into iblip_jax with identical params
  _, params2 = iblip_jax.from_pretrained(str(tmp_path / "b"))
  for a, b in zip(np.asarray(params["vision"]["layers"]["qkv"]["weight"]),
                  np.asarray(params2["vision"]["layers"]["qkv"]["weight"])):
    np.testing.assert_array_equal(a, b)


def test_sharded_index_is_read_and_written(tmp_path, hf_dir):
  model, params = iblip_jax.from_pretrained(str(hf_dir))
  hf_params.save_hf(model.config, params, str(tmp_path / "sharded"), max_shard_bytes=20_000)
  files = os.listdir(tmp_path / "sharded")
  assert hf_names.INDEX_NAME in files and sum(f.endswith(".safetensors") for f in files) > 2
  _, params2 = iblip_jax.from_pretrained(str(tmp_path / "sharded"))
  np.testing.assert_array_equal(params["language_model"]["lm_head"]["kernel"],
                                params2["language_model"]["lm_head"]["kernel"])
  back = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "sharded")
  assert back.query_tokens.shape == (1, oracle.NUM_QUERY, 32)


def test_buffers_and_tied_copies_are_ignored(tmp_path, hf_dir):
  d = _copy(hf_dir, tmp_path / "d")
  state = load_file(d / "model.safetensors")
  state["qformer.embeddings.position_ids"] = np.arange(512)[None]
  state["language_model.encoder.embed_tokens.weight"] = state["language_model.shared.weight"]
  save_file(state, d / "model.safetensors", metadata={"format": "pt"})
  iblip_jax.from_pretrained(str(d))


def test_missing_lm_head_falls_back_to_shared(tmp_path, hf_dir):
  d = _copy(hf_dir, tmp_path / "d")
  state = load_file(d / "model.safetensors")
  del state["language_model.lm_head.weight"]
  save_file(state, d / "model.safetensors", metadata={"format": "pt"})
  model, params = iblip_jax.from_pretrained(str(d))
  assert model.config.text.tie_word_embeddings and "lm_head" not in params["language_model"]


def _error(path) -> str:
  with pytest.raises(iblip_jax.CheckpointError) as e:
    iblip_jax.from_pretrained(str(path))
  return str(e.value)


def test_missing_and_unexpected_keys_are_listed_together(tmp_path, hf_dir):
  d = _copy(hf_dir, tmp_path / "d")
  state = load_file(d / "model.safetensors")
  del state["qformer.encoder.layer.1.attention.attention.key.weight"]
  del state["vision_model.encoder.layers.1.mlp.fc2.bias"]
  state["qformer.extra.weight"] = np.zeros(3, np.float32)
  save_file(state, d / "model.safetensors", metadata={"format": "pt"})
  msg = _error(d)
  assert "missing keys (2)" in msg and "qformer.encoder.layer.1.attention.attention.key.weight" in msg
  assert "vision_model.encoder.layers.1.mlp.fc2.bias" in msg
  assert "unexpected keys (1): qformer.extra.weight" in msg


def test_wrong_shape_names_the_key(tmp_path, hf_dir):
  d = _copy(hf_dir, tmp_path / "d")
  config = json.loads((d / "config.json").read_text())
  config["qformer_config"]["intermediate_size"] = 40  # config and tensors disagree
  (d / "config.json").write_text(json.dumps(config))
  msg = _error(d)
  assert "qformer.encoder.layer.0.intermediate.dense.weight: (37, 32), expected (40, 32)" in msg


def test_pickle_only_directory_is_refused(tmp_path, hf_dir):
  d = _copy(hf_dir, tmp_path / "d")
  os.remove(d / "model.safetensors")
  (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
  msg = _error(d)
  assert "pytorch_model.bin" in msg and "safetensors only" in msg


def test_truncated_safetensors_is_reported(tmp_path, hf_dir):
  d = _copy(hf_dir, tmp_path / "d")
  data = (d / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(data[: len(data) // 2])
  msg = _error(d)
  assert "model.safetensors" in msg and "truncated" in msg


def test_an_index_whose_entries_are_not_file_names_names_the_entry(tmp_path, hf_dir):
  d = _copy(hf_dir, tmp_path / "d")
  keys = list(load_file(d / "model.safetensors"))
  index = {"weight_map": {k: "model.safetensors" for k in keys}}
  index["weight_map"][keys[3]] = ["model.safetensors"]
  (d / hf_names.INDEX_NAME).write_text(json.dumps(index))
  msg = _error(d)
  assert f"weight_map[{keys[3]!r}] is list ([\"model.safetensors\"]); expected the name of the safetensors file" in msg
  assert "got dict" not in msg


def test_missing_config_and_directory(tmp_path, hf_dir):
  assert "not a directory" in _error(tmp_path / "nowhere")
  d = _copy(hf_dir, tmp_path / "d")
  os.remove(d / "config.json")
  assert "no config.json" in _error(d)


def test_unsupported_language_model_is_refused_clearly(tmp_path, hf_dir):
  d = _copy(hf_dir, tmp_path / "d")
  config = json.loads((d / "config.json").read_text())
  config["text_config"]["model_type"] = "opt"
  (d / "config.json").write_text(json.dumps(config))
  assert "text_config.model_type='opt'" in _error(d)


# --- config.json: wrong types and ranges, null, unknown fields -------------------------------------------------------


def _set(config: dict, dotted: str, value) -> dict:
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  return config


def _with_config(src, dst, edit) -> str:
  d = _copy(src, dst)
  (d / "config.json").write_text(json.dumps(edit(json.loads((d / "config.json").read_text()))))
  return d


@pytest.fixture(scope="module")
def hf_llama_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt_llama") / "hf"
  oracle.tiny_hf_model(llama=True).save_pretrained(path)
  return path


BAD_FIELDS = [  # (dotted field, value): each would otherwise be a TypeError, a silent default or a shape error
    ("vision_config.hidden_size", "64"),
    ("num_query_tokens", None),  # transformers declares it int: null has no meaning there
    ("text_config.num_layers", 2.5),
    ("qformer_config.num_attention_heads", 0),
    ("vision_config.num_attention_heads", -4),
    ("text_config.d_kv", -8),
    ("vision_config", []),  # a list where an object belongs (was silently replaced by the 1408-wide defaults)
    ("qformer_config.cross_attention_frequency", True),  # JSON true is a Python int, never a count
    ("text_config.tie_word_embeddings", "false"),  # a non-empty string is truthy
    ("qformer_config.layer_norm_eps", 0),
    ("text_config.dropout_rate", 1.5),
    ("qformer_config.hidden_act", ["gelu"]),
    ("text_config.feed_forward_proj", "gated-gelu-extra"),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS)
def test_bad_config_field_names_the_file_and_the_field(tmp_path, hf_dir, field, value):
  d = _with_config(hf_dir, tmp_path / "d", lambda c: _set(c, field, value))
  msg = _error(d)
  assert str(d / "config.json") in msg and f"{field} = {json.dumps(value)}" in msg
  # a dict handed to config_from_hf directly is checked the same way
  with pytest.raises(CheckpointError, match=re.escape(f"x/config.json: invalid config:\n  {field} = ")):
    hf_config.config_from_hf(json.loads((d / "config.json").read_text()), tied_head=False, source="x/config.json")


@pytest.mark.parametrize("field,value", [("text_config.num_key_value_heads", "2"), ("text_config.rope_parameters", []),
                                         ("text_config.rope_parameters.rope_theta", -1.0),
                                         ("text_config.bos_token_id", False)])
def test_bad_llama_config_field_names_the_file_and_the_field(tmp_path, hf_llama_dir, field, value):
  d = _with_config(hf_llama_dir, tmp_path / "d", lambda c: _set(c, field, value))
  msg = _error(d)
  assert str(d / "config.json") in msg and f"{field} = {json.dumps(value)}" in msg


def test_config_that_is_not_an_object_or_not_utf8(tmp_path, hf_dir):
  d = _copy(hf_dir, tmp_path / "d")
  (d / "config.json").write_text("[]")
  msg = _error(d)
  assert str(d / "config.json") in msg and "top level is list" in msg
  (d / "config.json").write_bytes(b'{"model_type": "instructbl\xefp"}')
  assert f"{d / 'config.json'}: not UTF-8" in _error(d)


def test_null_is_accepted_where_transformers_gives_it_a_meaning(hf_dir):
  config = json.loads((hf_dir / "config.json").read_text())
  for field in ("text_config.num_decoder_layers", "text_config.bos_token_id", "image_token_index"):
    _set(config, field, None)
  cfg = hf_config.config_from_hf(config, tied_head=False)
  assert cfg.text.num_decoder_layers == config["text_config"]["num_layers"] == 2  # T5Config: None = num_layers
  assert cfg.image_token_index is None and cfg.text.bos_token_id == 1
  cfg = hf_config.config_from_hf(dict(config, vision_config=None), tied_head=False)
  assert cfg.vision.hidden_size == 1408  # a null sub-config takes transformers' defaults, as transformers does


def test_unknown_fields_are_reported_but_not_transformers_own(tmp_path, hf_dir, hf_llama_dir, caplog):
  caplog.set_level("WARNING")
  hf_config._transformers_fields.cache_clear()
  for d in (hf_dir, hf_llama_dir):  # config.json as transformers writes it (T5 and LLaMA)
    hf_config.read_config(str(d))
  # ... checked against iblip_jax's own lists alone: transformers' config classes take seconds to import
  assert hf_config._transformers_fields.cache_info().currsize == 0
  cfg = hf_config.config_from_hf(hf_config.read_config(str(hf_dir)), tied_head=False)
  out = tmp_path / "ours"
  out.mkdir()
  (out / "config.json").write_text(json.dumps(hf_config.config_to_hf(cfg)))  # as save_hf writes it
  hf_config.read_config(str(out))
  assert not [r for r in caplog.records if r.levelname == "WARNING"]
  # keys only transformers' own lists know (what transformers 4.x wrote into every config, e.g. the released ones)
  # are not reported either; a typo is
  added = {"vision_config.patch_sise": 2, "flavour": "x", "chunk_size_feed_forward": 0, "vision_config.do_sample": False}

  def edit(c):
    for dotted, value in added.items():
      _set(c, dotted, value)
    return c
  d = _with_config(hf_dir, tmp_path / "d", edit)
  hf_config.read_config(str(d))
  [record] = [r for r in caplog.records if r.levelname == "WARNING"]
  assert str(d / "config.json") in record.getMessage()
  assert "unknown field(s) flavour, vision_config.patch_sise, ignored" in record.getMessage()
