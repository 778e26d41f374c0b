"""Greedy and beam-search generation with a KV cache, token-for-token equal to transformers' `generate`.

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
import functools

import jax
import jax.numpy as jnp
import numpy as np

from iblip_jax.models.instructblip import InstructBlip

NEG = -1.0e9  # transformers' "impossible" score in beam search


def _repetition_penalty(scores, seen, penalty: float):
  if penalty == 1.0:
    return scores
  return jnp.where(seen, jnp.where(scores < 0, scores * penalty, scores / penalty), scores)


def _block_eos(scores, generated: jax.Array, min_new_tokens: int, eos: int):
  return jnp.where(generated < min_new_tokens, scores.at[..., eos].set(-jnp.inf), scores)


def _prefill(model: InstructBlip, params, inputs: dict, num_beams: int, max_new_tokens: int):
  """-> (first token fed to the decoder (B,), cache with B * num_beams rows, (B, V) ids the repetition penalty
  treats as already generated). The image, Q-Former and LLM prompt run once per sample; beams share them."""
  start, cache, seen = model.apply({"params": params}, inputs["pixel_values"], inputs["qformer_input_ids"],
                                   inputs["qformer_attention_mask"], inputs["input_ids"], inputs["attention_mask"],
                                   max_new_tokens, method="prefill")
  return start, (cache if num_beams == 1 else model.llm_class.repeat_cache(cache, num_beams)), seen


def _step(model: InstructBlip, params, token, t, cache):
  """Feeds `token` (B,) as the t-th decoding input -> (next-token logits (B, V) f32, cache)."""
  return model.apply({"params": params}, token, t, cache, method="step")


def _greedy(model, params, inputs, *, max_new_tokens, min_new_tokens, repetition_penalty):
  text = model.config.text
  b = inputs["input_ids"].shape[0]
  start, cache, seen = _prefill(model, params, inputs, 1, max_new_tokens)
  tokens = jnp.full((b, max_new_tokens), text.pad_token_id, jnp.int32)

  def cond(state):
    t, _, _, _, _, done = state
    return (t < max_new_tokens) & ~jnp.all(done)

  def body(state):
    t, last, tokens, seen, cache, done = state
    logits, cache = _step(model, params, last, t, cache)
    scores = _block_eos(_repetition_penalty(logits, seen, repetition_penalty), t, min_new_tokens,
                        text.eos_token_id)
    nxt = jnp.where(done, text.pad_token_id, jnp.argmax(scores, axis=-1).astype(jnp.int32))
    seen = seen.at[jnp.arange(b), nxt].set(True)
    return t + 1, nxt, tokens.at[:, t].set(nxt), seen, cache, done | (nxt == text.eos_token_id)

  state = (jnp.int32(0), start, tokens, seen, cache, jnp.zeros((b,), bool))
  return jax.lax.while_loop(cond, body, state)[2]


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
      logp = _repetition_penalty(logp, seen, repetition_penalty)
    logp = _block_eos(logp, t, min_new_tokens, eos)
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
  if num_beams == 1:
    return _greedy(model, params, inputs, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                   repetition_penalty=repetition_penalty)
  return _beam_search(model, params, inputs, num_beams=num_beams, max_new_tokens=max_new_tokens,
                      min_new_tokens=min_new_tokens, length_penalty=length_penalty,
                      repetition_penalty=repetition_penalty, num_return_sequences=num_return_sequences)


def generate(model: InstructBlip, params, *, pixel_values, qformer_input_ids, qformer_attention_mask, input_ids,
             attention_mask, num_beams: int = 5, max_new_tokens: int = 30, min_new_tokens: int = 1,
             length_penalty: float = 1.0, repetition_penalty: float = 1.0,
             num_return_sequences: int = 1) -> jax.Array:
  """Generated tokens (B * num_return_sequences, max_new_tokens): after the start token (FlanT5) or the prompt
  (decoder-only), EOS included, then pad. Prompts may be padded on either side."""
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
