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

Decoder-only LLMs (Vicuna): the prompt is left-aligned and run once to fill the cache (see
`_prefill_decoder_only`); from there the same loops run, fed the last prompt token first. Only the new tokens are
returned (transformers returns the prompt too).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from iblip_jax.models import llama
from iblip_jax.models.instructblip import InstructBlip

NEG = -1.0e9  # transformers' "impossible" score in beam search


def _repetition_penalty(scores, seen, penalty: float):
  if penalty == 1.0:
    return scores
  return jnp.where(seen, jnp.where(scores < 0, scores * penalty, scores / penalty), scores)


def _block_eos(scores, generated: jax.Array, min_new_tokens: int, eos: int):
  return jnp.where(generated < min_new_tokens, scores.at[..., eos].set(-jnp.inf), scores)


def left_align(ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Moves every row's padding to the front, keeping token order (any padding layout in, left padding out), so
  that the last position of every prompt is a real token."""
  order = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)
  return jnp.take_along_axis(ids, order, axis=1), jnp.take_along_axis(mask, order, axis=1)


def _prefill_t5(model: InstructBlip, params, inputs: dict, num_beams: int, max_new_tokens: int):
  """Encoder states repeated per beam, their mask, and the decoder cache; decoding starts at the start token."""
  text = model.config.text
  encoded, mask = model.apply({"params": params}, inputs["pixel_values"], inputs["qformer_input_ids"],
                              inputs["qformer_attention_mask"], inputs["input_ids"], inputs["attention_mask"],
                              method="encode")
  encoded, mask = jnp.repeat(encoded, num_beams, axis=0), jnp.repeat(mask, num_beams, axis=0)
  cache = model.apply({"params": params}, encoded, max_new_tokens,
                      method=lambda m, e, n: m.language_model.init_cache(e, n))
  b = inputs["input_ids"].shape[0]
  seen = jnp.zeros((b, text.vocab_size), bool).at[:, text.decoder_start_token_id].set(True)
  return jnp.full((b,), text.decoder_start_token_id, jnp.int32), mask, cache, seen


def _prefill_decoder_only(model: InstructBlip, params, inputs: dict, num_beams: int, max_new_tokens: int):
  """[visual][left-padded prompt] minus its last token goes through the LLM once, filling the cache; decoding
  starts by feeding that last prompt token (always a real token after left alignment) at step 0.

  Positions are cumsum(mask) - 1 (transformers' generate), so padding does not shift the real tokens'. The
  repetition penalty counts every prompt id (and the image placeholder id) as seen, as transformers does with
  input_ids = [image tokens][padded prompt]."""
  cfg = model.config
  text = cfg.text
  ids, prompt_mask = left_align(inputs["input_ids"], inputs["attention_mask"])
  embeds, mask = model.apply({"params": params}, inputs["pixel_values"], inputs["qformer_input_ids"],
                             inputs["qformer_attention_mask"], ids, prompt_mask, method="llm_inputs")
  b, p = mask.shape
  size = p - 1 + max_new_tokens                                   # cache slots: prompt, then one per step
  positions = llama.positions(mask)
  key_mask = jnp.concatenate([mask[:, :p - 1].astype(bool), jnp.zeros((b, max_new_tokens), bool)], axis=1)
  causal = jnp.arange(size)[None, :] <= jnp.arange(p - 1)[:, None]                 # (P-1, T)
  cache = model.apply({"params": params}, b, size, method=lambda m, *a: m.language_model.init_cache(*a))
  _, cache = model.apply({"params": params}, embeds[:, :p - 1], positions[:, :p - 1],
                         (key_mask[:, None, None, :] & causal[None, None]), cache, 0,
                         method=lambda m, *a: m.language_model.extend(*a))
  seen = jnp.zeros((b, text.vocab_size), bool).at[jnp.arange(b)[:, None], ids].set(True)
  if cfg.image_token_index is not None and cfg.image_token_index < text.vocab_size:
    seen = seen.at[:, cfg.image_token_index].set(True)
  rep = lambda x: jnp.repeat(x, num_beams, axis=0)
  cache = jax.tree.map(lambda x: jnp.repeat(x, num_beams, axis=1), cache)
  ctx = {"key_mask": rep(key_mask), "last_position": rep(positions[:, -1]), "prompt_length": p}
  return ids[:, -1].astype(jnp.int32), ctx, cache, seen


def _prefill(model: InstructBlip, params, inputs: dict, num_beams: int, max_new_tokens: int):
  """-> (first token fed to the decoder (B,), context for `_step`, cache with B * num_beams rows, (B, V) ids the
  repetition penalty treats as already generated)."""
  fn = _prefill_decoder_only if model.config.decoder_only else _prefill_t5
  return fn(model, params, inputs, num_beams, max_new_tokens)


def _step(model: InstructBlip, params, token, t, cache, ctx):
  """Feeds `token` (B,) as the t-th decoding input -> (next-token logits (B, V) f32, cache)."""
  if not model.config.decoder_only:
    return model.apply({"params": params}, token, t, cache, ctx,
                       method=lambda m, *a: m.language_model.decode_step(*a))
  index = ctx["prompt_length"] - 1 + t
  slots = jnp.arange(ctx["key_mask"].shape[1])
  mask = ctx["key_mask"] | ((slots >= ctx["prompt_length"] - 1) & (slots <= index))[None]
  def run(m, token):
    return m.language_model.extend(m.language_model.embed(token[:, None]), (ctx["last_position"] + t)[:, None],
                                   mask[:, None, None, :], cache, index)
  return model.apply({"params": params}, token, method=run)


def _reorder(cache: dict, rows: jax.Array) -> dict:
  """Self-attention keys/values follow their beams; T5's cross-attention ones are equal across an item's beams."""
  return {k: v if k.startswith("cross") else v[:, rows] for k, v in cache.items()}


def _greedy(model, params, inputs, *, max_new_tokens, min_new_tokens, repetition_penalty):
  text = model.config.text
  b = inputs["input_ids"].shape[0]
  start, ctx, cache, seen = _prefill(model, params, inputs, 1, max_new_tokens)
  tokens = jnp.full((b, max_new_tokens), text.pad_token_id, jnp.int32)

  def cond(state):
    t, _, _, _, _, done = state
    return (t < max_new_tokens) & ~jnp.all(done)

  def body(state):
    t, last, tokens, seen, cache, done = state
    logits, cache = _step(model, params, last, t, cache, ctx)
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
  start, ctx, cache, prompt_seen = _prefill(model, params, inputs, k, max_new_tokens)
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
    logits, cache = _step(model, params, last, t, s["cache"], ctx)
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
    cache = _reorder(cache, beam_src)

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
