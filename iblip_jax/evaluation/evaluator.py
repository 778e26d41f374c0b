"""Runs an evaluation task over records: batches, generation or ranking, predictions JSONL, metrics JSON.

A record is a dict with an "id", an "image" (path, PIL image or array) or "frames" (video), the fields its task's
prompt names (question, ocr_tokens, ...), and what its metric needs: "answers" (list) for vqa/ivqa, "answer" for
exact_match, "captions" for cider, "candidates" + "answer_index" for ranking tasks ("label" 0/1 for auc).
"""
import json
import os
from typing import Iterable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from iblip_jax.data import preprocess, tokenize
from iblip_jax.decoding import generate
from iblip_jax.evaluation import metrics
from iblip_jax.evaluation.tasks import Task, render_prompt
from iblip_jax.ranking import rank


def _pixels(task: Task, record: dict, size: int) -> np.ndarray:
  if task.frames:
    frames = [Image.open(f) if isinstance(f, str) else f for f in record["frames"]]
    return preprocess.preprocess_video(frames, task.frames, size)
  image = record["image"]
  if isinstance(image, str):
    with Image.open(image) as im:
      return preprocess.preprocess_image(im, size)
  return preprocess.preprocess_image(image, size)


def _candidates(task: Task, record: dict) -> Sequence[str]:
  cands = task.candidates or record.get("candidates")
  if not cands:
    raise ValueError(f"task {task.name}: record {record.get('id')!r} has no 'candidates' to rank")
  return list(cands)


def predict_batch(task: Task, records: list[dict], model, params, tok: tokenize.Tokenizers, size: int) -> list[dict]:
  """Predictions for one batch: {"prediction": text} or {"prediction": index, "scores": [...]}."""
  pixels = np.stack([_pixels(task, r, size) for r in records])
  inputs = dict(pixel_values=pixels, **tokenize.encode_prompts(tok, [render_prompt(task, r) for r in records]))
  if task.inference == "generate":
    tokens = generate(model, params, **inputs, num_beams=task.num_beams, max_new_tokens=task.max_new_tokens,
                      min_new_tokens=task.min_new_tokens, length_penalty=task.length_penalty,
                      repetition_penalty=task.repetition_penalty)
    return [{"prediction": text} for text in tokenize.decode(tok, tokens)]
  cands = tokenize.encode_candidates(tok, [_candidates(task, r) for r in records])
  scores, _ = rank(model, params, **inputs, candidate_labels=cands)
  scores = np.where((cands != tokenize.IGNORE).any(-1), np.asarray(scores), -np.inf)  # padded candidates never win
  return [{"prediction": int(np.argmax(s)), "scores": [float(x) for x in s[:len(_candidates(task, r))]]}
          for s, r in zip(scores, records)]


def score(task: Task, records: list[dict], predictions: list[dict], vqa_variant: str = "official") -> dict:
  """The task's metric over all predictions (in percent, as the paper reports)."""
  m = task.metric
  if m == "cider":
    out = metrics.caption_metrics({r["id"]: p["prediction"] for r, p in zip(records, predictions)},
                                  {r["id"]: list(r["captions"]) for r in records})
    return {k: 100 * v for k, v in out.items()}
  if m == "vqa":
    values = [metrics.vqa_accuracy(p["prediction"], r["answers"], vqa_variant) for r, p in zip(records, predictions)]
  elif m == "ivqa":
    values = [metrics.ivqa_accuracy(p["prediction"], r["answers"]) for r, p in zip(records, predictions)]
  elif m == "exact_match":
    values = [metrics.exact_match(p["prediction"], r["answer"]) for r, p in zip(records, predictions)]
  elif m == "accuracy":
    values = [float(p["prediction"] == r["answer_index"]) for r, p in zip(records, predictions)]
  elif m == "auc":
    prob = [float(np.exp(p["scores"][task.positive] - np.logaddexp.reduce(p["scores"]))) for p in predictions]
    return {"AUC": 100 * metrics.roc_auc([r["label"] for r in records], prob)}
  elif m == "mrr":
    n = max(len(p["scores"]) for p in predictions)
    scores = np.array([p["scores"] + [-np.inf] * (n - len(p["scores"])) for p in predictions])
    return {"MRR": 100 * metrics.mean_reciprocal_rank(scores, [r["answer_index"] for r in records])}
  else:
    raise ValueError(f"unknown metric {m!r}")
  return {m: 100 * float(np.mean(values))}


def evaluate(task: Task, records: Iterable[dict], model, params, tok: tokenize.Tokenizers, *, out_dir: str,
             batch_size: int = 8, image_size: int | None = None, vqa_variant: str = "official",
             progress: bool = True) -> dict:
  """Runs `task` over `records`, writes {out_dir}/{task}_predictions.jsonl and {task}_metrics.json, returns
  the metrics. Batches are padded to `batch_size` so that jit compiles one shape."""
  records = list(records)
  if not records:
    raise ValueError(f"task {task.name}: no records to evaluate")
  size = image_size or model.config.vision.image_size
  os.makedirs(out_dir, exist_ok=True)
  predictions = []
  with tqdm(total=len(records), desc=f"eval {task.name}", unit="ex", disable=not progress) as bar:
    for start in range(0, len(records), batch_size):
      batch = records[start:start + batch_size]
      padded = batch + [batch[-1]] * (batch_size - len(batch))
      predictions += predict_batch(task, padded, model, params, tok, size)[:len(batch)]
      bar.update(len(batch))
  with open(os.path.join(out_dir, f"{task.name}_predictions.jsonl"), "w") as f:
    for r, p in zip(records, predictions):
      f.write(json.dumps({"id": r.get("id"), **p}) + "\n")
  result = score(task, records, predictions, vqa_variant)
  with open(os.path.join(out_dir, f"{task.name}_metrics.json"), "w") as f:
    json.dump({"task": task.name, "num_examples": len(records), **result}, f, indent=2)
  return result
