"""Readers for the InstructBLIP datasets, each in the annotation format its authors released.

Every reader takes the local directory the user points to (`root`), never downloads anything, and lazily yields
plain dict records:
  "id" (unique within the dataset), "dataset", "image" (absolute path) or "frames" (sorted frame paths, video), and
  task fields: "captions"; "question", "answers" (all annotators', duplicates kept), "answer" (one canonical
  answer); "candidates" + "answer_index"; "text" + "label" (HatefulMemes); "caption" + "label" (VSR); "context"
  (ScienceQA); "ocr_tokens" (scene-text datasets, when the source has them); "history" (Visual Dialog);
  "text_input" + "text_output" (LLaVA, user JSONL). Fields a dataset lacks are omitted (e.g. answers of test
  splits).
Images are not opened: a record whose image is missing is still yielded (the input pipeline skips and counts it).
A malformed annotation file (bad JSON, bytes that are not UTF-8, a missing key, a wrong type) raises ValueError naming
the file and the line or record. Stopping is deliberate, unlike the input pipeline's skip-and-count for bad examples:
readers run before training starts, so nothing is lost, and a broken annotation file is better fixed than silently
thinned. Each reader's docstring names the files it expects and the public layout it follows.

Video datasets: the project decodes no video, so MSVD-QA, MSRVTT-QA and iVQA expect frames extracted beforehand,
one directory of image files per video under `frames_dir` (named as documented per reader); "frames" lists them in
natural order (frame_2 before frame_10) and is empty when the directory is missing. The evaluator samples 4 of them
uniformly (paper: 4 frames).

READERS maps dataset names (those of templates.DATASET_TASKS and evaluation.tasks.TASKS) to readers.
"""
import collections
import csv
import functools
import glob
import json
import os
import re
from typing import Callable, Iterator, Sequence

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# ---------------------------------------------------------------------------------------------------------------------
# Helpers: loading with errors that name the file and the record.


def _decode(data: bytes, path: str, first_line: int = 1) -> str:
  """UTF-8 text, or a ValueError naming the file, the line, the byte's column and its offset in `data`."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line_start = data.rfind(b"\n", 0, e.start) + 1
    lineno = first_line + data.count(b"\n", 0, e.start)
    raise ValueError(f"{path}: line {lineno}, byte {e.start - line_start + 1} of the line: not UTF-8 (byte "
                     f"0x{data[e.start]:02x}: {e.reason}); re-save the file as UTF-8") from None


def load_json(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: annotation file not found")
  with open(path, "rb") as f:
    text = _decode(f.read(), path)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: line {e.lineno}, column {e.colno}: malformed JSON ({e.msg})") from None


def iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
  """(line number, object) for each non-blank line; lines end at "\n" (JSON Lines)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: annotation file not found")
  with open(path, "rb") as f:  # bytes, decoded line by line, so that a bad byte is reported with its line
    for lineno, raw in enumerate(f, 1):
      line = _decode(raw, path, lineno)
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {lineno}: malformed JSON ({e.msg})") from None
      yield lineno, _expect(obj, dict, path, f"line {lineno}")


def _expect(value, kind, path: str, where: str):
  if not isinstance(value, kind):
    want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
    raise ValueError(f"{path}: {where}: expected {want}, got {type(value).__name__}")
  return value


def _field(obj, key, path: str, where: str, kind=None):
  """obj[key], with a ValueError naming the file and record when obj is not an object or lacks the key."""
  _expect(obj, dict, path, where)
  if key not in obj:
    raise ValueError(f"{path}: {where}: missing required key {key!r}")
  return obj[key] if kind is None else _expect(obj[key], kind, path, f"{where}, key {key!r}")


def _int(value, path: str, where: str) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{path}: {where}: expected an integer id, got {value!r}") from None


def _path(*parts) -> str:
  return os.path.abspath(os.path.join(*parts))


def _first_file(candidates: Sequence[str], what: str) -> str:
  for c in candidates:
    if os.path.isfile(c):
      return c
  raise FileNotFoundError(f"no {what} found; looked for: {', '.join(candidates)}")


def _natural_key(name: str):
  return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def list_frames(directory: str) -> list[str]:
  """Frame image paths of one video directory in natural order; [] when the directory is missing."""
  if not os.path.isdir(directory):
    return []
  names = sorted((n for n in os.listdir(directory) if n.lower().endswith(FRAME_EXTENSIONS)), key=_natural_key)
  return [_path(directory, n) for n in names]


def _record(dataset: str, id_, **fields) -> dict:
  return {"id": id_, "dataset": dataset, **{k: v for k, v in fields.items() if v is not None}}


# ---------------------------------------------------------------------------------------------------------------------
# Captioning.


def read_coco_caption(root: str, split: str = "train", image_dir: str | None = None, include_restval: bool = True,
                      dataset: str = "coco_caption") -> Iterator[dict]:
  """COCO Caption, Karpathy split: {root}/dataset_coco.json from Karpathy's caption_datasets.zip
  ({"images": [{"filepath": "val2014", "filename": "COCO_val2014_...jpg", "cocoid", "split", "sentences":
  [{"raw", "tokens"}]}]}). Images at {image_dir}/{filepath}/{filename}, image_dir defaulting to root (holding
  train2014/ and val2014/). split: train (with restval, the usual 113K, unless include_restval=False), val, test.

  Without dataset_coco.json, BLIP/LAVIS's re-packaged coco_karpathy_{split}.json is read instead (LAVIS's
  coco/defaults_cap.yaml), from root or, as LAVIS stores it, {root}/annotations/ with images under {root}/images/:
  a list of {"image": "val2014/COCO_val2014_...jpg", "caption": str, "image_id"} (train: one item per caption,
  Karpathy train+restval already merged) or {"image", "caption": [str, ...]} (val, test). Its records are the same
  as dataset_coco.json's: one per image, captions in file order, id the COCO id from the file name (= cocoid)."""
  karpathy = os.path.join(root, "dataset_coco.json")
  lavis = [(os.path.join(root, f"coco_karpathy_{split}.json"), root),
           (os.path.join(root, "annotations", f"coco_karpathy_{split}.json"), os.path.join(root, "images"))]
  found = [(path, images) for path, images in lavis if os.path.isfile(path)]
  if os.path.isfile(karpathy) or not found:
    return _read_karpathy(karpathy, split, image_dir or root, include_restval, dataset)
  path, default_images = found[0]
  if split == "train" and not include_restval:
    raise ValueError(f"{path}: LAVIS's train file merges Karpathy train and restval; include_restval=False needs "
                     "Karpathy's dataset_coco.json, which keeps them apart")
  return _read_caption_list(path, image_dir or default_images, dataset)


def _read_caption_list(path: str, image_dir: str, dataset: str) -> Iterator[dict]:
  """BLIP/LAVIS caption lists ({"image", "caption": str | [str]} items), grouped into one record per image."""
  captions = collections.OrderedDict()  # image path -> captions, in order of first appearance
  for i, item in enumerate(_expect(load_json(path), list, path, "top level")):
    where = f"record {i}"
    caption = _field(item, "caption", path, where, (str, list))
    captions.setdefault(_field(item, "image", path, where, str), []).extend(
        [caption] if isinstance(caption, str) else caption)
  for image, texts in captions.items():
    yield _record(dataset, _coco_id(image), image=_path(image_dir, image), captions=texts)


def _coco_id(image: str):
  """COCO_val2014_000000391895.jpg -> 391895 (BLIP's own rule for these files); other names keep their stem."""
  stem = os.path.splitext(os.path.basename(image))[0]
  last = stem.rsplit("_", 1)[-1]
  return int(last) if last.isdigit() else stem


def read_flickr30k(root: str, split: str = "test", image_dir: str | None = None) -> Iterator[dict]:
  """Flickr30K, Karpathy split: {root}/dataset_flickr30k.json (same layout as dataset_coco.json, no "filepath");
  images at {image_dir}/{filename}, image_dir defaulting to {root}/flickr30k-images (the official archive's folder).
  The paper reports the 1K test split."""
  image_dir = image_dir or os.path.join(root, "flickr30k-images")
  return _read_karpathy(os.path.join(root, "dataset_flickr30k.json"), split, image_dir, False, "flickr30k")


def _read_karpathy(path: str, split: str, image_dir: str, include_restval: bool, dataset: str) -> Iterator[dict]:
  images = _field(load_json(path), "images", path, "top level", list)
  wanted = {split, "restval"} if split == "train" and include_restval else {split}
  for i, img in enumerate(images):
    where = f"record {i}"
    if _field(img, "split", path, where) not in wanted:
      continue
    filename = _field(img, "filename", path, where, str)
    sentences = _field(img, "sentences", path, where, list)
    captions = [_field(s, "raw", path, f"{where}, sentence {j}", str) for j, s in enumerate(sentences)]
    id_ = img["cocoid"] if "cocoid" in img else os.path.splitext(filename)[0]
    yield _record(dataset, id_, image=_path(image_dir, img.get("filepath", ""), filename), captions=captions)


def read_web_capfilt(root: str, ann_file: str = "ccs_synthetic_filtered_large.json", image_dir: str | None = None,
                     url_to_path: Callable[[str], str] | None = None) -> Iterator[dict]:
  """Web CapFilt: BLIP's bootstrapped captions (github.com/salesforce/BLIP, "Pre-training datasets download"), a JSON
  list of {"url": image URL, "caption": text}; default file the ViT-L CapFilt captions of CC3M+CC12M+SBU. The
  release has URLs only: pass `url_to_path` (URL -> local file, relative to image_dir) for the images you
  downloaded, or use a list whose items carry "image" (a path, as BLIP's own pretrain_dataset reads and LAVIS's
  capfilt14m annotation.json has). Relative paths resolve against image_dir (default root). Uncertain: which BLIP
  file (and whether COCO/VG images were included) made the paper's 14M "Web CapFilt"."""
  path = os.path.join(root, ann_file)
  image_dir = image_dir or root
  for i, item in enumerate(_expect(load_json(path), list, path, "top level")):
    where = f"record {i}"
    caption = _field(item, "caption", path, where, (str, list))
    yield _record("web_capfilt", i, image=_capfilt_image(item, path, where, image_dir, url_to_path),
                  captions=[caption] if isinstance(caption, str) else list(caption))


def _capfilt_image(item: dict, path: str, where: str, image_dir: str, url_to_path) -> str:
  if "image" in item:
    return _path(image_dir, _field(item, "image", path, where, str))
  url = _field(item, "url", path, where, str)
  if url_to_path is None:
    raise ValueError(f"{path}: {where}: has a 'url' but no 'image'; the released BLIP files list image URLs only: "
                     "download the images and pass url_to_path=, or add an 'image' path to each item")
  return _path(image_dir, url_to_path(url))


def read_textcaps(root: str, split: str = "train", image_dir: str | None = None,
                  ocr_files: Sequence[str] | None = None) -> Iterator[dict]:
  """TextCaps: {root}/TextCaps_0.1_{split}.json ({"data": [{"image_id", "caption_str", "reference_strs", ...}]},
  one entry per caption; test entries have no caption). One record per image with its captions in file order.
  Images are TextVQA's: {image_dir}/{image_id}.jpg, image_dir defaulting to {root}/train_images (train, val) or
  {root}/test_images (test), as TextVQA's train_val_images.zip / test_images.zip unpack. TextCaps ships no OCR:
  "ocr_tokens" come from TextVQA's Rosetta OCR files (default: every {root}/TextVQA_Rosetta_OCR_v0.2_*.json)."""
  path = os.path.join(root, f"TextCaps_0.1_{split}.json")
  image_dir = image_dir or os.path.join(root, "test_images" if split == "test" else "train_images")
  if ocr_files is None:
    ocr_files = sorted(glob.glob(os.path.join(root, "TextVQA_Rosetta_OCR_v0.2_*.json")))
  ocr = _rosetta_ocr(ocr_files)
  captions = collections.OrderedDict()  # image_id -> captions, in order of first appearance
  for i, entry in enumerate(_field(load_json(path), "data", path, "top level", list)):
    where = f"record {i}"
    image_id = str(_field(entry, "image_id", path, where))
    texts = captions.setdefault(image_id, [])
    if "caption_str" in entry:
      texts.append(_expect(entry["caption_str"], str, path, f"{where}, key 'caption_str'"))
    elif not texts and entry.get("reference_strs"):
      texts.extend(entry["reference_strs"])
  for image_id, texts in captions.items():
    yield _record("textcaps", image_id, image=_path(image_dir, f"{image_id}.jpg"), captions=texts or None,
                  ocr_tokens=ocr.get(image_id))


def _rosetta_ocr(files: Sequence[str]) -> dict[str, list[str]]:
  """image_id -> OCR tokens from TextVQA_Rosetta_OCR_v0.2_*.json ({"data": [{"image_id", "ocr_tokens", ...}]})."""
  tokens = {}
  for path in files:
    for i, entry in enumerate(_field(load_json(path), "data", path, "top level", list)):
      where = f"record {i}"
      image_id = str(_field(entry, "image_id", path, where))
      tokens[image_id] = [str(t) for t in _field(entry, "ocr_tokens", path, where, list)]
  return tokens


def read_nocaps(root: str, split: str = "val", image_dir: str | None = None) -> Iterator[dict]:
  """NoCaps: {root}/nocaps_val_4500_captions.json (COCO caption format: "images" [{"id", "file_name",
  "open_images_id", "domain", ...}], "annotations" [{"image_id", "caption"}], 10 captions per image); for test, or
  val without captions, nocaps_{split}_image_info.json. Images at {image_dir}/{file_name}, or at
  {image_dir}/{split}/{file_name} where only that exists (LAVIS's download_nocaps.py saves them to
  nocaps/images/{val,test}/); image_dir defaults to {root}/images."""
  path = _first_file([os.path.join(root, f"nocaps_{split}_4500_captions.json"),
                      os.path.join(root, f"nocaps_{split}_image_info.json")], f"NoCaps {split} annotation file")
  data = load_json(path)
  images = _field(data, "images", path, "top level", list)
  captions = collections.defaultdict(list)
  for i, ann in enumerate(data.get("annotations") or []):
    captions[_field(ann, "image_id", path, f"annotation {i}")].append(
        _field(ann, "caption", path, f"annotation {i}", str))
  image_dir = image_dir or os.path.join(root, "images")
  for i, img in enumerate(images):
    id_ = _field(img, "id", path, f"image {i}")
    file_name = _field(img, "file_name", path, f"image {i}", str)
    flat, nested = _path(image_dir, file_name), _path(image_dir, split, file_name)
    image = nested if not os.path.exists(flat) and os.path.exists(nested) else flat
    # the image's domain (in-domain / near-domain / out-domain): NoCaps reports CIDEr per domain and overall
    yield _record("nocaps", id_, image=image, captions=captions.get(id_), domain=img.get("domain"))


# ---------------------------------------------------------------------------------------------------------------------
# Visual question answering (and question generation, which reads the same records).


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
  questions = _field(q_json, "questions", q_path, "top level", list)
  # test-dev questions say "test-dev2015" but their images are test2015 ones
  subtype = q_json.get("data_subtype", subtype)
  image_subtype = "test2015" if subtype.startswith("test") else subtype
  annotations = _vqa_annotations(a_path) if a_path else None
  for i, q in enumerate(questions):
    where = f"record {i}"
    qid = _field(q, "question_id", q_path, where)
    image_id = _int(_field(q, "image_id", q_path, where), q_path, where)
    fields = dict(image=_path(image_dir, image_subtype, f"COCO_{image_subtype}_{image_id:012d}.jpg"),
                  question=_field(q, "question", q_path, where, str))
    if annotations is not None:
      if qid not in annotations:
        raise ValueError(f"{a_path}: no annotation for question_id {qid!r} ({q_path}, {where})")
      fields.update(annotations[qid])
    yield _record(dataset, qid, **fields)


def _vqa_annotations(path: str) -> dict:
  """question_id -> {"answers": [...10], "answer": multiple_choice_answer (when given)}."""
  out = {}
  for i, ann in enumerate(_field(load_json(path), "annotations", path, "top level", list)):
    where = f"record {i}"
    answers = _field(ann, "answers", path, where, list)
    out[_field(ann, "question_id", path, where)] = dict(
        answers=[_field(a, "answer", path, f"{where}, answer {j}", str) for j, a in enumerate(answers)],
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
  for i, item in enumerate(_expect(load_json(path), list, path, "top level")):
    where = f"record {i}"
    image_id = _int(_field(item, "image_id", path, where), path, where)
    yield _record(dataset, _field(item, "question_id", path, where),
                  image=_path(image_dir, f"{image_split}2017", f"{image_id:012d}.jpg"),
                  question=_field(item, "question", path, where, str),
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
  for key, item in _expect(load_json(path), dict, path, "top level").items():
    where = f"record {key!r}"
    if _field(item, "split", path, where) != code:
      continue
    extension = os.path.splitext(_field(item, "imageURL", path, where, str))[1] or ".jpg"
    questions = _field(item, "questions", path, where, list)
    answers = _field(item, "answers", path, where, list)
    if len(questions) != len(answers):
      raise ValueError(f"{path}: {where}: {len(questions)} questions but {len(answers)} answers")
    for j, (q, a) in enumerate(zip(questions, answers)):
      yield _record("ocrvqa", f"{key}_{j}", image=_path(image_dir, key + extension), question=q, answer=a,
                    answers=[a])


def read_textvqa(root: str, split: str = "val", image_dir: str | None = None,
                 ocr_file: str | None = None) -> Iterator[dict]:
  """TextVQA (textvqa.org): {root}/TextVQA_0.5.1_{split}.json ({"data": [{"question_id", "image_id", "question",
  "answers" (10; absent in test), ...}]}) and OCR tokens from {root}/TextVQA_Rosetta_OCR_v0.2_{split}.json when it
  exists (an entry's own "ocr_tokens" win). Images at {image_dir}/{image_id}.jpg, image_dir defaulting to
  {root}/train_images (train, val) or {root}/test_images."""
  path = os.path.join(root, f"TextVQA_0.5.1_{split}.json")
  ocr_file = ocr_file or os.path.join(root, f"TextVQA_Rosetta_OCR_v0.2_{split}.json")
  ocr = _rosetta_ocr([ocr_file] if os.path.isfile(ocr_file) else [])
  image_dir = image_dir or os.path.join(root, "test_images" if split == "test" else "train_images")
  for i, entry in enumerate(_field(load_json(path), "data", path, "top level", list)):
    where = f"record {i}"
    image_id = str(_field(entry, "image_id", path, where))
    yield _record("textvqa", _field(entry, "question_id", path, where), image=_path(image_dir, f"{image_id}.jpg"),
                  question=_field(entry, "question", path, where, str), answers=entry.get("answers"),
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
  path = _first_file([os.path.join(root, d, name) for d in ("", "questions1.2", "annotations")], f"GQA {name}")
  image_dir = image_dir or os.path.join(root, "images")
  data = _expect(load_json(path), (dict, list), path, "top level")
  if isinstance(data, list):
    yield from _read_gqa_lavis(data, path, image_dir)
    return
  for qid, q in data.items():
    where = f"record {qid!r}"
    yield _record("gqa", qid, image=_path(image_dir, f"{_field(q, 'imageId', path, where)}.jpg"),
                  question=_field(q, "question", path, where, str), answer=q.get("answer"))


def _read_gqa_lavis(items: list, path: str, image_dir: str) -> Iterator[dict]:
  for i, q in enumerate(items):
    where = f"record {i}"
    yield _record("gqa", str(_field(q, "question_id", path, where)),
                  image=_path(image_dir, _field(q, "image", path, where, str)),
                  question=_field(q, "question", path, where, str), answer=q.get("answer"))


def read_vizwiz(root: str, split: str = "val", image_dir: str | None = None) -> Iterator[dict]:
  """VizWiz-VQA (vizwiz.org): {root}/Annotations/{split}.json (or {root}/{split}.json), a list of {"image":
  "VizWiz_val_00000000.jpg", "question", "answers": [{"answer", "answer_confidence"}] x10, "answerable",
  "answer_type"} (test: no answers). Images at {image_dir}/{image}, image_dir defaulting to {root}/{split} (the
  official train.zip / val.zip / test.zip folders). All 10 answers are kept, "unanswerable" included: VizWiz's
  VQA accuracy counts them."""
  path = _first_file([os.path.join(root, "Annotations", f"{split}.json"), os.path.join(root, f"{split}.json")],
                     f"VizWiz {split} annotation file")
  image_dir = image_dir or os.path.join(root, split)
  for i, item in enumerate(_expect(load_json(path), list, path, "top level")):
    where = f"record {i}"
    image = _field(item, "image", path, where, str)
    answers = item.get("answers")
    yield _record("vizwiz", os.path.splitext(image)[0], image=_path(image_dir, image),
                  question=_field(item, "question", path, where, str),
                  answers=None if answers is None else
                  [_field(a, "answer", path, f"{where}, answer {j}", str) for j, a in enumerate(answers)])


# ---------------------------------------------------------------------------------------------------------------------
# Multiple choice, classification, dialogue.


def read_vsr(root: str, split: str = "test", variant: str = "zeroshot", image_dir: str | None = None) -> Iterator[dict]:
  """Visual Spatial Reasoning (github.com/cambridgeltl/visual-spatial-reasoning, data/): splits/{variant}/{split}.jsonl
  (variant zeroshot | random; also found at {root}/{variant}/{split}.jsonl or {root}/{split}.jsonl), lines
  {"image": "000000050403.jpg", "image_link", "caption", "label": 0|1, "relation", ...}. Images at
  {image_dir}/{image}, image_dir defaulting to {root}/images (the repo's images/ folder). "answer_index" = label,
  the index into the evaluation task's candidates ("false", "true"). Uncertain: which VSR variant the paper used."""
  path = _first_file([os.path.join(root, "splits", variant, f"{split}.jsonl"),
                      os.path.join(root, variant, f"{split}.jsonl"), os.path.join(root, f"{split}.jsonl")],
                     f"VSR {variant}/{split}.jsonl")
  image_dir = image_dir or os.path.join(root, "images")
  for lineno, item in iter_jsonl(path):
    where = f"line {lineno}"
    label = _field(item, "label", path, where)
    if label not in (0, 1):  # True/False compare equal to 1/0 and are accepted
      raise ValueError(f"{path}: {where}: label must be 0 or 1, got {label!r}")
    yield _record("vsr", lineno, image=_path(image_dir, _field(item, "image", path, where, str)),
                  caption=_field(item, "caption", path, where, str), label=int(label), answer_index=int(label))


def _listed_problems(root: str, key: str) -> Iterator[tuple[str, dict, str]]:
  """(pid, problem, problems.json path) for each pid listed under `key` in {root}/pid_splits.json, the layout
  IconQA and ScienceQA share (both from github.com/lupantech)."""
  problems_path, splits_path = os.path.join(root, "problems.json"), os.path.join(root, "pid_splits.json")
  problems = _expect(load_json(problems_path), dict, problems_path, "top level")
  for pid in _field(load_json(splits_path), key, splits_path, "top level", list):
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
    answer = _field(p, "answer", problems_path, where)
    fields = dict(image=_iconqa_image(image_dir, p.get("split"), split, task, pid),
                  question=_field(p, "question", problems_path, where, str))
    if task == "choose_txt":
      fields.update(candidates=_field(p, "choices", problems_path, where, list),
                    answer_index=_int(answer, problems_path, where))
    else:
      fields.update(answer=str(answer))
    yield _record("iconqa", pid, **fields)


def _iconqa_image(image_dir: str, own_split, split: str, task: str, pid: str) -> str:
  """The problem's own split folder; for a problem without one, the first of {split, train, val, test} whose folder
  holds it (a trainval or mini* list names no folder)."""
  if own_split:
    return _path(image_dir, str(own_split), task, pid, "image.png")
  candidates = [_path(image_dir, s, task, pid, "image.png") for s in dict.fromkeys((split, "train", "val", "test"))]
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
    yield _record("scienceqa_img", pid, image=_path(image_dir, p.get("split", split), pid, image) if image else None,
                  context=p.get("hint") or "", question=_field(p, "question", problems_path, where, str),
                  candidates=_field(p, "choices", problems_path, where, list),
                  answer_index=_int(_field(p, "answer", problems_path, where), problems_path, where))


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
    yield _record("hateful_memes", _field(item, "id", path, where),
                  image=_path(image_dir, _field(item, "img", path, where, str)),
                  text=_field(item, "text", path, where, str), label=None if label is None else int(label))


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
  data = _field(load_json(path), "data", path, "top level", dict)
  questions = _field(data, "questions", path, "data", list)
  answers = _field(data, "answers", path, "data", list)
  image_dir = image_dir or os.path.join(root, f"VisualDialog_{split}2018")
  for d, dialog in enumerate(_field(data, "dialogs", path, "data", list)):
    image_id = _int(_field(dialog, "image_id", path, f"dialog {d}"), path, f"dialog {d}")
    image = _path(image_dir, f"VisualDialog_{split}2018_{image_id:012d}.jpg")
    yield from _visdial_rounds(dialog, d, image_id, image, questions, answers, path)


def _visdial_rounds(dialog, d, image_id, image, questions, answers, path) -> Iterator[dict]:
  history = [_field(dialog, "caption", path, f"dialog {d}", str)]
  for r, turn in enumerate(_field(dialog, "dialog", path, f"dialog {d}", list)):
    where = f"dialog {d}, round {r + 1}"
    question = _lookup(questions, _field(turn, "question", path, where), path, where, "questions")
    if "answer_options" in turn:
      options = _field(turn, "answer_options", path, where, list)
      yield _record("visdial", f"{image_id}_{r + 1}", image=image, history=" ".join(history), question=question,
                    candidates=[_lookup(answers, k, path, where, "answers") for k in options],
                    answer_index=None if "gt_index" not in turn else _int(turn["gt_index"], path, where))
    if "answer" in turn:
      history.append(f"q: {question} a: {_lookup(answers, turn['answer'], path, where, 'answers')}")


def _lookup(table: list, index, path: str, where: str, name: str) -> str:
  if not isinstance(index, int) or not 0 <= index < len(table):
    raise ValueError(f"{path}: {where}: index {index!r} is not in data.{name} (length {len(table)})")
  return table[index]


# ---------------------------------------------------------------------------------------------------------------------
# Video QA (pre-extracted frames).


# Ranking candidates of the video QA sets when no answer-list file is given: the most frequent train answers, as many
# as LAVIS's lists hold (train_ans2label.json, from ALPRO): 1,500 for MSRVTT-QA (all-in-one's loader and ALPRO's
# config say 1,500) and 2,423 for MSVD-QA (ALPRO config, LAVIS #333). Uncertain: that those lists are exactly the
# top-k train answers (ties here keep first-seen order); the paper states no candidate set.
MSVD_TOP_K = 2423
MSRVTT_TOP_K = 1500


def read_msvd_qa(root: str, split: str = "test", frames_dir: str | None = None,
                 answer_vocab: str | Sequence[str] | None = None,
                 top_k: int | None = MSVD_TOP_K) -> Iterator[dict]:
  """MSVD-QA (github.com/xudejing/video-question-answering): {root}/{split}_qa.json, a list of {"id", "video_id"
  (N), "question", "answer"}, and {root}/youtube_mapping.txt, lines "<youtube clip name> vid<N>". Frames at
  {frames_dir}/<youtube clip name>/ (the clip's YouTubeClips/<name>.avi, extracted), frames_dir defaulting to
  {root}/frames. Ranking candidates: see _answer_vocab."""
  mapping = _youtube_mapping(os.path.join(root, "youtube_mapping.txt"))
  frames_dir = frames_dir or os.path.join(root, "frames")

  def video_dir(video_id, path, where):
    name = mapping.get(f"vid{_int(video_id, path, where)}")
    if name is None:
      raise ValueError(f"{path}: {where}: video_id {video_id!r} has no vid{video_id} line in youtube_mapping.txt")
    return os.path.join(frames_dir, name)

  return _read_video_qa(root, split, "msvd_qa", video_dir, answer_vocab, top_k)


def read_msrvtt_qa(root: str, split: str = "test", frames_dir: str | None = None,
                   answer_vocab: str | Sequence[str] | None = None,
                   top_k: int | None = MSRVTT_TOP_K) -> Iterator[dict]:
  """MSRVTT-QA (github.com/xudejing/video-question-answering): {root}/{split}_qa.json, a list of {"id", "video_id"
  (N), "question", "answer", "category_id"}. Frames at {frames_dir}/video<N>/ (MSR-VTT's video<N>.mp4, extracted),
  frames_dir defaulting to {root}/frames. Ranking candidates: see _answer_vocab."""
  frames_dir = frames_dir or os.path.join(root, "frames")

  def video_dir(video_id, path, where):
    return os.path.join(frames_dir, f"video{_int(video_id, path, where)}")

  return _read_video_qa(root, split, "msrvtt_qa", video_dir, answer_vocab, top_k)


def _read_video_qa(root, split, dataset, video_dir, answer_vocab, top_k) -> Iterator[dict]:
  path = os.path.join(root, f"{split}_qa.json")
  items = _expect(load_json(path), list, path, "top level")
  vocab = _answer_vocab(root, answer_vocab, top_k)
  index = {a: i for i, a in enumerate(vocab or ())}
  for i, item in enumerate(items):
    where = f"record {i}"
    answer = _field(item, "answer", path, where, str)
    yield _record(dataset, _field(item, "id", path, where),
                  frames=list_frames(video_dir(_field(item, "video_id", path, where), path, where)),
                  question=_field(item, "question", path, where, str), answer=answer, candidates=vocab,
                  answer_index=index.get(answer, -1) if vocab else None)


def _answer_vocab(root: str, answer_vocab, top_k: int | None) -> list[str] | None:
  """The candidate answers for ranking. Uncertain: the paper does not give its MSVD/MSRVTT candidate set. In order:
  `answer_vocab` (a list, or a JSON file: list, or {answer: index} as LAVIS's train_ans2label.json / just-ask's
  vocab.json); else such a file in root (train_ans2label.json, qa_ans2label.json, vocab.json); else the `top_k`
  most frequent answers of {root}/train_qa.json (LAVIS's list sizes, MSVD_TOP_K / MSRVTT_TOP_K; None: all of them),
  most frequent first; else None (records then carry no candidates). Answers outside the set get answer_index -1
  (always wrong, as in just-ask and ALPRO)."""
  if answer_vocab is None:
    found = [p for p in (os.path.join(root, n) for n in ("train_ans2label.json", "qa_ans2label.json", "vocab.json"))
             if os.path.isfile(p)]
    if found:
      answer_vocab = found[0]
    elif os.path.isfile(os.path.join(root, "train_qa.json")):
      path = os.path.join(root, "train_qa.json")
      items = _expect(load_json(path), list, path, "top level")
      counts = collections.Counter(_field(x, "answer", path, f"record {i}", str) for i, x in enumerate(items))
      return [a for a, _ in counts.most_common(top_k)]
    else:
      return None
  if not isinstance(answer_vocab, str):
    return list(answer_vocab)
  vocab = _expect(load_json(answer_vocab), (list, dict), answer_vocab, "top level")
  return list(vocab) if isinstance(vocab, list) else sorted(vocab, key=vocab.get)


def _youtube_mapping(path: str) -> dict[str, str]:
  """"vid<N>" -> YouTube clip name, from MSVD's youtube_mapping.txt ("<clip name> vid<N>" per line)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: MSVD video-name mapping not found")
  mapping = {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 2 or not parts[1].startswith("vid"):
        raise ValueError(f"{path}: line {lineno}: expected '<clip name> vid<N>', got {line.strip()!r}")
      mapping[parts[1]] = parts[0]
  return mapping


IVQA_COLUMNS = ("video_id", "question", "answer1", "answer2", "answer3", "answer4", "answer5")


def read_ivqa(root: str, split: str = "test", frames_dir: str | None = None) -> Iterator[dict]:
  """iVQA (github.com/antoyang/just-ask): {root}/{split}.csv with columns video_id (the YouTube id), question,
  answer1..answer5 (5 annotators; the iVQA metric counts matches). Frames at {frames_dir}/<clip>/, frames_dir
  defaulting to {root}/frames, where <clip> is the video_id or, when the CSV has start/end columns,
  "<video_id>_<start>_<end>", else the one directory named "<video_id>_*". Uncertain: the released clips' file
  naming (just-ask maps feature files to rows by their first 11 characters, the YouTube id)."""
  path = os.path.join(root, f"{split}.csv")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: annotation file not found")
  frames_dir = frames_dir or os.path.join(root, "frames")
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    missing = [c for c in IVQA_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f"{path}: line 1: missing column(s) {', '.join(missing)} (header: {reader.fieldnames})")
    for row_index, row in enumerate(reader):
      where = f"line {reader.line_num}"
      if None in row or any(row[c] is None for c in IVQA_COLUMNS):  # too many / too few fields on the line
        raise ValueError(f"{path}: {where}: expected {len(reader.fieldnames)} fields")
      answers = [row[f"answer{k}"].strip() for k in range(1, 6) if row[f"answer{k}"].strip()]
      yield _record("ivqa", row_index, frames=list_frames(_ivqa_clip_dir(frames_dir, row)),
                    question=row["question"], answers=answers)


def _ivqa_clip_dir(frames_dir: str, row: dict) -> str:
  video_id = row["video_id"].strip()
  candidates = [os.path.join(frames_dir, video_id)]
  if row.get("start") and row.get("end"):
    candidates.append(os.path.join(frames_dir, f"{video_id}_{row['start'].strip()}_{row['end'].strip()}"))
  for c in candidates:
    if os.path.isdir(c):
      return c
  matches = glob.glob(os.path.join(glob.escape(frames_dir), glob.escape(video_id) + "_*"))
  return matches[0] if len(matches) == 1 else candidates[-1]


# ---------------------------------------------------------------------------------------------------------------------
# Instruction data used as is.

LLAVA_FILES = {
    "llava_instruct": "llava_instruct_150k.json",  # all three parts in one file
    "llava_conversation": "conversation_58k.json",
    "llava_complex_reasoning": "complex_reasoning_77k.json",
    "llava_detail": "detail_23k.json",
}


def read_llava_instruct(root: str, subset: str = "llava_instruct", image_dir: str | None = None,
                        turns: str = "first") -> Iterator[dict]:
  """LLaVA-Instruct-150K (huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K): {root}/{LLAVA_FILES[subset]}, a
  list of {"id", "image": "000000033471.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": ...}, ...]}. Images are COCO train2017: {image_dir}/{image}, image_dir defaulting to
  {root}/train2017. "text_input" is a human turn without the <image> tag, "text_output" the gpt reply.
  turns="first" keeps each conversation's first exchange, as LAVIS's llava150k_dataset.py does; turns="all" yields
  one record per exchange. The file's "id" is the COCO image id, and an image has several conversations (the
  combined file repeats ids), so record ids add the conversation's place in the file: "<id>_<i>", and with
  turns="all" "<id>_<i>_<k>" for exchange k. Uncertain (reference doc, section 8): how the paper split multi-turn
  conversations."""
  if subset not in LLAVA_FILES:
    raise ValueError(f"unknown LLaVA subset {subset!r}; known: {', '.join(LLAVA_FILES)}")
  if turns not in ("first", "all"):
    raise ValueError(f"turns={turns!r}; expected 'first' or 'all'")
  path = os.path.join(root, LLAVA_FILES[subset])
  image_dir = image_dir or os.path.join(root, "train2017")
  for i, item in enumerate(_expect(load_json(path), list, path, "top level")):
    where = f"record {i}"
    id_ = _field(item, "id", path, where)
    image = _path(image_dir, _field(item, "image", path, where, str))
    exchanges = _llava_exchanges(_field(item, "conversations", path, where, list), path, where)
    for k, (text_input, text_output) in enumerate(exchanges[:1] if turns == "first" else exchanges):
      yield _record(subset, f"{id_}_{i}" if turns == "first" else f"{id_}_{i}_{k}", image=image,
                    text_input=text_input, text_output=text_output)


def _llava_exchanges(conversation: list, path: str, where: str) -> list[tuple[str, str]]:
  if not conversation or len(conversation) % 2:
    raise ValueError(f"{path}: {where}: expected alternating human/gpt turns, got {len(conversation)} turns")
  out = []
  for k in range(0, len(conversation), 2):
    human, gpt = conversation[k], conversation[k + 1]
    for turn, role, n in ((human, "human", k), (gpt, "gpt", k + 1)):
      if _field(turn, "from", path, f"{where}, turn {n}") != role:
        raise ValueError(f"{path}: {where}, turn {n}: expected a {role!r} turn, got {turn['from']!r}")
    out.append((_field(human, "value", path, f"{where}, turn {k}", str).replace("<image>", "").strip(),
                _field(gpt, "value", path, f"{where}, turn {k + 1}", str)))
  return out


def read_jsonl(path: str, dataset: str = "jsonl") -> Iterator[dict]:
  """A user's own data: a JSONL file, one {"image": path, "text_input": ..., "text_output": ...} per line for
  training (optional "id", default the line number); a relative image path is relative to the JSONL file's
  directory. Evaluation files carry their task's fields instead of the texts (question, answers, candidates,
  answer_index, captions, label, ...): every other field is kept as it is."""
  base = os.path.dirname(os.path.abspath(path))
  for lineno, item in iter_jsonl(path):
    where = f"line {lineno}"
    if "text_input" in item or "text_output" in item:  # a training line needs both texts
      for key in ("text_input", "text_output"):
        _field(item, key, path, where, str)
    extra = {k: v for k, v in item.items() if k not in ("id", "image", "dataset")}
    yield _record(dataset, item.get("id", lineno), image=_path(base, _field(item, "image", path, where, str)),
                  **extra)


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch: dataset name -> reader(root, **kwargs). Question-generation datasets read their VQA source's records.

READERS = {
    # held-in
    "coco_caption": read_coco_caption,
    "web_capfilt": read_web_capfilt,
    "textcaps": read_textcaps,
    "vqav2": read_vqav2,
    "vqg": functools.partial(read_vqav2, dataset="vqg"),
    "okvqa": read_okvqa,
    "okvqa_qg": functools.partial(read_okvqa, dataset="okvqa_qg"),
    "aokvqa": read_aokvqa,
    "aokvqa_qg": functools.partial(read_aokvqa, dataset="aokvqa_qg"),
    "aokvqa_mc": functools.partial(read_aokvqa, dataset="aokvqa_mc"),  # multiple choice (paper Table 3)
    "ocrvqa": read_ocrvqa,
    **{name: functools.partial(read_llava_instruct, subset=name) for name in LLAVA_FILES},
    # held-out
    "nocaps": read_nocaps,
    "flickr30k": read_flickr30k,
    "gqa": read_gqa,
    "vsr": read_vsr,
    "iconqa": read_iconqa,
    "textvqa": read_textvqa,
    "visdial": read_visdial,
    "hateful_memes": read_hateful_memes,
    "vizwiz": read_vizwiz,
    "scienceqa_img": read_scienceqa,
    "msvd_qa": read_msvd_qa,
    "msrvtt_qa": read_msrvtt_qa,
    "ivqa": read_ivqa,
    # user data (the argument is the JSONL file)
    "jsonl": read_jsonl,
}


def read(dataset: str, root: str, **kwargs) -> Iterator[dict]:
  if dataset not in READERS:
    raise ValueError(f"no reader for dataset {dataset!r}; known: {', '.join(sorted(READERS))}")
  return READERS[dataset](root, **kwargs)
