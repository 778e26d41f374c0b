"""Runs an evaluation task over records on a device mesh (through the inference engine, iblip_jax.engine):
predictions JSONL, metrics JSON.

A record is a dict with an "id", an "image" (path, PIL image or array) or "frames" (video), the fields its task's
prompt names (question, ocr_tokens, ...), and what its metric needs: "answers" (list) for vqa/ivqa, "answer" for
exact_match, "captions" for cider, "candidates" + "answer_index" for ranking tasks ("label" 0/1 for auc).

On several processes every process holds the whole record list (prompts are rendered and checked everywhere, so a
bad record stops all of them alike) but loads only the images of the rows its devices hold. Process 0 computes the
metrics once, writes the files and shares the metrics with the others. A record whose image cannot be read is
reported and left out of the metrics, never fatal.
"""
import json
import logging
from typing import Iterable, Sequence

import numpy as np
from etils import epath

from iblip_jax import distributed
from iblip_jax.data import tokenize
from iblip_jax.engine import Engine, Item
from iblip_jax.evaluation import metrics
from iblip_jax.evaluation.tasks import Task, class_scores, rank_candidates, render_prompt

log = logging.getLogger(__name__)


def infer(task: Task, records: Sequence[dict], model, params, tok: tokenize.Tokenizers, *, batch_size: int = 8,
          mesh=None, rules=(), progress: bool = True) -> list[dict]:
  """One prediction per record, on every process: {"prediction": text} (generation), {"prediction": index,
  "scores": [...]} (ranking), or {"error": why} for a record whose image could not be read.

  `batch_size` is the global batch, rounded up to a multiple of the mesh's batch axes (data x fsdp); `params`
  live on `mesh` (default: this process's first device). The work is the inference engine's (iblip_jax.engine)."""
  engine = Engine(model, params, tok, mesh=mesh, rules=rules, batch_size=batch_size)
  items = [Item(r.get("frames") if task.frames else r.get("image"), render_prompt(task, r), task.frames)
           for r in records]   # every prompt is rendered and checked on every process, before any work
  desc = task.name if progress else None
  if task.inference == "generate":
    outputs = engine.generate(items, task.decoding_for(model.config.decoder_only), progress=desc)
  else:
    outputs = engine.rank(items, [rank_candidates(task, r) for r in records], chunk=task.candidate_chunk,
                          normalize=task.normalize, progress=desc)
  out = []
  for record, o in zip(records, outputs):
    if o.error:
      log.warning("task %s: record %r: cannot read its image (%s); left out", task.name, record.get("id"), o.error)
      out.append({"error": "unreadable image"})
    elif task.inference == "generate":
      out.append({"prediction": o.answers[0].text})
    else:
      scores = class_scores(task, o.scores)
      out.append({"prediction": int(np.argmax(scores)), "scores": scores})
  return out


def score(task: Task, records: list[dict], predictions: list[dict], vqa_variant: str = "official") -> dict:
  """The task's metric over all predictions (in percent, as the paper reports)."""
  m = task.metric
  if m == "cider":
    return _caption_scores(records, predictions)
  if m == "vqa":
    values = [metrics.vqa_accuracy(p["prediction"], r["answers"], vqa_variant) for r, p in zip(records, predictions)]
  elif m == "ivqa":
    values = [metrics.ivqa_accuracy(p["prediction"], r["answers"]) for r, p in zip(records, predictions)]
  elif m == "exact_match":
    values = [metrics.exact_match(p["prediction"], r["answer"]) for r, p in zip(records, predictions)]
  elif m == "accuracy":
    return {m: 100 * metrics.multiple_choice_accuracy([p["prediction"] for p in predictions],
                                                      [r["answer_index"] for r in records])}
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


def _caption_scores(records: list[dict], predictions: list[dict]) -> dict:
  """CIDEr and BLEU-4 over all records; with records that carry a "domain" (NoCaps: in-, near-, out-domain) also
  CIDEr per domain, each computed over its own images as the NoCaps evaluation does (CIDEr's document
  frequencies come from the references scored), as "CIDEr_<domain>"."""
  def cider(pairs):
    out = metrics.caption_metrics({r["id"]: p["prediction"] for r, p in pairs},
                                  {r["id"]: list(r["captions"]) for r, _ in pairs})
    return {k: 100 * v for k, v in out.items()}
  pairs = list(zip(records, predictions))
  result = cider(pairs)
  domains = sorted({r["domain"] for r in records if r.get("domain")})
  for domain in domains:
    result[f"CIDEr_{domain}"] = cider([(r, p) for r, p in pairs if r.get("domain") == domain])["CIDEr"]
  return result


def evaluate(task: Task, records: Iterable[dict], model, params, tok: tokenize.Tokenizers, *, out_dir: str,
             batch_size: int = 8, mesh=None, rules=(), vqa_variant: str = "official", progress: bool = True,
             name: str | None = None) -> dict:
  """Runs `task` over `records` (see infer), writes {out_dir}/{name}_predictions.jsonl and {name}_metrics.json
  (local or gs://; process 0; `name` defaults to the task's), returns the metrics (on every process). Records whose
  image could not be read are listed in the predictions with their error and left out of the metrics (the metrics
  JSON counts them)."""
  name = name or task.name
  records = list(records)
  if not records:
    raise ValueError(f"task {task.name}: no records to evaluate")
  predictions = infer(task, records, model, params, tok, batch_size=batch_size, mesh=mesh, rules=rules,
                      progress=progress)
  result = None
  if distributed.is_primary():
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_predictions.jsonl").write_text(
        "".join(json.dumps({"id": r.get("id"), **p}) + "\n" for r, p in zip(records, predictions)))
    good = [(r, p) for r, p in zip(records, predictions) if "error" not in p]
    if len(good) < len(records):
      log.warning("task %s: %d of %d records could not be read and are left out of the metrics (see "
                  "%s_predictions.jsonl)", task.name, len(records) - len(good), len(records), name)
    if not good:
      raise ValueError(f"task {task.name}: none of the {len(records)} records could be read")
    result = score(task, [r for r, _ in good], [p for _, p in good], vqa_variant)
    (out / f"{name}_metrics.json").write_text(json.dumps(
        {"task": task.name, "num_examples": len(good), "unreadable": len(records) - len(good), **result}, indent=2))
  return distributed.broadcast_json(result)
