"""Every dataset reader on a tiny fixture in its released annotation layout, plus malformed-file errors."""
import csv
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from iblip_jax.data import readers, templates
from iblip_jax.evaluation import tasks


def _image(path) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((4, 5, 3), 128, np.uint8)).save(path)
  return str(path)


def _json(path, obj) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)
  return str(path)


def _jsonl(path, rows) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def _check_common(records, dataset):
  assert records, "no records"
  assert len({r["id"] for r in records}) == len(records)
  for r in records:
    assert r["dataset"] == dataset
    paths = [r["image"]] if "image" in r else r["frames"]
    assert all(os.path.isabs(p) for p in paths)


# --- held-in ---------------------------------------------------------------------------------------------------------


def test_coco_caption_karpathy(tmp_path):
  def img(cocoid, split, folder):
    name = f"COCO_{folder}_{cocoid:012d}.jpg"
    return {"filepath": folder, "filename": name, "cocoid": cocoid, "split": split, "imgid": cocoid,
            "sentences": [{"raw": f"caption {cocoid} {k}", "tokens": ["caption"]} for k in range(2)]}
  _json(tmp_path / "dataset_coco.json", {"dataset": "coco", "images": [
      img(1, "train", "train2014"), img(2, "restval", "val2014"), img(3, "test", "val2014")]})
  _image(tmp_path / "train2014" / "COCO_train2014_000000000001.jpg")
  train = list(readers.read_coco_caption(str(tmp_path)))
  _check_common(train, "coco_caption")
  assert [r["id"] for r in train] == [1, 2]
  assert train[0]["captions"] == ["caption 1 0", "caption 1 1"]
  assert train[0]["image"] == str(tmp_path / "train2014" / "COCO_train2014_000000000001.jpg")
  assert not os.path.exists(train[1]["image"])  # a missing image is yielded all the same
  assert [r["id"] for r in readers.read_coco_caption(str(tmp_path), include_restval=False)] == [1]
  assert [r["id"] for r in readers.read_coco_caption(str(tmp_path), split="test")] == [3]


def test_coco_caption_lavis_layout(tmp_path):
  """LAVIS stores BLIP's coco_karpathy_*.json in coco/annotations/ and the images in coco/images/; train has one
  item per caption, val/test a caption list. Records: one per image, the same as dataset_coco.json gives."""
  name = lambda folder, cocoid: f"{folder}/COCO_{folder}_{cocoid:012d}.jpg"
  _json(tmp_path / "annotations" / "coco_karpathy_train.json", [
      {"caption": "a cat on a mat", "image": name("train2014", 9), "image_id": "coco_9"},
      {"caption": "a dog", "image": name("val2014", 4), "image_id": "coco_4"},
      {"caption": "a cat sleeping", "image": name("train2014", 9), "image_id": "coco_9"}])
  _json(tmp_path / "annotations" / "coco_karpathy_test.json", [
      {"image": name("val2014", 391895), "caption": ["a man on a bike", "a biker", "a road"]}])
  _image(tmp_path / "images" / name("train2014", 9))
  train = list(readers.read_coco_caption(str(tmp_path)))
  _check_common(train, "coco_caption")
  assert [(r["id"], r["captions"]) for r in train] == [(9, ["a cat on a mat", "a cat sleeping"]), (4, ["a dog"])]
  assert train[0]["image"] == str(tmp_path / "images" / "train2014" / "COCO_train2014_000000000009.jpg")
  (test,) = readers.read_coco_caption(str(tmp_path), split="test", image_dir="/data/coco")
  assert test["id"] == 391895 and test["captions"] == ["a man on a bike", "a biker", "a road"]
  assert test["image"] == "/data/coco/val2014/COCO_val2014_000000391895.jpg"
  with pytest.raises(ValueError, match="coco_karpathy_train.json: LAVIS's train file merges"):
    list(readers.read_coco_caption(str(tmp_path), include_restval=False))
  # the file next to root's images (no annotations/ folder) is read too, images relative to root
  _json(tmp_path / "flat" / "coco_karpathy_val.json", [{"image": name("val2014", 5), "caption": ["x"]}])
  (val,) = readers.read_coco_caption(str(tmp_path / "flat"), split="val")
  assert val["image"] == str(tmp_path / "flat" / "val2014" / "COCO_val2014_000000000005.jpg")
  # with neither layout, the error names Karpathy's file
  with pytest.raises(FileNotFoundError, match="dataset_coco.json"):
    list(readers.read_coco_caption(str(tmp_path / "flat")))


def test_web_capfilt(tmp_path):
  _json(tmp_path / "ccs_synthetic_filtered_large.json", [
      {"url": "http://x.org/a.jpg", "caption": "a dog running"},
      {"url": "http://x.org/b.jpg", "caption": "two cats"}])
  _image(tmp_path / "img" / "a.jpg")
  records = list(readers.read_web_capfilt(str(tmp_path), image_dir=str(tmp_path / "img"),
                                          url_to_path=lambda url: url.rsplit("/", 1)[1]))
  _check_common(records, "web_capfilt")
  assert [r["captions"] for r in records] == [["a dog running"], ["two cats"]]
  assert records[0]["image"] == str(tmp_path / "img" / "a.jpg")
  # items with a local "image" path need no mapping; URL-only items without one are an error naming the record
  _json(tmp_path / "local.json", [{"image": "img/a.jpg", "caption": "a dog"}])
  assert next(readers.read_web_capfilt(str(tmp_path), "local.json"))["image"] == str(tmp_path / "img" / "a.jpg")
  with pytest.raises(ValueError, match=r"ccs_synthetic_filtered_large\.json: record 0: .*url_to_path"):
    list(readers.read_web_capfilt(str(tmp_path)))


def test_web_capfilt_finds_downloaded_images_by_url(tmp_path, caplog):
  """url_to_path as a config can write it: "basename", or a .json / .tsv map; URLs with no download are left out."""
  _json(tmp_path / "ccs_synthetic_filtered_large.json", [
      {"url": "http://x.org/p/a.jpg?size=2", "caption": "a dog"},
      {"url": "http://y.org/b.png", "caption": "two cats"},
      {"url": "http://z.org/dead.jpg", "caption": "gone"}])
  read = lambda spec: [(r["image"], r["captions"]) for r in readers.read_web_capfilt(str(tmp_path), url_to_path=spec)]
  assert read("basename") == [(str(tmp_path / "a.jpg"), ["a dog"]), (str(tmp_path / "b.png"), ["two cats"]),
                              (str(tmp_path / "dead.jpg"), ["gone"])]
  _json(tmp_path / "urls.json", {"http://x.org/p/a.jpg?size=2": "00000/000000000.jpg",
                                 "http://y.org/b.png": "00000/000000001.jpg"})
  (tmp_path / "urls.tsv").write_text("http://x.org/p/a.jpg?size=2\t00000/000000000.jpg\n"
                                     "http://y.org/b.png\t00000/000000001.jpg\n")
  want = [(str(tmp_path / "00000" / "000000000.jpg"), ["a dog"]), (str(tmp_path / "00000" / "000000001.jpg"),
                                                                   ["two cats"])]
  with caplog.at_level("WARNING"):
    assert read("urls.json") == want
  assert "1 records left out" in caplog.text
  assert read("urls.tsv") == want
  with pytest.raises(ValueError, match=r"url_to_path='urls\.txt': expected 'basename', a \.json"):
    read("urls.txt")
  (tmp_path / "bad.tsv").write_text("http://x.org/a.jpg 0.jpg\n")
  with pytest.raises(ValueError, match=r"bad\.tsv: line 1: expected 'url<TAB>path'"):
    read("bad.tsv")


def test_textcaps_with_rosetta_ocr(tmp_path):
  def entry(image_id, k):
    return {"image_id": image_id, "image_classes": ["Sign"], "caption_id": k, "caption_str": f"{image_id} cap {k}",
            "reference_strs": [f"{image_id} cap {j}" for j in range(2)], "set_name": "train"}
  _json(tmp_path / "TextCaps_0.1_train.json", {"dataset_type": "train", "dataset_name": "textcaps",
                                               "data": [entry("aa01", 0), entry("aa01", 1), entry("bb02", 0)]})
  _json(tmp_path / "TextVQA_Rosetta_OCR_v0.2_train.json", {"data": [
      {"image_id": "aa01", "ocr_tokens": ["STOP", "sign"], "ocr_info": []}]})
  _image(tmp_path / "train_images" / "aa01.jpg")
  records = list(readers.read_textcaps(str(tmp_path)))
  _check_common(records, "textcaps")
  assert [r["id"] for r in records] == ["aa01", "bb02"]
  assert records[0]["captions"] == ["aa01 cap 0", "aa01 cap 1"]
  assert records[0]["ocr_tokens"] == ["STOP", "sign"] and "ocr_tokens" not in records[1]
  assert records[0]["image"] == str(tmp_path / "train_images" / "aa01.jpg")
  assert templates.render("textcaps", records[0], np.random.default_rng(0))[0].startswith("OCR tokens: STOP, sign. ")


def _vqa_files(tmp_path, q_name, a_name, subtype):
  _json(tmp_path / q_name, {"data_subtype": subtype, "questions": [
      {"question_id": 10, "image_id": 5, "question": "what color is it?"},
      {"question_id": 11, "image_id": 6, "question": "how many cats?"}]})
  if a_name:
    _json(tmp_path / a_name, {"annotations": [
        {"question_id": 11, "image_id": 6, "multiple_choice_answer": "2",
         "answers": [{"answer": "2", "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]},
        {"question_id": 10, "image_id": 5, "multiple_choice_answer": "red",
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                     for k, a in enumerate(["red"] * 7 + ["orange"] * 3)]}]})
  _image(tmp_path / subtype / f"COCO_{subtype}_000000000005.jpg")


def test_vqav2_and_question_generation(tmp_path):
  _vqa_files(tmp_path, "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json", "val2014")
  records = list(readers.read_vqav2(str(tmp_path), split="val"))
  _check_common(records, "vqav2")
  assert records[0]["answers"] == ["red"] * 7 + ["orange"] * 3  # duplicates kept
  assert records[0]["answer"] == "red" and records[1]["answers"] == ["2"] * 10
  assert records[0]["image"] == str(tmp_path / "val2014" / "COCO_val2014_000000000005.jpg")
  vqg = list(readers.READERS["vqg"](str(tmp_path), split="val"))
  _check_common(vqg, "vqg")
  text_input, text_output = templates.render("vqg", vqg[0], np.random.default_rng(0))
  assert text_output == "what color is it?" and ("red" in text_input or "orange" in text_input)


def test_vqav2_test_dev_has_no_answers(tmp_path):
  _vqa_files(tmp_path, "v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test-dev2015")
  records = list(readers.read_vqav2(str(tmp_path), split="test-dev"))
  assert "answers" not in records[0]
  # test-dev questions use the test2015 images
  assert records[0]["image"] == str(tmp_path / "test2015" / "COCO_test2015_000000000005.jpg")


def test_okvqa(tmp_path):
  _vqa_files(tmp_path, "OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json", "val2014")
  records = list(readers.read_okvqa(str(tmp_path), split="val"))
  _check_common(records, "okvqa")
  assert records[1]["question"] == "how many cats?" and records[1]["answers"] == ["2"] * 10
  assert [r["dataset"] for r in readers.READERS["okvqa_qg"](str(tmp_path), split="val")] == ["okvqa_qg"] * 2


def test_aokvqa(tmp_path):
  def item(qid, image_id, **extra):
    return {"split": "val", "image_id": image_id, "question_id": qid, "question": f"question {qid}?",
            "choices": ["a", "b", "c", "d"], "rationales": ["because"], **extra}
  _json(tmp_path / "aokvqa_v1p0_val.json", [
      item("q1", 7, correct_choice_idx=2, direct_answers=["c"] * 9 + ["b"], difficult_direct_answer=False),
      item("q2", 8, correct_choice_idx=0, direct_answers=["a"] * 10, difficult_direct_answer=False)])
  _image(tmp_path / "val2017" / "000000000007.jpg")
  records = list(readers.read_aokvqa(str(tmp_path), split="val"))
  _check_common(records, "aokvqa")
  assert records[0]["candidates"] == ["a", "b", "c", "d"] and records[0]["answer_index"] == 2
  assert records[0]["answers"] == ["c"] * 9 + ["b"]
  assert records[0]["image"] == str(tmp_path / "val2017" / "000000000007.jpg")
  assert all(r["dataset"] == "aokvqa_qg" for r in readers.READERS["aokvqa_qg"](str(tmp_path), split="val"))
  # the test split has questions and choices only
  _json(tmp_path / "aokvqa_v1p0_test.json", [item("q3", 9)])
  (test,) = readers.read_aokvqa(str(tmp_path), split="test")
  assert "answers" not in test and "answer_index" not in test and test["candidates"]


def test_ocrvqa(tmp_path):
  _json(tmp_path / "dataset.json", {
      "761183272": {"imageURL": "http://ecx.images-amazon.com/images/I/61Y5cOdHJbL.jpg",
                    "questions": ["Who wrote this book?", "What is the genre of this book?"],
                    "answers": ["Sandra Boynton", "Calendars"], "title": "Mom's Family Wall Calendar 2016",
                    "authorName": "Sandra Boynton", "genre": "Calendars", "split": 1},
      "123": {"imageURL": "http://x/1.png", "questions": ["Is this a comic?"], "answers": ["No"], "title": "t",
              "authorName": "a", "genre": "g", "split": 3}})
  _image(tmp_path / "images" / "761183272.jpg")
  records = list(readers.read_ocrvqa(str(tmp_path)))
  _check_common(records, "ocrvqa")
  assert [(r["id"], r["answer"]) for r in records] == [("761183272_0", "Sandra Boynton"), ("761183272_1", "Calendars")]
  assert records[0]["image"] == str(tmp_path / "images" / "761183272.jpg") and "ocr_tokens" not in records[0]
  (test,) = readers.read_ocrvqa(str(tmp_path), split="test")
  assert test["image"].endswith("123.png")


def test_llava_instruct(tmp_path):
  conversation = [{"from": "human", "value": "<image>\nWhat is the man doing?"}, {"from": "gpt", "value": "Ironing."},
                  {"from": "human", "value": "Is it safe?"}, {"from": "gpt", "value": "No."}]
  _json(tmp_path / "conversation_58k.json", [
      {"id": "000000033471", "image": "000000033471.jpg", "conversations": conversation},
      {"id": "000000052846", "image": "000000052846.jpg", "conversations": conversation[:2]}])
  _image(tmp_path / "train2017" / "000000033471.jpg")
  records = list(readers.READERS["llava_conversation"](str(tmp_path)))
  _check_common(records, "llava_conversation")
  assert (records[0]["text_input"], records[0]["text_output"]) == ("What is the man doing?", "Ironing.")
  assert records[0]["image"] == str(tmp_path / "train2017" / "000000033471.jpg")
  assert [r["id"] for r in records] == ["000000033471_0", "000000052846_1"]
  every = list(readers.read_llava_instruct(str(tmp_path), "llava_conversation", turns="all"))
  assert [r["id"] for r in every] == ["000000033471_0_0", "000000033471_0_1", "000000052846_1_0"]
  assert every[1]["text_input"] == "Is it safe?"
  assert templates.render("llava_conversation", records[0], np.random.default_rng(0)) == (
      "What is the man doing?", "Ironing.")
  for name, filename in readers.LLAVA_FILES.items():
    assert name in templates.DATASET_TASKS and templates.DATASET_TASKS[name] is None and filename.endswith(".json")


def test_llava_instruct_ids_are_unique_when_an_image_has_several_conversations(tmp_path):
  """llava_instruct_150k.json merges the three parts, whose "id" is the COCO image id: an image with a conversation
  and a detailed description appears twice under the same id."""
  talk = lambda q, a: [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
  _json(tmp_path / "llava_instruct_150k.json", [
      {"id": "000000033471", "image": "000000033471.jpg", "conversations": talk("What is he doing?", "Ironing.")},
      {"id": "000000033471", "image": "000000033471.jpg", "conversations": talk("Describe the image.", "A man.")}])
  for turns in ("first", "all"):
    records = list(readers.read_llava_instruct(str(tmp_path), turns=turns))
    assert len(records) == 2 and len({r["id"] for r in records}) == 2, [r["id"] for r in records]
    assert [r["text_output"] for r in records] == ["Ironing.", "A man."]


# --- held-out --------------------------------------------------------------------------------------------------------


def test_nocaps(tmp_path):
  _json(tmp_path / "nocaps_val_4500_captions.json", {
      "licenses": [], "info": {},
      "images": [{"id": 0, "file_name": "0013ea2087020901.jpg", "open_images_id": "0013ea2087020901",
                  "domain": "in-domain", "height": 4, "width": 5},
                 {"id": 1, "file_name": "0023bd3a8f7c2ebd.jpg", "open_images_id": "0023bd3a8f7c2ebd",
                  "domain": "out-domain", "height": 4, "width": 5}],
      "annotations": [{"image_id": 1, "id": 0, "caption": "a jellyfish"}, {"image_id": 0, "id": 1, "caption": "a dog"},
                      {"image_id": 0, "id": 2, "caption": "a brown dog"}]})
  _image(tmp_path / "images" / "0013ea2087020901.jpg")
  records = list(readers.read_nocaps(str(tmp_path)))
  _check_common(records, "nocaps")
  assert records[0]["captions"] == ["a dog", "a brown dog"] and records[1]["captions"] == ["a jellyfish"]
  assert records[0]["image"] == str(tmp_path / "images" / "0013ea2087020901.jpg")
  _json(tmp_path / "nocaps_test_image_info.json", {"images": [{"id": 5, "file_name": "x.jpg"}]})
  assert "captions" not in next(readers.read_nocaps(str(tmp_path), split="test"))


def test_nocaps_images_in_lavis_split_folder(tmp_path):
  """LAVIS's download_nocaps.py saves the images to nocaps/images/{val,test}/; the flat folder is preferred."""
  _json(tmp_path / "nocaps_val_4500_captions.json", {
      "images": [{"id": 0, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}, {"id": 2, "file_name": "c.jpg"}],
      "annotations": [{"image_id": k, "id": k, "caption": "x"} for k in range(3)]})
  _image(tmp_path / "images" / "val" / "a.jpg")
  _image(tmp_path / "images" / "b.jpg")
  _image(tmp_path / "images" / "val" / "b.jpg")
  images = [r["image"] for r in readers.read_nocaps(str(tmp_path))]
  assert images == [str(tmp_path / "images" / "val" / "a.jpg"), str(tmp_path / "images" / "b.jpg"),
                    str(tmp_path / "images" / "c.jpg")]  # c: in neither, reported at the flat path


def test_flickr30k(tmp_path):
  _json(tmp_path / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": [
      {"filename": "1000092795.jpg", "imgid": 0, "split": "test", "sentids": [0],
       "sentences": [{"raw": "Two young guys with shaggy hair.", "tokens": [], "imgid": 0, "sentid": 0}]},
      {"filename": "10002456.jpg", "imgid": 1, "split": "train", "sentids": [1],
       "sentences": [{"raw": "Several men in hard hats.", "tokens": [], "imgid": 1, "sentid": 1}]}]})
  _image(tmp_path / "flickr30k-images" / "1000092795.jpg")
  (record,) = readers.read_flickr30k(str(tmp_path))
  _check_common([record], "flickr30k")
  assert record["id"] == "1000092795" and record["captions"] == ["Two young guys with shaggy hair."]
  assert record["image"] == str(tmp_path / "flickr30k-images" / "1000092795.jpg")


def test_gqa(tmp_path):
  _json(tmp_path / "questions1.2" / "testdev_balanced_questions.json", {
      "20968379": {"imageId": "n288870", "question": "Do the shorts have dark color?", "answer": "yes",
                   "fullAnswer": "Yes, the shorts are dark.", "isBalanced": True},
      "20968380": {"imageId": "n288871", "question": "Which color is the car?", "answer": "white",
                   "fullAnswer": "The car is white.", "isBalanced": True}})
  _image(tmp_path / "images" / "n288870.jpg")
  records = list(readers.read_gqa(str(tmp_path)))
  _check_common(records, "gqa")
  assert [(r["id"], r["answer"]) for r in records] == [("20968379", "yes"), ("20968380", "white")]
  assert records[0]["image"] == str(tmp_path / "images" / "n288870.jpg")


def test_gqa_lavis_list_layout(tmp_path):
  """LAVIS's testdev_balanced_questions.json (gqa/annotations/) is a list, not the official dict."""
  _json(tmp_path / "annotations" / "testdev_balanced_questions.json", [
      {"image": "n161313.jpg", "question": "Is it overcast?", "answer": "no", "question_id": 201307251},
      {"image": "n235859.jpg", "question": "Who is wearing the dress?", "answer": "woman", "question_id": 201640614}])
  _image(tmp_path / "images" / "n161313.jpg")
  records = list(readers.read_gqa(str(tmp_path)))
  _check_common(records, "gqa")
  assert [(r["id"], r["question"], r["answer"]) for r in records] == [
      ("201307251", "Is it overcast?", "no"), ("201640614", "Who is wearing the dress?", "woman")]
  assert records[0]["image"] == str(tmp_path / "images" / "n161313.jpg")
  _json(tmp_path / "testdev_balanced_questions.json", "neither")
  with pytest.raises(ValueError, match="expected dict or list, got str"):
    list(readers.read_gqa(str(tmp_path)))


def test_vsr(tmp_path):
  _jsonl(tmp_path / "splits" / "zeroshot" / "test.jsonl", [
      {"image": "000000017697.jpg", "image_link": "http://images.cocodataset.org/train2017/000000017697.jpg",
       "caption": "The car is behind the suitcase.", "label": 1, "relation": "behind", "annotator_id": 2,
       "vote_true_validator_id": "[18, 2]", "vote_false_validator_id": "[1]"},
      {"image": "000000199940.jpg", "image_link": "http://images.cocodataset.org/train2017/000000199940.jpg",
       "caption": "The cat is under the backpack.", "label": 0, "relation": "under", "annotator_id": 1,
       "vote_true_validator_id": "[]", "vote_false_validator_id": "[2, 51, 26]"}])
  _image(tmp_path / "images" / "000000017697.jpg")
  records = list(readers.read_vsr(str(tmp_path)))
  _check_common(records, "vsr")
  assert [(r["caption"], r["label"]) for r in records] == [("The car is behind the suitcase.", 1),
                                                          ("The cat is under the backpack.", 0)]
  task = tasks.get("vsr")
  assert [task.candidates[r["answer_index"]] for r in records] == ["true", "false"]
  assert tasks.render_prompt(task, records[0]).endswith('"The car is behind the suitcase." Answer:')


def test_iconqa(tmp_path):
  _json(tmp_path / "problems.json", {
      "1": {"question": "How likely is it that you will pick a black one?",
            "choices": ["certain", "unlikely", "impossible", "probable"], "answer": 2, "ques_type": "choose_txt",
            "grade": "grade1", "label": "S2"},
      "2": {"question": "Which is bigger?", "choices": ["the cat", "the dog"], "answer": 0, "ques_type": "choose_txt"},
      "3": {"question": "How many dots are there?", "answer": "7", "ques_type": "fill_in_blank"}})
  _json(tmp_path / "pid_splits.json", {"choose_txt_test": ["1", "2"], "fill_in_blank_test": ["3"]})
  _image(tmp_path / "iconqa" / "test" / "choose_txt" / "1" / "image.png")
  records = list(readers.read_iconqa(str(tmp_path)))
  _check_common(records, "iconqa")
  assert records[0]["candidates"][records[0]["answer_index"]] == "impossible"
  assert records[0]["image"] == str(tmp_path / "iconqa" / "test" / "choose_txt" / "1" / "image.png")
  assert "Options: (a) certain (b) unlikely" in tasks.render_prompt(tasks.get("iconqa"), records[0])
  (blank,) = readers.read_iconqa(str(tmp_path), task="fill_in_blank")
  assert blank["answer"] == "7" and "candidates" not in blank


def test_iconqa_trainval_and_mini_lists_use_each_problems_own_folder(tmp_path):
  """pid_splits.json's trainval / minitrain lists mix train and val problems; images sit under the problem's own
  split folder, never under iconqa/trainval/."""
  _json(tmp_path / "problems.json", {
      "10": {"question": "Which?", "choices": ["x", "y"], "answer": 1, "ques_type": "choose_txt", "split": "train"},
      "20": {"question": "Which?", "choices": ["x", "y"], "answer": 0, "ques_type": "choose_txt", "split": "val"},
      "30": {"question": "Which?", "choices": ["x", "y"], "answer": 0, "ques_type": "choose_txt"}})  # no split field
  _json(tmp_path / "pid_splits.json", {"choose_txt_trainval": ["10", "20", "30"], "choose_txt_minitrain": ["20"]})
  folder = lambda split, pid: str(tmp_path / "iconqa" / split / "choose_txt" / pid / "image.png")
  _image(folder("val", "30"))
  records = list(readers.read_iconqa(str(tmp_path), split="trainval"))
  assert [r["image"] for r in records] == [folder("train", "10"), folder("val", "20"), folder("val", "30")]
  (mini,) = readers.read_iconqa(str(tmp_path), split="minitrain")
  assert mini["image"] == folder("val", "20")


def test_textvqa(tmp_path):
  _json(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
      {"question": "what is the brand of this camera?", "image_id": "003a8ae2ef43b901", "question_id": 34602,
       "answers": ["dakota"] * 8 + ["nous les gosses"] * 2, "set_name": "val"},
      {"question": "what does the sign say?", "image_id": "00685bc495504d61", "question_id": 34603,
       "answers": ["stop"] * 10, "set_name": "val"}]})
  _json(tmp_path / "TextVQA_Rosetta_OCR_v0.2_val.json", {"data": [
      {"image_id": "003a8ae2ef43b901", "ocr_tokens": ["DAKOTA", "digital"], "ocr_info": []},
      {"image_id": "00685bc495504d61", "ocr_tokens": [], "ocr_info": []}]})
  _image(tmp_path / "train_images" / "003a8ae2ef43b901.jpg")
  records = list(readers.read_textvqa(str(tmp_path)))
  _check_common(records, "textvqa")
  assert records[0]["ocr_tokens"] == ["DAKOTA", "digital"] and records[1]["ocr_tokens"] == []
  assert records[0]["answers"][0] == "dakota" and len(records[0]["answers"]) == 10
  assert records[0]["image"] == str(tmp_path / "train_images" / "003a8ae2ef43b901.jpg")
  assert tasks.render_prompt(tasks.get("textvqa"), records[0]) == (
      "OCR tokens: DAKOTA, digital. Question: what is the brand of this camera? Short answer:")


def test_visdial(tmp_path):
  questions = ["is it sunny", "what color is the cat", "any people"]
  answers = [f"answer {k}" for k in range(100)]
  options = list(range(100))
  _json(tmp_path / "visdial_1.0_val.json", {"version": "1.0", "split": "val2018", "data": {
      "questions": questions, "answers": answers, "dialogs": [
          {"image_id": 185565, "caption": "a cat on a sofa", "dialog": [
              {"question": 0, "answer": 3, "answer_options": options, "gt_index": 3},
              {"question": 1, "answer": 4, "answer_options": options[::-1], "gt_index": 95}]},
          {"image_id": 284024, "caption": "a street", "dialog": [
              {"question": 2, "answer": 5, "answer_options": options, "gt_index": 5}]}]}})
  _image(tmp_path / "VisualDialog_val2018" / "VisualDialog_val2018_000000185565.jpg")
  records = list(readers.read_visdial(str(tmp_path)))
  _check_common(records, "visdial")
  assert [r["id"] for r in records] == ["185565_1", "185565_2", "284024_1"]
  first, second, _ = records
  assert first["history"] == "a cat on a sofa" and first["question"] == "is it sunny"
  assert second["history"] == "a cat on a sofa q: is it sunny a: answer 3"
  assert len(second["candidates"]) == 100 and second["candidates"][second["answer_index"]] == "answer 4"
  assert first["image"] == str(tmp_path / "VisualDialog_val2018" / "VisualDialog_val2018_000000185565.jpg")
  assert tasks.render_prompt(tasks.get("visdial"), second).startswith("Dialog history: a cat on a sofa q: is it")


def test_visdial_test_split(tmp_path):
  _json(tmp_path / "visdial_1.0_test.json", {"version": "1.0", "split": "test2018", "data": {
      "questions": ["q0", "q1"], "answers": [f"a{k}" for k in range(100)], "dialogs": [
          {"image_id": 1, "caption": "c", "round_id": 2, "dialog": [
              {"question": 0, "answer": 7}, {"question": 1, "answer_options": list(range(100))}]}]}})
  (record,) = readers.read_visdial(str(tmp_path), split="test")
  assert record["id"] == "1_2" and record["history"] == "c q: q0 a: a7" and "answer_index" not in record
  assert record["image"].endswith("VisualDialog_test2018/VisualDialog_test2018_000000000001.jpg")


def test_hateful_memes(tmp_path):
  _jsonl(tmp_path / "dev_seen.jsonl", [
      {"id": 8291, "img": "img/08291.png", "label": 1, "text": "white people is this a shooting range"},
      {"id": 46971, "img": "img/46971.png", "label": 0, "text": "bravery at its finest"}])
  _jsonl(tmp_path / "test_unseen.jsonl", [{"id": 3, "img": "img/00003.png", "text": "no label here"}])
  _image(tmp_path / "img" / "08291.png")
  records = list(readers.read_hateful_memes(str(tmp_path)))
  _check_common(records, "hateful_memes")
  assert [(r["id"], r["label"]) for r in records] == [(8291, 1), (46971, 0)]
  assert records[0]["image"] == str(tmp_path / "img" / "08291.png")
  assert "label" not in next(readers.read_hateful_memes(str(tmp_path), split="test_unseen"))


def test_vizwiz(tmp_path):
  answers = [{"answer": a, "answer_confidence": "yes"} for a in ["night time"] * 6 + ["unanswerable"] * 4]
  _json(tmp_path / "Annotations" / "val.json", [
      {"image": "VizWiz_val_00000000.jpg", "question": "What is this medicine?", "answers": answers,
       "answer_type": "other", "answerable": 1},
      {"image": "VizWiz_val_00000001.jpg", "question": "What color?", "answers": answers, "answer_type": "other",
       "answerable": 1}])
  _json(tmp_path / "Annotations" / "test.json", [{"image": "VizWiz_test_00000000.jpg", "question": "What?"}])
  _image(tmp_path / "val" / "VizWiz_val_00000000.jpg")
  records = list(readers.read_vizwiz(str(tmp_path)))
  _check_common(records, "vizwiz")
  assert records[0]["id"] == "VizWiz_val_00000000" and records[0]["answers"].count("unanswerable") == 4
  assert records[0]["image"] == str(tmp_path / "val" / "VizWiz_val_00000000.jpg")
  assert "answers" not in next(readers.read_vizwiz(str(tmp_path), split="test"))


def test_scienceqa_img(tmp_path):
  def problem(image, hint):
    return {"question": "Which animal's feet are adapted for swimming?", "choices": ["duck", "cat", "horse"],
            "answer": 0, "hint": hint, "image": image, "task": "closed choice", "grade": "grade3",
            "subject": "natural science", "split": "test", "lecture": "", "solution": ""}
  _json(tmp_path / "problems.json", {"4": problem("image.png", "Ducks live near water."), "5": problem(None, ""),
                                     "6": problem("image.png", "")})
  _json(tmp_path / "pid_splits.json", {"train": [], "val": [], "test": ["4", "5", "6"]})
  _image(tmp_path / "images" / "test" / "4" / "image.png")
  records = list(readers.read_scienceqa(str(tmp_path)))
  _check_common(records, "scienceqa_img")
  assert [r["id"] for r in records] == ["4", "6"]  # the IMG subset only
  assert records[0]["context"] == "Ducks live near water." and records[1]["context"] == ""
  assert records[0]["candidates"][records[0]["answer_index"]] == "duck"
  assert records[0]["image"] == str(tmp_path / "images" / "test" / "4" / "image.png")
  assert tasks.render_prompt(tasks.get("scienceqa_img"), records[0]) == (
      "Context: Ducks live near water. Question: Which animal's feet are adapted for swimming? "
      "Options: (a) duck (b) cat (c) horse. Answer:")
  assert len(list(readers.read_scienceqa(str(tmp_path), image_only=False))) == 3


def _frames(directory, n):
  for k in (10, 2, 1)[:n]:  # natural order must put frame_2 before frame_10
    _image(directory / f"frame_{k}.jpg")


def test_msvd_qa(tmp_path):
  (tmp_path / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\n-7KMZQEsJW4_205_208 vid2\n")
  _json(tmp_path / "test_qa.json", [
      {"answer": "cat", "id": 1, "question": "what is playing?", "video_id": 1},
      {"answer": "piano", "id": 2, "question": "what is played?", "video_id": 2}])
  _json(tmp_path / "train_qa.json", [{"answer": a, "id": k, "question": "q", "video_id": 1}
                                     for k, a in enumerate(["dog", "cat", "dog"])])
  _frames(tmp_path / "frames" / "-4wsuPCjDBc_5_15", 3)
  records = list(readers.read_msvd_qa(str(tmp_path)))
  _check_common(records, "msvd_qa")
  assert [os.path.basename(f) for f in records[0]["frames"]] == ["frame_1.jpg", "frame_2.jpg", "frame_10.jpg"]
  assert records[1]["frames"] == []  # frames not extracted: yielded, the pipeline skips it
  # candidates: the train answers, most frequent first; an answer outside them can never be right
  assert records[0]["candidates"] == ["dog", "cat"] and records[0]["answer_index"] == 1
  assert records[1]["answer"] == "piano" and records[1]["answer_index"] == -1
  # a LAVIS / just-ask {answer: index} file wins
  _json(tmp_path / "train_ans2label.json", {"piano": 1, "cat": 0})
  assert next(readers.read_msvd_qa(str(tmp_path)))["candidates"] == ["cat", "piano"]


def test_msrvtt_qa(tmp_path):
  _json(tmp_path / "test_qa.json", [
      {"answer": "man", "category_id": 2, "id": 158581, "question": "who is talking?", "video_id": 7010},
      {"answer": "car", "category_id": 0, "id": 158582, "question": "what is shown?", "video_id": 7011}])
  _frames(tmp_path / "frames" / "video7010", 2)
  records = list(readers.read_msrvtt_qa(str(tmp_path), answer_vocab=["man", "woman"]))
  _check_common(records, "msrvtt_qa")
  assert [os.path.basename(f) for f in records[0]["frames"]] == ["frame_2.jpg", "frame_10.jpg"]
  assert records[0]["answer_index"] == 0 and records[1]["answer_index"] == -1
  # no vocabulary anywhere: records carry the answer only
  (tmp_path / "other").mkdir()
  _json(tmp_path / "other" / "test_qa.json", [{"answer": "man", "id": 1, "question": "who?", "video_id": 1}])
  record = next(readers.read_msrvtt_qa(str(tmp_path / "other")))
  assert record["answer"] == "man" and "candidates" not in record


@pytest.mark.slow
def test_video_qa_default_candidates_are_the_top_k_train_answers(tmp_path):
  """Without an answer-list file the candidates are the most frequent train answers, as many as LAVIS's lists
  (MSRVTT 1,500, MSVD 2,423), not every train answer."""
  assert (readers.MSRVTT_TOP_K, readers.MSVD_TOP_K) == (1500, 2423)
  rng = np.random.default_rng(0)
  counts = {f"answer{k}": int(n) for k, n in enumerate(rng.permutation(np.arange(1, 1601)))}  # 1,600 distinct
  train = [{"answer": a, "id": i, "question": "q", "video_id": 1}
           for i, a in enumerate(a for a, n in counts.items() for _ in range(n))]
  _json(tmp_path / "train_qa.json", [train[i] for i in rng.permutation(len(train))])
  rare, common = min(counts, key=counts.get), max(counts, key=counts.get)
  _json(tmp_path / "test_qa.json", [{"answer": common, "id": 1, "question": "q", "video_id": 1},
                                    {"answer": rare, "id": 2, "question": "q", "video_id": 1}])
  first, second = readers.read_msrvtt_qa(str(tmp_path))
  want = sorted(counts, key=counts.get, reverse=True)[:1500]  # counts are distinct: no ties to break
  assert first["candidates"] == want and first["answer_index"] == 0
  assert second["answer_index"] == -1  # answered once: outside the 1,500, never right (as in ALPRO)
  assert len(next(readers.read_msrvtt_qa(str(tmp_path), top_k=None))["candidates"]) == 1600
  (tmp_path / "youtube_mapping.txt").write_text("clip vid1\n")
  assert len(next(readers.read_msvd_qa(str(tmp_path)))["candidates"]) == 1600  # fewer than 2,423: all of them
  assert next(readers.read_msvd_qa(str(tmp_path), top_k=3))["candidates"] == want[:3]


def test_ivqa(tmp_path):
  with open(tmp_path / "test.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["video_id", "start", "end", "question", "answer1", "answer2", "answer3", "answer4", "answer5"])
    writer.writerow(["aBcDeFgHiJk", "12", "29", "what is the man cutting?", "onion", "onion", "onions", "onion", ""])
    writer.writerow(["ZyXwVuTsRqP", "0", "8", "what sport is this?", "golf", "golf", "golf", "golf", "golf"])
  _frames(tmp_path / "frames" / "aBcDeFgHiJk_12_29", 3)
  records = list(readers.read_ivqa(str(tmp_path)))
  _check_common(records, "ivqa")
  assert records[0]["answers"] == ["onion", "onion", "onions", "onion"]
  assert len(records[0]["frames"]) == 3 and records[1]["frames"] == []
  assert tasks.render_prompt(tasks.get("ivqa"), records[0]) == "Question: what is the man cutting? Short answer:"


def test_generic_jsonl(tmp_path):
  _image(tmp_path / "data" / "pics" / "a.png")
  _jsonl(tmp_path / "data" / "train.jsonl", [
      {"image": "pics/a.png", "text_input": "Describe it.", "text_output": "A grey square."},
      {"id": "x", "image": "pics/missing.png", "text_input": "Q?", "text_output": "A."}])
  records = list(readers.read_jsonl(str(tmp_path / "data" / "train.jsonl")))
  _check_common(records, "jsonl")
  assert [r["id"] for r in records] == [1, "x"]
  assert records[0]["image"] == str(tmp_path / "data" / "pics" / "a.png")
  assert templates.render("jsonl", records[0], np.random.default_rng(0)) == ("Describe it.", "A grey square.")


def test_every_dataset_has_a_reader():
  assert set(templates.DATASET_TASKS) <= set(readers.READERS)
  held_out = {name for name, task in tasks.TASKS.items() if task.held_out}
  assert len(held_out) == 13 and held_out <= set(readers.READERS)
  with pytest.raises(ValueError, match="no reader"):
    readers.read("imagenet", "/nowhere")


def test_held_out_tasks_name_their_split_and_the_reader_defaults_to_it():
  """tasks.TASKS records the split each held-out task is scored on (dataset_formats.md); a reader called with its
  defaults, as config.evals entries are, reads that split."""
  import inspect
  for name, task in tasks.TASKS.items():
    if not task.held_out:
      continue
    assert task.split and task.split_note, name
    reader = readers.READERS[name]
    assert inspect.signature(reader).parameters["split"].default == task.split, name


# --- malformed files -------------------------------------------------------------------------------------------------


def test_bad_json_names_file_and_line(tmp_path):
  path = tmp_path / "dataset_coco.json"
  path.write_text('{"images": [\n  {"split": "train",\n   "filename": }\n]}')
  with pytest.raises(ValueError, match=r"dataset_coco\.json: line 3, column \d+: malformed JSON"):
    list(readers.read_coco_caption(str(tmp_path)))


def test_bad_jsonl_line_names_file_and_line(tmp_path):
  good = {"id": 1, "img": "img/1.png", "label": 0, "text": "t"}
  (tmp_path / "dev_seen.jsonl").write_text(json.dumps(good) + "\n\n" + '{"id": 2, "img": \n')
  with pytest.raises(ValueError, match=r"dev_seen\.jsonl: line 3: malformed JSON"):
    list(readers.read_hateful_memes(str(tmp_path)))


def test_every_bad_line_is_named_with_its_column_and_byte(tmp_path):
  """20 bad lines are one error naming the first 10 and counting the rest (not 20 reruns), each with the column and
  the byte of the file; a line cut short says so plainly; it is a UserError (one line at the command line)."""
  from iblip_jax.errors import UserError
  good = json.dumps({"image": "a.png", "text_input": "q", "text_output": "a"})
  lines = [good] + ['{"image": "b.png", "text_input": "cut' for _ in range(19)] + ['{"text_input": "q"}', good]
  path = tmp_path / "d.jsonl"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(UserError) as e:
    list(readers.read_jsonl(str(path)))
  text = str(e.value)
  assert text.startswith(f"{path}: 20 bad lines:") and "... and 10 more" in text
  second = len(good) + 1   # the byte where line 2 starts
  assert (f"line 2: malformed JSON (a string that is never closed: is the line cut short?; column 34, byte "
          f"{second + 33} of the file)") in text   # the string opens at column 34 (byte 33 of its line)
  assert "line 21" not in text   # beyond the first 10, counted only
  path.write_text(good + "\n" + '{"text_input": "q", "text_output": "a"}' + "\n")
  with pytest.raises(UserError, match=r"d\.jsonl: line 2: missing required key 'image'"):
    list(readers.read_jsonl(str(path)))


def test_invalid_utf8_names_file_line_and_byte(tmp_path):
  """A Latin-1 byte (é = 0xe9) in a UTF-8 annotation file: a ValueError naming the file, the line and the byte's
  position in it (counted by hand below), like malformed JSON, instead of the codec's bare 'position 1056'."""
  good = {"id": 1, "img": "img/1.png", "label": 0, "text": "t"}
  path = tmp_path / "dev_seen.jsonl"
  path.write_bytes(json.dumps(good).encode() + b"\n\n" + b'{"id": 2, "text": "caf\xe9"}\n')
  records = readers.read_hateful_memes(str(tmp_path))
  assert next(records)["id"] == 1  # the lines before it are read as usual
  with pytest.raises(ValueError, match=re.escape(f"{path}: line 3, byte 23 of the line: not UTF-8 (byte 0xe9")):
    next(records)
  path = tmp_path / "dataset_coco.json"
  path.write_bytes(b'{"images": [\n  {"caption": "caf\xe9"}\n]}')
  with pytest.raises(ValueError, match=re.escape(f"{path}: line 2, byte 19 of the line: not UTF-8 (byte 0xe9")):
    list(readers.read_coco_caption(str(tmp_path)))
  (tmp_path / "ok.json").write_bytes('{"caption": "café"}'.encode())  # real UTF-8 (two bytes) still reads
  assert readers.load_json(str(tmp_path / "ok.json")) == {"caption": "café"}


def test_missing_key_names_file_and_record(tmp_path):
  _json(tmp_path / "aokvqa_v1p0_val.json", [{"question_id": "q1", "image_id": 1, "question": "q?"},
                                            {"question_id": "q2", "question": "no image?"}])
  with pytest.raises(ValueError, match=r"aokvqa_v1p0_val\.json: record 1: missing required key 'image_id'"):
    list(readers.read_aokvqa(str(tmp_path), split="val"))
  _jsonl(tmp_path / "train.jsonl", [{"image": "a.png", "text_input": "x", "text_output": "y"},
                                    {"image": "b.png", "text_input": "x"}])
  with pytest.raises(ValueError, match=r"train\.jsonl: line 2: missing required key 'text_output'"):
    list(readers.read_jsonl(str(tmp_path / "train.jsonl")))
  _json(tmp_path / "dataset.json", {"42": {"imageURL": "u.jpg", "questions": ["q"], "split": 1}})
  with pytest.raises(ValueError, match=r"dataset\.json: record '42': missing required key 'answers'"):
    list(readers.read_ocrvqa(str(tmp_path)))


def test_wrong_types_and_dangling_references(tmp_path):
  _json(tmp_path / "dataset_flickr30k.json", {"images": {"not": "a list"}})
  with pytest.raises(ValueError, match=r"dataset_flickr30k\.json: top level, key 'images': expected list"):
    list(readers.read_flickr30k(str(tmp_path)))
  _json(tmp_path / "visdial_1.0_val.json", {"data": {"questions": ["q"], "answers": ["a"], "dialogs": [
      {"image_id": 1, "caption": "c", "dialog": [{"question": 0, "answer": 5, "answer_options": [0]}]}]}})
  with pytest.raises(ValueError, match=r"visdial_1\.0_val\.json: dialog 0, round 1: index 5 is not in data\.answers"):
    list(readers.read_visdial(str(tmp_path)))
  _vqa_files(tmp_path, "v2_OpenEnded_mscoco_train2014_questions.json", None, "train2014")
  _json(tmp_path / "v2_mscoco_train2014_annotations.json", {"annotations": []})
  with pytest.raises(ValueError, match=r"v2_mscoco_train2014_annotations\.json: no annotation for question_id 10"):
    list(readers.read_vqav2(str(tmp_path)))


def test_bad_csv_names_file_and_line(tmp_path):
  (tmp_path / "test.csv").write_text("video_id,question,answer1\nabc,q,a\n")
  with pytest.raises(ValueError, match=r"test\.csv: line 1: missing column\(s\) answer2"):
    list(readers.read_ivqa(str(tmp_path)))
  header = "video_id,question,answer1,answer2,answer3,answer4,answer5\n"
  (tmp_path / "test.csv").write_text(header + "a,q,1,2,3,4,5\nb,q,1,2\n")
  with pytest.raises(ValueError, match=r"test\.csv: line 3: expected 7 fields"):
    list(readers.read_ivqa(str(tmp_path)))


def test_missing_annotation_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="TextVQA_0.5.1_val.json"):
    list(readers.read_textvqa(str(tmp_path)))


def test_video_qa_from_the_original_clips(tmp_path):
  """Without extracted frames, a video QA record's "frames" is its original clip (MSVD's YouTubeClips/<name>.avi,
  MSR-VTT's videos/video<N>.mp4, iVQA's videos/<id>_<start>_<end>.mp4), and the model input decodes it; extracted
  frames win when both exist; a clip found nowhere is [] as before."""
  pytest.importorskip("av")
  import video_clips
  from iblip_jax.data import images
  (tmp_path / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\n-7KMZQEsJW4_205_208 vid2\n")
  _json(tmp_path / "test_qa.json", [{"answer": "cat", "id": 1, "question": "q?", "video_id": 1},
                                    {"answer": "dog", "id": 2, "question": "q?", "video_id": 2}])
  (tmp_path / "YouTubeClips").mkdir()
  video_clips.write(tmp_path / "YouTubeClips" / "-4wsuPCjDBc_5_15.avi", 8, codec="mjpeg")
  first, second = readers.read_msvd_qa(str(tmp_path), answer_vocab=["cat"])
  assert first["frames"] == str(tmp_path / "YouTubeClips" / "-4wsuPCjDBc_5_15.avi") and second["frames"] == []
  assert images.pixels(first["frames"], 32, frames=4).shape == (4, 32, 32, 3)
  _frames(tmp_path / "frames" / "-4wsuPCjDBc_5_15", 2)
  assert len(next(readers.read_msvd_qa(str(tmp_path), answer_vocab=["cat"]))["frames"]) == 2
  (tmp_path / "videos").mkdir()
  video_clips.write(tmp_path / "videos" / "video7.mp4", 5)
  _json(tmp_path / "test_qa.json", [{"answer": "cat", "id": 1, "question": "q?", "video_id": 7}])
  assert next(readers.read_msrvtt_qa(str(tmp_path), answer_vocab=["cat"]))["frames"] == \
      str(tmp_path / "videos" / "video7.mp4")
  with open(tmp_path / "test.csv", "w", newline="") as f:
    csv.writer(f).writerows([["video_id", "start", "end", "question", "answer1", "answer2", "answer3", "answer4",
                              "answer5"], ["aBcDeFgHiJk", "12", "29", "what?", "onion", "", "", "", ""]])
  video_clips.write(tmp_path / "videos" / "aBcDeFgHiJk_12_29.mp4", 5)
  assert next(readers.read_ivqa(str(tmp_path)))["frames"] == str(tmp_path / "videos" / "aBcDeFgHiJk_12_29.mp4")
