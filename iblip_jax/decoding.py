"""Generation with a KV cache, token-for-token equal to transformers' `generate`: beam search here, greedy through
the loop it shares with sampling (iblip_jax.sampling); and `Decoding`, the settings every caller passes.

The vision tower, Q-Former and T5 encoder run once; the decoder runs one token per step over an explicit cache
pytree inside a `jax.lax.while_loop`, all under one `jax.jit` (compiled once per shape and decoding setting).

transformers semantics reproduced here (5.x `_sample` / vectorised `_beam_search`):
- the decoder starts from `decoder_start_token_id`; that start token counts as "already generated" for the
  repetition penalty, which divides positive and multiplies negative scores of every token seen so far;
- greedy applies the penalties to raw logits, beam search to log-softmax scores;
- `min_new_tokens`: EOS is impossible while fewer than that many tokens were generated;
- beam search keeps 2 x num_beams candidates per step, finished hypotheses are scored with
  sum_logprob / generated_length ** length_penalty, and stops when no running beam can beat the worst finished
  one (early_stopping=False heuristic) or at max_new_tokens.
Output: (B * num_return_sequences, max_new_tokens) tokens after the start token, EOS included, pad after it.

Both LLMs go through the model's generation interface (InstructBlip.prefill / step and the LLM class's
repeat_cache / reorder_cache). Decoder-only LLMs (Vicuna): the prompt is left-aligned and run once to fill the cache;
the loops are fed the last prompt token first. Only the new tokens are returned (transformers returns the prompt
too).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from iblip_jax import sampling
from iblip_jax.errors import BadInput
from iblip_jax.models.instructblip import InstructBlip

NEG = -1.0e9  # transformers' "impossible" score in beam search


@dataclasses.dataclass(frozen=True)
class Decoding:
  """How answers are produced, with LAVIS's defaults (5 beams, repetition penalty 1.5, up to 30 tokens): the one
  place they are written (the Python API, the main job's predict and annotate settings, the evaluation tasks, the
  servers start from here). Without do_sample: beam search (num_beams > 1) or greedy (num_beams=1). With do_sample:
  temperature, top_k (0 = off), top_p (1 = off), one seed for the call (an item's samples depend on the seed and the
  item only), best_of samples per answer of which the num_return_sequences likeliest (log-probability / length **
  length_penalty) are returned; do_sample with temperature 0 is greedy. Lengths count generated tokens (EOS
  included)."""
  do_sample: bool = False
  num_beams: int | None = None       # None: 5 for beam search (LAVIS), 1 when sampling
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
    """self, or BadInput naming every setting that cannot work."""
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

  @classmethod
  def of(cls, settings: dict, base: "Decoding | None" = None) -> "Decoding":
    """`base` (default: LAVIS's) with `settings` replaced, checked; an unknown setting is named (not a TypeError)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
      raise BadInput(f"unknown decoding settings {unknown}; known: {', '.join(sorted(known))}")
    return dataclasses.replace(base or cls(), **settings).checked()


def _prefill(model: InstructBlip, params, inputs: dict, num_beams: int, max_new_tokens: int):
  """-> (first token fed to the decoder (B,), cache with B * num_beams rows, (B, V) ids the repetition penalty
  treats as already generated). The image, Q-Former and LLM prompt run once per sample; beams share them."""
  start, cache, seen = model.apply({"params": params}, inputs["pixel_values"], inputs["qformer_input_ids"],
                                   inputs["qformer_attention_mask"], inputs["input_ids"], inputs["attention_mask"],
                                   max_new_tokens, method="prefill")
  return start, model.llm_class.repeat_cache(cache, num_beams), seen


def _step(model: InstructBlip, params, token, t, cache):
  """Feeds `token` (B,) as the t-th decoding input -> (next-token logits (B, V) f32, cache)."""
  return model.apply({"params": params}, token, t, cache, method="step")


def _gather(x, idx):
  """x (B, K, ...), idx (B, J) -> (B, J, ...)."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam_search(model, params, inputs, *, num_beams, max_new_tokens, min_new_tokens, length_penalty,
                 repetition_penalty, num_return_sequences):
  text = model.config.text
  eos, v = text.eos_token_id, text.vocab_size
  b, k = inputs["input_ids"].shape[0], num_beams
  keep = 2 * k                        # candidates per step: enough that k survive even if k of them end in EOS
  length = max_new_tokens + 1         # sequences hold the start token too
  start, cache, prompt_seen = _prefill(model, params, inputs, k, max_new_tokens)
  prompt_seen = jnp.repeat(prompt_seen, k, axis=0)
  seqs = jnp.full((b, k, length), text.pad_token_id, jnp.int32).at[:, :, 0].set(start[:, None])
  state = dict(
      t=jnp.int32(0),                                             # tokens generated so far
      running=seqs, running_scores=jnp.zeros((b, k)).at[:, 1:].set(NEG),
      finished=seqs, finished_scores=jnp.full((b, k), NEG), is_finished=jnp.zeros((b, k), bool),
      improvable=jnp.ones((b, 1), bool), all_hit=jnp.bool_(False), cache=cache)

  def cond(s):
    return s["improvable"].any() & ~s["all_hit"]

  def body(s):
    t = s["t"]
    last = s["running"][:, :, t].reshape(b * k)
    logits, cache = _step(model, params, last, t, s["cache"])
    logp = jax.nn.log_softmax(logits, axis=-1)
    if repetition_penalty != 1.0:
      positions = jnp.arange(length)[None, :] <= t
      flat = s["running"].reshape(b * k, length)
      seen = prompt_seen.at[jnp.arange(b * k)[:, None], flat].max(positions)
      logp = sampling.repetition_penalty(logp, seen, repetition_penalty)
    logp = sampling.block_eos(logp, t, min_new_tokens, eos)
    total = (logp.reshape(b, k, v) + s["running_scores"][:, :, None]).reshape(b, k * v)

    # the best `keep` continuations over all beams
    top_scores, top_idx = jax.lax.top_k(total, keep)                 # (B, 2K)
    source, token = top_idx // v, (top_idx % v).astype(jnp.int32)
    cand = _gather(s["running"], source).at[:, :, t + 1].set(token)   # (B, 2K, T+1)
    hits = (token == eos) | (t + 2 >= length)                         # finished by EOS or by length

    # running beams: the best k candidates that did not finish
    run_scores = top_scores + hits * NEG
    nxt = jax.lax.top_k(run_scores, k)[1]
    running, running_scores = _gather(cand, nxt), _gather(run_scores, nxt)
    beam_src = (_gather(source, nxt) + jnp.arange(b)[:, None] * k).reshape(b * k)
    cache = model.llm_class.reorder_cache(cache, beam_src)

    # finished hypotheses: only the top k candidates may enter, scored with the length penalty
    just_done = hits & (jnp.arange(keep) < k)[None]
    done_scores = top_scores / ((t + 1.0) ** length_penalty)
    done_scores = done_scores + (~s["improvable"]) * NEG + (~just_done) * NEG
    merged_scores = jnp.concatenate([s["finished_scores"], done_scores], axis=1)
    best = jax.lax.top_k(merged_scores, k)[1]
    finished = _gather(jnp.concatenate([s["finished"], cand], axis=1), best)
    finished_scores = _gather(merged_scores, best)
    is_finished = _gather(jnp.concatenate([s["is_finished"], just_done], axis=1), best)

    # can a running beam still beat the worst finished one? (transformers' early_stopping=False heuristic)
    best_running = running_scores[:, :1] / ((t + 1.0) ** length_penalty)
    worst_done = jnp.where(is_finished, finished_scores.min(axis=1, keepdims=True), NEG)
    improvable = s["improvable"] & jnp.any(best_running > worst_done, axis=-1, keepdims=True)
    return dict(t=t + 1, running=running, running_scores=running_scores, finished=finished,
                finished_scores=finished_scores, is_finished=is_finished, improvable=improvable,
                all_hit=hits.all(), cache=cache)

  s = jax.lax.while_loop(cond, body, state)
  out = s["finished"][:, :num_return_sequences, 1:].reshape(b * num_return_sequences, max_new_tokens)
  # everything after the first EOS is padding
  after_eos = jnp.cumsum(out == eos, axis=1) - (out == eos) > 0
  return jnp.where(after_eos, text.pad_token_id, out)


@functools.partial(jax.jit, static_argnames=("model", "num_beams", "max_new_tokens", "min_new_tokens",
                                             "length_penalty", "repetition_penalty", "num_return_sequences"))
def _generate(model, params, inputs, *, num_beams, max_new_tokens, min_new_tokens, length_penalty,
              repetition_penalty, num_return_sequences):
  if num_beams == 1:   # greedy search: the loop sampling shares, taking the argmax
    settings = sampling.knobs(inputs["input_ids"].shape[0], 1, max_new_tokens=max_new_tokens,
                              min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty)
    return sampling.loop(model, params, inputs, settings, width=max_new_tokens, greedy=True, copies=1,
                         stream=False)[0]
  return _beam_search(model, params, inputs, num_beams=num_beams, max_new_tokens=max_new_tokens,
                      min_new_tokens=min_new_tokens, length_penalty=length_penalty,
                      repetition_penalty=repetition_penalty, num_return_sequences=num_return_sequences)


def generate(model: InstructBlip, params, *, pixel_values, qformer_input_ids, qformer_attention_mask, input_ids,
             attention_mask, num_beams: int = 5, max_new_tokens: int = 30, min_new_tokens: int = 1,
             length_penalty: float = 1.0, repetition_penalty: float = 1.0,
             num_return_sequences: int = 1) -> jax.Array:
  """Generated tokens (B * num_return_sequences, max_new_tokens): after the start token (FlanT5) or the prompt
  (decoder-only), EOS included, then pad. Prompts may be padded on either side. num_beams=1 is greedy search."""
  if not 1 <= num_return_sequences <= num_beams:
    raise ValueError(f"num_return_sequences={num_return_sequences} must be between 1 and num_beams={num_beams}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  inputs = dict(pixel_values=pixel_values, qformer_input_ids=qformer_input_ids,
                qformer_attention_mask=qformer_attention_mask, input_ids=input_ids,
                attention_mask=np.ones_like(input_ids) if attention_mask is None else attention_mask)
  return _generate(model, params, inputs, num_beams=num_beams, max_new_tokens=max_new_tokens,
                   min_new_tokens=min_new_tokens, length_penalty=float(length_penalty),
                   repetition_penalty=float(repetition_penalty), num_return_sequences=num_return_sequences)
