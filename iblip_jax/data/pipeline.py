"""The training input pipeline (grain): records -> images and texts -> bucketed, tokenised batches.

Bad examples never stop training: an example whose image is missing, unreadable, truncated or too large to decode
(whatever PIL raises), whose record does not render, or whose text is empty or not valid UTF-8 (including lone
surrogates; an instruction that a renderer returns as exactly "" is meant empty, as the untemplated captions of
templates' "raw" format, and is kept), is skipped and counted by reason and dataset (`SkipCounter`: reported in the
logs and metrics, `summary()` for people, `report(threshold)` for a skip rate that stays high); odd images
(grayscale, RGBA, CMYK, palette, 16-bit, EXIF-rotated) are converted (see preprocess.to_rgb). A bad *dataset* does
stop it, at once and by name (BadDatasetError): one whose first records all fail has a wrong format or path, and
would otherwise be silently replaced by the other datasets' examples for the whole run. Image decoding runs in
worker processes (grain mp_prefetch); skipping, batching and tokenisation run in the main process, so the counts are
exact and batches always have the same size.

Records come from any grain MapDataset: the readers' in-memory lists or a prepared tensorflow-datasets source
(tfds_builder.data_source, images as encoded bytes). Two mixing modes (mixture.py): per example, the stream is
records and batches are cut from it; per step (`per_step=True`, LAVIS's one dataset per step), the stream is global
batches of records from one dataset each, every process takes its share of each, so every process trains on the same
dataset at the same step.
"""
import collections
import dataclasses
import functools
import math
import multiprocessing
import os
import threading
from typing import Callable, Mapping, Sequence

import grain
import numpy as np
from absl import flags
from PIL import Image

from iblip_jax.data import images, preprocess, tokenize, video_files
from iblip_jax.errors import UserError

SKIP = "_skip"


def random_resized_crop(image: Image.Image, rng: np.random.Generator, scale=(0.5, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> Image.Image:
  """torchvision's RandomResizedCrop box choice: area fraction in `scale`, log-uniform aspect ratio in `ratio`,
  10 tries, then the largest centred crop within `ratio`."""
  w, h = image.size
  for _ in range(10):
    area = w * h * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
      return image.crop((x, y, x + cw, y + ch))
  in_ratio = w / h
  cw, ch = (w, int(round(w / ratio[0]))) if in_ratio < ratio[0] else \
      ((int(round(h * ratio[1])), h) if in_ratio > ratio[1] else (w, h))
  x, y = (w - cw) // 2, (h - ch) // 2
  return image.crop((x, y, x + cw, y + ch))


def _text(value) -> str | None:
  """The stripped text, or None when it is empty, not text, or not valid UTF-8 either way: undecodable bytes, or a
  str holding a lone surrogate (json.loads turns "\\ud800" into one, and the tokenizers cannot encode it)."""
  try:
    if isinstance(value, bytes):
      value = value.decode("utf-8")
    if not isinstance(value, str):
      return None
    value.encode("utf-8")
  except UnicodeError:
    return None
  value = value.strip()
  return value or None


def load_example(record: dict, rng: np.random.Generator, *, image_size: int, train: bool,
                 render: Callable[[dict, np.random.Generator], tuple[str, str]]) -> dict:
  """record -> {"pixel_values", "text_input", "text_output"} or {SKIP: reason}."""
  return _load_example(record, rng, image_size=image_size, train=train, render=render)[0]


def _load_example(record: dict, rng: np.random.Generator, *, image_size: int, train: bool,
                  render) -> tuple[dict, str | None]:
  """load_example's result and, for a skip, why: one line naming the record and what was wrong (for errors and
  reports; the counts go by reason)."""
  name = f"{_dataset(record)} record {record.get('id', '?')!r}" + (f" ({record['source_file']})"
                                                                  if record.get("source_file") else "")
  try:
    text_input, text_output = render(record, rng)
  except (KeyError, ValueError, IndexError) as e:
    detail = f"{type(e).__name__}: {_clip(e)}"  # the renderers' messages name the record already
    return {SKIP: f"bad_record:{type(e).__name__}"}, detail if name in str(e) else f"{name}: {detail}"
  meant_empty = isinstance(text_input, str) and text_input == ""   # a renderer's empty instruction (raw captions)
  text_input, text_output = ("" if meant_empty else _text(text_input)), _text(text_output)
  if text_input is None or text_output is None:
    which = "text_input" if text_input is None else "text_output"
    return {SKIP: "empty_or_invalid_text"}, f"{name}: {which} is empty or not valid UTF-8"
  try:
    source = _image_source(record)
  except images.BadImage as e:   # a video file that cannot be decoded
    return {SKIP: e.reason}, f"{name}: {_clip(e)}"
  if source is None:
    return {SKIP: "missing_image"}, f"{name}: no image or frames"
  try:
    image, _ = images.open_image(source, max_pixels=None)
  except images.BadImage as e:
    missing = e.reason == "missing_image" and isinstance(source, str)
    return {SKIP: e.reason}, f"{name}: {f'{source} not found' if missing else _clip(e)}"
  except Exception as e:  # noqa: BLE001 - whatever else decoding raises (MemoryError, ...) is this file's problem
    where = f" {source}" if isinstance(source, str) else ""
    return {SKIP: "unreadable_image"}, f"{name}:{where} {type(e).__name__}: {_clip(e)}"
  if train:
    image = random_resized_crop(image, rng)
  return {"pixel_values": preprocess.preprocess_image(image, image_size), "text_input": text_input,
          "text_output": text_output}, None


def _image_source(record: dict):
  """The record's image; for a video record (readers' "frames"), its middle frame: training has no video input
  (LAVIS's forward() has none either; the 4-frame input is an evaluation feature). None when there is neither."""
  if "image" in record or "frames" not in record:
    return record.get("image")
  if video_files.is_video_file(record["frames"]):   # the original clip (readers/video.py): its middle sampled frame
    frames = images.video_frames(record["frames"], video_files.FRAMES)
  else:
    frames = list(record["frames"] or ())
  return frames[len(frames) // 2] if frames else None


def _clip(e: BaseException, limit: int = 300) -> str:
  text = " ".join(str(e).split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def record_texts(record: dict, rng: np.random.Generator) -> tuple[str, str]:
  """The default renderer: records that already carry text_input/text_output (generic JSONL, LLaVA)."""
  del rng
  return record["text_input"], record["text_output"]


class BadDatasetError(UserError):
  """A dataset whose first records all fail to load: its format, paths or renderer are wrong, not a few files."""


FIRST_REASONS = 3  # detailed reasons kept per dataset, for errors and reports


class SkipCounter:
  """Skipped examples of this process: by reason (`counts`), by dataset (`dataset_counts`), over a recent window of
  batches (`recent_counts`, `recent_rate`, `report`), and the first few detailed reasons per dataset
  (`first_reasons`). Also a grain filter predicate that keeps good examples and counts skipped ones by reason.

  `check_first` > 0: when the first `check_first` examples this process loads from a dataset all fail,
  `update` raises BadDatasetError naming the dataset, the count and the first reasons. Each process decides on its
  own share; an all-bad dataset reaches the count on every process within a few batches of the others."""

  def __init__(self, window: int = 100, check_first: int = 0):
    self.counts = collections.Counter()        # reason -> skipped examples (and dropped-batch markers)
    self.skipped_by_dataset = collections.Counter()
    self.loaded_by_dataset = collections.Counter()
    self._reasons_by_dataset: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    self.first_reasons: dict[str, list[str]] = {}
    self.window, self.check_first = window, check_first
    self._recent = collections.deque(maxlen=window)  # per batch: {dataset: (skipped, loaded)}
    self._proven: set[str] = set()                   # datasets that gave a good example

  def __call__(self, example: dict) -> bool:
    if SKIP in example:
      self.counts[example[SKIP]] += 1
      return False
    return True

  def update(self, rows: Sequence[tuple[str, str | None, str | None]], markers: Sequence[str] = ()) -> None:
    """One batch's rows as (dataset, skip reason or None, why or None), plus markers counted by reason only."""
    self.counts.update(markers)
    batch: dict[str, list[int]] = {}
    for dataset, reason, why in rows:
      counts = batch.setdefault(dataset, [0, 0])
      counts[1] += 1
      self.loaded_by_dataset[dataset] += 1
      if reason is None:
        self._proven.add(dataset)
        continue
      counts[0] += 1
      self.counts[reason] += 1
      self.skipped_by_dataset[dataset] += 1
      self._reasons_by_dataset[dataset][reason] += 1
      kept = self.first_reasons.setdefault(dataset, [])
      if len(kept) < FIRST_REASONS and why:
        kept.append(why)
    self._recent.append({d: tuple(c) for d, c in batch.items()})
    for dataset in batch:
      if self.check_first and dataset not in self._proven and self.loaded_by_dataset[dataset] >= self.check_first:
        raise BadDatasetError(bad_dataset_message(dataset, self.loaded_by_dataset[dataset],
                                                  self._reasons_of(dataset), self.first_reasons.get(dataset, []),
                                                  "loaded by this process"))

  def _reasons_of(self, dataset: str) -> str:
    return ", ".join(f"{n} {r}" for r, n in self._reasons_by_dataset[dataset].most_common())

  def dataset_counts(self) -> dict[str, list[int]]:
    """{dataset: [skipped, loaded]} over the run (JSON-able: sum them over processes)."""
    return {d: [self.skipped_by_dataset[d], n] for d, n in sorted(self.loaded_by_dataset.items())}

  def recent_counts(self) -> dict[str, list[int]]:
    """{dataset: [skipped, loaded]} over the last `window` batches (JSON-able: sum them over processes)."""
    out: dict[str, list[int]] = {}
    for batch in self._recent:
      for dataset, (skipped, loaded) in batch.items():
        c = out.setdefault(dataset, [0, 0])
        c[0] += skipped
        c[1] += loaded
    return dict(sorted(out.items()))

  @property
  def recent_batches(self) -> int:
    return len(self._recent)

  def recent_rate(self) -> float:
    """The fraction of examples skipped over the last `window` batches (0.0 before any)."""
    counts = self.recent_counts().values()
    loaded = sum(n for _, n in counts)
    return sum(s for s, _ in counts) / loaded if loaded else 0.0

  def report(self, threshold: float, min_batches: int = 10) -> str | None:
    """A one-line warning when the recent skip rate exceeds `threshold` (a fraction), naming the datasets by skip
    rate and their first reasons; None otherwise, and until the window holds `min_batches` batches."""
    if self.recent_batches < min(min_batches, self.window):
      return None
    return skip_report(self.recent_counts(), threshold, self.first_reasons)

  @property
  def total(self) -> int:
    """Skips of every reason together (a dropped per-step batch counts once, its examples under their reasons)."""
    return sum(self.counts.values())

  def summary(self) -> str:
    """The counts for a console line or an end-of-run report, most frequent reason first (ties by name, so the
    text is stable): "3 skipped: 2 unreadable_image, 1 empty_or_invalid_text", or "none skipped"."""
    if not self.total:
      return "none skipped"
    reasons = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return f"{self.total} skipped: " + ", ".join(f"{n} {reason}" for reason, n in reasons if n)


def skip_report(recent: dict[str, Sequence[int]], threshold: float,
                first_reasons: dict[str, Sequence[str]] | None = None) -> str | None:
  """The warning of SkipCounter.report from {dataset: [skipped, loaded]} counts (e.g. summed over processes):
  "input: 42.0% of recent examples skipped (threshold 10.0%): scienceqa_img 100.0% (64/64), coco 1.6% (2/128);
  first: <why>", or None at or under the threshold."""
  loaded = sum(n for _, n in recent.values())
  skipped = sum(s for s, _ in recent.values())
  if not loaded or skipped / loaded <= threshold:
    return None
  worst = sorted(((s / n, d, s, n) for d, (s, n) in recent.items() if n and s), key=lambda t: (-t[0], t[1]))
  parts = ", ".join(f"{d} {100 * r:.1f}% ({s}/{n})" for r, d, s, n in worst)
  text = f"input: {100 * skipped / loaded:.1f}% of recent examples skipped (threshold {100 * threshold:.1f}%): {parts}"
  firsts = [why for _, d, _, _ in worst for why in (first_reasons or {}).get(d, [])[:1]]
  return text + (f"; first: {' | '.join(firsts)}" if firsts else "")


def bad_dataset_message(dataset: str, count: int, reasons: str, whys: Sequence[str], where: str) -> str:
  shown = "; ".join(whys[:FIRST_REASONS]) or "(no detail)"
  return (f"dataset {dataset!r}: the first {count} records {where} all failed ({reasons}); first reasons: {shown}. "
          "Its records do not load or render: check its format and paths (config.data.datasets.*) or leave it out")


def check_datasets(datasets: Mapping[str, Sequence], *, image_size: int, render, check_first: int = 32,
                   seed: int = 0) -> None:
  """Loads each dataset's records in order until one is good, at most `check_first`; BadDatasetError naming every
  dataset whose first `check_first` records (all, when it has fewer) fail, with the count and the first reasons.
  The same records on every process, so every process stops alike, before training; seconds (one example per good
  dataset). `datasets`: {name: records} (a list or grain MapDataset of records, before mixing)."""
  problems = []
  for name, records in datasets.items():
    reasons, whys = collections.Counter(), []
    n = min(check_first, len(records))
    for i in range(n):
      example, why = _load_example(records[i], np.random.default_rng([seed, i]), image_size=image_size, train=False,
                                   render=render)
      if SKIP not in example:
        break
      reasons[example[SKIP]] += 1
      whys.append(why)
    else:
      if n:
        summary = ", ".join(f"{c} {r}" for r, c in reasons.most_common())
        problems.append(bad_dataset_message(name, n, summary, whys, "in its source"))
  if problems:
    raise BadDatasetError("\n".join(problems))


def collate(tok: tokenize.Tokenizers) -> Callable[[Sequence[dict]], dict]:
  def fn(examples: Sequence[dict]) -> dict:
    return dict(pixel_values=np.stack([e["pixel_values"] for e in examples]),
                **tokenize.encode_training(tok, [e["text_input"] for e in examples],
                                           [e["text_output"] for e in examples]))
  return fn


@dataclasses.dataclass
class Batches:
  """What build() returns: this process's batches (a grain IterDataset, checkpointable) and its skip counts."""
  dataset: grain.IterDataset
  skipped: SkipCounter


LOOKAROUND = 16  # batches searched on either side for readable examples when a process's share has none


def _dataset(record) -> str:
  """The dataset a record is counted under: its config name (sources.tag), else its reader's name."""
  return str(record.get("source") or record.get("dataset", "?")) if isinstance(record, dict) else "?"


def _load_share(groups: grain.MapDataset, k: int, load, *, batch_size: int, process_index: int,
                process_count: int, seed: int) -> dict:
  """Process `process_index`'s rows of global batch k, loaded: {"examples": batch_size good examples, "skipped":
  [reasons], "rows": [(dataset, skip reason or None, why or None)] of the share's own rows, "failures": the rows
  tried, own and nearby, when none was good}. Each record is loaded with its own generator seeded by (seed, its
  place in the stream), so crops and template choices depend neither on how many processes share the batch nor on
  how batches are grouped. Skipped
  examples are replaced by repeats of the share's good ones (the batch keeps its size and, per step, its dataset); a
  share without any is filled from the nearest batch that has some, so every process yields a batch at every step,
  deterministically."""
  def load_rows(j):
    group = groups[j]   # [(index in the stream, record)] of global batch j
    if len(group) != batch_size * process_count:
      raise ValueError(f"a global batch has {len(group)} records, expected {batch_size} x {process_count} processes")
    start = process_index * batch_size
    return [(_dataset(r), *load(r, np.random.default_rng([seed, i]))) for i, r in group[start:start + batch_size]]

  loaded = load_rows(k)
  rows = [(d, e.get(SKIP), why) for d, e, why in loaded]
  skipped = []
  good = [e for _, e, _ in loaded if SKIP not in e]
  tried = list(rows)
  for offset in range(1, LOOKAROUND + 1):
    if good:
      break
    for j in (k - offset, k + offset):
      if 0 <= j < len(groups) and not good:
        nearby = load_rows(j)
        tried += [(d, e.get(SKIP), why) for d, e, why in nearby]
        good = [e for _, e, _ in nearby if SKIP not in e]
    if good:
      skipped.append("batch_without_good_examples")
  if not good:
    return {"examples": [], "skipped": skipped, "rows": rows, "failures": [t for t in tried if t[1]]}
  return {"examples": [good[i % len(good)] for i in range(batch_size)], "skipped": skipped, "rows": rows,
          "failures": []}


def indexed_batches(examples: grain.MapDataset, global_batch: int, *, per_step: bool) -> grain.MapDataset:
  """Global batches as lists of (index in the stream, record): the index seeds the record's generator."""
  if per_step:  # already global batches
    return examples.map_with_index(lambda k, g: [(k * global_batch + j, r) for j, r in enumerate(g)])
  return examples.map_with_index(lambda i, r: (i, r)).batch(global_batch, drop_remainder=True, batch_fn=list)


def length_keys(members: Sequence[tuple[int, dict]], tok: tokenize.Tokenizers, render, seed: int) -> np.ndarray:
  """(N, 3) token counts (instruction, prompt, target) of (index, record) pairs, rendered with the generator the
  pipeline will use for them (texts only: no image is opened); a record that does not render counts as empty."""
  texts_in, texts_out = [], []
  for i, r in members:
    try:
      a, b = render(r, np.random.default_rng([seed, i]))
    except Exception:  # noqa: BLE001 - the pipeline skips and counts it; here it only needs a length
      a = b = ""
    texts_in.append(_text(a) or "")
    texts_out.append(_text(b) or "")
  return tokenize.lengths(tok, texts_in, texts_out)


def length_grouped(groups: grain.MapDataset, window: int, keys, seed: int,
                   buckets: tuple[Sequence[int], Sequence[int]] | None = None) -> grain.MapDataset:
  """Global batches regrouped by length within windows of `window` batches: a window's examples are sorted by the
  padded shape each would have alone (its target, prompt and instruction lengths rounded up to `buckets` =
  (instruction and prompt buckets, target buckets); raw lengths without), cut into batches again, and the batches
  put in an order shuffled per window. Examples of one shape are then together, and a batch pads little.
  Deterministic from the texts (`keys`: members -> (N, 3) lengths), so every process computes the same batches;
  resuming needs only the batch index."""
  cache = {}

  def shape(lengths):
    if buckets is None:
      return lengths
    rounded = [np.searchsorted(np.asarray(b), lengths[:, c]) for c, b in ((0, buckets[0]), (1, buckets[0]),
                                                                          (2, buckets[1]))]
    return np.stack(rounded, axis=1)

  def batch(m: int):
    w, j = divmod(m, window)
    if w not in cache:
      cache.clear()
      members = [x for k in range(w * window, (w + 1) * window) for x in groups[k]]
      lengths = keys(members)
      padded = shape(lengths)
      index = np.array([i for i, _ in members])
      order = np.lexsort((index, lengths[:, 0], lengths[:, 1], lengths[:, 2], padded[:, 0], padded[:, 1],
                          padded[:, 2]))
      size = len(members) // window
      cut = [[members[i] for i in order[b * size:(b + 1) * size]] for b in range(window)]
      cache[w] = [cut[p] for p in np.random.default_rng([seed, w, 1]).permutation(window)]
    return cache[w][j]
  return grain.MapDataset.range(len(groups) // window * window).map(batch)


def fit_tokenizer_buckets(tok: tokenize.Tokenizers, groups: grain.MapDataset, keys, *, windows: int,
                          max_buckets: int) -> tokenize.Tokenizers:
  """The tokenizers with bucket lengths fitted to the lengths of the first `windows` global batches: one set for
  instructions and prompts, one for targets."""
  members = [x for k in range(min(windows, len(groups))) for x in groups[k]]
  lengths = keys(members)
  largest_in = tok.max_input_len
  largest_out = tok.max_output_len + (tok.max_input_len if tok.decoder_only else 0)   # decoder-only: whole rows
  return dataclasses.replace(
      tok, buckets=tokenize.fit_buckets(lengths[:, :2].reshape(-1), max_buckets, largest_in),
      target_buckets=tokenize.fit_buckets(lengths[:, 2], max_buckets, largest_out))


def build(examples: grain.MapDataset, tok: tokenize.Tokenizers, *, batch_size: int, image_size: int, seed: int,
          train: bool = True, render=record_texts, workers: int = 0, process_index: int = 0,
          process_count: int = 1, per_step: bool = False, check_first: int = 32,
          probe: Mapping[str, Sequence] | None = None, skip_window: int = 100, group_by_length: int = 0,
          fitted_buckets: int = 0) -> Batches:
  """examples: a (possibly mixed, infinite) MapDataset of records, or with `per_step` of global batches (lists of
  batch_size x process_count records, mixture.mix(..., batch_size=, batch_fn=list)). Yields this process's
  batches of `batch_size` rows with pixel_values, Q-Former/LLM inputs, labels, decoder mask.

  Global batch k is always records [kB, (k+1)B) of the stream (B = batch_size x process_count), and process p
  feeds its rows [pb, (p+1)b): the rows its devices hold (sharding.process_rows). So the global batch, and the
  training that follows, is the same on any number of processes, and resuming from a step needs nothing but the
  batch index. Bad examples are skipped, counted and replaced within the share (see _load_share).

  A dataset that cannot train stops the run, in seconds, with BadDatasetError naming it, the count and the first
  reasons: `probe` ({name: records} before mixing) is checked now (check_datasets: the same on every process);
  and while iterating, a dataset whose first `check_first` examples on this process all fail stops it (0: off).
  `skip_window`: the batches SkipCounter's recent rate covers.

  Padding: `group_by_length` = W > 0 regroups the stream's examples by length within windows of W global batches
  (length_grouped); `fitted_buckets` = K > 0 replaces the tokenizers' bucket lengths by at most K per field fitted
  to the first 2W batches' lengths (tokenize.fit_buckets). Both are computed from texts alone, the same on every
  process, so the hosts still agree on every batch."""
  if probe:
    check_datasets(probe, image_size=image_size, render=render, check_first=check_first or 32, seed=seed)
  load = lambda r, rng: _load_example(r, rng, image_size=image_size, train=train, render=render)
  groups = indexed_batches(examples, batch_size * process_count, per_step=per_step)
  if group_by_length:
    if per_step:
      raise ValueError("grouping batches by length mixes datasets in a batch: it needs mixing='example'")
    key = lambda members: length_keys(members, tok, render, seed)
    if fitted_buckets:
      tok = fit_tokenizer_buckets(tok, groups, key, windows=2 * group_by_length, max_buckets=fitted_buckets)
    groups = length_grouped(groups, group_by_length, key, seed, (tok.buckets, tok.out_buckets))
  ds = groups.map_with_index(lambda k, _: _load_share(groups, k, load, batch_size=batch_size,
                                                      process_index=process_index, process_count=process_count,
                                                      seed=seed))
  it = ds.to_iter_dataset()
  if workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a library caller may not have parsed any
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=exit_with_parent)
  counter = SkipCounter(window=skip_window, check_first=check_first)
  return Batches(it.map(functools.partial(_count_and_collate, counter, collate(tok))), counter)


def exit_with_parent(worker_index: int, worker_count: int) -> None:
  """grain worker_init_fn: the worker ends as soon as the process that started it is gone. A main process killed by
  SIGKILL (or the OOM killer) runs no cleanup, and its workers (hundreds of MB each) would live on, orphaned, for
  good; multiprocessing's resource tracker then follows by itself, once the last holder of its pipe is dead.

  What is watched is multiprocessing's parent sentinel, a pipe whose other end only the starting process holds: it
  reaches EOF when that process exits however it dies, also when a forkserver did the forking, and a reused pid
  cannot fool it. prctl(PR_SET_PDEATHSIG) would fire when the starting *thread* ends, and grain starts workers from
  short-lived threads."""
  del worker_index, worker_count
  parent = multiprocessing.parent_process()
  if parent is None:  # not started by multiprocessing: no one to outlive
    return

  def watch():
    parent.join()
    os._exit(1)  # at once: the queues' feeder threads would block on a reader that no longer exists

  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _count_and_collate(counter: SkipCounter, collate_fn, share: dict) -> dict:
  counter.update(share["rows"], share["skipped"])
  if not share["examples"]:
    raise BadDatasetError(_no_good_message(share["failures"]))
  return collate_fn(share["examples"])


def _no_good_message(failures: Sequence[tuple[str, str, str | None]]) -> str:
  """Names the datasets and the reasons of a share whose rows and nearby batches all failed."""
  by_dataset: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  whys: dict[str, list[str]] = collections.defaultdict(list)
  for dataset, reason, why in failures:
    by_dataset[dataset][reason] += 1
    if why and len(whys[dataset]) < FIRST_REASONS:
      whys[dataset].append(why)
  parts = "; ".join(f"{d}: {sum(c.values())} records ({', '.join(f'{n} {r}' for r, n in c.most_common())}), "
                    f"first reasons: {' | '.join(whys[d]) or '(no detail)'}" for d, c in sorted(by_dataset.items()))
  return (f"no readable example in {2 * LOOKAROUND + 1} consecutive batches of this process's data: {parts}. The "
          "records do not load or render: check the datasets' format and paths (config.data.datasets.*)")
