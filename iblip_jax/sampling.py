"""The token-by-token decoding loop that greedy decoding and sampling share (temperature, top-k, top-p), the logits
processors, best-of-n and token streaming, over the model's generation interface (InstructBlip.prefill / step, the
LLM class's repeat_cache). Beam search lives in iblip_jax.decoding (token-exact with transformers).

- The scores of each step are processed in transformers' order (generation/utils.py _get_logits_processor):
  repetition penalty on the raw logits (divide positive, multiply negative scores of every token generated or, for a
  decoder-only LLM, in the prompt), EOS blocked while fewer than `min_new_tokens` were generated, then temperature,
  top-k, top-p; the next token is drawn from the softmax of what remains. `greedy=True` takes the argmax of the
  penalised scores instead.
- The knobs (temperature, top_k, top_p, repetition penalty, lengths, seeds) are traced values, not compile-time
  constants: one compiled program per batch shape and token budget (`width`) serves every setting, so moving a slider
  in the web demo does not recompile.
- Randomness: row r draws with key fold_in(fold_in(key(seed_r), j), t) for its sample j and step t, so an item's
  samples depend on its seed alone, never on the batch it shares or on padding rows.
- Every row also accumulates its sequence log-probability under the model (log-softmax of the raw logits, before
  any processing), EOS included: best-of-n ranks samples by it.
- Streaming: each step hands (t, tokens, finished) to a host callback (jax.debug.callback), compiled into the loop
  only for streamed calls: a host round trip per step would slow every plain call (on TPU most of all). The loop's
  maths is the same code either way, so a streamed call produces the plain call's tokens.
- Greedy decoding is this loop with `greedy=True`; iblip_jax.generate(num_beams=1) runs it (token-exact with
  transformers' greedy search).
"""
import dataclasses
import itertools
import queue
import threading
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from iblip_jax.models.instructblip import InstructBlip

# --- logits processors (each matches its transformers namesake; tests/test_sampling.py checks them) ---------------


def repetition_penalty(scores, seen, penalty):
  """RepetitionPenaltyLogitsProcessor: scores of seen tokens divided (positive) or multiplied (negative) by penalty."""
  return jnp.where(seen, jnp.where(scores < 0, scores * penalty, scores / penalty), scores)


def block_eos(scores, generated, min_new_tokens, eos: int):
  """MinNewTokensLengthLogitsProcessor: EOS impossible while fewer than min_new_tokens tokens were generated."""
  return jnp.where(generated < min_new_tokens, scores.at[..., eos].set(-jnp.inf), scores)


def apply_temperature(scores, temperature):
  """TemperatureLogitsWarper."""
  return scores / temperature


def top_k_filter(scores, k):
  """TopKLogitsWarper: scores below the k-th largest become -inf (ties with it stay); k <= 0 keeps everything.
  `k` may be traced: the threshold is read from a sorted copy instead of lax.top_k's static k."""
  vocab = scores.shape[-1]
  k = jnp.where(k <= 0, vocab, jnp.minimum(k, vocab))
  kth = jnp.take_along_axis(jnp.sort(scores, axis=-1), jnp.broadcast_to(vocab - k, scores.shape[:-1])[..., None],
                            axis=-1)
  return jnp.where(scores < kth, -jnp.inf, scores)


def top_p_filter(scores, p):
  """TopPLogitsWarper: in ascending order, tokens whose cumulative probability is <= 1 - p become -inf; the most
  likely token always stays. p >= 1 keeps everything (transformers then adds no warper)."""
  order = jnp.argsort(scores, axis=-1)
  ascending = jnp.take_along_axis(scores, order, axis=-1)
  remove = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1) <= 1 - p
  remove = remove.at[..., -1].set(False)
  rows = jnp.arange(scores.shape[0])[:, None]
  remove = jnp.zeros_like(remove).at[rows, order].set(remove)   # back to vocabulary order
  return jnp.where((p < 1) & remove, -jnp.inf, scores)


def warp(scores, temperature, top_k, top_p):
  """The sampling warpers after the processors, in transformers' order: temperature, top-k, top-p."""
  return top_p_filter(top_k_filter(apply_temperature(scores, temperature), top_k), top_p)


def draw(keys, scores):
  """One token per row from softmax(scores), row r with its own key."""
  return jax.vmap(jax.random.categorical)(keys, scores).astype(jnp.int32)


# --- streaming listeners: host callbacks keyed by a traced call id (0 = nobody listens) --------------------------

_LISTENERS: dict[int, Callable] = {}
_IDS = itertools.count(1)
_LOCK = threading.Lock()


def _emit(listener, t, tokens, finished):
  fn = _LISTENERS.get(int(listener))
  if fn is not None:
    fn(int(t), np.asarray(tokens), np.asarray(finished))


def _register(fn: Callable | None) -> int:
  if fn is None:
    return 0
  with _LOCK:
    listener = next(_IDS)
    _LISTENERS[listener] = fn
  return listener


def _unregister(listener: int) -> None:
  with _LOCK:
    _LISTENERS.pop(listener, None)


# --- the decoding loop ---------------------------------------------------------------------------------------------


def knobs(batch: int, copies: int, *, max_new_tokens: int, min_new_tokens: int = 1, temperature: float = 1.0,
          top_k: int = 50, top_p: float = 1.0, repetition_penalty: float = 1.0, seed=0, listener: int = 0) -> dict:
  """The loop's traced settings for `batch` items x `copies` rows each (seed: an int, or one per item)."""
  seeds = np.broadcast_to(np.asarray(seed, np.int64) % 2**32, (batch,)).astype(np.uint32)
  return dict(seeds=np.repeat(seeds, copies), sample=np.tile(np.arange(copies, dtype=np.int32), batch),
              temperature=np.float32(temperature), top_k=np.int32(top_k), top_p=np.float32(top_p),
              repetition_penalty=np.float32(repetition_penalty), min_new_tokens=np.int32(min_new_tokens),
              max_new_tokens=np.int32(max_new_tokens), listener=np.int32(listener))


def loop(model: InstructBlip, params, inputs: dict, settings: dict, *, width: int, greedy: bool, copies: int,
         stream: bool):
  """The decoding loop, to be traced inside a jit (_decode here, decoding's greedy generate): prefill, then one
  token per step until every row has ended or `width` tokens -> (tokens (R, width), logprob (R,), length (R,))."""
  text = model.config.text
  eos, pad = text.eos_token_id, text.pad_token_id
  start, cache, seen = model.apply({"params": params}, inputs["pixel_values"], inputs["qformer_input_ids"],
                                   inputs["qformer_attention_mask"], inputs["input_ids"], inputs["attention_mask"],
                                   width, method="prefill")
  if copies > 1:   # rows i * copies + j: sample j of item i (the image, Q-Former and prompt ran once per item)
    start, seen = jnp.repeat(start, copies), jnp.repeat(seen, copies, axis=0)
    cache = model.llm_class.repeat_cache(cache, copies)
  rows = start.shape[0]
  keys = jax.vmap(lambda s, j: jax.random.fold_in(jax.random.key(s), j))(settings["seeds"], settings["sample"])
  limit = jnp.minimum(settings["max_new_tokens"], width)

  def cond(state):
    t, _, _, _, _, done, _, _ = state
    return (t < limit) & ~jnp.all(done)

  def body(state):
    t, last, tokens, seen, cache, done, logprob, length = state
    logits, cache = model.apply({"params": params}, last, t, cache, method="step")
    scores = block_eos(repetition_penalty(logits, seen, settings["repetition_penalty"]), t, settings["min_new_tokens"],
                       eos)
    if greedy:
      nxt = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    else:
      step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(keys)
      nxt = draw(step_keys, warp(scores, settings["temperature"], settings["top_k"], settings["top_p"]))
    nxt = jnp.where(done, pad, nxt)
    token_logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), nxt[:, None], axis=-1)[:, 0]
    logprob = logprob + jnp.where(done, 0.0, token_logp)
    length = length + (~done).astype(jnp.int32)
    if stream:
      jax.debug.callback(_emit, settings["listener"], t, nxt, done, ordered=True)
    seen = seen.at[jnp.arange(rows), nxt].set(True)
    return t + 1, nxt, tokens.at[:, t].set(nxt), seen, cache, done | (nxt == eos), logprob, length

  state = (jnp.int32(0), start, jnp.full((rows, width), pad, jnp.int32), seen, cache, jnp.zeros((rows,), bool),
           jnp.zeros((rows,), jnp.float32), jnp.zeros((rows,), jnp.int32))
  _, _, tokens, _, _, _, logprob, length = jax.lax.while_loop(cond, body, state)
  return tokens, logprob, length


_decode = jax.jit(loop, static_argnames=("model", "width", "greedy", "copies", "stream"))


@dataclasses.dataclass(frozen=True)
class Samples:
  """tokens (R, max_new_tokens): after the start token (FlanT5) or the prompt (decoder-only), EOS included, then pad;
  logprob (R,): each row's sequence log-probability under the model (EOS included); length (R,): its tokens.
  R = batch x num_return_sequences, sample j of item i in row i * num_return_sequences + j."""
  tokens: np.ndarray
  logprob: np.ndarray
  length: np.ndarray


def check(*, max_new_tokens: int, min_new_tokens: int, temperature: float, top_k: int, top_p: float,
          repetition_penalty: float, num_return_sequences: int) -> None:
  """ValueError naming the first setting out of range."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if min_new_tokens < 0:
    raise ValueError(f"min_new_tokens={min_new_tokens} must be >= 0")
  if not temperature > 0:
    raise ValueError(f"temperature={temperature} must be > 0 for sampling (temperature 0 is greedy decoding)")
  if top_k < 0:
    raise ValueError(f"top_k={top_k} must be >= 0 (0 switches top-k off)")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} must be in (0, 1] (1 switches top-p off)")
  if not repetition_penalty > 0:
    raise ValueError(f"repetition_penalty={repetition_penalty} must be > 0 (1 switches it off)")
  if num_return_sequences < 1:
    raise ValueError(f"num_return_sequences={num_return_sequences} must be >= 1")


def decode(model: InstructBlip, params, inputs: dict, *, on_token: Callable | None = None, **settings):
  """The decoding loop on `inputs` (the model's five input arrays; global arrays on a mesh work as they are) ->
  (tokens (R, width), logprob (R,), length (R,)) as jax arrays, R = batch x num_return_sequences. See sample for
  the settings and on_token."""
  listener = _register(on_token)
  try:
    traced, static = _arguments(inputs, listener=listener, **settings)
    return jax.block_until_ready(_decode(model, params, inputs, traced, **static, stream=on_token is not None))
  finally:
    _unregister(listener)


def precompile(model: InstructBlip, params, inputs: dict, *, streamed: bool, **settings) -> None:
  """Compiles, on this thread, the program that decode(model, params, inputs, **settings) runs (`streamed`: the one
  with on_token's callback); jit's cache keeps it, so that decode compiles nothing. Call it under the same mesh and
  axis-rule context as decode. Why: stream() runs decode on a thread of its own, and XLA's compiler crashed the
  process on that short-lived thread twice in CI (a segfault in backend_compile_and_load, and one in serialising
  the compiled program); compiling on the caller's thread leaves the stream's thread only the run."""
  traced, static = _arguments(inputs, listener=0, **settings)
  _decode.lower(model, params, inputs, traced, **static, stream=streamed).compile()


def _arguments(inputs: dict, *, listener: int, max_new_tokens: int = 30, min_new_tokens: int = 1,
               temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0, repetition_penalty: float = 1.0,
               num_return_sequences: int = 1, seed=0, greedy: bool = False, width: int | None = None):
  """The settings checked -> (_decode's traced settings, its static arguments but `stream`)."""
  check(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, repetition_penalty=repetition_penalty, num_return_sequences=num_return_sequences)
  width = max_new_tokens if width is None else width
  if width < max_new_tokens:
    raise ValueError(f"width={width} is smaller than max_new_tokens={max_new_tokens}")
  n = num_return_sequences
  traced = knobs(inputs["input_ids"].shape[0], n, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                 temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
                 listener=listener)
  return traced, dict(width=width, greedy=greedy, copies=n)


def sample(model: InstructBlip, params, *, pixel_values, qformer_input_ids, qformer_attention_mask, input_ids,
           attention_mask=None, max_new_tokens: int = 30, **settings) -> Samples:
  """Samples num_return_sequences answers per item (or, greedy=True, the greedy one).

  Settings (decode's): min_new_tokens, temperature, top_k (0 = off), top_p (1 = off), repetition_penalty,
  num_return_sequences, seed (an int for every item, or one per item), greedy, width (the compiled token budget,
  >= max_new_tokens; callers that want few compiled programs pass a bucket), on_token(t, tokens (R,), finished (R,)),
  called from JAX's runtime thread after every step, `finished` marking rows that had ended before it (their token
  is padding). A call with on_token compiles its own program, with the callback in the loop; the loop's maths is
  the same code, so its tokens are the plain call's (tests/test_sampling.py checks it).
  """
  inputs = dict(pixel_values=pixel_values, qformer_input_ids=qformer_input_ids,
                qformer_attention_mask=qformer_attention_mask, input_ids=input_ids,
                attention_mask=np.ones_like(input_ids) if attention_mask is None else attention_mask)
  tokens, logprob, length = decode(model, params, inputs, max_new_tokens=max_new_tokens, **settings)
  return Samples(np.asarray(tokens)[:, :max_new_tokens], np.asarray(logprob), np.asarray(length))


_DONE = object()


def stream(fn: Callable[[Callable], Samples]) -> Iterator:
  """Runs fn(on_token) in a thread and yields (t, tokens, finished) for every step as it is made, then the final
  Samples as the last item. An exception in fn is raised here, after the steps it made. Compile what fn runs
  before (precompile), so that the thread only runs it."""
  steps: queue.Queue = queue.Queue()
  outcome = {}

  def run():
    try:
      outcome["samples"] = fn(lambda t, tokens, finished: steps.put((t, tokens, finished)))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, who raises it
      outcome["error"] = e
    finally:
      steps.put(_DONE)

  worker = threading.Thread(target=run, name="iblip-stream", daemon=True)
  worker.start()
  while (item := steps.get()) is not _DONE:
    yield item
  worker.join()
  if "error" in outcome:
    raise outcome["error"]
  yield outcome["samples"]


def best_of(samples: Samples, n: int, keep: int, length_penalty: float = 1.0) -> Samples:
  """Of each item's n consecutive samples, the `keep` best by logprob / length ** length_penalty (beam search's
  length normalisation), best first."""
  score = samples.logprob / np.maximum(samples.length, 1).astype(np.float64) ** length_penalty
  order = np.argsort(-score.reshape(-1, n), axis=1, kind="stable")[:, :keep]
  rows = (order + np.arange(order.shape[0])[:, None] * n).reshape(-1)
  return Samples(samples.tokens[rows], samples.logprob[rows], samples.length[rows])
