"""Multiple choice, classification and dialogue: VSR, IconQA, ScienceQA-IMG, Hateful Memes, Visual Dialog."""
import os
from typing import Iterator

from iblip_jax.data import conversation
from iblip_jax.data.readers.files import (as_int, expect, field, first_file, iter_jsonl, join_path, load_json,
                                          make_record)

def read_vsr(root: str, split: str = "test", variant: str = "zeroshot", image_dir: str | None = None) -> Iterator[dict]:
  """Visual Spatial Reasoning (github.com/cambridgeltl/visual-spatial-reasoning, data/): splits/{variant}/{split}.jsonl
  (variant zeroshot | random; also found at {root}/{variant}/{split}.jsonl or {root}/{split}.jsonl), lines
  {"image": "000000050403.jpg", "image_link", "caption", "label": 0|1, "relation", ...}. Images at
  {image_dir}/{image}, image_dir defaulting to {root}/images (the repo's images/ folder). "answer_index" = label,
  the index into the evaluation task's candidates ("false", "true"). Uncertain: which VSR variant the paper used."""
  path = first_file([os.path.join(root, "splits", variant, f"{split}.jsonl"),
                     os.path.join(root, variant, f"{split}.jsonl"), os.path.join(root, f"{split}.jsonl")],
                    f"VSR {variant}/{split}.jsonl")
  image_dir = image_dir or os.path.join(root, "images")
  for lineno, item in iter_jsonl(path):
    where = f"line {lineno}"
    label = field(item, "label", path, where)
    if label not in (0, 1):  # True/False compare equal to 1/0 and are accepted
      raise ValueError(f"{path}: {where}: label must be 0 or 1, got {label!r}")
    yield make_record("vsr", lineno, image=join_path(image_dir, field(item, "image", path, where, str)),
                      caption=field(item, "caption", path, where, str), label=int(label), answer_index=int(label))


def _listed_problems(root: str, key: str) -> Iterator[tuple[str, dict, str]]:
  """(pid, problem, problems.json path) for each pid listed under `key` in {root}/pid_splits.json, the layout
  IconQA and ScienceQA share (both from github.com/lupantech)."""
  problems_path, splits_path = os.path.join(root, "problems.json"), os.path.join(root, "pid_splits.json")
  problems = expect(load_json(problems_path), dict, problems_path, "top level")
  for pid in field(load_json(splits_path), key, splits_path, "top level", list):
    pid = str(pid)
    if pid not in problems:
      raise ValueError(f"{problems_path}: no problem {pid!r} (listed under {key!r} in {splits_path})")
    yield pid, problems[pid], problems_path


def read_iconqa(root: str, split: str = "test", task: str = "choose_txt",
                image_dir: str | None = None) -> Iterator[dict]:
  """IconQA (github.com/lupantech/IconQA, iconqa_data/ of iconqa_data.zip): {root}/problems.json ({pid: {"question",
  "choices", "answer", "ques_type", ...}}) and pid_splits.json ({"{task}_{split}": [pid, ...]}); images at
  {image_dir}/{problem's split}/{task}/{pid}/image.png (the folder is each problem's own "split", train, val or
  test, as IconQA's loaders do: pid_splits.json's trainval and mini* lists mix folders), image_dir defaulting to
  {root}/iconqa. task choose_txt (multi-text-choice: "candidates", "answer_index"; the paper's ranking setting) or
  fill_in_blank ("answer"); choose_img has image choices and is not supported."""
  if task not in ("choose_txt", "fill_in_blank"):
    raise ValueError(f"IconQA task {task!r} is not supported; use 'choose_txt' or 'fill_in_blank'")
  image_dir = image_dir or os.path.join(root, "iconqa")
  for pid, p, problems_path in _listed_problems(root, f"{task}_{split}"):
    where = f"record {pid!r}"
    answer = field(p, "answer", problems_path, where)
    fields = dict(image=_iconqa_image(image_dir, p.get("split"), split, task, pid),
                  question=field(p, "question", problems_path, where, str))
    if task == "choose_txt":
      fields.update(candidates=field(p, "choices", problems_path, where, list),
                    answer_index=as_int(answer, problems_path, where))
    else:
      fields.update(answer=str(answer))
    yield make_record("iconqa", pid, **fields)


def _iconqa_image(image_dir: str, own_split, split: str, task: str, pid: str) -> str:
  """The problem's own split folder; for a problem without one, the first of {split, train, val, test} whose folder
  holds it (a trainval or mini* list names no folder)."""
  if own_split:
    return join_path(image_dir, str(own_split), task, pid, "image.png")
  candidates = [join_path(image_dir, s, task, pid, "image.png") for s in dict.fromkeys((split, "train", "val", "test"))]
  return next((c for c in candidates if os.path.exists(c)), candidates[0])


def read_scienceqa(root: str, split: str = "test", image_dir: str | None = None,
                   image_only: bool = True) -> Iterator[dict]:
  """ScienceQA (github.com/lupantech/ScienceQA, data/scienceqa/): {root}/problems.json ({pid: {"question",
  "choices", "answer" (index), "hint", "image": "image.png" | null, "split", ...}}) and pid_splits.json ({"train":
  [...], "val", "test", ...}); images at {image_dir}/{split}/{pid}/{image}, image_dir defaulting to {root}/images.
  image_only keeps the IMG subset the paper evaluates. "context" is the hint (the author's template, LAVIS #326)."""
  image_dir = image_dir or os.path.join(root, "images")
  for pid, p, problems_path in _listed_problems(root, split):
    where = f"record {pid!r}"
    image = p.get("image")
    if image_only and not image:
      continue
    yield make_record("scienceqa_img", pid,
                      image=join_path(image_dir, p.get("split", split), pid, image) if image else None,
                      context=p.get("hint") or "", question=field(p, "question", problems_path, where, str),
                      candidates=field(p, "choices", problems_path, where, list),
                      answer_index=as_int(field(p, "answer", problems_path, where), problems_path, where))


def read_hateful_memes(root: str, split: str = "dev_seen", image_dir: str | None = None) -> Iterator[dict]:
  """Hateful Memes (Facebook AI): {root}/{split}.jsonl, lines {"id", "img": "img/42953.png", "label": 0|1,
  "text"}; split one of the release's files (phase 2: train, dev_seen, dev_unseen, test_seen, test_unseen; phase
  1: train, dev, test); unlabelled test lines give no "label". Images at {image_dir}/{img}, image_dir defaulting to
  root. Uncertain: which split the paper's AUC is on (dev_seen assumed)."""
  path = os.path.join(root, f"{split}.jsonl")
  image_dir = image_dir or root
  for lineno, item in iter_jsonl(path):
    where = f"line {lineno}"
    label = item.get("label")
    if label is not None and label not in (0, 1):
      raise ValueError(f"{path}: {where}: label must be 0 or 1, got {label!r}")
    yield make_record("hateful_memes", field(item, "id", path, where),
                      image=join_path(image_dir, field(item, "img", path, where, str)),
                      text=field(item, "text", path, where, str), label=None if label is None else int(label))


def read_visdial(root: str, split: str = "val", image_dir: str | None = None) -> Iterator[dict]:
  """Visual Dialog v1.0 (visualdialog.org): {root}/visdial_1.0_{split}.json ({"data": {"questions": [...],
  "answers": [...], "dialogs": [{"image_id", "caption", "dialog": [{"question", "answer", "answer_options" (100
  indices), "gt_index"}]}]}}); split val (the paper's MRR) or test (only each dialog's last round has options, no
  gt_index). Images at {image_dir}/VisualDialog_{split}2018_{image_id:012d}.jpg, image_dir defaulting to
  {root}/VisualDialog_{split}2018. (Train images are COCO 2014 ones and are not handled.)
  One record per round with options: "history" = the caption, then the earlier rounds as "q: ... a: ..."
  (X-InstructBLIP's turn format). Uncertain (reference doc, section 8): how the paper formatted history and caption."""
  if split not in ("val", "test"):
    raise ValueError(f"Visual Dialog split {split!r} is not supported; use 'val' or 'test'")
  path = os.path.join(root, f"visdial_1.0_{split}.json")
  data = field(load_json(path), "data", path, "top level", dict)
  questions = field(data, "questions", path, "data", list)
  answers = field(data, "answers", path, "data", list)
  image_dir = image_dir or os.path.join(root, f"VisualDialog_{split}2018")
  for d, dialog in enumerate(field(data, "dialogs", path, "data", list)):
    image_id = as_int(field(dialog, "image_id", path, f"dialog {d}"), path, f"dialog {d}")
    image = join_path(image_dir, f"VisualDialog_{split}2018_{image_id:012d}.jpg")
    yield from _visdial_rounds(dialog, d, image_id, image, questions, answers, path)


def _visdial_rounds(dialog, d, image_id, image, questions, answers, path) -> Iterator[dict]:
  history = [field(dialog, "caption", path, f"dialog {d}", str)]
  for r, turn in enumerate(field(dialog, "dialog", path, f"dialog {d}", list)):
    where = f"dialog {d}, round {r + 1}"
    question = _lookup(questions, field(turn, "question", path, where), path, where, "questions")
    if "answer_options" in turn:
      options = field(turn, "answer_options", path, where, list)
      yield make_record("visdial", f"{image_id}_{r + 1}", image=image, history=" ".join(history), question=question,
                        candidates=[_lookup(answers, k, path, where, "answers") for k in options],
                        answer_index=None if "gt_index" not in turn else as_int(turn["gt_index"], path, where))
    if "answer" in turn:
      answer = _lookup(answers, turn["answer"], path, where, "answers")
      history.append(conversation.dialog_history([(question, answer)]))


def _lookup(table: list, index, path: str, where: str, name: str) -> str:
  if not isinstance(index, int) or not 0 <= index < len(table):
    raise ValueError(f"{path}: {where}: index {index!r} is not in data.{name} (length {len(table)})")
  return table[index]
