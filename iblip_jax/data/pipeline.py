"""The training input pipeline (grain): records -> images and texts -> bucketed, tokenised batches.

Bad input never stops training: an example whose image is missing, unreadable, truncated or too large to decode
(whatever PIL raises), or whose text is empty or not valid UTF-8 (including lone surrogates), is skipped and
counted by reason (`SkipCounter`, reported in the logs and metrics, `SkipCounter.summary()` for people);
odd images (grayscale, RGBA, CMYK, palette, 16-bit, EXIF-rotated) are converted (see preprocess.to_rgb).
Image decoding runs in worker processes (grain mp_prefetch); skipping, batching and tokenisation run in the
main process, so the counts are exact and batches always have the same size.

Records come from any grain MapDataset: the readers' in-memory lists or a prepared tensorflow-datasets source
(tfds_builder.data_source, images as encoded bytes). Two mixing modes (mixture.py): per example, the stream is
records and batches are cut from it; per step (`per_step=True`, LAVIS's one dataset per step), the stream is
global batches of records from one dataset each, every process takes its share of each, so every process trains
on the same dataset at the same step.
"""
import collections
import dataclasses
import functools
import io
import math
import multiprocessing
import os
import threading
import warnings
from typing import Callable, Sequence

import grain
import numpy as np
from absl import flags
from PIL import Image

from iblip_jax.data import preprocess, tokenize

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


def _open(path_or_image) -> Image.Image:
  if isinstance(path_or_image, (Image.Image, np.ndarray)):
    return path_or_image if isinstance(path_or_image, Image.Image) else Image.fromarray(path_or_image)
  if isinstance(path_or_image, bytes):  # an encoded file from a prepared dataset
    path_or_image = io.BytesIO(path_or_image)
  # PIL warns about images between MAX_IMAGE_PIXELS and twice that (89M-179M pixels) and raises beyond. Below the
  # limit the image is usable, so the warning is silenced: under `-W error` it would turn a good image into a skip.
  # (catch_warnings is not thread-safe before Python 3.14; a race can at worst leave this one filter in place.)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    image = Image.open(path_or_image)
    image.load()  # decode now: a truncated file fails here, inside the worker, not later
  return image


def load_example(record: dict, rng: np.random.Generator, *, image_size: int, train: bool,
                 render: Callable[[dict, np.random.Generator], tuple[str, str]]) -> dict:
  """record -> {"pixel_values", "text_input", "text_output"} or {SKIP: reason}."""
  try:
    text_input, text_output = render(record, rng)
  except (KeyError, ValueError, IndexError) as e:
    return {SKIP: f"bad_record:{type(e).__name__}"}
  text_input, text_output = _text(text_input), _text(text_output)
  if text_input is None or text_output is None:
    return {SKIP: "empty_or_invalid_text"}
  source = record.get("image")
  if isinstance(source, str) and not os.path.exists(source):
    return {SKIP: "missing_image"}
  try:
    image = preprocess.to_rgb(_open(source))
  except Exception:  # noqa: BLE001
    # Whatever decoding raises is this one file's problem, never the run's: OSError/SyntaxError (truncated, corrupt),
    # DecompressionBombError (over 179M pixels, not an OSError), ValueError, MemoryError, a plugin's own errors.
    return {SKIP: "unreadable_image"}
  if train:
    image = random_resized_crop(image, rng)
  return {"pixel_values": preprocess.preprocess_image(image, image_size), "text_input": text_input,
          "text_output": text_output}


def record_texts(record: dict, rng: np.random.Generator) -> tuple[str, str]:
  """The default renderer: records that already carry text_input/text_output (generic JSONL, LLaVA)."""
  del rng
  return record["text_input"], record["text_output"]


class SkipCounter:
  """grain filter predicate that keeps good examples and counts skipped ones by reason (main process)."""

  def __init__(self):
    self.counts = collections.Counter()

  def __call__(self, example: dict) -> bool:
    if SKIP in example:
      self.counts[example[SKIP]] += 1
      return False
    return True

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


def collate(tok: tokenize.Tokenizers) -> Callable[[Sequence[dict]], dict]:
  def fn(examples: Sequence[dict]) -> dict:
    return dict(pixel_values=np.stack([e["pixel_values"] for e in examples]),
                **tokenize.encode_training(tok, [e["text_input"] for e in examples],
                                           [e["text_output"] for e in examples]))
  return fn


@dataclasses.dataclass
class Pipeline:
  dataset: grain.IterDataset
  skipped: SkipCounter


LOOKAROUND = 16  # batches searched on either side for readable examples when a process's share has none


def _load_share(groups: grain.MapDataset, k: int, load, *, batch_size: int, process_index: int,
                process_count: int, seed: int) -> dict:
  """Process `process_index`'s rows of global batch k, loaded: {"examples": batch_size good examples, "skipped":
  [reasons]}. Example i of global batch k is loaded with its own generator seeded by (seed, k * B + i), so crops and
  template choices do not depend on how many processes share the batch. Skipped examples are replaced by repeats of
  the share's good ones (the batch keeps its size and, per step, its dataset); a share without any is filled from
  the nearest batch that has some, so every process yields a batch at every step, deterministically."""
  def load_rows(j):
    group = groups[j]
    if len(group) != batch_size * process_count:
      raise ValueError(f"a global batch has {len(group)} records, expected {batch_size} x {process_count} processes")
    start = process_index * batch_size
    base = j * len(group) + start
    return [load(r, np.random.default_rng([seed, base + i])) for i, r in enumerate(group[start:start + batch_size])]

  examples = load_rows(k)
  skipped = [e[SKIP] for e in examples if SKIP in e]
  good = [e for e in examples if SKIP not in e]
  for offset in range(1, LOOKAROUND + 1):
    if good:
      break
    for j in (k - offset, k + offset):
      if 0 <= j < len(groups) and not good:
        good = [e for e in load_rows(j) if SKIP not in e]
    if good:
      skipped.append("batch_without_good_examples")
  if not good:
    return {"examples": [], "skipped": skipped}
  return {"examples": [good[i % len(good)] for i in range(batch_size)], "skipped": skipped}


def build(examples: grain.MapDataset, tok: tokenize.Tokenizers, *, batch_size: int, image_size: int, seed: int,
          train: bool = True, render=record_texts, workers: int = 0, process_index: int = 0,
          process_count: int = 1, per_step: bool = False) -> Pipeline:
  """examples: a (possibly mixed, infinite) MapDataset of records, or with `per_step` of global batches (lists of
  batch_size x process_count records, mixture.mix(..., batch_size=, batch_fn=list)). Yields this process's
  batches of `batch_size` rows with pixel_values, Q-Former/LLM inputs, labels, decoder mask.

  Global batch k is always records [kB, (k+1)B) of the stream (B = batch_size x process_count), and process p
  feeds its rows [pb, (p+1)b): the rows its devices hold (sharding.process_rows). So the global batch, and the
  training that follows, is the same on any number of processes, and resuming from a step needs nothing but the
  batch index. Bad examples are skipped, counted and replaced within the share (see _load_share)."""
  load = lambda r, rng: load_example(r, rng, image_size=image_size, train=train, render=render)
  groups = examples if per_step else examples.batch(batch_size * process_count, drop_remainder=True, batch_fn=list)
  ds = groups.map_with_index(lambda k, _: _load_share(groups, k, load, batch_size=batch_size,
                                                      process_index=process_index, process_count=process_count,
                                                      seed=seed))
  it = ds.to_iter_dataset()
  if workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a library caller may not have parsed any
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=exit_with_parent)
  counter = SkipCounter()
  return Pipeline(it.map(functools.partial(_count_and_collate, counter, collate(tok))), counter)


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
  counter.counts.update(share["skipped"])
  if not share["examples"]:
    raise ValueError(f"no readable example in {2 * LOOKAROUND + 1} consecutive batches of this process's data "
                     f"({counter.summary()}): the data is broken, see the skip reasons")
  return collate_fn(share["examples"])
