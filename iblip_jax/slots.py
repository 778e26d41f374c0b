"""Continuous batching: a fixed set of decode slots on the device that requests join and leave between steps.

The serving side of the engine (iblip_jax.engine answers whole batches; the OpenAI server, iblip_jax.serve_api,
answers requests as they come). One scheduler thread owns the device:
- waiting requests are prefilled together, up to `prefill_batch` of them (image -> ViT -> Q-Former -> the LLM's
  prompt pass, the model's `prefill`; the ViT is most of a request's work and runs better batched), and each one's
  cache is written into a free slot (n slots for n choices: they share the prefill, each draws its own tokens);
- every step feeds each slot's last token at that slot's own position (the model's `step` with one t per row: the
  cache is written and masked per row, T5's position bias taken per row), picks the next tokens (greedy or sampled,
  per slot) and returns them to the host, which streams them, checks stop strings, and frees the slots that ended;
- nobody waits for the slowest row: a freed slot takes the next request at the next step.
Slot caches have one shape: FlanT5's encoder states (cross keys/values and mask) and Vicuna's [visual][prompt]
keys/values are padded to the longest prompt bucket and to `max_images` images' visual tokens (masked positions add
nothing), and the new tokens' keys/values have room for `width` tokens. So the compiled programs are: one prefill
per prompt bucket, prefill size (1 or `prefill_batch` requests) and image count (1 to `max_images`: a request about
several images has their query outputs concatenated in order, as the Pipeline's Images), one insert per prefill
size, one step, all compiled at start-up (`warm_up`) and reused for ever (`compiled_programs` counts them).

Per slot, the decoding maths is the engine's greedy/sampling loop (iblip_jax.sampling): repetition penalty, min new
tokens, temperature / top-k / top-p, a key per (seed, choice) folded with t. So a greedy answer here is the
Pipeline's greedy answer (num_beams=1) and a sampled one the Pipeline's do_sample answer with the same seed. Beam
search needs several rows per request reordered every step: it is not served here (the Pipeline has it).
"""
import collections
import copy
import dataclasses
import logging
import queue
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from iblip_jax import sampling, sharding
from iblip_jax.data import tokenize
from iblip_jax.errors import BadInput

log = logging.getLogger(__name__)


class QueueFull(Exception):
  """Every slot is taken and the waiting line is full: try again later (HTTP 429)."""


class Unavailable(Exception):
  """The slots are stopping or their decode loop has failed: no retry will help here (HTTP 503)."""


def images_in(r: "Request") -> int:
  """How many images a request asks about: (S, S, 3) pixels are one, (K, S, S, 3) are K."""
  return 1 if r.pixels.ndim == 3 else r.pixels.shape[0]


@dataclasses.dataclass(eq=False)   # a request is itself (the line removes it by identity; it holds arrays)
class Request:
  """One request: an image's pixels (S, S, 3), or several images' (K, S, S, 3) whose query outputs are concatenated
  in order (up to the slots' max_images), a prompt, n choices and their decoding settings. The scheduler calls
  `emit(event)` from its thread: ("token", choice, delta_text) as text becomes final, ("finish", choice, reason)
  with reason "stop" / "length" / "cancelled" / "timeout", ("error", message) when the request failed, and ("end",
  usage) last, always (after an error too). Set `cancelled` (a client went away) and its slots are freed at the next
  step."""
  pixels: np.ndarray
  prompt: str
  emit: Callable[[tuple], None]
  n: int = 1
  max_tokens: int = 16
  min_tokens: int = 0
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  repetition_penalty: float = 1.0
  seed: int = 0
  stop: tuple[str, ...] = ()
  timeout: float | None = None
  cancelled: bool = False
  # filled in by the scheduler
  submitted: float = 0.0
  first_token: float | None = None
  prompt_tokens: int = 0
  texts: list[str] = dataclasses.field(default_factory=list)
  tokens: list[list[int]] = dataclasses.field(default_factory=list)
  finish: list[str | None] = dataclasses.field(default_factory=list)

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


@dataclasses.dataclass
class _Choice:
  request: Request
  index: int
  sent: int = 0          # characters of text already emitted


class Slots:
  """`slots` decode slots for `engine`'s model (one device or a mesh; every slot lives everywhere), answers of up to
  `width` tokens, at most `max_waiting` requests waiting for a slot. start() runs the scheduler thread."""

  def __init__(self, engine, *, slots: int = 8, width: int = 256, max_waiting: int = 64, prefill_batch: int = 4,
               max_images: int = 1):
    if engine.tok.decoder_only and engine.model.config.text.vocab_size is None:
      raise BadInput("the model has no vocabulary size")
    # own tokenizers: the Pipeline's (ranking, on other threads) switch truncation on theirs, which is not
    # thread-safe under a concurrent encode (the Rust tokenizer's "Already borrowed")
    tok = engine.tok
    self.tok = dataclasses.replace(tok, llm=copy.deepcopy(tok.llm), qformer=copy.deepcopy(tok.qformer))
    self._tok_lock = threading.Lock()
    self.engine, self.model = engine, engine.model
    self.slots, self.width, self.max_waiting = slots, width, max_waiting
    if max_images < 1:
      raise BadInput(f"max_images={max_images} must be at least 1")
    # a request's images each give num_query_tokens visual tokens: the slots' caches are sized for the most
    self.max_images = max_images
    self.prefill_sizes = tuple(sorted({1, max(1, min(prefill_batch, slots))}))
    text = self.model.config.text
    self.eos, self.pad = text.eos_token_id, text.pad_token_id
    self.buckets = tuple(b for b in self.tok.buckets if b < self.prompt_limit) + (
        tokenize.bucket(self.prompt_limit, self.tok.buckets),)
    self._waiting: queue.Queue = queue.Queue()
    self._owner: list[_Choice | None] = [None] * slots
    self._stop = threading.Event()
    self._placing: list[Request] = []   # the requests being prefilled (neither waiting nor in a slot)
    self._thread: threading.Thread | None = None
    self.failure: BaseException | None = None
    self.stats = collections.Counter()            # tokens, requests, steps: the metrics endpoint reads them
    self._recent: collections.deque = collections.deque(maxlen=64)   # (time, tokens) of recent steps
    self._build()

  # -- the device side --

  @property
  def prompt_limit(self) -> int:
    """The longest prompt in tokens (LLM and Q-Former) the model takes."""
    cap = self.tok.qformer_max_len
    return self.tok.max_input_len if cap is None else min(self.tok.max_input_len, cap)

  def _build(self):
    model, width = self.model, self.width
    s = self.engine.image_size
    biggest = self.buckets[-1]
    pixels = (1, s, s, 3) if self.max_images == 1 else (1, self.max_images, s, s, 3)
    dummy = dict(pixel_values=jax.ShapeDtypeStruct(pixels, jnp.float32),
                 **{k: jax.ShapeDtypeStruct((1, biggest), jnp.int32)
                    for k in ("qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask")})
    raw = lambda params, inputs: model.apply({"params": params}, *(inputs[k] for k in _INPUTS), width,
                                             method="prefill")
    _, cache_shape, _ = jax.eval_shape(raw, self.engine.params, dummy)
    two = {k: jax.ShapeDtypeStruct((2,) + v.shape[1:], v.dtype) for k, v in dummy.items()}
    # each cache array's batch axis (T5: (layers, B, ...) keys/values and a (B, S) mask; LLaMA likewise): the one
    # whose size follows the batch
    axes = jax.tree.map(lambda a, b: next(i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y),
                        cache_shape, jax.eval_shape(raw, self.engine.params, two)[1])

    def prefill(params, inputs):
      """P requests -> (first tokens (P,), their cache padded to the slots' shape but for the batch, seen (P, V))."""
      start, cache, seen = raw(params, inputs)
      cache = jax.tree.map(lambda x, like: jnp.pad(x, [(0, max(0, b - a)) for a, b in zip(x.shape, like.shape)]),
                           cache, cache_shape)
      return start, cache, seen

    def insert(state, slot, row, start, cache, seen, knobs):
      """Row `row` of a prefill's outputs into slot `slot`."""
      put = lambda whole, part: whole.at[slot].set(part)
      cache = jax.tree.map(lambda whole, part, axis: jax.lax.dynamic_update_slice_in_dim(
          whole, jax.lax.dynamic_slice_in_dim(part, row, 1, axis), slot, axis), state["cache"], cache, axes)
      return dict(state, last=put(state["last"], start[row]), t=put(state["t"], 0), cache=cache,
                  seen=put(state["seen"], seen[row]), logprob=put(state["logprob"], 0.0),
                  **{k: put(state[k], v) for k, v in knobs.items()})

    eos, pad = self.eos, self.pad

    def step(params, state, active):
      """One token for every slot, each at its own step t; `active` (S,) marks the slots in use (the others
      compute and are ignored)."""
      t = state["t"]
      logits, cache = model.apply({"params": params}, state["last"], t, state["cache"], method="step")
      scores = sampling.repetition_penalty(logits, state["seen"], state["penalty"][:, None])
      scores = sampling.block_eos(scores, t[:, None], state["min_new"][:, None], eos)
      sampled = active & ~state["greedy"]

      def draw(scores):   # sampling's warpers sort the vocabulary: only when a row samples, each only if asked for
        keys = jax.vmap(lambda k, i: jax.random.fold_in(k, i))(jax.random.wrap_key_data(state["key"]), t)
        scores = sampling.apply_temperature(scores, state["temperature"][:, None])
        scores = jax.lax.cond(jnp.any(sampled & (state["top_k"] > 0)),
                              lambda x: sampling.top_k_filter(x, state["top_k"]), lambda x: x, scores)
        scores = jax.lax.cond(jnp.any(sampled & (state["top_p"] < 1)),
                              lambda x: sampling.top_p_filter(x, state["top_p"][:, None]), lambda x: x, scores)
        return sampling.draw(keys, scores)

      drawn = jax.lax.cond(jnp.any(sampled), draw, lambda x: jnp.zeros(x.shape[:1], jnp.int32), scores)
      nxt = jnp.where(state["greedy"], jnp.argmax(scores, axis=-1).astype(jnp.int32), drawn)
      nxt = jnp.where(active, nxt, pad)
      logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), nxt[:, None], axis=-1)[:, 0]
      t_next = t + active.astype(jnp.int32)
      ended = active & ((nxt == eos) | (t_next >= state["limit"]))
      seen = state["seen"].at[jnp.arange(nxt.shape[0]), nxt].set(True)
      state = dict(state, cache=cache, last=nxt, t=t_next, seen=seen,
                   logprob=state["logprob"] + jnp.where(active, logp, 0.0))
      return state, nxt, ended

    with sharding.context(self.engine.mesh, self.engine.rules):
      self._prefill = jax.jit(prefill)
      self._insert = jax.jit(insert, donate_argnums=0)
      self._step = jax.jit(step, donate_argnums=1)
      n, v = self.slots, self.model.config.text.vocab_size
      key_shape = jax.random.key_data(jax.random.key(0)).shape
      self._state = dict(
          cache=jax.tree.map(lambda x, axis: jnp.zeros(x.shape[:axis] + (n,) + x.shape[axis + 1:], x.dtype),
                             cache_shape, axes),
          last=jnp.zeros((n,), jnp.int32), t=jnp.zeros((n,), jnp.int32), seen=jnp.zeros((n, v), bool),
          logprob=jnp.zeros((n,), jnp.float32), key=jnp.zeros((n,) + key_shape, jnp.uint32),
          greedy=jnp.ones((n,), bool), temperature=jnp.ones((n,), jnp.float32), top_k=jnp.zeros((n,), jnp.int32),
          top_p=jnp.ones((n,), jnp.float32), penalty=jnp.ones((n,), jnp.float32),
          min_new=jnp.zeros((n,), jnp.int32), limit=jnp.ones((n,), jnp.int32))

  def compiled_programs(self) -> int:
    """Programs compiled so far (prefill per prompt bucket, insert, step): constant once warm."""
    return sum(f._cache_size() for f in (self._prefill, self._insert, self._step))

  def warm_up(self, progress: bool = True) -> None:
    """Compiles every program the slots will run, before the first request (one prefill per prompt bucket, prefill
    size and image count)."""
    s = self.engine.image_size
    pixels = np.zeros((s, s, 3), np.float32)
    sizes, counts = self.prefill_sizes, range(1, self.max_images + 1)
    with tqdm(total=len(self.buckets) * len(sizes) * len(counts) + 2, desc="compiling", unit="program",
              disable=not progress) as bar:
      outs = {}
      for k in counts:
        for b in self.buckets:
          for n in sizes:
            bar.set_postfix_str(f"prefill {n} x {b} tokens, {k} image{'s' if k > 1 else ''}")
            outs[n] = self._run_prefill([pixels if k == 1 else np.stack([pixels] * k)] * n, ["x"] * n, b)
            bar.update(1)
      # twice: the first state is uncommitted, the later ones are the programs' own outputs (another cache entry)
      for _ in range(2):
        bar.set_postfix_str("insert, step")
        for out in outs.values():
          self._state = self._insert(self._state, np.int32(0), np.int32(0), *out,
                                     self._knobs(Request(pixels, "x", print), 0))
        self._state, *_ = self._step(self.engine.params, self._state, np.zeros((self.slots,), bool))
        jax.block_until_ready(self._state)
      bar.update(2)

  def encode(self, prompt: str, bucket: int | None = None) -> dict:
    """A prompt -> the model's token inputs, both padded to one bucket (fewer programs; `bucket` forces one);
    BadInput when it is longer than the model takes (the server's 400, never a silent truncation)."""
    with self._tok_lock:
      llm = self.tok.llm(prompt, add_special_tokens=True)["input_ids"]
      qformer = self.tok.qformer(prompt, add_special_tokens=True)["input_ids"]
    longest = max(len(llm), len(qformer))
    if longest > self.prompt_limit:
      raise BadInput(f"the prompt is {longest} tokens long; this model takes at most {self.prompt_limit}")
    b = bucket or tokenize.bucket(longest, self.buckets)
    cap = self.tok.qformer_max_len   # as tokenize pads: never past the Q-Former's positions
    q_ids, q_mask = tokenize._pad([qformer[:b]], self.tok.qformer.pad_token_id, b if cap is None else min(b, cap))  # noqa: SLF001
    l_ids, l_mask = tokenize._pad([llm[:b]], self.tok.llm.pad_token_id, b)  # noqa: SLF001 - the same padding
    return dict(qformer_input_ids=q_ids, qformer_attention_mask=q_mask, input_ids=l_ids, attention_mask=l_mask,
                length=len(llm))

  def _run_prefill(self, pixels: list[np.ndarray], prompts: list[str], bucket: int | None = None):
    """The prefill of a few requests, padded to one prompt bucket (the longest's) and to a prefill size (repeats of
    the last request: their rows are never read)."""
    if bucket is None:
      bucket = max(self.encode(p)["input_ids"].shape[1] for p in prompts)
    rows = [self.encode(p, bucket) for p in prompts]
    size = next(n for n in self.prefill_sizes if n >= len(rows))
    rows += [rows[-1]] * (size - len(rows))
    pixels = list(pixels) + [pixels[-1]] * (size - len(pixels))
    inputs = dict(pixel_values=np.stack(pixels).astype(np.float32),
                  **{k: np.concatenate([r[k] for r in rows]) for k in _INPUTS[1:]})
    with sharding.context(self.engine.mesh, self.engine.rules):
      return self._prefill(self.engine.params, inputs)

  def _knobs(self, r: Request, choice: int) -> dict:
    key = jax.random.key_data(jax.random.fold_in(jax.random.key(np.uint32(r.seed % 2**32)), choice))
    return dict(key=key, greedy=np.bool_(r.greedy), temperature=np.float32(r.temperature or 1.0),
                top_k=np.int32(r.top_k), top_p=np.float32(r.top_p), penalty=np.float32(r.repetition_penalty),
                min_new=np.int32(r.min_tokens), limit=np.int32(r.max_tokens))

  # -- the host side --

  def check(self, r: Request) -> None:
    """BadInput naming what in a request cannot be served (before it waits for a slot)."""
    problems = []
    if not 1 <= images_in(r) <= self.max_images:
      problems.append(f"{images_in(r)} images: this server takes at most {self.max_images} per request "
                      "(its --max-images)")
    if not 1 <= r.n <= self.slots:
      problems.append(f"n={r.n}: this server answers 1 to {self.slots} choices per request")
    if not 1 <= r.max_tokens <= self.width:
      problems.append(f"max_tokens={r.max_tokens}: must be between 1 and {self.width} (the server's --max-tokens)")
    if r.min_tokens < 0 or r.min_tokens > r.max_tokens:
      problems.append(f"min_tokens={r.min_tokens} must be between 0 and max_tokens={r.max_tokens}")
    if r.temperature < 0:
      problems.append(f"temperature={r.temperature} must be >= 0")
    if not 0 < r.top_p <= 1:
      problems.append(f"top_p={r.top_p} must be in (0, 1]")
    if not r.repetition_penalty > 0:
      problems.append(f"repetition_penalty={r.repetition_penalty} must be > 0")
    if any(not isinstance(s, str) or not s for s in r.stop) or len(r.stop) > 4:
      problems.append("stop: at most 4 non-empty strings")
    if problems:
      raise BadInput("; ".join(problems))

  def submit(self, r: Request) -> None:
    """Queues a checked request (BadInput if it cannot be served, QueueFull if the line is full)."""
    if r.pixels.ndim == 4 and r.pixels.shape[0] == 1:   # one image, however given: one prefill shape
      r.pixels = r.pixels[0]
    self.check(r)
    r.prompt_tokens = self.encode(r.prompt)["length"]
    if self._stop.is_set() or not self.alive():
      raise Unavailable("the server is stopping" if self.failure is None else
                        f"the decode loop has failed ({type(self.failure).__name__}: {self.failure})")
    beyond = self._waiting.qsize() - (self.slots - self.active)   # those that will not get a slot at once
    if beyond >= self.max_waiting:
      raise QueueFull(f"{self._waiting.qsize()} requests are waiting for a slot")
    r.submitted = time.monotonic()
    r.texts, r.tokens, r.finish = [""] * r.n, [[] for _ in range(r.n)], [None] * r.n
    self.stats["requests"] += 1
    self._waiting.put(r)

  @property
  def waiting(self) -> int:
    return self._waiting.qsize()

  @property
  def active(self) -> int:
    return sum(c is not None for c in self._owner)

  def tokens_per_second(self) -> float:
    """Generated tokens per second over the recent steps (0 when idle)."""
    recent = [x for x in list(self._recent) if x[0] > time.monotonic() - 10]   # a copy: the loop appends
    if len(recent) < 2:
      return 0.0
    return sum(n for _, n in recent[1:]) / max(recent[-1][0] - recent[0][0], 1e-9)

  def start(self) -> "Slots":
    self._thread = threading.Thread(target=self._run, name="iblip-slots", daemon=True)
    self._thread.start()
    return self

  def alive(self) -> bool:
    return self._thread is not None and self._thread.is_alive() and self.failure is None

  def stop(self, drain: float = 0.0) -> None:
    """Stops taking requests; what is in the slots or waiting gets `drain` seconds to finish, then is cancelled."""
    deadline = time.monotonic() + drain
    while (self.active or self.waiting) and time.monotonic() < deadline and self.alive():
      time.sleep(0.05)
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=30)

  def _run(self):
    try:
      while not self._stop.is_set():
        self._admit()
        if not self.active:
          self._wait_for_work()
          continue
        self._decode_step()
      for r in self._in_flight():
        self._end(r, "cancelled")
    except BaseException as e:  # noqa: BLE001 - every request learns it; the health endpoint reports it
      log.exception("the decode loop failed")
      self.failure = e
      for r in self._in_flight():
        self._fail(r, f"the server's decode loop failed: {type(e).__name__}: {e}")

  def _in_flight(self) -> list[Request]:
    out = {id(c.request): c.request for c in self._owner if c is not None}
    for r in self._placing:
      out[id(r)] = r
    while True:
      try:
        r = self._waiting.get_nowait()
      except queue.Empty:
        break
      out[id(r)] = r
    self._owner = [None] * self.slots
    return list(out.values())

  def _wait_for_work(self):
    """Waits a little for a request (idle), leaving it first in line for _admit."""
    try:
      r = self._waiting.get(timeout=0.05)
    except queue.Empty:
      return
    with self._waiting.mutex:
      self._waiting.queue.appendleft(r)

  def _admit(self):
    """Waiting requests take free slots, in order, as long as a request's n choices fit; the cancelled and the
    expired leave the line wherever they are (they would hold a place in it, and their clients wait for the end)."""
    with self._waiting.mutex:
      gone = [r for r in self._waiting.queue if r.cancelled or self._expired(r)]
      for r in gone:
        self._waiting.queue.remove(r)
    for r in gone:
      self._end(r, "cancelled" if r.cancelled else "timeout")
    while True:   # the next few that fit, prefilled together
      group, free = [], self.slots - self.active
      with self._waiting.mutex:
        while (self._waiting.queue and len(group) < self.prefill_sizes[-1]
               and free - sum(r.n for r in group) >= self._waiting.queue[0].n
               and (not group or images_in(self._waiting.queue[0]) == images_in(group[0]))):   # one pixel shape
          group.append(self._waiting.queue.popleft())
      if not group:
        return
      self._place(group)

  def _place(self, group: list[Request]):
    self._placing = group
    self.stats["prefills"] += 1
    self.stats["prefilled"] += len(group)
    try:
      start, cache, seen = self._run_prefill([r.pixels for r in group], [r.prompt for r in group])
    except Exception as e:  # noqa: BLE001 - these requests' problem (memory, say): they end, the others go on
      log.exception("prefill failed")
      for r in group:
        self._fail(r, str(e) if isinstance(e, BadInput) else f"prefill failed: {type(e).__name__}: {e}")
      self._placing = []
      return
    free = iter([i for i, c in enumerate(self._owner) if c is None])
    for row, r in enumerate(group):
      for j in range(r.n):   # a failure here leaves the state unknown: the loop fails (every request ends)
        slot = next(free)
        self._state = self._insert(self._state, np.int32(slot), np.int32(row), start, cache, seen,
                                   self._knobs(r, j))
        self._owner[slot] = _Choice(r, j)
    self._placing = []

  def _expired(self, r: Request) -> bool:
    return r.timeout is not None and time.monotonic() - r.submitted > r.timeout

  def _decode_step(self):
    active = np.array([c is not None for c in self._owner])
    self._state, nxt, ended = self._step(self.engine.params, self._state, active)
    nxt, ended = np.asarray(nxt), np.asarray(ended)
    now = time.monotonic()
    self.stats["steps"] += 1
    self.stats["tokens"] += int(active.sum())
    self._recent.append((now, int(active.sum())))
    for slot, c in enumerate(self._owner):
      if c is None:
        continue
      r = c.request
      if r.first_token is None:
        r.first_token = now
      token = int(nxt[slot])
      r.tokens[c.index].append(token)
      reason = ("stop" if token == self.eos else "length") if ended[slot] else None
      self._text(c, reason)
      if r.cancelled or self._expired(r):
        reason = "cancelled" if r.cancelled else "timeout"
      if r.finish[c.index] is not None:
        reason = r.finish[c.index]
      if reason is not None:
        self._owner[slot] = None
        self._finish(c, reason)

  def _text(self, c: _Choice, reason: str | None):
    """Decodes the choice's tokens, cuts at a stop string (which then ends it), and emits the text that is final:
    text that might be the start of a stop string is held back until the next token says."""
    r = c.request
    text = tokenize.decode(self.tok, np.asarray([r.tokens[c.index]], np.int64))[0]
    hold = 0
    for s in r.stop:
      at = text.find(s)
      if at >= 0:
        text, reason = text[:at], "stop"
        r.finish[c.index] = "stop"
        hold = 0
        break
      hold = max(hold, max((k for k in range(1, len(s)) if text.endswith(s[:k])), default=0))
    if reason is not None:
      hold = 0
    elif text.endswith("\ufffd"):   # a character cut between tokens: wait for the rest of its bytes
      hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
    r.texts[c.index] = text
    final = len(text) - hold
    if final > c.sent:
      self._emit(r, ("token", c.index, text[c.sent:final]))
      c.sent = final

  def _finish(self, c: _Choice, reason: str):
    r = c.request
    r.finish[c.index] = reason
    self._emit(r, ("finish", c.index, reason))
    if all(f is not None for f in r.finish) and all(o is None or o.request is not r for o in self._owner):
      self._emit(r, ("end", self._usage(r)))

  def _fail(self, r: Request, message: str):
    """Ends a request with an error: "error", its unfinished choices "error", then "end"."""
    self._emit(r, ("error", message))
    self._end(r, "error")

  @staticmethod
  def _emit(r: Request, event: tuple):
    try:
      r.emit(event)
    except Exception:  # noqa: BLE001 - a listener gone (its event loop closed) must not stop the loop
      log.warning("a request's listener failed on %s", event[0], exc_info=True)

  def _end(self, r: Request, reason: str):
    for j in range(r.n):
      if r.finish[j] is None:
        r.finish[j] = reason
        self._emit(r, ("finish", j, reason))
    self._emit(r, ("end", self._usage(r)))

  @staticmethod
  def _usage(r: Request) -> dict:
    completion = sum(len(t) for t in r.tokens)
    return dict(prompt_tokens=r.prompt_tokens, completion_tokens=completion,
                total_tokens=r.prompt_tokens + completion)


_INPUTS = ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask")
