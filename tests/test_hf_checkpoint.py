"""Loading and exporting the Hugging Face format: round trips through transformers, and clear errors."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import InstructBlipForConditionalGeneration

import iblip_jax
import oracle
from iblip_jax import hf_checkpoint


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
  for a, b in zip(np.asarray(params["vision"]["layers"]["qkv"]["kernel"]),
                  np.asarray(params2["vision"]["layers"]["qkv"]["kernel"])):
    np.testing.assert_array_equal(a, b)


def test_sharded_index_is_read_and_written(tmp_path, hf_dir):
  model, params = iblip_jax.from_pretrained(str(hf_dir))
  hf_checkpoint.save_hf(model.config, params, str(tmp_path / "sharded"), max_shard_bytes=20_000)
  files = os.listdir(tmp_path / "sharded")
  assert hf_checkpoint.INDEX_NAME in files and sum(f.endswith(".safetensors") for f in files) > 2
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
