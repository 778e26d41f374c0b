"""Tiny file sets of the 13 held-out datasets in their released layouts (as configs/paper/README.md lists them), a
few records each, for running the Table 1 command end to end."""
import csv
import json
import os

import numpy as np
from PIL import Image

WORDS = ("a red blue green dog cat car man two sign stop piano golf yes no true false question short answer "
         "what color is it image description options context dialog history this with written on hateful "
         "based the statement or").split()


def _image(path, seed: int = 0) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 16, 3), np.uint8)).save(path)


def _json(path, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def _frames(directory, n: int = 4) -> None:
  for k in range(1, n + 1):
    _image(os.path.join(directory, f"frame_{k}.jpg"), k)


def write(root) -> dict[str, str]:
  """Writes each dataset under root/<folder> (config_lib.HELD_OUT_FOLDERS); returns {task: folder path}."""
  root = str(root)
  p = lambda *parts: os.path.join(root, *parts)
  domains = ["in-domain", "near-domain", "out-domain"]
  _json(p("nocaps", "nocaps_val_4500_captions.json"), {
      "images": [{"id": i, "file_name": f"{i}.jpg", "open_images_id": str(i), "domain": d}
                 for i, d in enumerate(domains)],
      "annotations": [{"image_id": i, "id": i, "caption": c} for i, c in enumerate(["a red car", "a dog", "a sign"])]})
  for i in range(3):
    _image(p("nocaps", "images", "val", f"{i}.jpg"), i)
  _json(p("flickr30k", "dataset_flickr30k.json"), {"images": [
      {"filename": f"{i}.jpg", "imgid": i, "split": "test", "sentences": [{"raw": "two dog", "tokens": []}]}
      for i in range(2)]})
  for i in range(2):
    _image(p("flickr30k", "flickr30k-images", f"{i}.jpg"), i)
  _json(p("gqa", "testdev_balanced_questions.json"), {
      str(i): {"imageId": f"n{i}", "question": "what color is it?", "answer": "red"} for i in range(2)})
  for i in range(2):
    _image(p("gqa", "images", f"n{i}.jpg"), i)
  os.makedirs(p("vsr", "splits", "zeroshot"), exist_ok=True)
  with open(p("vsr", "splits", "zeroshot", "test.jsonl"), "w") as f:
    for i in range(2):
      f.write(json.dumps({"image": f"{i}.jpg", "caption": "the cat is on the dog", "label": i}) + "\n")
      _image(p("vsr", "images", f"{i}.jpg"), i)
  _json(p("iconqa", "problems.json"), {str(i): {"question": "what is it?", "choices": ["dog", "cat"], "answer": i,
                                                "ques_type": "choose_txt", "split": "test"} for i in range(2)})
  _json(p("iconqa", "pid_splits.json"), {"choose_txt_test": ["0", "1"]})
  for i in range(2):
    _image(p("iconqa", "iconqa", "test", "choose_txt", str(i), "image.png"), i)
  _json(p("textvqa", "TextVQA_0.5.1_val.json"), {"data": [
      {"question": "what does the sign say?", "image_id": f"t{i}", "question_id": i, "answers": ["stop"] * 10}
      for i in range(2)]})
  _json(p("textvqa", "TextVQA_Rosetta_OCR_v0.2_val.json"), {"data": [
      {"image_id": f"t{i}", "ocr_tokens": ["STOP"]} for i in range(2)]})
  for i in range(2):
    _image(p("textvqa", "train_images", f"t{i}.jpg"), i)
  _json(p("visdial", "visdial_1.0_val.json"), {"version": "1.0", "split": "val2018", "data": {
      "questions": ["what color is it", "is it a dog"], "answers": ["red", "yes", "no", "two"],
      "dialogs": [{"image_id": i + 1, "caption": "a dog on a car", "dialog": [
          {"question": 0, "answer": 0, "answer_options": [0, 1, 2, 3], "gt_index": 0},
          {"question": 1, "answer": 1, "answer_options": [3, 2, 1, 0], "gt_index": 2}]} for i in range(2)]}})
  for i in range(2):
    _image(p("visdial", "VisualDialog_val2018", f"VisualDialog_val2018_{i + 1:012d}.jpg"), i)
  os.makedirs(p("hateful_memes"), exist_ok=True)
  with open(p("hateful_memes", "dev_seen.jsonl"), "w") as f:
    for i in range(4):
      f.write(json.dumps({"id": i, "img": f"img/{i}.png", "label": i % 2, "text": "a dog with a sign"}) + "\n")
      _image(p("hateful_memes", "img", f"{i}.png"), i)
  _json(p("vizwiz", "Annotations", "val.json"), [
      {"image": f"VizWiz_val_{i:08d}.jpg", "question": "what color is it?", "answerable": 1, "answer_type": "other",
       "answers": [{"answer": "blue", "answer_confidence": "yes"}] * 10} for i in range(2)])
  for i in range(2):
    _image(p("vizwiz", "val", f"VizWiz_val_{i:08d}.jpg"), i)
  problem = {"question": "which is a dog?", "choices": ["dog", "cat"], "answer": 0, "hint": "a dog",
             "image": "image.png", "split": "test"}
  _json(p("scienceqa", "problems.json"), {"4": problem, "5": {**problem, "answer": 1}})
  _json(p("scienceqa", "pid_splits.json"), {"train": [], "val": [], "test": ["4", "5"]})
  for pid in ("4", "5"):
    _image(p("scienceqa", "images", "test", pid, "image.png"), int(pid))
  os.makedirs(p("msvd"), exist_ok=True)
  with open(p("msvd", "youtube_mapping.txt"), "w") as f:
    f.write("clipA vid1\nclipB vid2\n")
  _json(p("msvd", "test_qa.json"), [{"answer": a, "id": i, "question": "what is played?", "video_id": i + 1}
                                    for i, a in enumerate(["piano", "golf"])])
  _json(p("msvd", "train_qa.json"), [{"answer": a, "id": i, "question": "q", "video_id": 1}
                                     for i, a in enumerate(["piano", "golf", "dog", "piano", "car", "man"])])
  for clip in ("clipA", "clipB"):
    _frames(p("msvd", "frames", clip))
  _json(p("msrvtt", "test_qa.json"), [{"answer": a, "id": i, "question": "who is it?", "video_id": 7000 + i,
                                       "category_id": 1} for i, a in enumerate(["man", "dog"])])
  _json(p("msrvtt", "train_qa.json"), [{"answer": a, "id": i, "question": "q", "video_id": 1, "category_id": 1}
                                       for i, a in enumerate(["man", "dog", "cat", "man", "car"])])
  for i in range(2):
    _frames(p("msrvtt", "frames", f"video{7000 + i}"))
  os.makedirs(p("ivqa"), exist_ok=True)
  with open(p("ivqa", "test.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["video_id", "start", "end", "question", "answer1", "answer2", "answer3", "answer4", "answer5"])
    for i in range(2):
      writer.writerow([f"vid{i}", "0", "8", "what sport is this?"] + ["golf"] * 5)
      _frames(p("ivqa", "frames", f"vid{i}_0_8"))
  from iblip_jax import config_lib
  return {task: p(folder) for task, folder in config_lib.HELD_OUT_FOLDERS.items()}
