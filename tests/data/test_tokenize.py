"""Tokenisation: LAVIS's truncation sides, bucketed padding, -100 labels; tokenizers loaded from local files."""
import pytest

from iblip_jax.data import tokenize, word_tokenizers

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
