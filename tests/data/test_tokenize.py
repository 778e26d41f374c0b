"""Tokenisation: LAVIS's truncation sides, bucketed padding, -100 labels; tokenizers loaded from local files and
checked against the model (EOS)."""
import dataclasses
import logging

import numpy as np
import pytest

import train_helper
from iblip_jax.data import tokenize
from iblip_jax.demo import word_tokenizers
from iblip_jax.models import configs as model_configs
from iblip_jax.models.instructblip import InstructBlip

WORDS = "a photo of the cat dog sits on mat what is in image short answer question caption".split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok")
  word_tokenizers.build(WORDS, str(path))
  return tokenize.load_tokenizers(str(path), max_input_len=6, max_output_len=4, buckets=(4, 8))


def test_prompts_are_left_truncated_and_bucket_padded(tok):
  out = tokenize.encode_prompts(tok, ["what is in the image", "a cat sits on the mat of the dog"])
  llm = tok.llm
  assert out["input_ids"].shape == (2, 8) and out["qformer_input_ids"].shape[1] in (4, 8)
  row = [llm.convert_ids_to_tokens(int(i)) for i in out["input_ids"][1] if i != llm.pad_token_id]
  assert row == ["the", "mat", "of", "the", "dog", "</s>"]  # the last words and EOS survive
  assert out["attention_mask"].sum(1).tolist() == [6, 6]  # "what is in the image </s>" fits in 6
  q = [tok.qformer.convert_ids_to_tokens(int(i)) for i in out["qformer_input_ids"][1][:6]]
  assert q[-1] == "[SEP]" and "dog" in q  # the end survives, the beginning was cut


def test_targets_are_right_truncated_with_ignored_padding(tok):
  out = tokenize.encode_targets(tok, ["cat", "a dog sits on the mat"])
  assert out["labels"].shape == (2, 4)
  assert out["labels"][0, 2:].tolist() == [-100, -100] and out["decoder_attention_mask"][0].tolist() == [1, 1, 0, 0]
  words = tok.llm.convert_ids_to_tokens(out["labels"][1].tolist())
  assert words == ["a", "dog", "sits", "</s>"]  # the beginning survives, EOS is kept


def test_candidates_and_decode(tok):
  cands = tokenize.encode_candidates(tok, [["cat", "dog"], ["the mat"]])
  assert cands.shape == (2, 2, 4)
  assert (cands[1, 1] == -100).all()
  assert tokenize.decode(tok, [[5, 6, 1, 0]])[0] == " ".join(tok.llm.convert_ids_to_tokens([5, 6]))


def test_missing_tokenizer_directory_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="qformer_tokenizer"):
    tokenize.load_tokenizers(str(tmp_path))


def test_buckets():
  assert tokenize.bucket(3, (4, 8)) == 4 and tokenize.bucket(8, (4, 8)) == 8 and tokenize.bucket(9, (4, 8)) == 16


@pytest.fixture(scope="module")
def vicuna_tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok_vicuna")
  word_tokenizers.build(WORDS, str(path), decoder_only=True)
  return tokenize.load_tokenizers(str(path), max_input_len=6, max_output_len=4, buckets=(4, 8), decoder_only=True)


def test_decoder_only_training_sequence(vicuna_tok):
  """LAVIS's concat_text_input_output: [</s> prompt][target </s>], padding at the end, loss on the target only."""
  tok = vicuna_tok
  out = tokenize.encode_training(tok, ["what is in the image", "a cat"], ["a cat", "the mat of the dog"])
  words = lambda row: tok.llm.convert_ids_to_tokens([int(i) for i in row])
  n = out["attention_mask"].sum(1).tolist()
  assert out["input_ids"].shape == (2, 16) and n == [9, 7]   # 6 + 3 and 3 + 4 (the target truncated to 3 + EOS)
  assert words(out["input_ids"][0][:9]) == ["</s>", "what", "is", "in", "the", "image", "a", "cat", "</s>"]
  assert words(out["input_ids"][1][:7]) == ["</s>", "a", "cat", "the", "mat", "of", "</s>"]
  assert (out["input_ids"][1][7:] == tok.llm.pad_token_id).all()
  labels = out["labels"]
  assert (labels[0][:6] == -100).all() and words(labels[0][6:9]) == ["a", "cat", "</s>"] and (labels[0][9:] == -100).all()
  assert (labels[1][:3] == -100).all() and words(labels[1][3:7]) == ["the", "mat", "of", "</s>"]
  assert out["qformer_input_ids"].shape[0] == 2 and "decoder_attention_mask" not in out


def test_decoder_only_candidates_have_no_special_tokens(vicuna_tok):
  cands = tokenize.encode_candidates(vicuna_tok, [["cat", "the dog"]])
  assert vicuna_tok.llm.convert_ids_to_tokens(cands[0, 1][:2].tolist()) == ["the", "dog"]
  assert (cands[0, 0][1:] == -100).all() and (cands[0, 1][2:] == -100).all()


def test_qformer_text_is_held_to_its_position_embeddings(tmp_path):
  """An instruction longer than the Q-Former's positions (demo: 64) keeps its end and is never padded past them,
  while the LLM prompt keeps max_input_len (128) tokens."""
  word_tokenizers.build(WORDS, str(tmp_path))
  words = [WORDS[(7 * i) % len(WORDS)] for i in range(300)]  # an irregular sequence: the kept window is checkable
  texts = [" ".join(words), "what is in the image"]
  capped = tokenize.load_tokenizers(str(tmp_path), qformer_max_len=64)
  out = tokenize.encode_training(capped, texts, ["a cat", "the dog"])
  assert out["qformer_input_ids"].shape == (2, 64) and out["input_ids"].shape == (2, 128)
  row = capped.qformer.convert_ids_to_tokens(out["qformer_input_ids"][0].tolist())
  assert row == ["[CLS]"] + words[-62:] + ["[SEP]"]  # the last 62 words between the special tokens
  assert out["qformer_attention_mask"].sum(1).tolist() == [64, 7]
  # a cap that is not a bucket bounds the padding too (bucket 64 for 63 tokens would exceed 40)
  assert tokenize.encode_prompts(tokenize.load_tokenizers(str(tmp_path), qformer_max_len=40),
                                 texts)["qformer_input_ids"].shape == (2, 40)
  # without a cap the Q-Former text is truncated at max_input_len, as before
  plain = tokenize.encode_prompts(tokenize.load_tokenizers(str(tmp_path)), texts)
  assert plain["qformer_input_ids"].shape == (2, 128) and plain["qformer_attention_mask"][0].all()


def test_fitted_buckets_minimise_padding_like_brute_force():
  import itertools
  rng = np.random.default_rng(0)
  lengths = np.concatenate([rng.integers(1, 9, 40), rng.integers(20, 40, 15), rng.integers(90, 120, 5)])
  rounded = np.minimum(-(-lengths // 8) * 8, 128)
  cost = lambda b: sum(min(v for v in b if v >= x) for x in rounded)
  for k in (1, 2, 3):
    got = tokenize.fit_buckets(lengths, k, 128)
    assert got[-1] == 128 and len(got) <= k and all(v % 8 == 0 for v in got)
    candidates = sorted(set(rounded.tolist()) | {128})
    best = min(cost(c + (128,)) for n in range(k) for c in itertools.combinations(candidates[:-1], n))
    assert cost(got) == best


def _vicuna_like(eos: int) -> InstructBlip:
  cfg = model_configs.from_dict(train_helper.load_config("tiny_vicuna").model.to_dict())
  return InstructBlip(cfg.replace(text=dataclasses.replace(cfg.text, eos_token_id=eos)))


def test_tokenizer_eos_wins_with_a_warning(caplog):
  """The Vicuna hub config says eos 1; its tokenizer's </s> is 2 (what LAVIS stops on)."""
  with caplog.at_level(logging.WARNING):
    model = tokenize.align_eos(_vicuna_like(eos=1), 2, "ckpt")
  assert model.config.text.eos_token_id == 2
  assert "EOS id is 2 but the model config says 1" in caplog.text


def test_matching_eos_leaves_the_model_alone(caplog):
  model = _vicuna_like(eos=2)
  with caplog.at_level(logging.WARNING):
    assert tokenize.align_eos(model, 2, "ckpt") is model
  assert not caplog.text
