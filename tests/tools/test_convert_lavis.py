"""tools/convert_lavis.py on LAVIS state dicts built here at tiny sizes, with the key names of LAVIS's own modules
(lavis/models/eva_vit.py, blip2_models/Qformer.py, blip2.py, blip2_qformer.py, blip2_t5*.py, blip2_vicuna_instruct.py
at 506965b9): transformers' InstructBlipForConditionalGeneration is the oracle for the names (it loads the result
with no missing, unexpected or mis-shaped key) and every LAVIS tensor must arrive unchanged."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import InstructBlipForConditionalGeneration

import iblip_jax
import oracle

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
_spec = importlib.util.spec_from_file_location("convert_lavis", os.path.join(ROOT, "tools", "convert_lavis.py"))
convert_lavis = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_lavis)

WIDTH, LAYERS, FFN, VOCAB, POSITIONS, QUERIES = 32, 3, 37, 99, 512, 10  # oracle.tiny_hf_config's Q-Former


def _t(rng, *shape):
  return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))


def lavis_qformer(rng, *, text=True, stage1_heads=False, proj="t5_proj", llm=32, image_width=32) -> dict:
  """What LAVIS's Blip2* models hold besides the frozen towers: ln_vision, query_tokens, Qformer.bert (BertModel of
  Qformer.py: embeddings, encoder.layer.N with crossattention every 2nd layer and the query FFN copies), the
  projection; with stage1_heads the stage-1 extras (Qformer.cls, vision_proj, text_proj, itm_head, temp)."""
  sd = {"query_tokens": _t(rng, 1, QUERIES, WIDTH), "ln_vision.weight": _t(rng, image_width),
        "ln_vision.bias": _t(rng, image_width), "Qformer.bert.embeddings.LayerNorm.weight": _t(rng, WIDTH),
        "Qformer.bert.embeddings.LayerNorm.bias": _t(rng, WIDTH),
        "Qformer.bert.embeddings.position_ids": torch.arange(POSITIONS).expand((1, -1))}
  if text:
    sd["Qformer.bert.embeddings.word_embeddings.weight"] = _t(rng, VOCAB, WIDTH)
    sd["Qformer.bert.embeddings.position_embeddings.weight"] = _t(rng, POSITIONS, WIDTH)

  def linear(name, out, inp):
    sd[f"{name}.weight"], sd[f"{name}.bias"] = _t(rng, out, inp), _t(rng, out)

  def norm(name):
    sd[f"{name}.weight"], sd[f"{name}.bias"] = _t(rng, WIDTH), _t(rng, WIDTH)
  for i in range(LAYERS):
    layer = f"Qformer.bert.encoder.layer.{i}"
    for attention, kv_width in [("attention", WIDTH)] + ([("crossattention", image_width)] if i % 2 == 0 else []):
      linear(f"{layer}.{attention}.self.query", WIDTH, WIDTH)
      linear(f"{layer}.{attention}.self.key", WIDTH, kv_width)
      linear(f"{layer}.{attention}.self.value", WIDTH, kv_width)
      linear(f"{layer}.{attention}.output.dense", WIDTH, WIDTH)
      norm(f"{layer}.{attention}.output.LayerNorm")
    for suffix in ("_query",) + (("",) if text else ()):
      linear(f"{layer}.intermediate{suffix}.dense", FFN, WIDTH)
      linear(f"{layer}.output{suffix}.dense", WIDTH, FFN)
      norm(f"{layer}.output{suffix}.LayerNorm")
  if proj:
    linear(proj, llm, WIDTH)
  if stage1_heads:
    sd["Qformer.cls.predictions.bias"] = sd["Qformer.cls.predictions.decoder.bias"] = _t(rng, VOCAB)
    linear("Qformer.cls.predictions.transform.dense", WIDTH, WIDTH)
    norm("Qformer.cls.predictions.transform.LayerNorm")
    sd["Qformer.cls.predictions.decoder.weight"] = _t(rng, VOCAB, WIDTH)
    linear("vision_proj", 16, WIDTH)
    linear("text_proj", 16, WIDTH)
    linear("itm_head", 2, WIDTH)
    sd["temp"] = torch.tensor(0.07)
  return sd


def lavis_eva(rng, *, width=32, layers=2, ffn=37, patch=2, image=30) -> dict:
  """eva_vit.py's VisionTransformer (qkv without bias, separate q_bias / v_bias), under visual_encoder."""
  sd = {"visual_encoder.cls_token": _t(rng, 1, 1, width),
        "visual_encoder.pos_embed": _t(rng, 1, (image // patch) ** 2 + 1, width),
        "visual_encoder.patch_embed.proj.weight": _t(rng, width, 3, patch, patch),
        "visual_encoder.patch_embed.proj.bias": _t(rng, width)}
  for i in range(layers):
    b = f"visual_encoder.blocks.{i}"
    sd.update({f"{b}.norm1.weight": _t(rng, width), f"{b}.norm1.bias": _t(rng, width),
               f"{b}.attn.qkv.weight": _t(rng, 3 * width, width), f"{b}.attn.q_bias": _t(rng, width),
               f"{b}.attn.v_bias": _t(rng, width), f"{b}.attn.proj.weight": _t(rng, width, width),
               f"{b}.attn.proj.bias": _t(rng, width), f"{b}.norm2.weight": _t(rng, width),
               f"{b}.norm2.bias": _t(rng, width), f"{b}.mlp.fc1.weight": _t(rng, ffn, width),
               f"{b}.mlp.fc1.bias": _t(rng, ffn), f"{b}.mlp.fc2.weight": _t(rng, width, ffn),
               f"{b}.mlp.fc2.bias": _t(rng, width)})
  return sd


def save_lavis(path, state: dict) -> str:
  """As RunnerBase._save_checkpoint writes it: the state dict under "model", beside optimizer, config, scaler, epoch."""
  torch.save({"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0]}]},
              "config": {"run": {"init_lr": 1e-5, "task": "image_text_pretrain"}}, "scaler": None, "epoch": 4},
             path)
  return str(path)


@pytest.fixture(scope="module")
def frozen_t5(tmp_path_factory):
  """A Hugging Face InstructBLIP directory (FlanT5 layout, separate head) written by transformers itself."""
  path = tmp_path_factory.mktemp("hf_t5")
  model = oracle.tiny_hf_model(untie_head=True, tie=False)
  model.save_pretrained(path)
  os.makedirs(path / "qformer_tokenizer")
  (path / "qformer_tokenizer" / "vocab.txt").write_text("[PAD]\n")
  (path / "tokenizer_config.json").write_text("{}")
  return path, model.state_dict()


def _load_hf(out):
  model, info = InstructBlipForConditionalGeneration.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  return model.state_dict()


def _assert_every_tensor_arrived(lavis: dict, out, skip=()):
  """Every LAVIS tensor that is not ignored (q/v biases apart) is, unchanged, exactly one written tensor: the
  values are random, so equal bytes mean the right tensor, and a mapping that transposed or swapped would show."""
  reader = iblip_jax.hf.safetensors.SafetensorsReader(str(out))
  fingerprints = {}
  for name in reader.keys():
    value = reader.get(name)
    fingerprints.setdefault((tuple(value.shape), value.tobytes()), []).append(name)
  reader.close()
  for key, value in lavis.items():
    if convert_lavis.ignored_reason(key) or key in skip or key.endswith(("q_bias", "v_bias")):
      continue
    found = fingerprints.get((tuple(value.shape), value.numpy().tobytes()), [])
    assert len(found) == 1, (key, found)


def test_trimmed_instructblip_with_the_frozen_towers_of_a_hf_directory(tmp_path, frozen_t5):
  """instruct_blip_flanxl_trimmed.pth's content + --frozen-from: the command line, as a module of the repo root."""
  frozen_dir, frozen = frozen_t5
  lavis = lavis_qformer(np.random.default_rng(1))
  path = save_lavis(tmp_path / "instruct_blip_flanxl_trimmed.pth", lavis)
  out = tmp_path / "out"
  run = subprocess.run([sys.executable, "-m", "tools.convert_lavis", "--lavis", path, "--frozen-from",
                        str(frozen_dir), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 0, run.stderr
  assert "Q-Former text side (word/position embeddings, text FFN): instruct_blip_flanxl_trimmed.pth" in run.stdout
  assert f"vision tower (EVA ViT: LAVIS's visual_encoder.*): {frozen_dir}" in run.stdout
  assert "ignored 1 key(s), a buffer (0..max_position-1)" in run.stdout
  got = _load_hf(out)
  _assert_every_tensor_arrived(lavis, out)
  # the names where LAVIS and HF differ, checked one by one
  pairs = {"Qformer.bert.encoder.layer.2.crossattention.self.key.weight":
           "qformer.encoder.layer.2.crossattention.attention.key.weight",
           "Qformer.bert.encoder.layer.1.attention.self.value.bias":
           "qformer.encoder.layer.1.attention.attention.value.bias",
           "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight":
           "qformer.encoder.layer.0.intermediate_query.dense.weight",
           "Qformer.bert.encoder.layer.0.output.LayerNorm.bias": "qformer.encoder.layer.0.output.LayerNorm.bias",
           "Qformer.bert.embeddings.LayerNorm.weight": "qformer.embeddings.layernorm.weight",
           "ln_vision.weight": "vision_model.post_layernorm.weight", "t5_proj.weight": "language_projection.weight",
           "query_tokens": "query_tokens"}
  for lavis_name, hf_name in pairs.items():
    torch.testing.assert_close(got[hf_name], lavis[lavis_name], rtol=0, atol=0, msg=lavis_name)
  # the frozen towers are the HF directory's; its tokenizer files come along
  for name in ("vision_model.encoder.layers.1.self_attn.qkv.weight", "language_model.shared.weight",
               "language_model.lm_head.weight"):
    torch.testing.assert_close(got[name], frozen[name], rtol=0, atol=0, msg=name)
  assert (out / "qformer_tokenizer" / "vocab.txt").exists() and (out / "tokenizer_config.json").exists()
  model, params = iblip_jax.from_pretrained(str(out))
  assert model.config.qformer.vocab_size == VOCAB and model.config.num_query_tokens == QUERIES
  np.testing.assert_array_equal(params["query_tokens"], lavis["query_tokens"].numpy())


def test_vicuna_trimmed_file(tmp_path):
  """instruct_blip_vicuna7b_trimmed.pth: llm_proj, and the rotary buffers LLaMA kept in its state dict then."""
  frozen_dir = tmp_path / "hf_llama"
  oracle.tiny_hf_model(llama=True).save_pretrained(frozen_dir)
  lavis = lavis_qformer(np.random.default_rng(2), proj="llm_proj")
  lavis["llm_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
  p = convert_lavis.plan([save_lavis(tmp_path / "vicuna7b_trimmed.pth", lavis)], frozen_from=str(frozen_dir))
  assert set(p.ignored) == {"Qformer.bert.embeddings.position_ids",
                            "llm_model.model.layers.0.self_attn.rotary_emb.inv_freq"}
  convert_lavis.write(p, str(tmp_path / "out"))
  p.close()
  convert_lavis.verify(str(tmp_path / "out"))
  got = _load_hf(tmp_path / "out")
  torch.testing.assert_close(got["language_projection.weight"], lavis["llm_proj.weight"], rtol=0, atol=0)
  assert iblip_jax.from_pretrained(str(tmp_path / "out"))[0].config.decoder_only


def test_stage1_then_stage2_is_the_papers_initialisation(tmp_path, frozen_t5):
  """blip2_pretrained.pth (whole Q-Former + stage-1 heads) then blip2_pretrained_flant5xl.pth (no text side): the
  text side comes from stage 1, everything stage 2 has from stage 2, the stage-1 heads are left out, named."""
  frozen_dir, _ = frozen_t5
  stage1 = lavis_qformer(np.random.default_rng(3), stage1_heads=True, proj=None)
  stage2 = lavis_qformer(np.random.default_rng(4), text=False)
  paths = [save_lavis(tmp_path / "blip2_pretrained.pth", stage1),
           save_lavis(tmp_path / "blip2_pretrained_flant5xl.pth", stage2)]
  p = convert_lavis.plan(paths, frozen_from=str(frozen_dir))
  reasons = set(p.ignored.values())
  assert {k for k in p.ignored if not k.startswith("Qformer.cls.")} == {
      "Qformer.bert.embeddings.position_ids", "vision_proj.weight", "vision_proj.bias", "text_proj.weight",
      "text_proj.bias", "itm_head.weight", "itm_head.bias", "temp"}
  assert len(reasons) == 3 and any("Qformer.cls = None" in r for r in reasons)
  assert p.origin["Q-Former text side (word/position embeddings, text FFN)"] == "blip2_pretrained.pth"
  assert p.origin["projection (t5_proj / llm_proj)"] == "blip2_pretrained_flant5xl.pth"
  convert_lavis.write(p, str(tmp_path / "out"))
  p.close()
  got = _load_hf(tmp_path / "out")
  torch.testing.assert_close(got["qformer.embeddings.word_embeddings.weight"],
                             stage1["Qformer.bert.embeddings.word_embeddings.weight"], rtol=0, atol=0)
  torch.testing.assert_close(got["qformer.encoder.layer.1.output.dense.weight"],
                             stage1["Qformer.bert.encoder.layer.1.output.dense.weight"], rtol=0, atol=0)
  for lavis_name, hf_name in [("Qformer.bert.encoder.layer.1.output_query.dense.weight",
                               "qformer.encoder.layer.1.output_query.dense.weight"),
                              ("query_tokens", "query_tokens"), ("ln_vision.bias", "vision_model.post_layernorm.bias")]:
    torch.testing.assert_close(got[hf_name], stage2[lavis_name], rtol=0, atol=0)
  # stage 2 alone lacks the text side: said, with the remedy
  with pytest.raises(convert_lavis.ConversionError, match=r"(?s)missing:\n  Q-Former text side.*pass the stage-1 "
                     r"blip2_pretrained.pth first"):
    convert_lavis.plan(paths[1:], frozen_from=str(frozen_dir))


def test_a_lavis_file_with_the_towers_and_given_config(tmp_path, frozen_t5):
  """A state dict holding everything (ViT under visual_encoder with q_bias / v_bias, T5 under t5_model with its
  embed_tokens copies) converts without --frozen-from when --config gives the sizes no shape shows."""
  frozen_dir, frozen = frozen_t5
  rng = np.random.default_rng(5)
  lavis = {**lavis_qformer(rng), **lavis_eva(rng)}
  lavis.update({f"t5_model.{k[len('language_model.'):]}": v.clone() for k, v in frozen.items()
                if k.startswith("language_model.")})
  lavis["t5_model.encoder.embed_tokens.weight"] = lavis["t5_model.decoder.embed_tokens.weight"] = \
      lavis["t5_model.shared.weight"]
  path = save_lavis(tmp_path / "full.pth", lavis)
  with pytest.raises(convert_lavis.ConversionError, match="pass --config"):
    convert_lavis.plan([path])
  p = convert_lavis.plan([path], config_path=str(frozen_dir / "config.json"))
  assert p.origin["vision tower (EVA ViT: LAVIS's visual_encoder.*)"] == "full.pth"
  convert_lavis.write(p, str(tmp_path / "out"))
  convert_lavis.verify(str(tmp_path / "out"))
  got = _load_hf(tmp_path / "out")
  _assert_every_tensor_arrived(lavis, tmp_path / "out", skip={"t5_model.encoder.embed_tokens.weight",
                                                 "t5_model.decoder.embed_tokens.weight"})
  for i in range(2):
    q, v = lavis[f"visual_encoder.blocks.{i}.attn.q_bias"], lavis[f"visual_encoder.blocks.{i}.attn.v_bias"]
    torch.testing.assert_close(got[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"],
                               torch.cat([q, torch.zeros_like(q), v]), rtol=0, atol=0)
  torch.testing.assert_close(got["vision_model.embeddings.patch_embedding.weight"],
                             lavis["visual_encoder.patch_embed.proj.weight"], rtol=0, atol=0)


def test_missing_parts_are_named_and_partial_writes_what_there_is(tmp_path, capsys):
  path = save_lavis(tmp_path / "instruct_blip_flanxl_trimmed.pth", lavis_qformer(np.random.default_rng(6)))
  assert convert_lavis.main(["--lavis", path, "--out", str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err
  assert "cannot build a complete checkpoint; missing:\n  vision tower (EVA ViT: LAVIS's visual_encoder.*)\n  " \
         "language model (t5_model.* / llm_model.*)\n" in err
  assert "pass --frozen-from with a Hugging Face InstructBLIP directory" in err and not (tmp_path / "out").exists()
  assert convert_lavis.main(["--lavis", path, "--out", str(tmp_path / "out"), "--partial"]) == 0
  assert "partial: no config.json; missing:" in capsys.readouterr().out
  assert sorted(os.listdir(tmp_path / "out")) == ["model.safetensors"]
  reader = iblip_jax.hf.safetensors.SafetensorsReader(str(tmp_path / "out"))
  assert {k.split(".")[0] for k in reader.keys()} == {"qformer", "query_tokens", "vision_model",
                                                      "language_projection"}
  with pytest.raises(iblip_jax.CheckpointError, match="no config.json"):
    iblip_jax.from_pretrained(str(tmp_path / "out"))
  assert convert_lavis.main(["--lavis", path, "--out", str(tmp_path / "out"), "--partial"]) == 1
  assert "out: not empty; write to a new directory" in capsys.readouterr().err


def test_unknown_keys_are_errors_not_drops(tmp_path):
  lavis = lavis_qformer(np.random.default_rng(7))
  lavis["Qformer.bert.pooler.dense.weight"] = torch.zeros(WIDTH, WIDTH)
  lavis["visual_encoder.blocks.0.attn.relative_position_bias_table"] = torch.zeros(3, 2)
  lavis["visual_encoder.blocks.1.attn.q_bias"] = torch.zeros(WIDTH)  # without its v_bias
  with pytest.raises(convert_lavis.ConversionError) as e:
    convert_lavis.plan([save_lavis(tmp_path / "odd.pth", lavis)])
  assert str(e.value) == (
      f"{tmp_path / 'odd.pth'}: 3 key(s) with no Hugging Face InstructBLIP counterpart (a different architecture or a "
      "newer LAVIS?): Qformer.bert.pooler.dense.weight, visual_encoder.blocks.0.attn.relative_position_bias_table, "
      "visual_encoder.blocks.1.attn.q_bias (without its v_bias)")


def test_projection_for_another_llm_is_refused(tmp_path, frozen_t5):
  frozen_dir, _ = frozen_t5
  path = save_lavis(tmp_path / "xxl.pth", lavis_qformer(np.random.default_rng(8), llm=64))
  with pytest.raises(convert_lavis.ConversionError, match="the projection .* outputs 64 but the language model's "
                     "width is 32"):
    convert_lavis.plan([path], frozen_from=str(frozen_dir))


class _Payload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):  # unpickling this runs a shell command
    return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused(tmp_path, capsys):
  marker = tmp_path / "ran"
  path = tmp_path / "instruct_blip_vicuna7b_trimmed.pth"
  torch.save({"model": {"query_tokens": torch.zeros(1, 2, 3)}, "config": _Payload(marker)}, path)
  assert not marker.exists()
  assert convert_lavis.main(["--lavis", str(path), "--out", str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err
  assert "refused: the pickle would import or call code (posix.system)" in err and "not loaded" in err
  assert not marker.exists() and not (tmp_path / "out").exists()
  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
  with pytest.raises(convert_lavis.ConversionError, match="junk.pth: not a readable PyTorch checkpoint"):
    convert_lavis.load_lavis(str(tmp_path / "junk.pth"))
  torch.save({"model": {"query_tokens": torch.zeros(1), "step": 3}}, tmp_path / "mixed.pth")
  with pytest.raises(convert_lavis.ConversionError, match=r"1 entries of the state dict are not tensors \(first: "
                     r"\['step'\]\)"):
    convert_lavis.load_lavis(str(tmp_path / "mixed.pth"))
