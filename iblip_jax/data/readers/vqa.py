"""Visual question answering datasets (question generation reads the same records): VQAv2, OKVQA, A-OKVQA,
OCR-VQA, TextVQA, GQA, VizWiz."""
import os
from typing import Iterator

from iblip_jax.data.readers.files import (as_int, expect, field, first_file, join_path, load_json, make_record,
                                          rosetta_ocr)


def read_vqav2(root: str, split: str = "train", image_dir: str | None = None,
               dataset: str = "vqav2") -> Iterator[dict]:
  """VQAv2 (visualqa.org): {root}/v2_OpenEnded_mscoco_{split}2014_questions.json ({"data_subtype", "questions":
  [{"question_id", "image_id", "question"}]}) and v2_mscoco_{split}2014_annotations.json ({"annotations":
  [{"question_id", "answers": [{"answer", ...}] x10, "multiple_choice_answer", ...}]}); split test / test-dev read
  v2_OpenEnded_mscoco_{split}2015_questions.json (no answers). Images at
  {image_dir}/{subtype}/COCO_{subtype}_{image_id:012d}.jpg (subtype train2014, val2014 or test2015), image_dir
  defaulting to root. dataset="vqg" gives the same records for question generation."""
  year = "2014" if split in ("train", "val") else "2015"
  q_path = os.path.join(root, f"v2_OpenEnded_mscoco_{split}{year}_questions.json")
  a_path = os.path.join(root, f"v2_mscoco_{split}{year}_annotations.json") if year == "2014" else None
  return _read_vqa(q_path, a_path, image_dir or root, f"{split}{year}", dataset)


def read_okvqa(root: str, split: str = "train", image_dir: str | None = None,
               dataset: str = "okvqa") -> Iterator[dict]:
  """OK-VQA (okvqa.allenai.org), VQA format: {root}/OpenEnded_mscoco_{split}2014_questions.json and
  mscoco_{split}2014_annotations.json, split train or val (the paper's held-in eval split); COCO 2014 images as
  for VQAv2. dataset="okvqa_qg" gives the same records for question generation."""
  q_path = os.path.join(root, f"OpenEnded_mscoco_{split}2014_questions.json")
  a_path = os.path.join(root, f"mscoco_{split}2014_annotations.json")
  return _read_vqa(q_path, a_path, image_dir or root, f"{split}2014", dataset)


def _read_vqa(q_path: str, a_path: str | None, image_dir: str, subtype: str, dataset: str) -> Iterator[dict]:
  q_json = load_json(q_path)
  questions = field(q_json, "questions", q_path, "top level", list)
  # test-dev questions say "test-dev2015" but their images are test2015 ones
  subtype = q_json.get("data_subtype", subtype)
  image_subtype = "test2015" if subtype.startswith("test") else subtype
  annotations = _vqa_annotations(a_path) if a_path else None
  for i, q in enumerate(questions):
    where = f"record {i}"
    qid = field(q, "question_id", q_path, where)
    image_id = as_int(field(q, "image_id", q_path, where), q_path, where)
    fields = dict(image=join_path(image_dir, image_subtype, f"COCO_{image_subtype}_{image_id:012d}.jpg"),
                  question=field(q, "question", q_path, where, str))
    if annotations is not None:
      if qid not in annotations:
        raise ValueError(f"{a_path}: no annotation for question_id {qid!r} ({q_path}, {where})")
      fields.update(annotations[qid])
    yield make_record(dataset, qid, **fields)


def _vqa_annotations(path: str) -> dict:
  """question_id -> {"answers": [...10], "answer": multiple_choice_answer (when given)}."""
  out = {}
  for i, ann in enumerate(field(load_json(path), "annotations", path, "top level", list)):
    where = f"record {i}"
    answers = field(ann, "answers", path, where, list)
    out[field(ann, "question_id", path, where)] = dict(
        answers=[field(a, "answer", path, f"{where}, answer {j}", str) for j, a in enumerate(answers)],
        answer=ann.get("multiple_choice_answer"))
  return out


def read_aokvqa(root: str, split: str = "train", image_dir: str | None = None,
                dataset: str = "aokvqa") -> Iterator[dict]:
  """A-OKVQA (github.com/allenai/aokvqa): {root}/aokvqa_v1p0_{split}.json, a list of {"question_id", "image_id",
  "question", "choices", "correct_choice_idx", "direct_answers" (10), "rationales", ...}; test has no answers.
  Images are COCO 2017, {image_dir}/{split}2017/{image_id:012d}.jpg as the repo's get_coco_path, image_dir
  defaulting to root. Records carry both settings: "answers" (direct) and "candidates"/"answer_index" (multiple
  choice). dataset="aokvqa_qg" gives the same records for question generation, dataset="aokvqa_mc" for training
  in the multiple-choice setting (templates.py renders the two settings differently)."""
  path = os.path.join(root, f"aokvqa_v1p0_{split}.json")
  image_split = "test" if split.startswith("test") else split
  image_dir = image_dir or root
  for i, item in enumerate(expect(load_json(path), list, path, "top level")):
    where = f"record {i}"
    image_id = as_int(field(item, "image_id", path, where), path, where)
    yield make_record(dataset, field(item, "question_id", path, where),
                      image=join_path(image_dir, f"{image_split}2017", f"{image_id:012d}.jpg"),
                      question=field(item, "question", path, where, str),
                      answers=item.get("direct_answers"), candidates=item.get("choices"),
                      answer_index=item.get("correct_choice_idx"))


def read_ocrvqa(root: str, split: str = "train", image_dir: str | None = None) -> Iterator[dict]:
  """OCR-VQA (ocr-vqa.github.io): {root}/dataset.json, {book_id: {"imageURL", "questions", "answers", "title",
  "authorName", "genre", "split": 1 train | 2 val | 3 test}}. Images as the release's downloader saves them:
  {image_dir}/{book_id}{extension of imageURL}, image_dir defaulting to {root}/images. One record per question;
  the release has no OCR tokens, so none are yielded."""
  path = os.path.join(root, "dataset.json")
  code = {"train": 1, "val": 2, "test": 3}[split]
  image_dir = image_dir or os.path.join(root, "images")
  for key, item in expect(load_json(path), dict, path, "top level").items():
    where = f"record {key!r}"
    if field(item, "split", path, where) != code:
      continue
    extension = os.path.splitext(field(item, "imageURL", path, where, str))[1] or ".jpg"
    questions = field(item, "questions", path, where, list)
    answers = field(item, "answers", path, where, list)
    if len(questions) != len(answers):
      raise ValueError(f"{path}: {where}: {len(questions)} questions but {len(answers)} answers")
    for j, (q, a) in enumerate(zip(questions, answers)):
      yield make_record("ocrvqa", f"{key}_{j}", image=join_path(image_dir, key + extension), question=q, answer=a,
                        answers=[a])


def read_textvqa(root: str, split: str = "val", image_dir: str | None = None,
                 ocr_file: str | None = None) -> Iterator[dict]:
  """TextVQA (textvqa.org): {root}/TextVQA_0.5.1_{split}.json ({"data": [{"question_id", "image_id", "question",
  "answers" (10; absent in test), ...}]}) and OCR tokens from {root}/TextVQA_Rosetta_OCR_v0.2_{split}.json when it
  exists (an entry's own "ocr_tokens" win). Images at {image_dir}/{image_id}.jpg, image_dir defaulting to
  {root}/train_images (train, val) or {root}/test_images."""
  path = os.path.join(root, f"TextVQA_0.5.1_{split}.json")
  ocr_file = ocr_file or os.path.join(root, f"TextVQA_Rosetta_OCR_v0.2_{split}.json")
  ocr = rosetta_ocr([ocr_file] if os.path.isfile(ocr_file) else [])
  image_dir = image_dir or os.path.join(root, "test_images" if split == "test" else "train_images")
  for i, entry in enumerate(field(load_json(path), "data", path, "top level", list)):
    where = f"record {i}"
    image_id = str(field(entry, "image_id", path, where))
    yield make_record("textvqa", field(entry, "question_id", path, where),
                      image=join_path(image_dir, f"{image_id}.jpg"),
                      question=field(entry, "question", path, where, str), answers=entry.get("answers"),
                      ocr_tokens=entry.get("ocr_tokens", ocr.get(image_id)))


def read_gqa(root: str, split: str = "testdev", image_dir: str | None = None,
             balanced: bool = True) -> Iterator[dict]:
  """GQA (questions1.2): {root}/{split}_balanced_questions.json (or _all_ with balanced=False), a dict
  {question_id: {"imageId", "question", "answer", "fullAnswer", ...}}; also found under {root}/questions1.2/.
  Images at {image_dir}/{imageId}.jpg, image_dir defaulting to {root}/images. The paper evaluates testdev
  (balanced); test/challenge questions have no answer.

  LAVIS ships a different file under the same name (gqa/balanced_testdev.yaml, stored in gqa/annotations/): a list
  of {"image": "n161313.jpg", "question", "answer", "question_id"}, also read (from root, questions1.2/ or
  annotations/), images at {image_dir}/{image}."""
  name = f"{split}_{'balanced' if balanced else 'all'}_questions.json"
  path = first_file([os.path.join(root, d, name) for d in ("", "questions1.2", "annotations")], f"GQA {name}")
  image_dir = image_dir or os.path.join(root, "images")
  data = expect(load_json(path), (dict, list), path, "top level")
  if isinstance(data, list):
    yield from _read_gqa_lavis(data, path, image_dir)
    return
  for qid, q in data.items():
    where = f"record {qid!r}"
    yield make_record("gqa", qid, image=join_path(image_dir, f"{field(q, 'imageId', path, where)}.jpg"),
                      question=field(q, "question", path, where, str), answer=q.get("answer"))


def _read_gqa_lavis(items: list, path: str, image_dir: str) -> Iterator[dict]:
  for i, q in enumerate(items):
    where = f"record {i}"
    yield make_record("gqa", str(field(q, "question_id", path, where)),
                      image=join_path(image_dir, field(q, "image", path, where, str)),
                      question=field(q, "question", path, where, str), answer=q.get("answer"))


def read_vizwiz(root: str, split: str = "val", image_dir: str | None = None) -> Iterator[dict]:
  """VizWiz-VQA (vizwiz.org): {root}/Annotations/{split}.json (or {root}/{split}.json), a list of {"image":
  "VizWiz_val_00000000.jpg", "question", "answers": [{"answer", "answer_confidence"}] x10, "answerable",
  "answer_type"} (test: no answers). Images at {image_dir}/{image}, image_dir defaulting to {root}/{split} (the
  official train.zip / val.zip / test.zip folders). All 10 answers are kept, "unanswerable" included: VizWiz's
  VQA accuracy counts them."""
  path = first_file([os.path.join(root, "Annotations", f"{split}.json"), os.path.join(root, f"{split}.json")],
                    f"VizWiz {split} annotation file")
  image_dir = image_dir or os.path.join(root, split)
  for i, item in enumerate(expect(load_json(path), list, path, "top level")):
    where = f"record {i}"
    image = field(item, "image", path, where, str)
    answers = item.get("answers")
    yield make_record("vizwiz", os.path.splitext(image)[0], image=join_path(image_dir, image),
                      question=field(item, "question", path, where, str),
                      answers=None if answers is None else
                      [field(a, "answer", path, f"{where}, answer {j}", str) for j, a in enumerate(answers)])
