"""Every reader's records train: a tiny file set in the reader's released layout is read with the reader's defaults
(as a config.data.datasets entry is), rendered by the training renderer, batched by the input pipeline with word
tokenizers, and takes one training step of the tiny model with a finite loss over the target's tokens. One
compiled step serves every reader: every batch is padded to the same shapes.

And the other side: a dataset whose records all fail stops the stream in seconds with an error naming it."""
import csv
import json
import os
import signal

import jax
import numpy as np
import pytest
from PIL import Image

import train_helper

pytestmark = pytest.mark.slow   # one compiled training step shared by 34 tests (~40 s in all)
from iblip_jax import sharding, train_state
from iblip_jax.data import mixture, pipeline, readers, sources, tokenize
from iblip_jax.demo import word_tokenizers
from iblip_jax.models import configs as model_configs
from iblip_jax.models.instructblip import InstructBlip

# The targets' words (the tiny model's vocabularies hold 99 ids: keep this list well under 46 words); instruction
# words outside it become unknown tokens, which is fine for one step.
WORDS = ("a red blue circle square sign dog what color is it duck cat yes no true false two man piano golf stop "
         "question answer options context swims ? .").split()
BATCH, LENGTH = 2, 24  # one bucket for prompts, Q-Former text and targets: every batch has the same shapes


# --- one compiled training step for all readers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok")
  word_tokenizers.build(WORDS, str(path))
  t = tokenize.load_tokenizers(str(path), max_input_len=LENGTH, max_output_len=8, buckets=(LENGTH,))
  assert len(t.llm) < 99 and len(t.qformer) < 99
  return t


class _Trainer:
  """The tiny model's state and its jitted step on a 1-device mesh; each call steps from the last state (the step
  donates it)."""

  def __init__(self):
    config = train_helper.load_config("tiny")
    self.config = config
    self.model = InstructBlip(model_configs.from_dict(config.model.to_dict()))
    self.rules = [tuple(r) for r in config.sharding_rules]
    self.mesh = sharding.make_mesh(dict(zip(sharding.AXES, (1, 1, 1))), jax.devices()[:1])
    setup = train_state.build(self.model, patterns=config.trainable, optim=config.optim,
                              total_steps=config.total_steps, mesh=self.mesh, rules=self.rules)
    self.trainable, self.frozen = setup.init_random(jax.random.key(0))
    self.opt_state = setup.init_opt_state(self.trainable)
    self.step = setup.train_step(dropout=False)
    self.steps = 0

  def __call__(self, batch: dict) -> dict:
    with sharding.context(self.mesh, self.rules):
      self.trainable, self.opt_state, metrics = self.step(self.trainable, self.opt_state, self.frozen,
                                                          sharding.global_batch(batch, self.mesh),
                                                          jax.random.key(self.steps))
    self.steps += 1
    return {k: float(v) for k, v in metrics.items()}


@pytest.fixture(scope="module")
def trainer():
  return _Trainer()


def _train_one(dataset, root, tok, trainer, want_target, **reader_args):
  """Reads `dataset` from `root`, renders and batches its records as training does, takes one step; checks the
  batch holds `want_target` as every row's target and that the loss is finite over exactly those tokens."""
  records = list(readers.read(dataset, str(root), **reader_args))
  assert records, dataset
  render = sources.renderer()
  pipe = pipeline.build(mixture.source(records).repeat(), tok, batch_size=BATCH, image_size=30, seed=0,
                        render=render, probe={dataset: records})
  batch = next(iter(pipe.dataset))
  assert pipe.skipped.total == 0, pipe.skipped.summary()
  text_shape = (BATCH, LENGTH)
  assert {k: v.shape for k, v in batch.items()} == {
      "pixel_values": (BATCH, 30, 30, 3), "qformer_input_ids": text_shape, "qformer_attention_mask": text_shape,
      "input_ids": text_shape, "attention_mask": text_shape, "labels": text_shape, "decoder_attention_mask": text_shape}
  targets = tokenize.decode(tok, np.where(batch["labels"] < 0, tok.llm.pad_token_id, batch["labels"]))
  assert targets == [want_target] * BATCH, targets
  metrics = trainer(batch)
  assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0, metrics
  assert metrics["tokens"] == (batch["labels"] >= 0).sum()
  return records


# --- files in the released layouts -------------------------------------------------------------------------------


def _image(path) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.random.default_rng(len(str(path))).integers(0, 256, (12, 16, 3), np.uint8)).save(path)
  return str(path)


def _json(path, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def _vqa_files(root, q_name, a_name, answer):
  _json(root / q_name, {"data_subtype": "train2014", "questions": [
      {"image_id": 42, "question": "what color is it?", "question_id": 42000}]})
  _json(root / a_name, {"annotations": [
      {"question_id": 42000, "image_id": 42, "answers": [{"answer": answer, "answer_confidence": "yes",
                                                          "answer_id": k} for k in range(1, 11)],
       "multiple_choice_answer": answer, "answer_type": "other", "question_type": "what color"}]})
  _image(root / "train2014" / "COCO_train2014_000000000042.jpg")


def _aokvqa_files(root):
  _json(root / "aokvqa_v1p0_train.json", [
      {"split": "train", "image_id": 7, "question_id": "22MexNkBPpdZGX6sxbxVBH", "question": "what swims?",
       "choices": ["red", "blue", "duck", "cat"], "correct_choice_idx": 2, "direct_answers": ["blue"] * 10,
       "difficult_direct_answer": False, "rationales": ["ducks swim"]}])
  _image(root / "train2017" / "000000000007.jpg")


def _llava_file(root, name):
  _json(root / name, [{"id": "000000033471", "image": "000000033471.jpg", "conversations": [
      {"from": "human", "value": "<image>\nWhat is on the mat?"}, {"from": "gpt", "value": "A cat."}]}])
  _image(root / "train2017" / "000000033471.jpg")


def _problems(root, problems, splits):
  _json(root / "problems.json", problems)
  _json(root / "pid_splits.json", splits)


def _frames(directory, n=5):
  for k in range(1, n + 1):
    _image(directory / f"frame_{k}.jpg")


# --- one test per reader -------------------------------------------------------------------------------------------
# held-in


def test_coco_caption(tmp_path, tok, trainer):
  _json(tmp_path / "dataset_coco.json", {"dataset": "coco", "images": [
      {"filepath": "train2014", "filename": "COCO_train2014_000000000001.jpg", "cocoid": 1, "split": "train",
       "sentences": [{"raw": "a red circle", "tokens": ["a", "red", "circle"]}]}]})
  _image(tmp_path / "train2014" / "COCO_train2014_000000000001.jpg")
  _train_one("coco_caption", tmp_path, tok, trainer, "a red circle")


def test_coco_caption_lavis_layout(tmp_path, tok, trainer):
  _json(tmp_path / "annotations" / "coco_karpathy_train.json", [
      {"caption": "a blue square", "image": "val2014/COCO_val2014_000000000004.jpg", "image_id": "coco_4"}])
  _image(tmp_path / "images" / "val2014" / "COCO_val2014_000000000004.jpg")
  _train_one("coco_caption", tmp_path, tok, trainer, "a blue square")


def test_web_capfilt(tmp_path, tok, trainer):
  # LAVIS's capfilt14m annotation.json items carry an image path (BLIP's own files list URLs only)
  _json(tmp_path / "ccs_synthetic_filtered_large.json", [{"image": "cc/0001.jpg", "caption": "a blue circle"}])
  _image(tmp_path / "cc" / "0001.jpg")
  _train_one("web_capfilt", tmp_path, tok, trainer, "a blue circle")


def test_textcaps(tmp_path, tok, trainer):
  _json(tmp_path / "TextCaps_0.1_train.json", {"dataset_name": "textcaps", "data": [
      {"image_id": "011e7e629fb9ae7b", "image_path": "train/011e7e629fb9ae7b.jpg", "caption_id": 1,
       "caption_str": "a red sign", "caption_tokens": ["a", "red", "sign"], "reference_strs": ["a red sign"]}]})
  _json(tmp_path / "TextVQA_Rosetta_OCR_v0.2_train.json", {"data": [
      {"image_id": "011e7e629fb9ae7b", "ocr_tokens": ["stop"], "ocr_info": []}]})
  _image(tmp_path / "train_images" / "011e7e629fb9ae7b.jpg")
  _train_one("textcaps", tmp_path, tok, trainer, "a red sign")


@pytest.mark.parametrize("dataset, target", [("vqav2", "red"), ("vqg", "what color is it ?")])
def test_vqav2_and_question_generation(tmp_path, tok, trainer, dataset, target):
  _vqa_files(tmp_path, "v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json", "red")
  _train_one(dataset, tmp_path, tok, trainer, target)  # decoded as words: the tokenizer splits punctuation off


@pytest.mark.parametrize("dataset, target", [("okvqa", "blue"), ("okvqa_qg", "what color is it ?")])
def test_okvqa_and_question_generation(tmp_path, tok, trainer, dataset, target):
  _vqa_files(tmp_path, "OpenEnded_mscoco_train2014_questions.json", "mscoco_train2014_annotations.json", "blue")
  _train_one(dataset, tmp_path, tok, trainer, target)


@pytest.mark.parametrize("dataset, target", [("aokvqa", "blue"), ("aokvqa_mc", "duck"),
                                             ("aokvqa_qg", "what swims ?")])
def test_aokvqa_direct_multiple_choice_and_question_generation(tmp_path, tok, trainer, dataset, target):
  _aokvqa_files(tmp_path)
  _train_one(dataset, tmp_path, tok, trainer, target, split="train")


def test_ocrvqa(tmp_path, tok, trainer):
  _json(tmp_path / "dataset.json", {"761183272": {
      "imageURL": "http://ecx.images-amazon.com/images/I/61Y5cOdHJbL.jpg", "questions": ["What does it say?"],
      "answers": ["stop"], "title": "t", "authorName": "a", "genre": "g", "split": 1}})
  _image(tmp_path / "images" / "761183272.jpg")
  _train_one("ocrvqa", tmp_path, tok, trainer, "stop")


@pytest.mark.parametrize("dataset", sorted(readers.LLAVA_FILES))
def test_llava_instruct(tmp_path, tok, trainer, dataset):
  _llava_file(tmp_path, readers.LLAVA_FILES[dataset])
  _train_one(dataset, tmp_path, tok, trainer, "a cat .")


def test_user_jsonl(tmp_path, tok, trainer):
  _image(tmp_path / "pics" / "a.png")
  (tmp_path / "train.jsonl").write_text(json.dumps({"image": "pics/a.png", "text_input": "What color is it?",
                                                    "text_output": "red"}) + "\n")
  _train_one("jsonl", tmp_path / "train.jsonl", tok, trainer, "red")


# held-out datasets, fine-tuned on (paper Table 3) or mixed in by a user


def test_nocaps(tmp_path, tok, trainer):
  _json(tmp_path / "nocaps_val_4500_captions.json", {
      "images": [{"id": 0, "file_name": "0013ea2087020901.jpg", "open_images_id": "0013ea2087020901"}],
      "annotations": [{"image_id": 0, "id": 0, "caption": "a red dog"}]})
  _image(tmp_path / "images" / "val" / "0013ea2087020901.jpg")  # LAVIS's download layout
  _train_one("nocaps", tmp_path, tok, trainer, "a red dog")


def test_flickr30k(tmp_path, tok, trainer):
  _json(tmp_path / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": [
      {"filename": "1000092795.jpg", "imgid": 0, "split": "test", "sentences": [{"raw": "two dog", "tokens": []}]}]})
  _image(tmp_path / "flickr30k-images" / "1000092795.jpg")
  _train_one("flickr30k", tmp_path, tok, trainer, "two dog")


def test_gqa(tmp_path, tok, trainer):
  _json(tmp_path / "questions1.2" / "testdev_balanced_questions.json", {
      "20968379": {"imageId": "n288870", "question": "Is it red?", "answer": "no", "fullAnswer": "No, it is blue."}})
  _image(tmp_path / "images" / "n288870.jpg")
  _train_one("gqa", tmp_path, tok, trainer, "no")


def test_gqa_lavis_list(tmp_path, tok, trainer):
  _json(tmp_path / "annotations" / "testdev_balanced_questions.json", [
      {"image": "n161313.jpg", "question": "Is it red?", "answer": "yes", "question_id": 201307251}])
  _image(tmp_path / "images" / "n161313.jpg")
  _train_one("gqa", tmp_path, tok, trainer, "yes")


def test_vsr(tmp_path, tok, trainer):
  line = {"image": "000000017697.jpg", "image_link": "http://images.cocodataset.org/train2017/000000017697.jpg",
          "caption": "The cat is behind the dog.", "label": 1, "relation": "behind", "annotator_id": 2,
          "vote_true_validator_id": "[18, 2]", "vote_false_validator_id": "[1]"}
  os.makedirs(tmp_path / "splits" / "zeroshot")
  (tmp_path / "splits" / "zeroshot" / "test.jsonl").write_text(json.dumps(line) + "\n")
  _image(tmp_path / "images" / "000000017697.jpg")
  _train_one("vsr", tmp_path, tok, trainer, "true")


@pytest.mark.parametrize("task, target", [("choose_txt", "cat"), ("fill_in_blank", "two")])
def test_iconqa(tmp_path, tok, trainer, task, target):
  _problems(tmp_path, {
      "1": {"question": "Which is it?", "choices": ["duck", "cat"], "answer": 1, "ques_type": "choose_txt",
            "split": "test"},
      "2": {"question": "How many dots are there?", "answer": "two", "ques_type": "fill_in_blank", "split": "test"}},
      {"choose_txt_test": ["1"], "fill_in_blank_test": ["2"]})
  _image(tmp_path / "iconqa" / "test" / "choose_txt" / "1" / "image.png")
  _image(tmp_path / "iconqa" / "test" / "fill_in_blank" / "2" / "image.png")
  _train_one("iconqa", tmp_path, tok, trainer, target, task=task)


def test_textvqa(tmp_path, tok, trainer):
  _json(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
      {"question": "what does the sign say?", "image_id": "00685bc495504d61", "question_id": 34603,
       "answers": ["stop"] * 10, "set_name": "val"}]})
  _json(tmp_path / "TextVQA_Rosetta_OCR_v0.2_val.json", {"data": [
      {"image_id": "00685bc495504d61", "ocr_tokens": ["STOP"], "ocr_info": []}]})
  _image(tmp_path / "train_images" / "00685bc495504d61.jpg")
  _train_one("textvqa", tmp_path, tok, trainer, "stop")


def test_visdial(tmp_path, tok, trainer):
  _json(tmp_path / "visdial_1.0_val.json", {"version": "1.0", "split": "val2018", "data": {
      "questions": ["how many are there"], "answers": ["yes", "two", "no"],
      "dialogs": [{"image_id": 1, "caption": "two dogs on a mat", "dialog": [
          {"question": 0, "answer": 1, "answer_options": [2, 1, 0], "gt_index": 1}]}]}})
  _image(tmp_path / "VisualDialog_val2018" / "VisualDialog_val2018_000000000001.jpg")
  _train_one("visdial", tmp_path, tok, trainer, "two")


def test_hateful_memes(tmp_path, tok, trainer):
  (tmp_path / "dev_seen.jsonl").write_text(json.dumps({"id": 42953, "img": "img/42953.png", "label": 1,
                                                       "text": "a mean text"}) + "\n")
  _image(tmp_path / "img" / "42953.png")
  _train_one("hateful_memes", tmp_path, tok, trainer, "yes")


def test_vizwiz(tmp_path, tok, trainer):
  _json(tmp_path / "Annotations" / "val.json", [
      {"image": "VizWiz_val_00000000.jpg", "question": "What color is this?", "answerable": 1, "answer_type": "other",
       "answers": [{"answer": "blue", "answer_confidence": "yes"}] * 10}])
  _image(tmp_path / "val" / "VizWiz_val_00000000.jpg")
  _train_one("vizwiz", tmp_path, tok, trainer, "blue")


def test_scienceqa_img(tmp_path, tok, trainer):
  problem = {"question": "Which animal's feet are adapted for swimming?", "choices": ["duck", "cat"], "answer": 0,
             "hint": "Ducks live near water.", "image": "image.png", "task": "closed choice", "grade": "grade3",
             "subject": "natural science", "topic": "biology", "category": "adaptations", "skill": "s",
             "lecture": "", "solution": "", "split": "test"}
  _problems(tmp_path, {"4": problem, "5": {**problem, "image": None}}, {"train": [], "val": [], "test": ["4", "5"]})
  _image(tmp_path / "images" / "test" / "4" / "image.png")
  _train_one("scienceqa_img", tmp_path, tok, trainer, "duck")


def test_msvd_qa(tmp_path, tok, trainer):
  (tmp_path / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\n")
  _json(tmp_path / "test_qa.json", [{"answer": "piano", "id": 1, "question": "what is played?", "video_id": 1}])
  _frames(tmp_path / "frames" / "-4wsuPCjDBc_5_15")
  _train_one("msvd_qa", tmp_path, tok, trainer, "piano")


def test_msrvtt_qa(tmp_path, tok, trainer):
  _json(tmp_path / "test_qa.json", [{"answer": "man", "category_id": 2, "id": 158581, "question": "who is talking?",
                                     "video_id": 7010}])
  _frames(tmp_path / "frames" / "video7010")
  _train_one("msrvtt_qa", tmp_path, tok, trainer, "man")


def test_ivqa(tmp_path, tok, trainer):
  with open(tmp_path / "test.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["video_id", "start", "end", "question", "answer1", "answer2", "answer3", "answer4", "answer5"])
    writer.writerow(["ZyXwVuTsRqP", "0", "8", "what sport is this?", "golf", "golf", "golf", "golf", "golf"])
  _frames(tmp_path / "frames" / "ZyXwVuTsRqP_0_8")
  _train_one("ivqa", tmp_path, tok, trainer, "golf")


def test_every_reader_is_covered_here():
  tested = {name[len("test_"):] for name in globals() if name.startswith("test_")}
  covered = {"vqav2", "vqg", "okvqa", "okvqa_qg", "aokvqa", "aokvqa_mc", "aokvqa_qg", "jsonl", *readers.LLAVA_FILES}
  missing = set(readers.READERS) - covered - tested
  assert not missing, f"readers without a training test: {sorted(missing)}"


# --- a dataset that cannot train ------------------------------------------------------------------------------------


def test_an_all_bad_dataset_stops_the_stream_in_seconds_naming_it(tmp_path, tok, trainer):
  """ScienceQA records whose answer indexes no choice, mixed with good COCO captions: without the check the stream
  would train on COCO alone, for good. The error names the dataset, the count and the first reasons."""
  problem = {"question": "Which?", "choices": ["duck", "cat"], "answer": 5, "hint": "", "image": "image.png",
             "split": "test"}
  _problems(tmp_path / "sqa", {str(k): problem for k in range(40)}, {"test": [str(k) for k in range(40)]})
  for k in range(40):
    _image(tmp_path / "sqa" / "images" / "test" / str(k) / "image.png")
  _json(tmp_path / "coco" / "dataset_coco.json", {"images": [
      {"filepath": "train2014", "filename": "c.jpg", "cocoid": 1, "split": "train", "sentences": [{"raw": "a dog"}]}]})
  _image(tmp_path / "coco" / "train2014" / "c.jpg")
  datasets = {"scienceqa_img": mixture.source(list(readers.read("scienceqa_img", str(tmp_path / "sqa")))),
              "coco_caption": mixture.source(list(readers.read("coco_caption", str(tmp_path / "coco"))))}
  mixed = mixture.mix(datasets, {"scienceqa_img": 0.5, "coco_caption": 0.5}, seed=0)
  pipe = pipeline.build(mixed, tok, batch_size=BATCH, image_size=30, seed=0, render=sources.renderer())

  def expire(signum, frame):
    raise TimeoutError("the stream did not stop within 20 s")
  previous = signal.signal(signal.SIGALRM, expire)
  signal.alarm(20)
  try:
    with pytest.raises(pipeline.BadDatasetError) as e:
      for _ in pipe.dataset:  # infinite: only the error ends it
        pass
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
  message = str(e.value)
  assert message.startswith("dataset 'scienceqa_img': the first 32 records loaded by this process all failed "
                            "(32 bad_record:ValueError); first reasons: ")  # 32: build's default check_first
  assert "answer_index=5 does not index its 2 candidates" in message
  # the same data checked when the pipeline is built (probe=): stopped before the first batch
  with pytest.raises(pipeline.BadDatasetError, match="dataset 'scienceqa_img': the first 32 records in its source"):
    pipeline.build(mixed, tok, batch_size=BATCH, image_size=30, seed=0, render=sources.renderer(),
                   probe=datasets)
