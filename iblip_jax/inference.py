"""One call from images and instructions to answers, for people: `Pipeline`.

    pipe = iblip_jax.Pipeline.from_pretrained("demo_assets/instructblip-demo")   # or a training workdir
    pipe("photo.jpg", "What is unusual about this image?")                      # -> "..."
    pipe(["a.jpg", "b.jpg"], "A short image caption:", num_beams=1)            # -> ["...", "..."]
    pipe("photo.jpg", "Describe it.", do_sample=True, top_p=0.9, num_return_sequences=3, seed=1)
    for chunk in pipe.stream("photo.jpg", "Describe it."): print(chunk.delta, end="", flush=True)
    pipe.rank("photo.jpg", "What colour is the car?", ["red", "blue", "green"]).best
    chat = pipe.chat("photo.jpg"); chat.ask("What is it?"); chat.ask("What colour is it?")
    pipe.attention_overlay("photo.jpg", ["What colour is the car?", "Where is the dog?"], path="maps.png")

What it does with the inputs:
- Images: PIL images, paths or uint8 arrays (prepare() checks and preprocesses them once: an unreadable, animated,
  CMYK or huge image gets a clear message, see load_image). One image with several prompts, several images with one
  prompt, or one prompt per image.
- Shapes: items go through in batches padded to a few sizes (BATCH_BUCKETS, up to max_batch) and prompts to the
  tokenizers' length buckets, and sampling compiles per token budget bucket, so a session compiles a handful of
  programs and reuses them.
- Decoding (Decoding): beam search and greedy go to iblip_jax.generate (token-exact with transformers); do_sample
  goes to iblip_jax.sampling (temperature, top-k, top-p, seeds, best-of-n); defaults are LAVIS's (5 beams,
  repetition penalty 1.5, up to 30 tokens).
- Multi-turn: a Conversation renders earlier questions and answers into the prompt (see Conversation).
- A workdir (training output) answers with its latest checkpoint: the model from its config.json's model_init and
  the trainable weights restored as the main job's predict mode does (iblip_jax.run.restore).

`python -m iblip_jax.inference --model DIR --image photo.jpg "What is it?"` streams an answer on the terminal;
`--chat` then reads follow-up questions.
"""
import argparse
import dataclasses
import json
import logging
import os
import sys
import threading
import types
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from iblip_jax import attention_maps as maps_lib
from iblip_jax import decoding, pretrained, ranking, sampling, sharding
from iblip_jax.data import preprocess, readers, tokenize
from iblip_jax.errors import UserError

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MAX_PIXELS = 64_000_000       # a larger image is refused before it is decoded (a decompression bomb is much larger)


class BadInput(UserError):
  """An image or a prompt the pipeline cannot use; the message says which and why."""


# --- images --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PreparedImage:
  """An image checked and preprocessed for the model: `image` (RGB, for drawing), `pixels` (S, S, 3) normalised,
  `notes` (what was done to it that a person should know, e.g. "animated GIF: the first of 12 frames is used")."""
  image: Image.Image
  pixels: np.ndarray
  notes: tuple[str, ...] = ()


def _describe(source) -> str:
  return repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else type(source).__name__


def load_image(source, *, max_pixels: int = MAX_PIXELS,
               name: str | None = None) -> tuple[Image.Image, tuple[str, ...]]:
  """A path, PIL image, uint8/uint16 array or bytes -> (RGB PIL image, notes). BadInput names the problem (and the
  image, as `name` or its path): no such file, not an image, an image too large (checked from the header, before
  decoding), a file that does not decode."""
  notes = []
  what = name or _describe(source)
  if isinstance(source, np.ndarray):
    try:
      return preprocess.to_rgb(source), ()
    except ValueError as e:
      raise BadInput(f"{what}: {e}") from None
  if isinstance(source, (bytes, bytearray)):
    import io
    source = io.BytesIO(source)
  elif isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
    raise BadInput(f"{what}: no such image file")
  try:
    image = source if isinstance(source, Image.Image) else Image.open(source)
  except UnidentifiedImageError:
    raise BadInput(f"{what}: not an image (PIL recognises no image format in it); upload a JPEG, PNG, WebP, GIF or "
                   "BMP file") from None
  except Image.DecompressionBombError as e:
    raise BadInput(f"{what}: refused as too large ({e})") from None
  except OSError as e:
    raise BadInput(f"{what}: cannot be read ({e})") from None
  w, h = image.size
  if w * h > max_pixels:
    raise BadInput(f"{what}: the image is {w} x {h} pixels ({w * h / 1e6:.0f} megapixels), more than the "
                   f"{max_pixels / 1e6:.0f} megapixels accepted; scale it down first")
  if w < 1 or h < 1:
    raise BadInput(f"{what}: the image is empty ({w} x {h} pixels)")
  frames = getattr(image, "n_frames", 1)
  if frames > 1:
    image.seek(0)
    notes.append(f"animated image: the first of its {frames} frames is used")
  if image.mode == "CMYK":
    notes.append("CMYK image: converted to RGB (printing colours may look different on screen)")
  try:
    image.load()
    rgb = preprocess.to_rgb(image)
  except (OSError, ValueError, SyntaxError) as e:
    raise BadInput(f"{what}: the image data cannot be decoded ({type(e).__name__}: {e})") from None
  return rgb, tuple(notes)


def prepare(source, size: int, *, max_pixels: int = MAX_PIXELS, name: str | None = None) -> PreparedImage:
  """load_image + the model's preprocessing (square bicubic resize to `size`, CLIP normalisation)."""
  if isinstance(source, PreparedImage):
    if source.pixels.shape[0] != size:
      return PreparedImage(source.image, preprocess.preprocess_image(source.image, size), source.notes)
    return source
  image, notes = load_image(source, max_pixels=max_pixels, name=name)
  for note in notes:
    log.warning("%s: %s", name or _describe(source), note)
  return PreparedImage(image, preprocess.preprocess_image(image, size), notes)


# --- prompts -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Conversation:
  """Questions and answers about one image, ending with the question to answer: turns = (q1, a1, q2, a2, ..., qn).

  Rendered as the instruction data renders LLaVA-Instruct's human turns (readers.read_llava_instruct: the text
  with any <image> tag removed, stripped), with the earlier exchanges in front in the turn format of the project's
  one multi-turn source, Visual Dialog ("q: ... a: ...", readers.read_visdial; its zero-shot prompt's "Dialog
  history: ...\\n Question: ..."), without Visual Dialog's "Short answer:" so that answers can be long. A one-turn
  conversation is exactly its question. The prompt is truncated on the left like every instruction, so the newest
  question always survives."""
  turns: tuple[str, ...]

  def __post_init__(self):
    if not self.turns or len(self.turns) % 2 == 0:
      raise BadInput(f"a conversation alternates question, answer, ..., and ends with a question; got "
                     f"{len(self.turns)} turns")

  @classmethod
  def from_llava(cls, conversation: Sequence[dict]) -> "Conversation":
    """LLaVA-Instruct's format: [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}, ...,
    {"from": "human", ...}] (a final gpt turn, as in the dataset's files, is dropped: it is what is asked for)."""
    turns = list(conversation)
    if turns and turns[-1].get("from") == "gpt":
      turns = turns[:-1]
    if not turns or turns[-1].get("from") != "human":
      raise BadInput("a LLaVA conversation must end with a human turn (the question to answer)")
    exchanges = readers._llava_exchanges(turns[:-1], "conversation", "history") if len(turns) > 1 else []
    last = readers._llava_exchanges([turns[-1], {"from": "gpt", "value": ""}], "conversation", "last turn")[0][0]
    return cls(tuple(t for qa in exchanges for t in qa) + (last,))

  def then(self, answer: str, question: str) -> "Conversation":
    """This conversation answered with `answer`, followed by `question`."""
    return Conversation(self.turns + (answer, question))

  def render(self) -> str:
    question = _human(self.turns[-1])
    if len(self.turns) == 1:
      return question
    history = " ".join(f"q: {_human(q)} a: {a.strip()}" for q, a in zip(self.turns[:-1:2], self.turns[1::2]))
    return f"Dialog history: {history}\n Question: {question}"


def _human(text: str) -> str:
  """A human turn as the LLaVA reader renders it."""
  return text.replace("<image>", "").strip()


def _prompt(prompt) -> str:
  text = prompt.render() if isinstance(prompt, Conversation) else prompt
  if not isinstance(text, str):
    raise BadInput(f"a prompt is a string or a Conversation, got {type(prompt).__name__}")
  if not text.strip():
    raise BadInput("the prompt is empty: type an instruction or a question about the image")
  return text


# --- decoding settings and results ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Decoding:
  """How answers are produced. Without do_sample: beam search (num_beams > 1) or greedy (num_beams=1), through
  iblip_jax.generate. With do_sample: temperature, top_k (0 = off), top_p (1 = off), one seed for the call (an
  item's samples depend on the seed and the item only), best_of samples per answer of which the
  num_return_sequences likeliest (log-probability / length ** length_penalty) are returned. do_sample with
  temperature 0 is greedy. Lengths count generated tokens (EOS included); LAVIS's defaults otherwise."""
  do_sample: bool = False
  num_beams: int | None = None       # None: 5 for beam search (LAVIS), 1 when sampling or streaming
  max_new_tokens: int = 30
  min_new_tokens: int = 1
  length_penalty: float = 1.0
  repetition_penalty: float = 1.5
  temperature: float = 1.0
  top_k: int = 50
  top_p: float = 1.0
  num_return_sequences: int = 1
  best_of: int | None = None
  seed: int = 0

  @property
  def sampling(self) -> bool:
    return self.do_sample and self.temperature != 0

  @property
  def beams(self) -> int:
    return (1 if self.do_sample else 5) if self.num_beams is None else self.num_beams

  def checked(self) -> "Decoding":
    """self, or BadInput naming the setting that cannot work."""
    problems = []
    if self.sampling and self.beams != 1:
      problems.append(f"num_beams={self.num_beams} with do_sample: beam sampling is not supported; use num_beams=1")
    if self.beams < 1:
      problems.append(f"num_beams={self.num_beams} must be >= 1")
    if self.best_of is not None and not self.sampling:
      problems.append("best_of needs do_sample=True (beam search already returns its best)")
    if self.best_of is not None and self.best_of < self.num_return_sequences:
      problems.append(f"best_of={self.best_of} must be >= num_return_sequences={self.num_return_sequences}")
    if not self.sampling and not 1 <= self.num_return_sequences <= self.beams:
      problems.append(f"num_return_sequences={self.num_return_sequences} must be between 1 and num_beams="
                      f"{self.beams} (or sample: do_sample=True)")
    if self.temperature < 0:
      problems.append(f"temperature={self.temperature} must be >= 0")
    try:
      sampling.check(max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens,
                     temperature=self.temperature or 1.0, top_k=self.top_k, top_p=self.top_p,
                     repetition_penalty=self.repetition_penalty, num_return_sequences=self.num_return_sequences)
    except ValueError as e:
      problems.append(str(e))
    if problems:
      raise BadInput("decoding settings: " + "; ".join(problems))
    return self


def decoding_of(settings: dict) -> Decoding:
  """Decoding(**settings).checked(), with an unknown setting named rather than a TypeError."""
  known = {f.name for f in dataclasses.fields(Decoding)}
  unknown = sorted(set(settings) - known)
  if unknown:
    raise BadInput(f"unknown decoding settings {unknown}; known: {', '.join(sorted(known))}")
  return Decoding(**settings).checked()


@dataclasses.dataclass(frozen=True)
class Answer:
  """text; tokens: the generated ids, EOS included when the answer ended by it; logprob: log p(tokens | image,
  prompt) under the model (raw logits, before penalties and temperature)."""
  text: str
  tokens: tuple[int, ...]
  logprob: float

  def __str__(self) -> str:
    return self.text


@dataclasses.dataclass(frozen=True)
class Ranking:
  """Candidates scored by log-likelihood: `best` is candidates[index]; scores in candidate order."""
  best: str
  index: int
  scores: tuple[float, ...]
  candidates: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Chunk:
  """One streamed token: `text` is the whole answer so far, `delta` what it added to the previous chunk's text."""
  token: int
  text: str
  delta: str


class Stream:
  """Iterate for Chunks as tokens are produced; afterwards `answer` holds the Answer (the same as the call without
  streaming would return)."""

  def __init__(self, steps: Iterator, finish):
    self._steps, self._finish = steps, finish
    self.answer: Answer | None = None

  def __iter__(self) -> Iterator[Chunk]:
    for item in self._steps:
      if isinstance(item, Chunk):
        yield item
      else:
        self.answer = self._finish(item)

  def text(self) -> str:
    """Runs the stream to its end and returns the answer's text."""
    for _ in self:
      pass
    return self.answer.text


# --- the pipeline --------------------------------------------------------------------------------------------------


def _single_device_mesh():
  return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])


def _onto_one_device(params):
  """Leaf by leaf through host memory (one leaf's copy at a time): jax.device_put of an array sharded over a mesh
  keeps that mesh in the array's type (jax 0.10), and tracing under the one-device mesh then fails with
  "use_abstract_mesh cannot change the size of the mesh"."""
  device = jax.local_devices()[0]
  return jax.tree.map(lambda x: jax.device_put(np.asarray(x), device), params)


def _is_workdir(path: str) -> bool:
  """A training workdir has checkpoints/ or a config.json written by the main job (a Hugging Face directory's
  config.json has "model_type" instead)."""
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return True
  try:
    with open(os.path.join(path, "config.json")) as f:
      return "model_init" in json.load(f)
  except (OSError, ValueError):
    return False


def _near(path: str, workdir: str) -> str:
  """A relative path of a workdir's config: as given (the training job's working directory was probably this one),
  else relative to the workdir or one of its parents."""
  if not path or os.path.isabs(path) or os.path.exists(path):
    return path
  base = os.path.abspath(workdir)
  while True:
    if os.path.exists(os.path.join(base, path)):
      return os.path.join(base, path)
    if os.path.dirname(base) == base:
      return path
    base = os.path.dirname(base)


def _restore_workdir(workdir: str, dtype, model_init: str | None, tokenizer: str | None):
  """(model, params, tokenizers, step) from a training workdir, through the main job's own restore path."""
  import ml_collections
  from iblip_jax import checkpoints
  from iblip_jax.run import common, restore, settings
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"{workdir}: a workdir without config.json (the main job writes it when training starts)")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.model_init = model_init or _near(config.model_init, workdir)
  config.tokenizer = tokenizer or _near(config.get("tokenizer", ""), workdir)
  # the training layout over this host's devices, as predict mode uses it
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
  if dtype is not None:
    config.model.vision.dtype = config.model.text.dtype = jnp.dtype(dtype).name
  s = settings.resolve(config, workdir, "predict")
  if not checkpoints.directory(workdir).exists():
    raise UserError(f"{workdir}: no checkpoints/ (nothing trained to answer with); to answer with the pretrained "
                    f"weights, load {config.model_init!r} itself")
  model, params, step, _, _ = restore.inference_state(s)
  if not step:
    raise UserError(f"{workdir}: no readable checkpoint (see the warnings above)")
  model, tok = common.load_tokenizers(s, model)
  return model, params, tok, step


class Pipeline:
  """Images and instructions in, answers out (see the module docstring). Thread-safe: one request at a time runs on
  the devices."""

  def __init__(self, model, params, tokenizers: tokenize.Tokenizers, *, mesh=None, rules=(), max_batch: int = 8,
               source: str = ""):
    self.model, self.params, self.tok = model, params, tokenizers
    self.mesh = mesh or _single_device_mesh()
    self.rules = rules
    self.split = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    self.max_batch = max(max_batch, self.split)
    self.source = source
    self.image_size = model.config.vision.image_size
    self._lock = threading.Lock()

  @classmethod
  def from_pretrained(cls, path: str, dtype=None, *, mesh=None, rules=(), max_batch: int = 8,
                      model_init: str | None = None, tokenizer: str | None = None) -> "Pipeline":
    """A Hugging Face InstructBLIP directory (its tokenizers with it, the Q-Former's in qformer_tokenizer/), or a
    training workdir (config.json + checkpoints/: the latest checkpoint's trainable weights on the pretrained model
    its config names; `model_init` / `tokenizer` replace the config's paths when they have moved). `dtype`: the
    frozen towers' dtype (default float32; bfloat16 for TPU/GPU). The model lives on one device, or on `mesh`
    (sharded by `rules`) for an HF directory too large for one."""
    if not os.path.isdir(path):
      raise UserError(f"{path}: not a directory (expected a Hugging Face InstructBLIP directory or a training "
                      "workdir)")
    from iblip_jax.run import common
    if _is_workdir(path):
      model, params, tok, step = _restore_workdir(path, dtype, model_init, tokenizer)
      if mesh is None:   # restored in the training layout; gathered onto one device for interactive use
        params = _onto_one_device(params)
      log.info("answering with %s at step %d", path, step)
    else:
      model, params = pretrained.from_pretrained(path, jnp.float32 if dtype is None else dtype, mesh=mesh,
                                                 rules=rules)
      # the same tokenizer checks as the main job's (its settings are only read for .tokenizer)
      model, tok = common.load_tokenizers(types.SimpleNamespace(tokenizer=tokenizer or path), model)
    return cls(model, params, tok, mesh=mesh, rules=rules, max_batch=max_batch, source=path)

  # -- inputs --

  def prepare(self, image, name: str | None = None) -> PreparedImage:
    """Checks and preprocesses an image once, for several calls (load_image's messages, naming it `name`)."""
    return prepare(image, self.image_size, name=name)

  def _items(self, images, prompts) -> tuple[list[tuple[PreparedImage, str]], bool]:
    """-> ([(image, prompt text)], whether the call was for a single item)."""
    one_image = not isinstance(images, (list, tuple)) and not (isinstance(images, np.ndarray) and images.ndim == 4)
    one_prompt = isinstance(prompts, (str, Conversation))
    images = [images] if one_image else list(images)
    prompts = [prompts] if one_prompt else list(prompts)
    if not images or not prompts:
      raise BadInput("no images or no prompts")
    if len(images) != len(prompts) and 1 not in (len(images), len(prompts)):
      raise BadInput(f"{len(images)} images and {len(prompts)} prompts: give one prompt, one image, or one prompt "
                     "per image")
    texts = [_prompt(p) for p in prompts]
    prepared = [self.prepare(x) for x in images]
    n = max(len(prepared), len(texts))
    items = [(prepared[i if len(prepared) > 1 else 0], texts[i if len(texts) > 1 else 0]) for i in range(n)]
    return items, one_image and one_prompt

  def _batches(self, items):
    """Chunks of at most max_batch items, each padded to a batch bucket (a multiple of the mesh's batch split) with
    repeats of its last item -> (number of real items, padded chunk)."""
    for first in range(0, len(items), self.max_batch):
      chunk = items[first:first + self.max_batch]
      size = tokenize.bucket(len(chunk), [b for b in BATCH_BUCKETS if b % self.split == 0] or [self.split])
      yield len(chunk), chunk + [chunk[-1]] * (size - len(chunk))

  def _inputs(self, chunk) -> dict:
    local = dict(pixel_values=np.stack([img.pixels for img, _ in chunk]),
                 **tokenize.encode_prompts(self.tok, [p for _, p in chunk]))
    return sharding.global_batch(local, self.mesh)

  # -- answers --

  def __call__(self, images, prompts, *, details: bool = False, **decoding_settings):
    """Answers: a str per item (details=True: an Answer with tokens and log-probability), a list of
    num_return_sequences of them when that is > 1; one result for one image and one prompt, else a list."""
    items, single = self._items(images, prompts)
    dec = decoding_of(decoding_settings)
    results = []
    for n, chunk in self._batches(items):
      results += self._answer(chunk, dec, scores=details)[:n]
    out = [[a if details else a.text for a in r] for r in results]
    out = [r[0] if dec.num_return_sequences == 1 else r for r in out]
    return out[0] if single else out

  def _answers(self, tokens: np.ndarray, logprob, length) -> list[Answer]:
    texts = tokenize.decode(self.tok, tokens)
    return [Answer(t, tuple(int(x) for x in row[:n]), float(lp))
            for t, row, n, lp in zip(texts, tokens, length, logprob)]

  def _lengths(self, tokens: np.ndarray) -> np.ndarray:
    """Generated tokens of each row: up to and including the first EOS, else all of them."""
    eos = tokens == self.model.config.text.eos_token_id
    return np.where(eos.any(1), eos.argmax(1) + 1, tokens.shape[1])

  def _answer(self, chunk, dec: Decoding, on_token=None, scores: bool = True) -> list[list[Answer]]:
    """One padded chunk -> per item, its num_return_sequences answers (beam search and greedy: with their
    log-probabilities only if `scores`, which costs a teacher-forced pass; sampling has them for free)."""
    inputs = self._inputs(chunk)
    k = dec.num_return_sequences
    with self._lock, sharding.context(self.mesh, self.rules):
      if dec.sampling or on_token is not None:
        copies = (dec.best_of or k) if dec.sampling else 1
        s = sampling.sample(self.model, self.params, **inputs, max_new_tokens=dec.max_new_tokens,
                            min_new_tokens=dec.min_new_tokens, temperature=dec.temperature or 1.0, top_k=dec.top_k,
                            top_p=dec.top_p, repetition_penalty=dec.repetition_penalty, num_return_sequences=copies,
                            seed=dec.seed, greedy=not dec.sampling,
                            width=tokenize.bucket(dec.max_new_tokens, tokenize.BUCKETS), on_token=on_token)
        if copies != k:
          s = sampling.best_of(s, copies, k, dec.length_penalty)
        answers = self._answers(s.tokens, s.logprob, s.length)
      else:
        tokens = np.asarray(jax.device_get(decoding.generate(
            self.model, self.params, **inputs, num_beams=dec.beams, max_new_tokens=dec.max_new_tokens,
            min_new_tokens=dec.min_new_tokens, length_penalty=dec.length_penalty,
            repetition_penalty=dec.repetition_penalty, num_return_sequences=k)))
        length = self._lengths(tokens)
        logprob = self._logprob(inputs, tokens, length, k) if scores else np.full(len(tokens), np.nan)
        answers = self._answers(tokens, logprob, length)
    return [answers[i * k:(i + 1) * k] for i in range(len(chunk))]

  def _logprob(self, inputs: dict, tokens: np.ndarray, length: np.ndarray, k: int) -> np.ndarray:
    """Each answer's log-likelihood, scored as ranking scores a candidate (teacher forcing)."""
    b = inputs["input_ids"].shape[0]
    labels = np.where(np.arange(tokens.shape[1])[None] < length[:, None], tokens, tokenize.IGNORE)
    scores, _ = ranking.rank(self.model, self.params, **inputs, candidate_labels=labels.reshape(b, k, -1))
    return np.asarray(jax.device_get(scores)).reshape(-1)

  def stream(self, image, prompt, **decoding_settings) -> Stream:
    """Streams the answer to one image and one prompt token by token (greedy, or sampling with do_sample): the
    same tokens as the call without streaming. Beam search only knows its answer at the end: no streaming."""
    dec = decoding_of({"num_beams": 1, **decoding_settings})   # greedy unless told otherwise
    if dec.beams != 1 or dec.num_return_sequences != 1 or (dec.best_of or 1) != 1:
      raise BadInput("streaming shows one answer as it is produced: use num_beams=1 (greedy) or do_sample=True, "
                     "with num_return_sequences=1 and no best_of")
    items, single = self._items(image, prompt)
    if not single:
      raise BadInput("stream() takes one image and one prompt")
    (_, chunk), = self._batches(items)
    tokens: list[int] = []
    last_text = [""]

    def on_step(t, step_tokens, finished):
      if finished[0]:
        return None
      tokens.append(int(step_tokens[0]))
      text = self.decode(tokens)
      delta = text[len(last_text[0]):] if text.startswith(last_text[0]) else text
      last_text[0] = text
      return Chunk(tokens[-1], text, delta)

    def steps():
      for item in sampling.stream(lambda on_token: self._answer(chunk, dec, on_token)):
        if isinstance(item, tuple):
          out = on_step(*item)
          if out is not None:
            yield out
        else:
          yield item

    return Stream(steps(), lambda answers: answers[0][0])

  def decode(self, tokens) -> str:
    return tokenize.decode(self.tok, np.asarray([tokens], np.int64))[0]

  # -- ranking, chat, attention maps --

  def rank(self, images, prompts, candidates: Sequence, *, normalize: bool = False):
    """Scores each candidate answer by its log-likelihood (multiple choice). candidates: one list for every item,
    or one list per item. Returns a Ranking per item (one for one image and one prompt)."""
    items, single = self._items(images, prompts)
    per_item = candidates and not isinstance(candidates[0], str)
    lists = [list(c) for c in candidates] if per_item else [list(candidates)] * len(items)
    if len(lists) != len(items):
      raise BadInput(f"{len(lists)} candidate lists for {len(items)} items")
    if any(not c or any(not isinstance(x, str) or not x.strip() for x in c) for c in lists):
      raise BadInput("every item needs at least one candidate, and candidates are non-empty strings")
    out, first = [], 0
    for n, chunk in self._batches(items):
      cands = lists[first:first + n] + [lists[first + n - 1]] * (len(chunk) - n)
      inputs = self._inputs(chunk)
      inputs["candidate_labels"] = sharding.global_batch(
          {"candidate_labels": tokenize.encode_candidates(self.tok, cands)}, self.mesh)["candidate_labels"]
      with self._lock, sharding.context(self.mesh, self.rules):
        scores = np.asarray(jax.device_get(ranking.rank(self.model, self.params, **inputs, normalize=normalize)[0]))
      for i in range(n):
        s = scores[i, :len(cands[i])]   # padding candidates (all ignored) score 0 and must never win
        best = int(np.argmax(s))
        out.append(Ranking(cands[i][best], best, tuple(float(x) for x in s), tuple(cands[i])))
      first += n
    return out[0] if single else out

  def chat(self, image, **decoding_settings) -> "Chat":
    """A conversation about one image: chat.ask(question) answers with the earlier turns in the prompt."""
    return Chat(self, self.prepare(image), decoding_settings)

  def attention_maps(self, image, prompts, answers: Sequence[str] | None = None,
                     **decoding_settings) -> list[maps_lib.AttentionMaps]:
    """The Q-Former's cross-attention and the answer-relevance map (iblip_jax.attention_maps) of one image under
    each prompt; `answers` default to the pipeline's own answers with `decoding_settings`."""
    prepared = self.prepare(image)
    prompts = [prompts] if isinstance(prompts, (str, Conversation)) else list(prompts)
    if answers is None:
      answers = self(prepared, prompts, **decoding_settings)
    if len(answers) != len(prompts):
      raise BadInput(f"{len(answers)} answers for {len(prompts)} prompts")
    texts = [_prompt(p) for p in prompts]
    with self._lock:
      maps = maps_lib.compute(self.model, self.params, self.tok, np.stack([prepared.pixels] * len(texts)),
                              texts, [str(a) for a in answers])
    return maps

  def attention_overlay(self, image, prompts, answers: Sequence[str] | None = None, *, path: str | None = None,
                        per_layer: bool = False, **decoding_settings) -> Image.Image:
    """attention_maps drawn over the image, one column per prompt (PNG written to `path` if given)."""
    prepared = self.prepare(image)
    png = maps_lib.render(prepared.image, self.attention_maps(prepared, prompts, answers, **decoding_settings),
                          per_layer=per_layer)
    if path:
      with open(path, "wb") as f:
        f.write(png)
    import io
    return Image.open(io.BytesIO(png))


class Chat:
  """A conversation about one image (Pipeline.chat): ask() and stream() put the earlier turns into the prompt and
  record the answer."""

  def __init__(self, pipe: Pipeline, image: PreparedImage, decoding_settings: dict):
    self.pipe, self.image, self.settings = pipe, image, dict(decoding_settings)
    self.turns: list[str] = []

  def _conversation(self, question: str) -> Conversation:
    _prompt(question)
    return Conversation(tuple(self.turns) + (question,))

  def ask(self, question: str, **decoding_settings) -> str:
    answer = self.pipe(self.image, self._conversation(question), **{**self.settings, **decoding_settings})
    self.turns += [question, answer if isinstance(answer, str) else answer[0]]
    return self.turns[-1]

  def stream(self, question: str, **decoding_settings) -> Stream:
    stream = self.pipe.stream(self.image, self._conversation(question), **{**self.settings, **decoding_settings})
    finish = stream._finish

    def record(item):
      answer = finish(item)
      self.turns += [question, answer.text]
      return answer
    stream._finish = record
    return stream

  def reset(self) -> None:
    self.turns.clear()


# --- command line --------------------------------------------------------------------------------------------------


def _args(argv):
  p = argparse.ArgumentParser(prog="python -m iblip_jax.inference", description=(
      "Answer an instruction about an image, streaming the answer; --chat then reads follow-up questions."))
  p.add_argument("prompt", nargs="?", default="A short image description:")
  p.add_argument("--model", required=True, help="a Hugging Face InstructBLIP directory or a training workdir")
  p.add_argument("--image", required=True)
  p.add_argument("--dtype", default=None, help="frozen towers' dtype (float32, bfloat16)")
  p.add_argument("--chat", action="store_true", help="keep asking follow-up questions (an empty line ends)")
  p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=50)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--max-new-tokens", type=int, default=30)
  p.add_argument("--repetition-penalty", type=float, default=1.5)
  p.add_argument("--attention-maps", default="", help="also write the attention overlay PNG here")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = _args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  settings = dict(do_sample=args.sample, num_beams=1, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, max_new_tokens=args.max_new_tokens,
                  repetition_penalty=args.repetition_penalty)
  try:
    pipe = Pipeline.from_pretrained(args.model, args.dtype)
    chat = pipe.chat(args.image, **settings)
    question = args.prompt
    while question:
      for chunk in chat.stream(question):
        print(chunk.delta, end="", flush=True)
      print(flush=True)
      if args.attention_maps:
        pipe.attention_overlay(chat.image, [question], [chat.turns[-1]], path=args.attention_maps)
        print(f"(attention overlay: {args.attention_maps})", file=sys.stderr)
      if not args.chat:
        break
      try:
        question = input("> ").strip()
      except EOFError:
        break
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
