"""`--config.mode=annotate`: a whole dataset answered in bulk, streamed, on the mesh, resumable exactly once.

  --config.annotate.inputs="gs://bucket/laion/*.tar" --config.annotate.output=gs://bucket/captions \
      --config.annotate.prompts='["A short image caption:", "What is the main object?"]'
(inputs: globs, files and folders, comma-separated; braces like {00000..00999} are not expanded.)

Inputs are shards (data/shards.py: webdataset tars, JSONL/CSV rows of {image, prompt}, image folders, prepared
ArrayRecord datasets; a JSONL row may give several images for its prompt, {"images": [...]}, their query outputs
concatenated in order, zero-shot use; a JSONL/CSV "image" may be a video file, answered from its 4 sampled frames),
split over
the processes (process p takes every P-th unfinished shard); each host streams its own, decoding images in a
thread pool ahead of the model (at most a few batches held), filling batches across shard boundaries. Every step
all hosts run one global batch of the same shapes (a host out of records feeds padding rows) and the loop ends when
no host has records left. A batch holds records of one image count: a record with another count starts the next
batch, and when hosts' next batches differ, the smallest count goes first and the others wait a step. Each image is
decoded once and asked every prompt (a JSONL/CSV row's own prompt replaces them).

Outputs, under config.annotate.output (local or gs://):
  annotate.json                 what the rows mean (inputs, prompts, decoding, weights): a rerun with other values
                                is refused, naming them.
  rows/<shard>.part-NNNNN.jsonl rows {"key", "shard", "prompt", "answer" | "error", ["score"], ["meta"]} of records
                                [N * rows_per_file, (N + 1) * rows_per_file) of the shard, written whole once all
                                of them are answered (local: a temporary file renamed; gs://: one object upload).
  done/<shard>.json             the shard is finished (its record and part counts).
  manifest.json                 finished and unfinished shards, written at the end of each run.
Exactly once: a part is the unit of work and its file appears whole or not at all, so a rerun (after SIGTERM, which
stops after the current batch with exit status 75, or SIGKILL at any moment) skips the parts that exist (their
records are read but not decoded) and redoes the others from their first record; part boundaries are fixed by
config.annotate.rows_per_file, which is part of annotate.json.
A record that cannot be used (not an image, a missing file, a cut tar) is an "error" row; a shard that cannot be
opened is reported, left unfinished, and the run exits 1 after finishing everything else (rerun to retry it).
"""
import collections
import dataclasses
import functools
import hashlib
import json
import logging
import os
import queue
import signal
import threading
import time
import uuid
from concurrent import futures
from typing import Iterator

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from iblip_jax import distributed, sharding
from iblip_jax.data import images, shards as shards_lib, tokenize, video_files
from iblip_jax.decoding import Decoding
from iblip_jax.engine import Engine
from iblip_jax.errors import BadInput, UserError
from iblip_jax.run import common, restore, train
from iblip_jax.run.settings import ConfigError, Settings

log = logging.getLogger(__name__)

CONFIG_FILE = "annotate.json"
AHEAD_BATCHES = 3   # batches decoded ahead of the model: the memory bound (with the decode pool's images in flight)


class Stopped(train.Preempted):
  def __init__(self, message: str):
    Exception.__init__(self, message)
    self.step = None


@dataclasses.dataclass
class _Row:
  """A (record, prompt) pair: `pixels` is None for an error row (it takes no place in a batch)."""
  shard: str
  part: int
  key: str
  prompt: str
  pixels: np.ndarray | None = None
  error: str | None = None
  meta: dict | None = None
  first: bool = True   # the record's first prompt (images are counted once)
  count: int = 1       # the record's images (JSONL "images"): a batch holds one count


@dataclasses.dataclass
class _Close:
  """All rows of a shard's part have been emitted (rows: how many); `last`: the shard ends with it."""
  shard: str
  part: int
  rows: int
  last: bool = False
  records: int = 0
  parts: int = 0


def prompts_of(a) -> tuple[str, ...]:
  """config.annotate.prompts: one prompt, or a JSON list of them."""
  text = a.prompts.strip()
  if text.startswith("["):
    try:
      out = json.loads(text)
    except ValueError as e:
      raise ConfigError(f"config.annotate.prompts: starts with '[' but is not a JSON list of strings ({e})") from None
    if not out or not all(isinstance(p, str) and p.strip() for p in out):
      raise ConfigError(f"config.annotate.prompts={a.prompts!r}: expected a non-empty list of non-empty strings")
    return tuple(out)
  if not text:
    raise ConfigError("config.annotate.prompts is empty: give a prompt, or a JSON list of prompts")
  return (a.prompts,)


def meaning(s: Settings, found: list[shards_lib.Shard]) -> dict:
  """What the output rows depend on: a rerun into the same folder must agree on all of it."""
  a = s.annotate
  return {"inputs": a.inputs, "shards": {sh.name: _identity(sh) for sh in found}, "prompts": list(prompts_of(a)),
          "num_beams": a.num_beams, "max_new_tokens": a.max_new_tokens, "min_new_tokens": a.min_new_tokens,
          "length_penalty": a.length_penalty, "repetition_penalty": a.repetition_penalty, "scores": a.scores,
          "rows_per_file": a.rows_per_file, "folder_shard": a.folder_shard, "model_init": s.model_init,
          "model_adapter": s.model_adapter, "workdir": s.workdir or "", "image_size": s.model.vision.image_size}


def _identity(shard: shards_lib.Shard):
  """What tells a shard's content apart between runs: its size; for a folder's part also its files (a file added
  to or removed from a folder shifts the parts after it)."""
  if shard.kind != "folder":
    return shard.size
  return [shard.size, len(shard.files), hashlib.sha1("\n".join(shard.files).encode()).hexdigest()[:16]]


def _differences(old: dict, new: dict) -> list[str]:
  out = []
  for k in sorted(set(old) | set(new)):
    if old.get(k) == new.get(k):
      continue
    if k == "shards":
      gone = sorted(set(old[k]) - set(new[k]))
      added = sorted(set(new[k]) - set(old[k]))
      resized = sorted(n for n in set(old[k]) & set(new[k]) if old[k][n] != new[k][n])
      out.append("the input shards differ: " + "; ".join(
          f"{what} {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
          for what, names in (("gone:", gone), ("new:", added), ("changed (size or files):", resized)) if names))
    else:
      out.append(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now")
  return out


def _check_output(root: epath.Path, fingerprint: dict, step: int | None) -> None:
  """On a rerun, refuses a different meaning, naming the differences; on a first run writes annotate.json (once the
  weights' checkpoint step is known: `step` None checks the rest before the weights load)."""
  path = root / CONFIG_FILE
  problems = None
  if distributed.is_primary():
    if path.exists():
      old = json.loads(path.read_text())
      if step is None:
        old.pop("checkpoint_step", None)
      problems = _differences(old, fingerprint if step is None else {**fingerprint, "checkpoint_step": step})
    elif step is None:
      problems = []
    else:
      fingerprint = {**fingerprint, "checkpoint_step": step}
      root.mkdir(parents=True, exist_ok=True)
      (root / "rows").mkdir(exist_ok=True)
      (root / "done").mkdir(exist_ok=True)
      _write_whole(path, json.dumps(fingerprint, indent=1, sort_keys=True))
      problems = []
  problems = distributed.broadcast_json(problems)
  if problems:
    raise ConfigError(f"config.annotate.output={str(root)!r} holds rows made with other settings "
                      f"({path}):\n  " + "\n  ".join(problems) + "\nUse a new output folder, or the same settings "
                      "to continue that run")


def _write_whole(path: epath.Path, text: str) -> None:
  """The file appears whole or not at all: locally a temporary file beside it is renamed over it; on gs:// one
  object upload is atomic already."""
  if str(path).startswith("gs://"):
    path.write_text(text)
    return
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _finished(root: epath.Path) -> tuple[list[str], dict[str, list[int]]]:
  """(finished shards, each shard's written parts) from the output folder's listing, sorted (JSON, to share)."""
  done = sorted(p.name.removesuffix(".json") for p in (root / "done").glob("*.json"))
  parts: dict[str, list[int]] = {}
  for p in (root / "rows").glob("*.part-*.jsonl"):
    shard, _, n = p.name.removesuffix(".jsonl").rpartition(".part-")
    if n.isdigit():
      parts.setdefault(shard, []).append(int(n))
  return done, {k: sorted(v) for k, v in sorted(parts.items())}


def _rows(mine: list[shards_lib.Shard], written: dict[str, set[int]], prompts: tuple[str, ...], per_file: int,
          size: int, pool: futures.Executor, unreadable: list[str], counts: dict) -> Iterator:
  """This host's shards as a stream of (_Row or _Close, future pixels or None), in order; parts already written are
  read past without decoding. Decoding runs in `pool`, ahead of the consumer."""
  for shard in mine:
    skip = written.get(shard.name, set())
    n = rows_in_part = 0
    try:
      for rec in shards_lib.read(shard):
        part = n // per_file
        if n and n % per_file == 0:
          if part - 1 not in skip:
            yield _Close(shard.name, part - 1, rows_in_part), None
          rows_in_part = 0
        n += 1
        counts["bytes"] += rec.nbytes
        if part in skip:
          continue
        asked = (rec.prompt,) if rec.prompt else prompts
        rows_in_part += len(asked)
        # a JSONL row's "images" or a video file: (K, S, S, 3) pixels, K images or the video's sampled frames
        k = len(rec.image) if isinstance(rec.image, list) else (
            video_files.FRAMES if video_files.is_video_file(rec.image) else 1)
        future = None if rec.error else pool.submit(images.pixels, rec.image, size, max_pixels=images.MAX_PIXELS,
                                                       name=_name(shard, rec), frames=k if k > 1 else 0)
        for i, p in enumerate(asked):
          yield _Row(shard.name, part, rec.key, p, error=rec.error, meta=rec.meta, first=i == 0, count=k), future
    except Exception as e:  # noqa: BLE001 - whatever stops a reader is this shard's problem: reported, retried
      why = str(e) if isinstance(e, shards_lib.UnreadableShard) else f"{shard.path}: {type(e).__name__}: {e}"
      unreadable.append(why[:300])
      log.warning("%s; the shard is left unfinished, for the next run", why)
      continue
    if not n:
      log.warning("%s: the shard holds no records", shard.path)
    last = max(n - 1, 0) // per_file
    yield _Close(shard.name, last, -1 if (not n or last in skip) else rows_in_part, last=True, records=n,
                 parts=-(-n // per_file)), None


def _name(shard: shards_lib.Shard, rec: shards_lib.Record) -> str:
  """How a record is named in its error: shard and key, and the image's path when it has one."""
  where = f"{shard.name}: {rec.key}"
  if isinstance(rec.image, list):
    return f"{where} ({' + '.join(rec.image)})"
  return f"{where} ({rec.image})" if isinstance(rec.image, str) and rec.image != rec.key else where


def _ahead(stream: Iterator, depth: int, stop: threading.Event) -> queue.Queue:
  """Runs `stream` in a thread into a queue of `depth` entries (None ends it): input overlaps compute, memory is
  bounded by the queue and the decode pool. Setting `stop` ends the thread (and closes the shard it reads) when
  the consumer has gone."""
  q: queue.Queue = queue.Queue(maxsize=depth)

  def put(entry) -> bool:
    while not stop.is_set():
      try:
        q.put(entry, timeout=0.5)
        return True
      except queue.Full:
        continue
    return False

  def work():
    try:
      for entry in stream:
        if not put(entry):
          stream.close()
          return
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which stops every host with it
      put(("error", e))
    put(None)
  threading.Thread(target=work, daemon=True, name="annotate-input").start()
  return q


def run(s: Settings) -> dict:
  # SIGTERM while the weights load or compile: exit 75 at once (nothing is lost; stream() takes over the signal)
  received: list = []
  previous = signal.signal(signal.SIGTERM, train._start_up_handler(received))
  try:
    return _run(s, received)
  finally:
    signal.signal(signal.SIGTERM, previous)


def _run(s: Settings, received: list) -> dict:
  a = s.annotate
  prompts = prompts_of(a)
  if s.workdir and not (epath.Path(s.workdir) / "checkpoints").exists():
    raise ConfigError(f"--workdir={s.workdir!r} has no checkpoints/: nothing trained to answer with. Omit --workdir "
                      f"to answer with the weights of config.model_init={s.model_init!r}")
  try:
    decoding = Decoding(num_beams=a.num_beams, max_new_tokens=a.max_new_tokens, min_new_tokens=a.min_new_tokens,
                        length_penalty=a.length_penalty, repetition_penalty=a.repetition_penalty).checked()
  except BadInput as e:
    raise ConfigError(f"config.annotate: {e}") from None
  found = distributed.broadcast_json(
      [dataclasses.asdict(x) for x in shards_lib.find(a.inputs, a.folder_shard)] if distributed.is_primary() else None)
  found = [shards_lib.Shard(**{**x, "files": tuple(x["files"])}) for x in found]
  root = epath.Path(a.output)

  _check_output(root, meaning(s, found), None)   # before minutes of loading
  model, params, step, mesh, rules = restore.inference_state(s)
  _check_output(root, meaning(s, found), step)
  model, tok = common.load_tokenizers(s, model)
  engine = Engine(model, params, tok, mesh=mesh, rules=rules, batch_size=a.batch_size)

  # process 0's listing, so that every process splits the same unfinished shards the same way
  done, written = distributed.broadcast_json(_finished(root) if distributed.is_primary() else None)
  done, written = set(done), {k: set(v) for k, v in written.items()}
  pending = [sh for sh in found if sh.name not in done]
  mine = pending[jax.process_index()::jax.process_count()]
  if distributed.is_primary():
    print(f"annotate: {len(found)} shards, {len(done)} finished before, {len(pending)} to do over "
          f"{jax.process_count()} process(es); {len(prompts)} prompt(s); output {a.output}", flush=True)
  start, stop = sharding.process_rows(engine.mesh, engine.batch_size)
  share = engine.batch_size // jax.process_count()
  if (start, stop) != (jax.process_index() * share, (jax.process_index() + 1) * share):
    # each host feeds its own shards into its own rows: two hosts holding the same rows would mix their inputs
    raise ConfigError(f"this process's devices hold rows {(start, stop)} of each batch of {engine.batch_size}, "
                      "shared with another process (a tensor axis across hosts?): annotate needs every process to "
                      "hold its own rows; use config.mesh sizes whose data x fsdp split reaches every host")
  # each image once with its prompts (the ViT once per image) when the batch splits into whole images on every
  # device; else a row per (image, prompt)
  k = len(prompts)
  per_image = k if k > 1 and engine.batch_size % (k * engine.split) == 0 else 1
  if k > 1 and per_image == 1 and distributed.is_primary():
    print(f"annotate: config.annotate.batch_size={engine.batch_size} is not a multiple of {k} prompts x "
          f"{engine.split} batch devices: each image goes through the ViT once per prompt", flush=True)
  answer = functools.partial(_answer, engine, decoding, stop - start, per_image, prompts[0], a.scores, start)
  if distributed.any_process(bool(received)):   # a start-up signal whose exception was lost (see train.py)
    raise train.Preempted(None)
  summed = stream(root, mine, pending, written, prompts, rows_per_file=a.rows_per_file,
                  image_size=engine.image_size, local=stop - start, answer=answer, scores=a.scores,
                  per_image=per_image)
  if distributed.is_primary():
    secs = summed["seconds"]
    print(f"annotate: {summed['images']} images, {summed['rows']} rows ({summed['errors']} errors) in {secs:.0f} s "
          f"({summed['images'] / max(secs, 1e-9):.2f} images/s, {summed['rows'] / max(secs, 1e-9):.2f} prompts/s); "
          f"{summed['shards']} shards finished; {summed['parts']} files written under {root}", flush=True)
  lost = summed["unreadable"]
  if lost:
    raise UserError(f"{len(lost)} shard(s) could not be read and are left unfinished (everything else is written; "
                    "rerun the same command to retry them):\n  " + "\n  ".join(lost[:10])
                    + ("\n  ..." if len(lost) > 10 else ""))
  return summed


def stream(root: epath.Path, mine: list, pending: list, written: dict, prompts: tuple[str, ...], *,
           rows_per_file: int, image_size: int, local: int, answer, scores: bool, per_image: int = 1,
           progress: bool = True) -> dict:
  """The annotation loop over this host's shards `mine` (of all `pending` ones). Each step takes up to
  `local // per_image` groups (the rows of one record, at most `per_image` of them; `per_image` 1: a row each) of
  records with one image count and gives them to `answer` (groups, count -> {id(row): Answer or error text}; every
  process calls it once per step, all with the same count: the smallest any host asks for, the others keeping their
  step's entries for later); parts and finished shards are written as they complete. Returns the totals over every
  process, the seconds taken and the shards that could not be read."""
  counts = {"bytes": 0}
  unreadable: list[str] = []
  pool = futures.ThreadPoolExecutor(max(2, min(16, os.cpu_count() or 2)), thread_name_prefix="annotate-decode")
  stop_input = threading.Event()
  q = _ahead(_rows(mine, written, prompts, rows_per_file, image_size, pool, unreadable, counts),
             AHEAD_BATCHES * local, stop_input)
  parts: dict[tuple[str, int], list[dict]] = {}
  totals = {"images": 0, "rows": 0, "errors": 0, "parts": 0, "shards": 0}
  received = {"signal": None}
  previous = signal.signal(signal.SIGTERM, lambda signum, _: received.update(signal=signum))
  ended, capacity, failure = False, local // per_image, None
  later: collections.deque = collections.deque()   # entries read but not yet used: the next steps take them first
  bar = tqdm(total=sum(sh.size for sh in pending) or None, unit="B", unit_scale=True, dynamic_ncols=True,
             desc="annotate", disable=not (progress and distributed.is_primary()))
  t0 = time.perf_counter()
  try:
    while True:
      groups, entries = [], []
      # at most AHEAD_BATCHES x local entries a step: a long run of error rows (no batch places) is written as it
      # goes, not held
      while (later or not ended) and failure is None and len(entries) < AHEAD_BATCHES * local:
        entry = later.popleft() if later else q.get()
        if entry is None:
          ended = True
          break
        if entry[0] == "error":
          failure = entry[1]
          break
        row, future = entry
        if isinstance(row, _Row) and row.error is None:
          if groups and groups[-1][-1][1] is future and len(groups[-1]) < per_image:
            groups[-1].append(entry)     # the same image, another prompt
          elif len(groups) == capacity or (groups and row.count != groups[0][0][0].count):
            later.appendleft(entry)      # the next batch's first row
            break
          else:
            groups.append([entry])
        entries.append(entry)
      # one exchange a step: every host takes the same branch (stop on anyone's failure or signal, or go on)
      every = distributed.gather_json({"bytes": counts["bytes"], "more": bool(groups) or bool(later) or not ended,
                                       "signal": received["signal"] is not None, "failed": failure is not None,
                                       "count": groups[0][0][0].count if groups else None})
      if any(x["failed"] for x in every):
        if failure is not None:
          raise failure
        raise UserError("another process of this job failed (its log says why); the files written so far are "
                        "kept: rerun the same command to continue")
      if not any(x["more"] for x in every):
        _apply(root, entries, {}, parts, totals, scores)
        break
      count = min((x["count"] for x in every if x["count"] is not None), default=1)
      if groups and groups[0][0][0].count != count:   # another host's batch goes first: this one waits a step
        later.extendleft(reversed(entries))
        groups, entries = [], []
      answers = answer(groups, count)
      try:
        _apply(root, entries, answers, parts, totals, scores)
      except Exception as e:  # noqa: BLE001 - a failed write stops every host at the next exchange
        failure = e
      _progress(bar, every, totals, t0)
      if any(x["signal"] for x in every) and failure is None:
        raise Stopped(f"stopped by a signal; {totals['parts']} output files were written in this run, and the "
                      "records of the unfinished ones will be answered again")
    if distributed.is_primary():
      bar.update(max(0, (bar.total or 0) - bar.n))
    distributed.sync("iblip_jax_annotate_end")
    every = distributed.gather_json({"totals": totals, "unreadable": unreadable})
  finally:
    bar.close()
    stop_input.set()
    pool.shutdown(wait=False, cancel_futures=True)
    signal.signal(signal.SIGTERM, previous)   # after the last exchange: a start-up handler raises
  summed = {k: sum(x["totals"][k] for x in every) for k in totals}
  lost = [u for x in every for u in x["unreadable"]]
  if distributed.is_primary():
    _manifest(root, pending)
  return {**summed, "seconds": time.perf_counter() - t0, "unreadable": lost}


def _answer(engine: Engine, decoding: Decoding, local: int, per_image: int, pad_prompt: str, scores: bool,
            start: int, groups: list, count: int = 1) -> dict:
  """This host's groups of one global batch -> {id(row): Answer, or why its image could not be used}. With
  `per_image` > 1 each group is one image and its prompts, padded to `per_image` rows (the model runs the ViT once per
  image: models/instructblip._per_row); else each group is one row. Records of `count` > 1 images have their
  (count, S, S, 3) pixels repeated for each of their rows (the model's per-image sharing is for single images).
  Every process calls it once per step."""
  arrays, bad = [], {}
  for i, group in enumerate(groups):
    try:
      arrays.append(group[0][1].result())
    except Exception as e:  # noqa: BLE001 - a decoder's error is the record's
      bad[i] = str(e) if isinstance(e, images.BadImage) else f"{type(e).__name__}: {str(e)[:200]}"
      arrays.append(None)
  s = engine.image_size
  blank = np.zeros((s, s, 3) if count == 1 else (count, s, s, 3), np.float32)
  pixels = [blank if x is None else x for x in arrays]
  if count == 1:
    pixels += [blank] * (local // per_image - len(arrays))
  else:   # a row each
    pixels = [x for x in pixels for _ in range(per_image)]
    pixels += [blank] * (local - len(pixels))
  texts = []
  for group in groups:
    asked = [row.prompt for row, _ in group]
    texts += asked + [asked[-1]] * (per_image - len(asked))
  texts += [pad_prompt] * (local - len(texts))
  inputs = sharding.global_batch(dict(pixel_values=np.stack(pixels), **tokenize.encode_prompts(engine.tok, texts)),
                                 engine.mesh)
  answers = engine._answers(inputs, decoding, scores=scores)[start:start + local]
  out = {}
  for i, group in enumerate(groups):
    for j, (row, _) in enumerate(group):
      out[id(row)] = bad[i] if i in bad else answers[i * per_image + j][0]
  return out


def _apply(root: epath.Path, entries: list, answers: dict, parts: dict, totals: dict, scores: bool) -> None:
  """Entries in stream order: rows join their part, a closed part is written, a finished shard marked."""
  for row, future in entries:
    if isinstance(row, _Row):
      out = {"key": row.key, "shard": row.shard, "prompt": row.prompt}
      result = answers.get(id(row)) if row.error is None else row.error
      if isinstance(result, str):
        out["error"] = result
        totals["errors"] += 1
      else:
        out["answer"] = result.text
        if scores:
          out["score"] = result.logprob
      if row.meta:
        out["meta"] = row.meta
      parts.setdefault((row.shard, row.part), []).append(out)
      totals["rows"] += 1
      totals["images"] += row.first and "answer" in out
      continue
    close = row
    if close.rows >= 0:
      rows = parts.pop((close.shard, close.part), [])
      assert len(rows) == close.rows, (close, len(rows))   # the stream's own bookkeeping, not the input's
      _write_whole(root / "rows" / f"{close.shard}.part-{close.part:05d}.jsonl",
                   "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
      totals["parts"] += 1
    if close.last:
      _write_whole(root / "done" / f"{close.shard}.json", json.dumps({"records": close.records,
                                                                      "parts": close.parts}))
      totals["shards"] += 1


def _progress(bar, every: list, totals: dict, t0: float) -> None:
  if bar.disable:
    return
  bar.update(max(0, sum(x["bytes"] for x in every) - bar.n))
  secs = max(time.perf_counter() - t0, 1e-9)
  bar.set_postfix_str(f"{totals['images'] / secs:.1f} img/s, {totals['rows'] / secs:.1f} prompts/s, "
                      f"{totals['errors']} errors (this host)", refresh=False)


def _manifest(root: epath.Path, pending: list) -> None:
  done, written = _finished(root)
  finished = {}
  for name in done:
    try:
      finished[name] = json.loads((root / "done" / f"{name}.json").read_text())
    except (OSError, ValueError):
      finished[name] = None
  unfinished = sorted(sh.name for sh in pending if sh.name not in done)
  _write_whole(root / "manifest.json", json.dumps({"finished": finished, "unfinished": unfinished,
                                                   "parts_of_unfinished": {k: v for k, v in written.items()
                                                                           if k in unfinished}}, indent=1))
