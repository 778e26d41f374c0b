"""The demo's procedural dataset: deterministic, held-out task absent from the training files."""
import json
import re

from iblip_jax.data import readers
from iblip_jax.demo import shapes


def _lines(path):
  return [json.loads(l) for l in open(path)]


def test_deterministic_and_readable(tmp_path):
  a = shapes.generate(str(tmp_path / "a"), train=6, val=3, seed=4)
  b = shapes.generate(str(tmp_path / "b"), train=6, val=3, seed=4)
  for name in a:
    assert _lines(a[name]) == _lines(b[name])
  assert (tmp_path / "a" / "images" / "train_00000.png").read_bytes() == \
      (tmp_path / "b" / "images" / "train_00000.png").read_bytes()
  records = list(readers.read_jsonl(a["caption"]))
  assert len(records) == 6 and records[0]["image"].startswith(str(tmp_path / "a"))
  for row in readers.read_jsonl(a["val_mc"]):
    pool = shapes.SHAPES if row["question"] == shapes.SHAPE_QUESTION else tuple(shapes.COLORS)
    assert len(set(row["candidates"])) == 3 and set(row["candidates"]) <= set(pool)
    assert row["answer_index"] in (0, 1, 2)


def test_text_stage_puts_the_caption_where_the_visual_tokens_go(tmp_path):
  """Stage A's records carry the caption apart (it goes in front of the prompt, as the visual tokens do), and
  every caption is exactly 7 words, which with EOS fills the demo's 8 query slots."""
  files = shapes.generate(str(tmp_path), train=20, val=0, seed=2)
  rows = _lines(files["pretrain_text"])
  assert len(rows) == 20 * 7   # 3 questions, 3 multiple-choice versions, 1 caption per image
  for row in rows:
    assert len(row["caption"].split()) == 7 and row["caption"] not in row["text_input"]


def test_held_out_format_never_appears_in_instruction_tuning(tmp_path):
  files = shapes.generate(str(tmp_path), train=50, val=2, seed=0)
  for name in ("caption", "vqa", "qgen"):
    for row in _lines(files[name]):
      assert "options" not in row["text_input"].lower()


def test_vocabulary_covers_every_text(tmp_path):
  files = shapes.generate(str(tmp_path), train=30, val=5, seed=1)
  vocab = set(shapes.vocabulary())
  for name, path in files.items():
    for row in _lines(path):
      for key in ("text_input", "text_output", "question", "caption"):
        for word in re.findall(r"\w+|[^\w\s]", row.get(key, "")):  # as the tokenizer splits punctuation
          assert word.lower() in vocab, (name, word)
