"""The inference engine: images and prompts in, answers or ranking scores out, on one device, a mesh or many hosts.

Everything that answers images runs through it: the Python API (inference.Pipeline), the evaluator, the main job's
predict mode and the web demo.
- Items: an image (a path, PIL image, array, bytes or data.images.PreparedImage; for a video, the list of its
  frames with `frames` > 0) and a prompt. Every process is given the same items and loads (data/images.py) only the
  rows its devices hold; an image that cannot be read becomes that item's error, known on every process, never a
  dead job.
- Batches: at most `batch_size` items (rounded up to a multiple of the mesh's data x fsdp); a shorter last batch is
  padded with repeats of its last item to the smallest of `batch_sizes` that holds it (one compiled program per
  size). Prompts are padded to the tokenizers' length buckets, and the hosts agree on each batch's shapes
  (sharding.global_batch).
- Answers: beam search and greedy (iblip_jax.generate, token-exact with transformers), sampling with best-of-n
  (iblip_jax.sampling), one item streamed token by token, candidates ranked by log-likelihood in chunks of one shape
  (iblip_jax.rank). Results are gathered onto every process, in item order.
"""
import dataclasses
import logging
import threading
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from tqdm import tqdm

from iblip_jax import decoding, distributed, ranking, sampling, sharding
from iblip_jax.data import images, tokenize
from iblip_jax.decoding import Decoding
from iblip_jax.losses import IGNORE

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Item:
  """One image (or video: `image` lists its frames, `frames` of them are sampled) and one prompt."""
  image: Any
  prompt: str
  frames: int = 0


@dataclasses.dataclass(frozen=True)
class Answer:
  """text; tokens: the generated ids, EOS included when the answer ended by it; logprob: log p(tokens | image,
  prompt) under the model (raw logits, before penalties and temperature; NaN when not asked for)."""
  text: str
  tokens: tuple[int, ...]
  logprob: float

  def __str__(self) -> str:
    return self.text


@dataclasses.dataclass(frozen=True)
class Output:
  """One item's result: `answers` (generation: num_return_sequences of them, best first), `scores` (ranking: one
  log-likelihood per candidate), or `error` (why its image could not be read)."""
  answers: tuple[Answer, ...] = ()
  scores: tuple[float, ...] = ()
  error: str | None = None


@dataclasses.dataclass(frozen=True)
class Chunk:
  """One streamed token: `text` is the whole answer so far, `delta` what it added to the previous chunk's text."""
  token: int
  text: str
  delta: str


class Stream:
  """Iterate for Chunks as tokens are produced; afterwards `answer` holds the Answer (the plain call's).
  `on_answer(answer)`, if set before the end, is called with it (a conversation records the turn so)."""

  def __init__(self, steps: Iterator, finish: Callable):
    self._steps, self._finish = steps, finish
    self.answer: Answer | None = None
    self.on_answer: Callable[[Answer], None] | None = None

  def __iter__(self) -> Iterator[Chunk]:
    for item in self._steps:
      if isinstance(item, Chunk):
        yield item
      else:
        self.answer = self._finish(item)
        if self.on_answer is not None:
          self.on_answer(self.answer)

  def text(self) -> str:
    """Runs the stream to its end and returns the answer's text."""
    for _ in self:
      pass
    return self.answer.text


def single_device_mesh():
  return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])


class Engine:
  """Answers items with `model` and `params` (living on `mesh`; default: this process's first device) under the
  logical axis `rules`. `batch_size`: the largest global batch; `batch_sizes`: the smaller sizes a last batch may be
  padded to (default: none, every batch has batch_size rows). Calls are serialised (a server's threads share one)."""

  def __init__(self, model, params, tok: tokenize.Tokenizers, *, mesh=None, rules=(), batch_size: int = 8,
               batch_sizes: Sequence[int] = ()):
    self.model, self.params, self.tok = model, params, tok
    self.mesh, self.rules = mesh or single_device_mesh(), rules
    self.split = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    up = lambda n: -(-max(n, 1) // self.split) * self.split
    self.batch_size = up(batch_size)
    self.batch_sizes = tuple(sorted({up(b) for b in batch_sizes if b <= batch_size} | {self.batch_size}))
    self.image_size = model.config.vision.image_size
    self.lock = threading.RLock()

  # -- batches --

  def batches(self, items: Sequence[Item]) -> Iterator[tuple[int, int, list[Item]]]:
    """(first item's index, real items, the padded global batch) in order. A batch holds items of one shape: a run
    of images, or of videos (several images) with one frame count; a change of shape starts a new batch."""
    first = 0
    while first < len(items):
      end = first + 1
      while end < len(items) and end - first < self.batch_size and items[end].frames == items[first].frames:
        end += 1
      chunk = list(items[first:end])
      size = tokenize.bucket(len(chunk), self.batch_sizes)
      yield first, len(chunk), chunk + [chunk[-1]] * (size - len(chunk))
      first = end

  def inputs(self, chunk: Sequence[Item]) -> tuple[dict, list[str | None]]:
    """A padded global batch -> (the model's inputs as global arrays, per row the reason its image could not be
    read, or None). This process loads its rows only; the reasons are shared."""
    start, stop = sharding.process_rows(self.mesh, len(chunk))
    pixels, whys = [], {}
    for i in range(start, stop):
      item = chunk[i]
      try:
        pixels.append(images.pixels(item.image, self.image_size, frames=item.frames))
      except Exception as e:  # noqa: BLE001 - whatever a decoder raises is this record's problem, never the job's
        whys[i] = str(e) if isinstance(e, images.BadImage) else f"{type(e).__name__}: {str(e)[:200]}"
        pixels.append(None)
    blank = np.zeros(next((p.shape for p in pixels if p is not None), self._blank_shape(chunk[start])), np.float32)
    local = dict(pixel_values=np.stack([blank if p is None else p for p in pixels]),
                 **tokenize.encode_prompts(self.tok, [chunk[i].prompt for i in range(start, stop)]))
    shared = {}
    for part in distributed.gather_json({str(i): why for i, why in whys.items()}):
      shared.update(part)
    return sharding.global_batch(local, self.mesh), [shared.get(str(i)) for i in range(len(chunk))]

  def _blank_shape(self, item: Item) -> tuple[int, ...]:
    s = self.image_size
    return (item.frames, s, s, 3) if item.frames else (s, s, 3)

  def _progress(self, total: int, desc: str | None):
    return tqdm(total=total, desc=desc, unit="ex", dynamic_ncols=True,
                disable=not (desc and distributed.is_primary()))

  # -- generation --

  def generate(self, items: Sequence[Item], dec: Decoding, *, scores: bool = False,
               progress: str | None = None) -> list[Output]:
    """Each item's answers (num_return_sequences, best first); with `scores`, beam and greedy answers carry their
    log-probability too (a teacher-forced pass; sampling has it for free). `progress`: a progress bar's title."""
    out = []
    with self._progress(len(items), progress) as bar:
      for _, n, chunk in self.batches(items):
        inputs, whys = self.inputs(chunk)
        answers = self._answers(inputs, dec, scores=scores)
        out += [Output(error=why) if why else Output(answers=a) for a, why in zip(answers[:n], whys)]
        bar.update(n)
    return out

  def _answers(self, inputs: dict, dec: Decoding, *, scores: bool, on_token=None) -> list[tuple[Answer, ...]]:
    """One global batch -> per row, its num_return_sequences answers."""
    k = dec.num_return_sequences
    with self.lock, sharding.context(self.mesh, self.rules):
      if dec.sampling or on_token is not None:
        settings = self._loop_settings(dec)
        copies = settings["num_return_sequences"]
        arrays = sampling.decode(self.model, self.params, inputs, on_token=on_token, **settings)
        tokens, logprob, length = (distributed.gather(x) for x in arrays)
        s = sampling.Samples(tokens[:, :dec.max_new_tokens], logprob, length)
        if copies != k:
          s = sampling.best_of(s, copies, k, dec.length_penalty)
        tokens, logprob, length = s.tokens, s.logprob, s.length
      else:
        tokens = distributed.gather(decoding.generate(
            self.model, self.params, **inputs, num_beams=dec.beams, max_new_tokens=dec.max_new_tokens,
            min_new_tokens=dec.min_new_tokens, length_penalty=dec.length_penalty,
            repetition_penalty=dec.repetition_penalty, num_return_sequences=k))
        length = self._lengths(tokens)
        logprob = self._logprob(inputs, tokens, length, k) if scores else np.full(len(tokens), np.nan)
    texts = tokenize.decode(self.tok, tokens)
    answers = [Answer(t, tuple(int(x) for x in row[:n]), float(lp))
               for t, row, n, lp in zip(texts, tokens, length, logprob)]
    return [tuple(answers[i * k:(i + 1) * k]) for i in range(len(answers) // k)]

  def _loop_settings(self, dec: Decoding) -> dict:
    """sampling.decode's settings for `dec` (sampling, or greedy when streamed)."""
    return dict(max_new_tokens=dec.max_new_tokens, min_new_tokens=dec.min_new_tokens,
                temperature=dec.temperature or 1.0, top_k=dec.top_k, top_p=dec.top_p,
                repetition_penalty=dec.repetition_penalty,
                num_return_sequences=(dec.best_of or dec.num_return_sequences) if dec.sampling else 1, seed=dec.seed,
                greedy=not dec.sampling, width=tokenize.bucket(dec.max_new_tokens, tokenize.BUCKETS))

  def _lengths(self, tokens: np.ndarray) -> np.ndarray:
    """Generated tokens of each row: up to and including the first EOS, else all of them."""
    eos = tokens == self.model.config.text.eos_token_id
    return np.where(eos.any(1), eos.argmax(1) + 1, tokens.shape[1])

  def _logprob(self, inputs: dict, tokens: np.ndarray, length: np.ndarray, k: int) -> np.ndarray:
    """Each answer's log-likelihood, scored as ranking scores a candidate (teacher forcing)."""
    b = inputs["input_ids"].shape[0]
    labels = np.where(np.arange(tokens.shape[1])[None] < length[:, None], tokens, IGNORE).reshape(b, k, -1)
    start, stop = sharding.process_rows(self.mesh, b)
    labels = sharding.global_batch({"candidate_labels": labels[start:stop]}, self.mesh)["candidate_labels"]
    scores, _ = ranking.rank(self.model, self.params, **inputs, candidate_labels=labels)
    return distributed.gather(scores).reshape(-1)

  def stream(self, item: Item, dec: Decoding) -> Stream:
    """One item's answer token by token (greedy, or sampling): the same tokens as generate's."""
    (_, _, chunk), = self.batches([item])
    tokens: list[int] = []
    last = [""]

    def on_step(t, step_tokens, finished):
      del t
      if finished[0]:
        return None
      tokens.append(int(step_tokens[0]))
      text = self.decode(tokens)
      delta = text[len(last[0]):] if text.startswith(last[0]) else text
      last[0] = text
      return Chunk(tokens[-1], text, delta)

    def steps():
      # Here, on the consumer's thread: the image read and the program compiled (sampling.precompile says why);
      # the stream's own thread only runs it.
      inputs, whys = self.inputs(chunk)
      if whys[0]:
        raise images.BadImage(whys[0])
      with self.lock, sharding.context(self.mesh, self.rules):
        sampling.precompile(self.model, self.params, inputs, streamed=True, **self._loop_settings(dec))
      run = lambda on_token: self._answers(inputs, dec, scores=False, on_token=on_token)
      for step in sampling.stream(run):
        if isinstance(step, tuple):
          chunk_ = on_step(*step)
          if chunk_ is not None:
            yield chunk_
        else:
          yield step

    return Stream(steps(), lambda answers: answers[0][0])

  def decode(self, tokens: Sequence[int]) -> str:
    return tokenize.decode(self.tok, np.asarray([tokens], np.int64))[0]

  # -- ranking --

  def rank(self, items: Sequence[Item], candidates: Sequence[Sequence[str]], *, chunk: int = 0,
           normalize: bool = False, progress: str | None = None) -> list[Output]:
    """Each item's candidates (candidates[i], non-empty strings) scored by log-likelihood (summed over tokens, or
    their mean with `normalize`), `chunk` candidates per model call (0: all at once; the scores are the same)."""
    if len(candidates) != len(items):
      raise ValueError(f"{len(candidates)} candidate lists for {len(items)} items")
    out = []
    with self._progress(len(items), progress) as bar:
      for first, n, batch in self.batches(items):
        lists = [list(c) for c in candidates[first:first + n]]
        lists += [lists[-1]] * (len(batch) - n)
        inputs, whys = self.inputs(batch)
        scores = self._rank_chunked(inputs, lists, chunk, normalize)
        out += [Output(error=why) if why else Output(scores=tuple(float(x) for x in scores[j, :len(lists[j])]))
                for j, why in zip(range(n), whys)]
        bar.update(n)
    return out

  def _rank_chunked(self, inputs: dict, lists: list[list[str]], chunk: int, normalize: bool) -> np.ndarray:
    """Scores (B, num_chunks x size) of a global batch's candidate lists: iblip_jax.rank on each chunk of `size`
    candidates, concatenated. Every chunk has the same shape (the last is padded with ignored candidates), so one
    program serves them all; every process knows every list, so all agree on the number of calls."""
    size = chunk or max(len(x) for x in lists)
    start, stop = sharding.process_rows(self.mesh, len(lists))
    out = []
    with self.lock, sharding.context(self.mesh, self.rules):
      for c in range(-(-max(len(x) for x in lists) // size)):
        labels = _chunk_labels(self.tok, lists[start:stop], c * size, size)
        labels = sharding.global_batch({"candidate_labels": labels}, self.mesh)["candidate_labels"]
        scores, _ = ranking.rank(self.model, self.params, **inputs, candidate_labels=labels, normalize=normalize)
        out.append(distributed.gather(scores))
    return np.concatenate(out, axis=1)


def _chunk_labels(tok: tokenize.Tokenizers, lists: Sequence[Sequence[str]], start: int, size: int) -> np.ndarray:
  """(B, size, N) labels of candidates [start, start + size) of each row, IGNORE where a row has fewer (those
  scores are never read)."""
  parts = [list(x[start:start + size]) for x in lists]
  labels = tokenize.encode_candidates(tok, [p or [""] for p in parts])
  for i, p in enumerate(parts):
    if not p:
      labels[i] = IGNORE
  return np.pad(labels, [(0, 0), (0, size - labels.shape[1]), (0, 0)], constant_values=IGNORE)
