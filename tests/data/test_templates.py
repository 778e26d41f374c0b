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
    templates.render("imagenet", {"captions": ["x"]}, np.random.default_rng(0))


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


MC_RECORD = {"id": "4", "question": "Which animal's feet are adapted for swimming?",
             "candidates": ["duck", "cat", "horse"], "answer_index": 0}


def test_multiple_choice_lists_the_options_in_a_vqa_template():
  """ScienceQA-IMG, IconQA choose_txt and A-OKVQA MC: the question with LAVIS's "(a) x (b) y" options inside one of
  the VQA templates; the target is the correct option's text."""
  question = "Which animal's feet are adapted for swimming? Options: (a) duck (b) cat (c) horse"
  seen = set()
  for dataset in ("scienceqa_img", "iconqa", "aokvqa_mc"):
    for text_input, text_output in _renders(dataset, MC_RECORD, 0, n=60):
      assert text_output == "duck"
      (template,) = [t for t in templates.VQA_TEMPLATES if text_input == t.replace("{Question}", question)]
      seen.add(template)
  assert seen == set(templates.VQA_TEMPLATES)
  # ScienceQA's hint comes first, worded as its zero-shot prompt; an empty hint adds nothing
  with_hint, _ = templates.render("scienceqa_img", {**MC_RECORD, "context": "Ducks live near water."},
                                  np.random.default_rng(1))
  bare, _ = templates.render("scienceqa_img", {**MC_RECORD, "context": ""}, np.random.default_rng(1))
  assert with_hint == "Context: Ducks live near water. " + bare
  # A-OKVQA records carry both settings: "aokvqa" trains on the direct answers, "aokvqa_mc" on the choice
  both = {**MC_RECORD, "answers": ["webbed feet"] * 10}
  assert templates.render("aokvqa", both, np.random.default_rng(0))[1] == "webbed feet"
  assert templates.render("aokvqa_mc", both, np.random.default_rng(0))[1] == "duck"
  # an IconQA fill_in_blank record has no options: plain VQA on its answer
  blank_input, blank_output = templates.render("iconqa", {"id": "3", "question": "How many dots?", "answer": "7"},
                                               np.random.default_rng(0))
  assert blank_output == "7" and "Options" not in blank_input
  for bad, message in (({**MC_RECORD, "answer_index": 3}, "does not index its 3 candidates"),
                       ({**MC_RECORD, "answer_index": -1}, "does not index"),
                       ({k: v for k, v in MC_RECORD.items() if k != "answer_index"}, "'answer_index'")):
    with pytest.raises(ValueError, match=message):
      templates.render("scienceqa_img", bad, np.random.default_rng(0))


def test_classification_and_dialog_use_their_zero_shot_prompt_and_the_right_candidate():
  rng = np.random.default_rng(0)
  assert templates.render("vsr", {"caption": "The cat is under the table.", "label": 0, "answer_index": 0}, rng) == (
      'Based on the image, is this statement true or false? "The cat is under the table." Answer:', "false")
  assert templates.render("hateful_memes", {"text": "have a nice day", "label": 1}, rng) == (
      'This is an image with: "have a nice day" written on it. Is it hateful? Answer:', "yes")
  dialog = {"history": "a cat. q: is it black? a: yes", "question": "is it big?", "candidates": ["no", "yes", "maybe"],
            "answer_index": 2}
  assert templates.render("visdial", dialog, rng) == (
      "Dialog history: a cat. q: is it black? a: yes\n Question: is it big? Short answer:", "maybe")
  assert templates.templates_for("vsr") == (tasks.get("vsr").prompt,)
  with pytest.raises(ValueError, match="'label'"):
    templates.render("hateful_memes", {"id": 9, "text": "unlabelled test line"}, rng)


def test_every_reader_has_a_renderer():
  from iblip_jax.data import readers
  assert set(readers.READERS) == set(templates.DATASET_TASKS)


def _format(dataset, record, fmt, seed=0):
  return templates.render(dataset, record, np.random.default_rng(seed), instruction_format=fmt)


def test_multitask_formats_without_instructions():
  """The paper's multitask baselines: the raw input alone, or behind a [Task:Dataset] identifier; the targets are
  drawn as for instruction tuning; LLaVA's own texts are used as they are."""
  caption = {"id": 7, "captions": ["a cat on a mat"]}
  assert _format("coco_caption", caption, "raw") == ("", "a cat on a mat")
  assert _format("coco_caption", caption, "dataset_name") == ("[Image captioning:COCO Caption]", "a cat on a mat")
  one_answer = {**VQA_RECORD, "answers": ["red"] * 10}
  assert _format("vqav2", one_answer, "raw") == ("what color is the cat?", "red")
  assert _format("vqav2", one_answer, "dataset_name") == (
      "[Visual question answering:VQAv2] what color is the cat?", "red")
  answers = {_format("okvqa", VQA_RECORD, "raw", seed)[1] for seed in range(40)}
  assert answers == {"red", "orange"}   # one annotator's answer per draw, as with templates
  assert _format("vqg", VQA_RECORD, "raw", 1) == (_format("vqav2", VQA_RECORD, "raw", 1)[1], "what color is the cat?")
  assert _format("aokvqa_qg", VQA_RECORD, "dataset_name", 1)[0].startswith("[Visual question generation:A-OKVQA] ")
  assert _format("scienceqa_img", {**MC_RECORD, "context": "Ducks swim."}, "raw") == (
      "Context: Ducks swim. Which animal's feet are adapted for swimming? Options: (a) duck (b) cat (c) horse", "duck")
  assert _format("hateful_memes", {"text": "have a nice day", "label": 1}, "dataset_name") == (
      "[Image classification:HatefulMemes] have a nice day", "yes")
  assert _format("textvqa", {**VQA_RECORD, "ocr_tokens": ["stop"]}, "raw")[0] == (
      "OCR tokens: stop. what color is the cat?")
  llava = {"text_input": "What is in the image?", "text_output": "A cat."}
  assert _format("llava_conversation", llava, "dataset_name") == ("What is in the image?", "A cat.")
  # nothing of a template is left; an empty question is a bad record, an empty caption input is meant
  for fmt in ("raw", "dataset_name"):
    text_input = _format("vqav2", VQA_RECORD, fmt)[0]
    assert not any(t.replace("{Question}", "").strip(" ?:.\"") in text_input for t in templates.VQA_TEMPLATES[1:])
    with pytest.raises(ValueError, match="its 'question' is empty"):
      _format("vqav2", {**VQA_RECORD, "question": "  "}, fmt)
  with pytest.raises(ValueError, match="instruction_format='none'"):
    _format("vqav2", VQA_RECORD, "none")
  named = {d for d, task in templates.DATASET_TASKS.items() if task is not None}
  assert named <= set(templates.DATASET_NAMES)   # every templated dataset has its identifier


def test_the_training_pipeline_keeps_an_empty_caption_instruction():
  """The input pipeline skips empty texts as bad data, except an instruction a renderer returns as exactly "" (raw
  captions); the batch then holds the tokenizer's encoding of an empty prompt."""
  from PIL import Image
  from iblip_jax.data import pipeline, sources
  image = Image.new("RGB", (8, 8))
  render = sources.renderer("raw")
  example = pipeline.load_example({"dataset": "coco_caption", "id": 1, "image": image, "captions": ["a cat"]},
                                  np.random.default_rng(0), image_size=8, train=False, render=render)
  assert example["text_input"] == "" and example["text_output"] == "a cat"
  bad = pipeline.load_example({"dataset": "vqav2", "id": 2, "image": image, "question": " ", "answers": ["a"]},
                              np.random.default_rng(0), image_size=8, train=False, render=render)
  assert bad == {pipeline.SKIP: "bad_record:ValueError"}
