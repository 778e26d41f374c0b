"""Instruction templates against the reference document (parsed, not copied), and deterministic rendering."""
import pathlib
import re

import numpy as np
import pytest

from iblip_jax.data import templates
from iblip_jax.evaluation import tasks

REFERENCE = "shared/reference/lavis_instructblip.md"
# Section 3.6 of that document as it was when the templates were checked, so the check runs where the team's
# shared/ folder is not beside the repository (a clean CI machine); test_snapshot_is_current keeps it honest.
SNAPSHOT = pathlib.Path(__file__).resolve().parents[1] / "golden" / "lavis_instructblip_3_6.md"


def _reference_path() -> pathlib.Path | None:
  # The reference lives in ../shared beside the repo here; a copy of the tree may carry shared/ inside it.
  here = pathlib.Path(__file__).resolve()
  for directory in here.parents:
    for candidate in (directory / REFERENCE, directory.parent / REFERENCE):
      if candidate.is_file():
        return candidate
  return None


def _section(text: str) -> str:
  return text[text.index("### 3.6"):text.index("### 3.7")]


def test_snapshot_is_current():
  path = _reference_path()
  if path is None:
    pytest.skip(f"{REFERENCE} not found beside the repository; the snapshot stands in for it")
  assert SNAPSHOT.read_text(encoding="utf-8") == _section(path.read_text(encoding="utf-8")), \
      f"{REFERENCE} section 3.6 changed: re-check the templates and refresh {SNAPSHOT}"


@pytest.fixture(scope="module")
def reference_lists() -> dict[str, list[str]]:
  """Section 3.6's bullets -> their backquoted templates, e.g. {"Captioning (13)": [...], ...}."""
  path = _reference_path()
  section = _section(path.read_text(encoding="utf-8")) if path else SNAPSHOT.read_text(encoding="utf-8")
  lists = {}
  for bullet in re.split(r"\n- ", section)[1:]:
    title = re.match(r"\*\*(.+?)\*\*", bullet)
    if title:
      lists[title.group(1)] = re.findall(r"`([^`]+)`", bullet)
  return lists


def _list(reference_lists, prefix):
  (key,) = [k for k in reference_lists if k.startswith(prefix)]
  return key, reference_lists[key]


def test_counts():
  assert len(templates.CAPTION_TEMPLATES) == 13
  assert len(templates.VQA_TEMPLATES) == 10
  assert len(templates.VQG_TEMPLATES) == 6
  for group in templates.TASK_TEMPLATES.values():
    assert len(set(group)) == len(group)


@pytest.mark.parametrize("prefix, ours", [("Captioning", templates.CAPTION_TEMPLATES),
                                          ("VQA", templates.VQA_TEMPLATES),
                                          ("VQG", templates.VQG_TEMPLATES)])
def test_templates_match_the_reference_document(reference_lists, prefix, ours):
  key, theirs = _list(reference_lists, prefix)
  assert list(ours) == theirs
  count = re.search(r"\((\d+)\)", key)  # the document's own count, where it gives one
  if count:
    assert len(ours) == int(count.group(1))


def test_a_few_exact_strings(reference_lists):
  _, caption = _list(reference_lists, "Captioning")
  _, vqa = _list(reference_lists, "VQA")
  _, vqg = _list(reference_lists, "VQG")
  assert "Could you use a few words to describe what you perceive in the photo?" in caption
  assert templates.CAPTION_TEMPLATES[0] == caption[0] == "A short image caption:"
  assert templates.VQA_TEMPLATES[4] == vqa[4] == "Question: {Question} Short answer:"
  assert templates.VQA_TEMPLATES[-1] == vqa[-1]
  assert templates.VQG_TEMPLATES[-1] == vqg[-1]
  assert "generate an question" in templates.VQG_TEMPLATES[-1]  # the paper's wording, kept


def test_held_in_mapping():
  assert len(templates.HELD_IN) == 13
  assert templates.templates_for("coco_caption") == templates.CAPTION_TEMPLATES
  assert templates.templates_for("ocrvqa") == templates.VQA_TEMPLATES
  for name in ("vqg", "okvqa_qg", "aokvqa_qg"):
    assert templates.templates_for(name) == templates.VQG_TEMPLATES
  for name in ("llava_conversation", "llava_complex_reasoning", "llava_detail", "llava_instruct", "jsonl"):
    assert templates.templates_for(name) == ()
  # held-in names line up with the held-in evaluation tasks where those exist
  for name in ("coco_caption", "textcaps", "vqav2", "okvqa", "aokvqa", "ocrvqa"):
    assert name in templates.HELD_IN and not tasks.get(name).held_out
  with pytest.raises(ValueError, match="no instruction templates"):
    templates.render("nocaps", {"captions": ["x"]}, np.random.default_rng(0))


VQA_RECORD = {"id": 1, "question": "what color is the cat?", "answers": ["red"] * 6 + ["orange"] * 4}


def _renders(dataset, record, seed, n=20):
  rng = np.random.default_rng(seed)
  return [templates.render(dataset, record, rng) for _ in range(n)]


def test_rendering_is_deterministic_for_a_seed():
  caption = {"id": 7, "captions": ["a cat on a mat", "a cat", "the cat sits"]}
  assert _renders("coco_caption", caption, 3) == _renders("coco_caption", caption, 3)
  assert _renders("vqav2", VQA_RECORD, 3) == _renders("vqav2", VQA_RECORD, 3)
  assert _renders("vqav2", VQA_RECORD, 3) != _renders("vqav2", VQA_RECORD, 4)
  # over many draws every template and every caption shows up
  many = _renders("coco_caption", caption, 0, n=400)
  assert {i for i, _ in many} == set(templates.CAPTION_TEMPLATES)
  assert {o for _, o in many} == set(caption["captions"])


def test_rendered_text():
  for text_input, text_output in _renders("vqav2", VQA_RECORD, 0, n=50):
    assert text_output in ("red", "orange")
    assert "what color is the cat?" in text_input and "{Question}" not in text_input
    assert any(text_input == t.replace("{Question}", "what color is the cat?") for t in templates.VQA_TEMPLATES)
  for text_input, text_output in _renders("vqg", VQA_RECORD, 0, n=50):
    assert text_output == "what color is the cat?"
    assert any(text_input == t.replace("{Answer}", a) for t in templates.VQG_TEMPLATES for a in ("red", "orange"))
  # a single canonical answer is used when there is no answer list
  assert templates.render("ocrvqa", {"question": "who wrote this book?", "answer": "Sandra Boynton"},
                          np.random.default_rng(0))[1] == "Sandra Boynton"
  llava = {"text_input": "What is in the image?", "text_output": "A cat.", "captions": ["ignored"]}
  assert templates.render("llava_detail", llava, np.random.default_rng(0)) == ("What is in the image?", "A cat.")
  with pytest.raises(ValueError, match="'question'"):
    templates.render("vqav2", {"id": 5, "answers": ["a"]}, np.random.default_rng(0))


def test_ocr_injection():
  tokens = [f"w{i}" for i in range(40)]
  record = {"id": "abc", "captions": ["a sign that says stop"], "ocr_tokens": tokens}
  text_input, _ = templates.render("textcaps", record, np.random.default_rng(0))
  prefix = "OCR tokens: " + ", ".join(tokens[:30]) + ". "
  assert text_input.startswith(prefix)
  assert text_input[len(prefix):] in templates.CAPTION_TEMPLATES
  assert "w30" not in text_input  # only the first 30 tokens, as LAVIS
  # the same draw without OCR tokens gives the bare template; datasets outside the scene-text set never get them
  bare, _ = templates.render("textcaps", {**record, "ocr_tokens": []}, np.random.default_rng(0))
  assert text_input == prefix + bare
  assert not templates.render("vqav2", {**VQA_RECORD, "ocr_tokens": tokens},
                              np.random.default_rng(0))[0].startswith("OCR")
  vqa_input, _ = templates.render("textvqa", {**VQA_RECORD, "ocr_tokens": ["stop"]}, np.random.default_rng(0))
  assert vqa_input.startswith("OCR tokens: stop. ")
  # the same wording as the TextVQA zero-shot prompt
  assert tasks.get("textvqa").prompt.startswith(templates.OCR_PREFIX.format("{ocr_tokens}").rstrip())
