"""Runs an evaluation task over records on a device mesh: batches, generation or ranking, predictions JSONL,
metrics JSON.

A record is a dict with an "id", an "image" (path, PIL image or array) or "frames" (video), the fields its task's
prompt names (question, ocr_tokens, ...), and what its metric needs: "answers" (list) for vqa/ivqa, "answer" for
exact_match, "captions" for cider, "candidates" + "answer_index" for ranking tasks ("label" 0/1 for auc).

On several processes every process holds the whole record list (prompts are rendered and checked everywhere, so a
bad record stops all of them alike) but loads only the images of the rows its devices hold; the last batch is
padded with repeats of the last record, which are dropped after the gather. Process 0 computes the metrics once,
writes the files and shares the metrics with the others. A record whose image cannot be read is reported and left
out of the metrics, never fatal.
"""
import json
import logging
from typing import Iterable, Sequence

import jax
import numpy as np
from etils import epath
from PIL import Image
from tqdm import tqdm

from iblip_jax import distributed, sharding
from iblip_jax.data import preprocess, tokenize
from iblip_jax.decoding import generate
from iblip_jax.evaluation import metrics
from iblip_jax.evaluation.tasks import Task, class_scores, rank_candidates, render_prompt
from iblip_jax.ranking import rank

log = logging.getLogger(__name__)


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
  return rank_candidates(task, record)


def _load(task: Task, record: dict, size: int) -> tuple[np.ndarray | None, str | None]:
  """(pixels, None), or (None, why) for an image or video that cannot be read."""
  try:
    return _pixels(task, record, size), None
  except Exception as e:  # noqa: BLE001 - any decoder failure is a bad record, never a dead job
    return None, f"{type(e).__name__}: {str(e)[:200]}"


def _gather(x) -> np.ndarray:
  """A global array, whole, on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _single_device_mesh():
  return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])


def infer(task: Task, records: Sequence[dict], model, params, tok: tokenize.Tokenizers, *, batch_size: int = 8,
          mesh=None, rules=(), image_size: int | None = None, progress: bool = True) -> list[dict]:
  """One prediction per record, on every process: {"prediction": text} (generation), {"prediction": index,
  "scores": [...]} (ranking), or {"error": why} for a record whose image could not be read.

  `batch_size` is the global batch, rounded up to a multiple of the mesh's batch axes (data x fsdp); `params`
  live on `mesh` (default: this process's first device)."""
  mesh = mesh or _single_device_mesh()
  size = image_size or model.config.vision.image_size
  split = mesh.shape["data"] * mesh.shape["fsdp"]
  b = -(-batch_size // split) * split
  start, stop = sharding.process_rows(mesh, b)
  prompts = [render_prompt(task, r) for r in records]               # checked on every process, before any work
  num_cands = [len(_candidates(task, r)) for r in records] if task.inference == "rank" else None
  blank = _blank(task, size)   # stands in for an unreadable image, whose prediction is dropped
  out = []
  with tqdm(total=len(records), desc=f"{task.name}", unit="ex", disable=not (progress and distributed.is_primary()),
            dynamic_ncols=True) as bar:
    for first in range(0, len(records), b):
      rows = [min(first + i, len(records) - 1) for i in range(start, stop)]   # the tail repeats the last record
      loaded = [_load(task, records[i], size) for i in rows]
      for i, (_, why) in zip(rows, loaded):
        if why:
          log.warning("task %s: record %r: cannot read its image (%s); left out", task.name,
                          records[i].get("id"), why)
      local = dict(pixel_values=np.stack([blank if p is None else p for p, _ in loaded]),
                   ok=np.array([why is None for _, why in loaded], np.int32),
                   **tokenize.encode_prompts(tok, [prompts[i] for i in rows]))
      inputs = sharding.global_batch(local, mesh)
      ok = _gather(inputs.pop("ok")).astype(bool)
      with sharding.context(mesh, rules):
        if task.inference == "generate":
          result = _gather(generate(model, params, **inputs, num_beams=task.num_beams,
                                    max_new_tokens=task.max_new_tokens, min_new_tokens=task.min_new_tokens,
                                    length_penalty=task.length_penalty,
                                    repetition_penalty=task.repetition_penalty))
        else:
          batch_rows = range(first, min(first + b, len(records)))
          result = rank_chunked(model, params, inputs, tok, [_candidates(task, records[i]) for i in rows],
                                num_chunks=_num_chunks(task, [num_cands[i] for i in batch_rows]), mesh=mesh,
                                chunk=task.candidate_chunk, normalize=task.normalize)
      n = min(b, len(records) - first)
      if task.inference == "generate":
        texts = tokenize.decode(tok, result[:n])
        out += [{"prediction": t} if good else {"error": "unreadable image"} for t, good in zip(texts, ok)]
      else:
        for j in range(n):
          scores = class_scores(task, result[j, :num_cands[first + j]])
          out.append({"prediction": int(np.argmax(scores)), "scores": scores} if ok[j]
                     else {"error": "unreadable image"})
      bar.update(n)
  return out


def _num_chunks(task: Task, counts: Sequence[int]) -> int:
  """Model calls for one global batch: from every record's candidate count (all processes know all records, so all
  agree, and each call has the same shapes everywhere)."""
  return 1 if not task.candidate_chunk else -(-max(counts) // task.candidate_chunk)


def _chunk_labels(tok: tokenize.Tokenizers, lists: Sequence[Sequence[str]], start: int, size: int) -> np.ndarray:
  """(B, size, N) labels of candidates [start, start + size) of each row, -100 where a row has fewer (those
  scores are never read)."""
  parts = [list(x[start:start + size]) for x in lists]
  labels = tokenize.encode_candidates(tok, [p or [""] for p in parts])
  for i, p in enumerate(parts):
    if not p:
      labels[i] = tokenize.IGNORE
  return np.pad(labels, [(0, 0), (0, size - labels.shape[1]), (0, 0)], constant_values=tokenize.IGNORE)


def rank_chunked(model, params, inputs: dict, tok: tokenize.Tokenizers, lists: Sequence[Sequence[str]], *,
                 num_chunks: int, mesh, chunk: int = 0, normalize: bool = False) -> np.ndarray:
  """Scores (B, num_chunks * chunk) of this process's rows' candidate `lists` (B = the global batch, after
  gathering): iblip_jax.rank on each chunk of `chunk` candidates (0: all at once), concatenated. Every chunk has
  the same shape (the last is padded), so one program serves them all; ranking scores each candidate on its own,
  so chunked scores equal unchunked ones."""
  size = chunk or max(len(x) for x in lists)
  out = []
  for c in range(num_chunks):
    labels = sharding.global_batch({"candidate_labels": _chunk_labels(tok, lists, c * size, size)}, mesh)
    out.append(_gather(rank(model, params, **inputs, candidate_labels=labels["candidate_labels"],
                            normalize=normalize)[0]))
  return np.concatenate(out, axis=1)


def _blank(task: Task, size: int) -> np.ndarray:
  return np.zeros((task.frames, size, size, 3) if task.frames else (size, size, 3), np.float32)


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
             batch_size: int = 8, mesh=None, rules=(), image_size: int | None = None, vqa_variant: str = "official",
             progress: bool = True, name: str | None = None) -> dict:
  """Runs `task` over `records` (see infer), writes {out_dir}/{name}_predictions.jsonl and {name}_metrics.json
  (local or gs://; process 0; `name` defaults to the task's), returns the metrics (on every process). Records whose
  image could not be read are listed in the predictions with their error and left out of the metrics (the metrics
  JSON counts them)."""
  name = name or task.name
  records = list(records)
  if not records:
    raise ValueError(f"task {task.name}: no records to evaluate")
  predictions = infer(task, records, model, params, tok, batch_size=batch_size, mesh=mesh, rules=rules,
                      image_size=image_size, progress=progress)
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
