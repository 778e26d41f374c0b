"""The evaluator end to end on the tiny model: predictions equal direct generate/rank calls, files are written,
metrics are the metric functions of those predictions."""
import json
import types

import numpy as np
import pytest

import iblip_jax
from iblip_jax import prompts
from iblip_jax.data import preprocess, tokenize
from iblip_jax.decoding import Decoding
from iblip_jax.evaluation import evaluator, metrics, tasks

def test_generation_task(tiny_eval, tmp_path):
  model, params, tok, images = tiny_eval
  task = tasks.Task("toy_vqa", prompts.QA, inference="generate", metric="vqa",
                    decoding=Decoding(num_beams=2, max_new_tokens=3, min_new_tokens=0, length_penalty=-1.0))
  records = [{"id": i, "image": im, "question": "what color is the cat", "answers": ["red"] * 10}
             for i, im in enumerate(images)]
  result = evaluator.evaluate(task, records, model, params, tok, out_dir=str(tmp_path), batch_size=2,
                              progress=False)
  lines = [json.loads(l) for l in open(tmp_path / "toy_vqa_predictions.jsonl")]
  assert [l["id"] for l in lines] == list(range(5))
  # the same predictions from a direct call
  inputs = tokenize.encode_prompts(tok, ["Question: what color is the cat Short answer:"] * 2)
  pixels = np.stack([preprocess.preprocess_image(im, 30) for im in images[:2]])
  direct = tokenize.decode(tok, iblip_jax.generate(model, params, pixel_values=pixels, **inputs, num_beams=2,
                                                   max_new_tokens=3, min_new_tokens=0, length_penalty=-1.0,
                                                   repetition_penalty=1.5))
  assert [l["prediction"] for l in lines[:2]] == direct
  want = 100 * np.mean([metrics.vqa_accuracy(l["prediction"], ["red"] * 10) for l in lines])
  assert result == {"vqa": pytest.approx(want)}
  assert json.load(open(tmp_path / "toy_vqa_metrics.json"))["num_examples"] == 5


def test_ranking_tasks(tiny_eval, tmp_path):
  model, params, tok, images = tiny_eval
  hm = tasks.get("hateful_memes")
  records = [{"id": i, "image": im, "text": "a cat", "label": i % 2} for i, im in enumerate(images)]
  result = evaluator.evaluate(hm, records, model, params, tok, out_dir=str(tmp_path), batch_size=4, progress=False)
  lines = [json.loads(l) for l in open(tmp_path / "hateful_memes_predictions.jsonl")]
  prob_yes = [np.exp(l["scores"][1]) / np.exp(l["scores"]).sum() for l in lines]
  assert result["AUC"] == pytest.approx(100 * metrics.roc_auc([r["label"] for r in records], prob_yes))
  # per-record candidate lists of different sizes: padding candidates never win
  mc = tasks.Task("toy_mc", "Question: {question} Options: {options}. Short answer:", inference="rank",
                  metric="accuracy")
  records = [{"id": i, "image": im, "question": "what color", "candidates": ["red", "blue", "dog"][: 2 + i % 2],
              "answer_index": 0} for i, im in enumerate(images)]
  evaluator.evaluate(mc, records, model, params, tok, out_dir=str(tmp_path), batch_size=5, progress=False)
  lines = [json.loads(l) for l in open(tmp_path / "toy_mc_predictions.jsonl")]
  for r, l in zip(records, lines):
    assert len(l["scores"]) == len(r["candidates"]) and l["prediction"] == int(np.argmax(l["scores"]))


def test_prompt_rendering_and_errors():
  assert tasks.render_prompt(tasks.get("iconqa"), {"question": "q?", "candidates": ["x", "y"]}) == \
      "Question: q? Options: (a) x (b) y. Short answer:"
  assert tasks.render_prompt(tasks.get("textvqa"), {"question": "q?", "ocr_tokens": ["stop", "sign"]}) == \
      "OCR tokens: stop, sign. Question: q? Short answer:"
  with pytest.raises(ValueError, match="no field 'question'"):
    tasks.render_prompt(tasks.get("gqa"), {"id": 3})
  with pytest.raises(ValueError, match="unknown evaluation task"):
    tasks.get("imagenet")
  assert sum(t.held_out for t in tasks.TASKS.values()) == 13


@pytest.mark.parametrize("task_name", ["nocaps", "gqa"])
def test_vicuna_gets_lavis_vicuna_lengths(task_name, monkeypatch):
  """LAVIS passes the same min_len to both LLMs, but T5 counts its decoder start token and Vicuna's generate from
  inputs_embeds has none: min_len 10 is 9 new tokens for T5 and 10 for Vicuna; Vicuna's predict_answers has
  length_penalty 0 where T5's has -1 (blip2_vicuna_instruct.py / blip2_t5_instruct.py). The evaluator must hand the
  engine the settings of the model's own kind."""
  given = []

  class Recorder:
    def __init__(self, *a, **kw):
      pass

    def generate(self, items, decoding, progress=None):
      given.append(decoding)
      return [types.SimpleNamespace(error=None, answers=[types.SimpleNamespace(text="a")]) for _ in items]

  monkeypatch.setattr(evaluator, "Engine", Recorder)
  task = tasks.get(task_name)
  record = {"id": 0, "image": "x.png", "question": "q?"}
  for decoder_only in (False, True):
    model = types.SimpleNamespace(config=types.SimpleNamespace(decoder_only=decoder_only))
    evaluator.infer(task, [record], model, None, None, progress=False)
  t5, vicuna = given
  caption = task.metric == "cider"
  # LAVIS's numbers, by hand: captions min_len 10, QA min_len 1; T5 counts one token fewer
  assert (t5.min_new_tokens, vicuna.min_new_tokens) == ((9, 10) if caption else (0, 1))
  assert (t5.length_penalty, vicuna.length_penalty) == ((1.0, 1.0) if caption else (-1.0, 0.0))
  assert t5.repetition_penalty == vicuna.repetition_penalty == (1.15 if caption else 1.5)
  assert t5.max_new_tokens == vicuna.max_new_tokens == (80 if caption else 10)
