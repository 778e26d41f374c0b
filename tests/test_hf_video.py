"""transformers' InstructBLIP-Video format (InstructBlipVideoForConditionalGeneration): loaded with equal logits
and tokens on a 4-frame clip (FlanT5 and LLaMA), kept on export, and its frame sampling matched."""
import json
import logging

import numpy as np
import pytest
import torch
from transformers import InstructBlipVideoForConditionalGeneration
from transformers.video_utils import VideoMetadata, default_sample_indices_fn

import iblip_jax
import oracle
from iblip_jax.data import preprocess

FRAMES = 4


def _clip_batch(llama: bool) -> dict:
  """Three 4-frame clips, each frame different; prompts right-padded (FlanT5) or left-padded (LLaMA)."""
  b = oracle.tiny_batch(seed=7)
  p = b["pixel_values"]
  b["pixel_values"] = np.stack([p, p[::-1] * 0.7, -p, np.roll(p, 5, axis=1)], axis=1)   # (B, T, H, W, 3)
  if llama:
    lengths, width = b["attention_mask"].sum(1), b["input_ids"].shape[1]
    ids, mask = np.zeros_like(b["input_ids"]), np.zeros_like(b["attention_mask"])
    for i, n in enumerate(lengths):
      ids[i, width - n:], mask[i, width - n:] = b["input_ids"][i, :n], 1
    b.update(input_ids=ids, attention_mask=mask)
  return b


def _hf_inputs(batch: dict) -> dict:
  """transformers' layout: (B, T, C, H, W) pixels and T x Q video placeholders before the prompt."""
  t = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
  b, n = t["input_ids"].shape[0], FRAMES * oracle.NUM_QUERY
  return dict(t, pixel_values=t["pixel_values"].permute(0, 1, 4, 2, 3),
              input_ids=torch.cat([torch.full((b, n), oracle.IMAGE_TOKEN), t["input_ids"]], 1),
              attention_mask=torch.cat([torch.ones(b, n, dtype=torch.long), t["attention_mask"]], 1))


@pytest.fixture(scope="module", params=[False, True], ids=["t5", "llama"])
def video_models(request, tmp_path_factory):
  llama = request.param
  path = tmp_path_factory.mktemp("video") / ("llama" if llama else "t5")
  hf = oracle.tiny_hf_model(seed=11, llama=llama, video=True)
  with torch.no_grad():   # a sharper distribution, and the placeholder id a likely answer: the repetition
    hf.language_model.lm_head.weight.mul_(8.0)   # penalty then tells whether it counts as seen (it does for LLaMA)
    hf.language_model.lm_head.weight[oracle.IMAGE_TOKEN].mul_(2.5)
  hf.save_pretrained(path)
  return llama, path, hf


def _logits(model, params, batch, llama):
  if llama:
    inputs = {k: v for k, v in batch.items() if not k.startswith("decoder")}
    return np.asarray(model.apply({"params": params}, **inputs))
  return np.asarray(model.apply({"params": params}, **batch))


def test_loads_with_equal_logits_and_tokens(video_models, caplog):
  llama, path, hf = video_models
  caplog.set_level(logging.WARNING)
  model, params = iblip_jax.from_pretrained(str(path))
  assert not [r for r in caplog.records if "unknown field" in r.getMessage()]   # video_token_index is read
  assert model.config.video_format and model.config.video_token_index == oracle.IMAGE_TOKEN
  batch = _clip_batch(llama)
  with torch.no_grad():
    if llama:
      inputs = {k: v for k, v in _hf_inputs(batch).items() if not k.startswith("decoder")}
      want = hf(**inputs).logits.numpy()
    else:
      want = hf(**_hf_inputs(batch)).logits.numpy()
  np.testing.assert_allclose(_logits(model, params, batch, llama), want, atol=2e-5, rtol=1e-4)

  gen = {k: v for k, v in batch.items() if not k.startswith("decoder")}
  # the penalty counts the prompt (video placeholders included, for LLaMA) as already generated
  for setting in (dict(num_beams=1), dict(num_beams=1, repetition_penalty=1.5), dict(num_beams=3)):
    ours = iblip_jax.generate(model, params, **gen, max_new_tokens=8, min_new_tokens=0, **setting)
    with torch.no_grad():
      theirs = hf.generate(**{k: v for k, v in _hf_inputs(batch).items() if not k.startswith("decoder")},
                           do_sample=False, max_new_tokens=8, **setting).numpy()
    eos = 2 if llama else 1
    theirs = theirs[:, _hf_inputs(batch)["input_ids"].shape[1]:] if llama else theirs[:, 1:]
    oracle.assert_same_tokens(ours, theirs, eos=eos)


def test_export_keeps_the_video_format(video_models, tmp_path):
  llama, path, hf = video_models
  model, params = iblip_jax.from_pretrained(str(path))
  iblip_jax.save_pretrained(model, params, str(tmp_path / "out"))
  written = json.loads((tmp_path / "out" / "config.json").read_text())
  assert written["model_type"] == "instructblipvideo"
  assert written["architectures"] == ["InstructBlipVideoForConditionalGeneration"]
  assert written["video_token_index"] == oracle.IMAGE_TOKEN
  back = InstructBlipVideoForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
  back.set_attn_implementation("eager")
  assert type(back.config).__name__ == "InstructBlipVideoConfig"
  batch = _clip_batch(llama)
  inputs = _hf_inputs(batch)
  if llama:
    inputs = {k: v for k, v in inputs.items() if not k.startswith("decoder")}
  with torch.no_grad():
    np.testing.assert_array_equal(back(**inputs).logits.numpy(), hf(**inputs).logits.numpy())
    np.testing.assert_array_equal(back.generate(**{k: v for k, v in inputs.items() if not k.startswith("decoder")},
                                                do_sample=False, max_new_tokens=6).numpy(),
                                  hf.generate(**{k: v for k, v in inputs.items() if not k.startswith("decoder")},
                                              do_sample=False, max_new_tokens=6).numpy())


def test_an_image_checkpoint_still_exports_as_instructblip(tmp_path):
  oracle.tiny_hf_model(seed=1).save_pretrained(tmp_path / "a")
  model, params = iblip_jax.from_pretrained(str(tmp_path / "a"))
  assert not model.config.video_format
  iblip_jax.save_pretrained(model, params, str(tmp_path / "b"))
  written = json.loads((tmp_path / "b" / "config.json").read_text())
  assert written["model_type"] == "instructblip" and "video_token_index" not in written


@pytest.mark.parametrize("total", [4, 5, 7, 8, 13, 30, 31, 100, 257, 1001])
def test_frames_sampled_as_the_video_processor_samples_them(total):
  """Our 4 frames of an N-frame clip are the ones transformers' video processor samples (num_frames=4)."""
  want = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=25.0), num_frames=FRAMES)
  np.testing.assert_array_equal(preprocess.video_frame_indices(total, FRAMES), want)
