"""Small word-level tokenizer pairs in Hugging Face format, for tests and the embedded demo.

The released checkpoints carry their own tokenizers (bert-base-uncased + [DEC] for the Q-Former, FlanT5's
sentencepiece model); nothing here replaces them. These exist because nothing can be downloaded in tests: they
follow the same conventions (Q-Former: [CLS] ... [SEP], pad 0; LLM: text </s>, pad 0, eos 1) and load through the
same `load_tokenizers` path.
"""
import os

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertTokenizerFast, PreTrainedTokenizerFast

QFORMER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
LLM_SPECIALS = ["<pad>", "</s>", "<unk>"]


def build(words, out_dir: str, *, decoder_only: bool = False) -> None:
  """Writes an LLM tokenizer to `out_dir` and a Q-Former tokenizer to `out_dir/qformer_tokenizer`.

  decoder_only: Vicuna's conventions as LAVIS sets them, </s> prepended as BOS and nothing appended (ids: pad 0,
  </s> 2, unk 1), instead of T5's "text </s>" (pad 0, </s> 1, unk 2)."""
  words = sorted({w.lower() for w in words} - set(QFORMER_SPECIALS) - set(LLM_SPECIALS))
  os.makedirs(os.path.join(out_dir, "qformer_tokenizer"), exist_ok=True)
  vocab_file = os.path.join(out_dir, "qformer_tokenizer", "vocab.txt")
  # one line per token: a duplicate line would shift every later id past the vocabulary size
  lines = list(dict.fromkeys(QFORMER_SPECIALS + words + list("abcdefghijklmnopqrstuvwxyz0123456789.,?!'\":;-()")))
  with open(vocab_file, "w") as f:
    f.write("\n".join(lines) + "\n")
  BertTokenizerFast(vocab_file, do_lower_case=True, bos_token="[DEC]").save_pretrained(
      os.path.join(out_dir, "qformer_tokenizer"))

  specials = ["<pad>", "<unk>", "</s>"] if decoder_only else LLM_SPECIALS
  vocab = {w: i for i, w in enumerate(specials + words)}
  eos = vocab["</s>"]
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
  tok.post_processor = processors.TemplateProcessing(single="</s> $A" if decoder_only else "$A </s>",
                                                     special_tokens=[("</s>", eos)])
  extra = dict(bos_token="</s>") if decoder_only else {}
  PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                          **extra).save_pretrained(out_dir)
