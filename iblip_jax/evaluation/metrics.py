"""Benchmark metrics of the paper's zero-shot evaluation.

- `vqa_accuracy`: the official VQA evaluation (mean over the 10 leave-one-out subsets of min(1, matches / 3));
  the official script normalises answers and prediction only when the annotators disagree; `variant="lavis"`
  always normalises the prediction and only strips punctuation from the answers (LAVIS's copy of an older script).
- `exact_match` with GQA normalisation (GQA, MSVD-QA, MSRVTT-QA), `ivqa_accuracy` (min(1, matches / 2)),
  `multiple_choice_accuracy`, `roc_auc` (HatefulMemes), `mean_reciprocal_rank` (Visual Dialog, 100 candidates).
- `caption_metrics`: CIDEr and BLEU-4 through pycocoevalcap with its PTB tokenizer (needs Java).
"""
from typing import Sequence

import numpy as np

from iblip_jax.evaluation import vqa_normalize as vn
from iblip_jax.extras import require


def vqa_accuracy(prediction: str, answers: Sequence[str], variant: str = "official") -> float:
  if variant not in ("official", "lavis"):
    raise ValueError(f"variant={variant!r}; expected 'official' or 'lavis'")
  if not answers:
    raise ValueError("vqa_accuracy needs at least one ground-truth answer")
  pred = vn.clean(prediction)
  gts = [vn.clean(a) for a in answers]
  disagree = len(set(gts)) > 1
  if variant == "official":
    if disagree:
      gts = [vn.digits_and_articles(vn.punctuation(a)) for a in gts]
      pred = vn.digits_and_articles(vn.punctuation(pred))
  else:
    pred = vn.digits_and_articles(vn.punctuation(pred))
    if disagree:
      gts = [vn.punctuation(a) for a in gts]
  scores = []
  for i in range(len(gts)):  # leave annotator i out, score against the others
    matches = sum(1 for j, a in enumerate(gts) if j != i and a == pred)
    scores.append(min(1.0, matches / 3))
  return float(np.mean(scores))


def exact_match(prediction: str, answer: str) -> float:
  """GQA-style: both sides normalised (punctuation, number words, articles), then compared."""
  return float(vn.normalize(prediction) == vn.normalize(answer))


def ivqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """iVQA: min(1, number of annotators who gave the prediction / 2), after normalisation."""
  pred = vn.normalize(prediction)
  return min(1.0, sum(vn.normalize(a) == pred for a in answers) / 2)


def multiple_choice_accuracy(predicted_indices: Sequence[int], answer_indices: Sequence[int]) -> float:
  p, a = np.asarray(predicted_indices), np.asarray(answer_indices)
  return float((p == a).mean())


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
  """Area under the ROC curve = P(score of a random positive > score of a random negative), ties counting 1/2
  (Mann-Whitney U with average ranks)."""
  labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
  n_pos, n_neg = labels.sum(), (~labels).sum()
  if n_pos == 0 or n_neg == 0:
    raise ValueError("roc_auc needs both positive and negative labels")
  order = np.argsort(scores, kind="mergesort")
  ranks = np.empty(len(scores))
  sorted_scores = scores[order]
  i = 0
  while i < len(scores):  # average rank over ties
    j = i
    while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
      j += 1
    ranks[order[i:j + 1]] = (i + j) / 2 + 1
    i = j + 1
  return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mean_reciprocal_rank(scores: np.ndarray, answer_indices: Sequence[int]) -> float:
  """scores (N, C) for C candidates (higher is better); rank of the right one is 1 + number scored strictly
  higher (the Visual Dialog evaluation's convention for ranks)."""
  scores = np.asarray(scores, dtype=np.float64)
  right = scores[np.arange(len(scores)), np.asarray(answer_indices)]
  ranks = 1 + (scores > right[:, None]).sum(axis=1)
  return float((1.0 / ranks).mean())


def caption_metrics(predictions: dict, references: dict) -> dict[str, float]:
  """{"CIDEr", "BLEU-4"} of predictions {id: caption} against references {id: [captions]} (COCO toolkit)."""
  Bleu = require("pycocoevalcap.bleu.bleu", "eval", "captioning metrics (CIDEr, BLEU-4)").Bleu
  Cider = require("pycocoevalcap.cider.cider", "eval", "captioning metrics (CIDEr, BLEU-4)").Cider
  PTBTokenizer = require("pycocoevalcap.tokenizer.ptbtokenizer", "eval", "captioning metrics").PTBTokenizer

  missing = sorted(set(predictions) ^ set(references), key=str)
  if missing:
    raise ValueError(f"predictions and references cover different ids, e.g. {missing[:5]}")
  tokenizer = PTBTokenizer()
  res = tokenizer.tokenize({k: [{"caption": v}] for k, v in predictions.items()})
  gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
  cider, _ = Cider().compute_score(gts, res)
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  return {"CIDEr": float(cider), "BLEU-4": float(bleu[3])}
