"""`Pipeline`: one call from images and instructions to answers, for people, over the inference engine.

    pipe = iblip_jax.Pipeline.from_pretrained("demo_assets/instructblip-demo")   # or a training workdir
    pipe("photo.jpg", "What is unusual about this image?")                      # -> "..."
    pipe(["a.jpg", "b.jpg"], "A short image caption:", num_beams=1)            # -> ["...", "..."]
    pipe("photo.jpg", "Describe it.", do_sample=True, top_p=0.9, num_return_sequences=3, seed=1)
    for chunk in pipe.stream("photo.jpg", "Describe it."): print(chunk.delta, end="", flush=True)
    for row in pipe.annotate(paths_or_images, ["A short caption:", "What is shown?"]): ...   # lazy, in batches
    pipe.rank("photo.jpg", "What colour is the car?", ["red", "blue", "green"]).best
    chat = pipe.chat("photo.jpg"); chat.ask("What is it?"); chat.ask("What colour is it?")
    pipe.attention_overlay("photo.jpg", ["What colour is the car?", "Where is the dog?"], path="maps.png")

- Images: PIL images, paths, uint8 arrays or bytes, checked and preprocessed once (data/images.py: an unreadable,
  animated, CMYK or huge image gets a clear message). One image with several prompts, several images with one
  prompt, or one prompt per image.
- Shapes: items go through in batches padded to a few sizes (BATCH_BUCKETS, up to max_batch) and prompts to the
  tokenizers' length buckets, so a session compiles a handful of programs and reuses them (iblip_jax.engine).
- Decoding (iblip_jax.decoding.Decoding): LAVIS's defaults, 5 beams, repetition penalty 1.5, up to 30 tokens;
  greedy with num_beams=1; sampling with do_sample (temperature, top-k, top-p, seed, best-of-n).
- Multi-turn: a Conversation renders earlier questions and answers into the prompt (data/conversation.py).
- A workdir (training output) answers with its latest checkpoint, restored as the main job's predict mode does
  (iblip_jax.run.restore.from_workdir).
"""
import dataclasses
import io
import itertools
import logging
import os
from concurrent import futures
from typing import Iterable, Iterator, Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image

from iblip_jax import attention_maps as maps_lib
from iblip_jax import hf
from iblip_jax.data import images as images_lib
from iblip_jax.data import tokenize, video_files
from iblip_jax.data.conversation import Conversation, prompt_text
from iblip_jax.decoding import Decoding
from iblip_jax.engine import Engine, Item, Stream
from iblip_jax.errors import BadInput
from iblip_jax.inference.chat import Chat
from iblip_jax.run import restore

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclasses.dataclass(frozen=True)
class Ranking:
  """Candidates scored by log-likelihood: `best` is candidates[index]; scores in candidate order."""
  best: str
  index: int
  scores: tuple[float, ...]
  candidates: tuple[str, ...]


class Images(tuple):
  """Several images for one prompt: pipe(Images(before, after), "What changed between these two pictures?"). Each
  goes through the ViT and the instruction-aware Q-Former; their query outputs are concatenated in order before the
  prompt, as a video's frames are (LAVIS #318). The released weights were trained on one image per example, so this
  is zero-shot use."""

  def __new__(cls, *images):
    if not images:
      raise BadInput("Images() needs at least one image")
    return super().__new__(cls, images)


class Pipeline:
  """Images and instructions in, answers out (see the module docstring). Thread-safe: one request at a time runs on
  the devices."""

  def __init__(self, model, params, tokenizers, *, mesh=None, rules=(), max_batch: int = 8, source: str = ""):
    self.engine = Engine(model, params, tokenizers, mesh=mesh, rules=rules, batch_size=max_batch,
                         batch_sizes=BATCH_BUCKETS)
    self.source = source

  model = property(lambda self: self.engine.model)
  params = property(lambda self: self.engine.params)
  tok = property(lambda self: self.engine.tok)
  image_size = property(lambda self: self.engine.image_size)

  @classmethod
  def from_pretrained(cls, path: str, dtype=None, *, mesh=None, rules=(), max_batch: int = 8,
                      model_init: str | None = None, tokenizer: str | None = None,
                      adapter: str | None = None, quantize: str | dict | None = None) -> "Pipeline":
    """A Hugging Face InstructBLIP directory (its tokenizers with it, the Q-Former's in qformer_tokenizer/), or a
    training workdir (config.json + checkpoints/: the latest checkpoint's trainable weights on the pretrained model
    its config names; `model_init` / `tokenizer` replace the config's paths when they have moved). `dtype`: the
    frozen towers' dtype (default float32; bfloat16 for TPU/GPU). The model lives on one device, or on `mesh`
    (sharded by `rules`). `adapter`: a PEFT LoRA directory applied on top of a Hugging Face directory's model.
    `quantize`: "int8" / "int4" frozen towers (or {"vision": ..., "text": ...}), quantised as they load."""
    if not os.path.isdir(path):
      raise BadInput(f"{path}: not a directory (expected a Hugging Face InstructBLIP directory or a training "
                     "workdir)")
    if restore.is_workdir(path):
      if adapter or quantize:
        raise BadInput(f"{path} is a training workdir: adapter= and quantize= apply to a Hugging Face directory (a "
                       "workdir's config says both: --config.model.text.quantize, config.lora)")
      model, params, tok, step = restore.from_workdir(path, dtype, model_init, tokenizer, one_device=mesh is None)
      log.info("answering with %s at step %d", path, step)
    else:
      model, params = hf.from_pretrained(path, jnp.float32 if dtype is None else dtype, mesh=mesh, rules=rules,
                                         adapter=adapter, quantize=quantize)
      model, tok = tokenize.for_model(tokenizer or path, model)
    return cls(model, params, tok, mesh=mesh, rules=rules, max_batch=max_batch, source=path)

  # -- inputs --

  def prepare(self, image, name: str | None = None) -> images_lib.PreparedImage:
    """Checks and preprocesses an image once, for several calls (messages name it `name`, else its path)."""
    prepared = images_lib.prepare(image, self.image_size, name=name)
    if not isinstance(image, images_lib.PreparedImage):
      for note in prepared.notes:
        log.warning("%s: %s", name or images_lib.describe(image), note)
    return prepared

  def _input(self, x) -> tuple[object, int]:
    """One item's visual input and its frame count (0: one image): several images (Images) or a video file's
    sampled frames as a sequence (each through the ViT and the Q-Former, tokens concatenated), else one image. A video
    file is decoded here, so that a bad one fails the call as a bad image does."""
    if isinstance(x, Images):
      return [self.prepare(image) for image in x], len(x)
    if video_files.is_video_file(x):
      return images_lib.video_frames(x, video_files.FRAMES), video_files.FRAMES
    return self.prepare(x), 0

  def _items(self, images, prompts) -> tuple[list[Item], bool]:
    """-> (items, whether the call was for a single image and prompt)."""
    one_image = isinstance(images, Images) or (
        not isinstance(images, (list, tuple)) and not (isinstance(images, np.ndarray) and images.ndim == 4))
    one_prompt = isinstance(prompts, (str, Conversation))
    images = [images] if one_image else list(images)
    prompts = [prompts] if one_prompt else list(prompts)
    if not images or not prompts:
      raise BadInput("no images or no prompts")
    if len(images) != len(prompts) and 1 not in (len(images), len(prompts)):
      raise BadInput(f"{len(images)} images and {len(prompts)} prompts: give one prompt, one image, or one prompt "
                     "per image")
    texts = [prompt_text(p) for p in prompts]
    inputs = [self._input(x) for x in images]
    n = max(len(inputs), len(texts))
    items = []
    for i in range(n):
      image, frames = inputs[i % len(inputs)]
      items.append(Item(image, texts[i % len(texts)], frames=frames))
    return items, one_image and one_prompt

  # -- answers --

  def __call__(self, images, prompts, *, details: bool = False, **decoding_settings):
    """Answers: a str per item (details=True: an Answer with tokens and log-probability), a list of
    num_return_sequences of them when that is > 1; one result for one image and one prompt, else a list."""
    items, single = self._items(images, prompts)
    dec = Decoding.of(decoding_settings)
    out = []
    for o in self.engine.generate(items, dec, scores=details):
      answers = [a if details else a.text for a in o.answers]
      out.append(answers[0] if dec.num_return_sequences == 1 else answers)
    return out[0] if single else out

  def annotate(self, images: Iterable, prompts, **decoding_settings) -> Iterator[dict]:
    """Answers a stream of images with each of `prompts`, the Python side of --config.mode=annotate. `images`: any
    iterable, read lazily (paths, bytes, PIL images, arrays, Images(a, b) for several, video files, or (key, image)
    pairs; key default: the position).
    Yields {"key", "prompt", "answer"}, or "error" instead of "answer" for an image that cannot be used, in input
    order as each batch finishes; the next batch's images are read and decoded while the model runs, so memory holds
    about two batches whatever the input's length."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
      raise BadInput("annotate: prompts must be a string or a list of strings")
    dec = Decoding.of(decoding_settings)
    keyed = ((x if isinstance(x, tuple) and not isinstance(x, Images) and len(x) == 2 else (i, x))
             for i, x in enumerate(images))
    per_batch = max(1, self.engine.batch_size // len(prompts))

    def load():   # the next batch's inputs, checked and preprocessed: (visual, frames), or an error text
      return [(key, self._input_or_why(x)) for key, x in itertools.islice(keyed, per_batch)]

    with futures.ThreadPoolExecutor(1, thread_name_prefix="annotate-input") as pool:
      ahead = pool.submit(load)
      while chunk := ahead.result():
        ahead = pool.submit(load)
        good = [Item(visual, p, frames=frames) for _, x in chunk if not isinstance(x, str) for visual, frames in [x]
                for p in prompts]
        outputs = iter(self.engine.generate(good, dec))
        for key, image in chunk:
          for p in prompts:
            o = None if isinstance(image, str) else next(outputs)
            why = image if o is None else o.error
            yield {"key": key, "prompt": p, **({"error": why} if why else {"answer": o.answers[0].text})}

  def _input_or_why(self, x):
    """_input's (visual, frames) for an image, Images or a video file, or why it cannot be used."""
    try:
      return self._input(x)
    except BadInput as e:
      return str(e)

  def stream(self, image, prompt, **decoding_settings) -> Stream:
    """Streams the answer to one image and one prompt token by token (greedy unless do_sample): the same tokens as
    the call without streaming. Beam search only knows its answer at the end: no streaming."""
    dec = Decoding.of({"num_beams": 1, **decoding_settings})
    if dec.beams != 1 or dec.num_return_sequences != 1 or (dec.best_of or 1) != 1:
      raise BadInput("streaming shows one answer as it is produced: use num_beams=1 (greedy) or do_sample=True, "
                     "with num_return_sequences=1 and no best_of")
    items, single = self._items(image, prompt)
    if not single:
      raise BadInput("stream() takes one image and one prompt")
    return self.engine.stream(items[0], dec)

  def decode(self, tokens) -> str:
    return self.engine.decode(tokens)

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
    out = []
    for cands, o in zip(lists, self.engine.rank(items, lists, normalize=normalize)):
      best = int(np.argmax(o.scores))
      out.append(Ranking(cands[best], best, o.scores, tuple(cands)))
    return out[0] if single else out

  def chat(self, image, **decoding_settings) -> Chat:
    """A conversation about one image, several (Images(a, b)) or a video file: chat.ask(question) answers with the
    earlier turns in the prompt. Each image (or the video's frames) is read and checked once, here."""
    if isinstance(image, Images):
      return Chat(self, Images(*(self.prepare(x) for x in image)), decoding_settings)
    if video_files.is_video_file(image):
      return Chat(self, Images(*(self.prepare(frame) for frame in images_lib.video_frames(image, video_files.FRAMES))),
                  decoding_settings)
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
    texts = [prompt_text(p) for p in prompts]
    with self.engine.lock:
      return maps_lib.compute(self.model, self.params, self.tok, np.stack([prepared.pixels] * len(texts)), texts,
                              [str(a) for a in answers])

  def attention_overlay(self, image, prompts, answers: Sequence[str] | None = None, *, path: str | None = None,
                        per_layer: bool = False, **decoding_settings) -> Image.Image:
    """attention_maps drawn over the image, one column per prompt (PNG written to `path` if given)."""
    prepared = self.prepare(image)
    png = maps_lib.render(prepared.image, self.attention_maps(prepared, prompts, answers, **decoding_settings),
                          per_layer=per_layer)
    if path:
      with open(path, "wb") as f:
        f.write(png)
    return Image.open(io.BytesIO(png))


