"""Independent oracle: transformers' PyTorch InstructBlipForConditionalGeneration on tiny random configs.

transformers' default init hides bugs (vision weights ~1e-10, zero query tokens, unit LayerNorms), so every
parameter is re-randomised; the k third of the fused qkv bias stays zero as in every real checkpoint.
"""
import numpy as np
import torch
from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

NUM_QUERY = 10
IMAGE_TOKEN = 98
# The word-level vocabulary of the evaluator tests' tokenizers (conftest.py tiny_eval): every word their prompts and
# candidates use.
EVAL_WORDS = ("question short answer what color is the cat dog yes no red blue true false green big small a an of "
              "very dark light hateful image with written on it this description options").split()


def tiny_hf_config(*, tie: bool = True, cross_attention_frequency: int = 2, num_decoder_layers: int = 2,
                   dense_act_fn: str = "gelu", image_size: int = 30) -> InstructBlipConfig:
  vision = dict(image_size=image_size, patch_size=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=37, initializer_range=0.02)
  qformer = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                 cross_attention_frequency=cross_attention_frequency)
  text = dict(model_type="t5", vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2,
              num_decoder_layers=num_decoder_layers, num_heads=4, relative_attention_num_buckets=8,
              relative_attention_max_distance=20, feed_forward_proj="gated-gelu", dense_act_fn=dense_act_fn,
              tie_word_embeddings=tie, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, bos_token_id=1)
  return InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=text,
                            num_query_tokens=NUM_QUERY, image_token_index=IMAGE_TOKEN)


def tiny_hf_llama_config(*, kv_heads: int = 2, rope: dict | None = None, image_size: int = 30) -> InstructBlipConfig:
  """Decoder-only variant: LLaMA with grouped-query attention (4 query heads share 2 key/value heads)."""
  cfg = tiny_hf_config(image_size=image_size)
  text = dict(model_type="llama", vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=kv_heads, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              rope_parameters=rope or {"rope_theta": 500.0, "rope_type": "default"})
  return InstructBlipConfig(vision_config=cfg.vision_config.to_dict(), qformer_config=cfg.qformer_config.to_dict(),
                            text_config=text, num_query_tokens=NUM_QUERY, image_token_index=IMAGE_TOKEN)


def tiny_hf_video_config(*, llama: bool = False, **config_kw):
  """transformers' InstructBLIP-Video format of the same tiny model; its frames' placeholder is IMAGE_TOKEN."""
  from transformers import InstructBlipVideoConfig
  cfg = tiny_hf_llama_config(**config_kw) if llama else tiny_hf_config(**config_kw)
  return InstructBlipVideoConfig(vision_config=cfg.vision_config.to_dict(), qformer_config=cfg.qformer_config.to_dict(),
                                 text_config=cfg.text_config.to_dict(), num_query_tokens=NUM_QUERY,
                                 video_token_index=IMAGE_TOKEN)


def tiny_hf_model(seed: int = 0, *, untie_head: bool = False, llama: bool = False, video: bool = False,
                  **config_kw) -> InstructBlipForConditionalGeneration:
  """A re-randomised tiny model in eval mode with eager attention (fp32); `video`: transformers'
  InstructBlipVideoForConditionalGeneration instead."""
  torch.manual_seed(seed)
  if video:
    from transformers import InstructBlipVideoForConditionalGeneration
    model = InstructBlipVideoForConditionalGeneration(tiny_hf_video_config(llama=llama, **config_kw)).eval()
  else:
    config = tiny_hf_llama_config(**config_kw) if llama else tiny_hf_config(**config_kw)
    model = InstructBlipForConditionalGeneration(config).eval()
  model.set_attn_implementation("eager")
  if untie_head:  # a separate head, as in the released FlanT5 checkpoints
    lm = model.language_model
    lm.lm_head.weight = torch.nn.Parameter(torch.empty_like(lm.shared.weight))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("qkv.bias"):
        p.normal_(0, 0.1)
        p[p.shape[0] // 3: 2 * p.shape[0] // 3] = 0
      elif ("norm" in name.lower()) and name.endswith("weight"):
        p.copy_(1 + 0.1 * torch.randn_like(p))
      else:
        p.normal_(0, 0.1)
  return model


def tiny_batch(seed: int = 0, batch: int = 3, image_size: int = 30) -> dict[str, np.ndarray]:
  """Uneven instruction, prompt and target lengths (right padding, as the tokenizers produce)."""
  rng = np.random.default_rng(seed)
  def mask(lengths, width):
    return (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
  lengths = {"q": [7, 4, 2], "p": [3, 6, 5], "d": [5, 5, 3]}
  out = dict(
      pixel_values=rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32),
      qformer_input_ids=rng.integers(1, 99, (batch, 7)), qformer_attention_mask=mask(lengths["q"][:batch], 7),
      input_ids=rng.integers(2, 98, (batch, 6)), attention_mask=mask(lengths["p"][:batch], 6),
      decoder_input_ids=rng.integers(2, 98, (batch, 5)), decoder_attention_mask=mask(lengths["d"][:batch], 5))
  for k in ("qformer_input_ids", "input_ids", "decoder_input_ids"):  # pad id 0 where masked
    out[k] = out[k] * out[k.replace("input_ids", "attention_mask")]
  return out


def hf_inputs(batch: dict[str, np.ndarray]) -> dict:
  """Our batch in transformers' layout: NCHW pixels and Q image placeholder tokens before the prompt."""
  t = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items() if v is not None}
  b = t["input_ids"].shape[0]
  return dict(t, pixel_values=t["pixel_values"].permute(0, 3, 1, 2),
              input_ids=torch.cat([torch.full((b, NUM_QUERY), IMAGE_TOKEN), t["input_ids"]], 1),
              attention_mask=torch.cat([torch.ones(b, NUM_QUERY, dtype=torch.long), t["attention_mask"]], 1))


def hf_forward(model, batch: dict[str, np.ndarray], **kw):
  """transformers' forward on our batch layout."""
  with torch.no_grad():
    return model(**hf_inputs(batch), **kw)


def hf_generate(model, batch: dict[str, np.ndarray], **kw) -> np.ndarray:
  """transformers' greedy/beam generate on our batch layout: its whole output (T5: the start token first;
  decoder-only: image tokens and prompt first)."""
  with torch.no_grad():
    return model.generate(**hf_inputs(batch), do_sample=False, **kw).numpy()


# Generation settings compared token for token with transformers (tests/test_decoding.py, test_decoding_llama.py):
# greedy, beams, length penalties of both signs, repetition penalty, min_new_tokens, several returned sequences.
DECODING_SETTINGS = [
    dict(num_beams=1),
    dict(num_beams=1, repetition_penalty=1.5, min_new_tokens=4),
    dict(num_beams=3),
    dict(num_beams=4, length_penalty=-1.0),
    dict(num_beams=5, length_penalty=1.0, repetition_penalty=1.5),
    dict(num_beams=5, length_penalty=-1.0, repetition_penalty=1.5, min_new_tokens=3, num_return_sequences=3),
    dict(num_beams=3, min_new_tokens=6),
]


def assert_same_tokens(ours, theirs, eos=1, pad=0):
  """Equal up to and including EOS; after EOS ours is padding (transformers fills with whatever it used)."""
  ours = np.asarray(ours)
  assert ours.shape[0] == theirs.shape[0]
  for row_ours, row_theirs in zip(ours, theirs):
    n = len(row_theirs)
    if eos in row_theirs:
      n = int(np.argmax(row_theirs == eos)) + 1
    np.testing.assert_array_equal(row_ours[:n], row_theirs[:n])
    assert (row_ours[n:] == pad).all() or n == len(row_ours)


def word_checkpoint(path, words, *, llama: bool, seed: int) -> str:
  """A tiny checkpoint with word-level tokenizers in `path`, as a user's directory (Pipeline.from_pretrained). The
  Vicuna one gets a sharper distribution with a likely EOS, so that answers end at different lengths."""
  from iblip_jax.demo import word_tokenizers
  hf = tiny_hf_model(seed=seed, llama=llama)
  if llama:
    with torch.no_grad():
      hf.language_model.lm_head.weight.mul_(6.0)
  hf.save_pretrained(path)
  word_tokenizers.build(words, str(path), decoder_only=llama)
  return str(path)
