"""Sequence packing: several training examples share one LLM row, so that short examples stop paying for padding.

An example's LLM side is [its V visual tokens][its prompt] (FlanT5: on the encoder, its target on the decoder;
decoder-only: [visual][prompt][target] in one row). Packing lays examples one after another in rows of `length`
tokens and gives every token the example's segment id (1, 2, ... within the row; 0 = padding) and a position
counted from the example's start. The models attend only within a segment (layers.segment_mask) and LLaMA's
rotary angles restart per segment (positions; T5's relative bias depends on key - query alone, which a contiguous
segment keeps), so each example computes what it computes alone; the loss stays the token mean over the batch, so packed and unpacked steps are the same maths.

The ViT and the Q-Former still run per example (pixel values and Q-Former instructions stay (B, ...)); the row
positions of example b's visual tokens are in `packed_visual_slots` as b * V + j (b counted over the global batch),
and the model places them there (InstructBlip.packed_target_logits).

Rows are filled first-fit, longest example first, from the token ids alone: the same texts give the same rows on
every host and after every restart, so packing needs no state of its own beyond the batch index.

Fields (all int32; R rows, L = `length`; FlanT5's decoder rows T tokens, the smallest multiple of 8 holding the
fullest row's targets):
  packed_input_ids, packed_segment_ids, packed_positions, packed_visual_slots (R, L);
  packed_labels: FlanT5 (R, T) the targets; decoder-only (R, L) the token each position predicts (shifted already);
  FlanT5 only: packed_decoder_segment_ids, packed_decoder_positions (R, T) (the model shifts the targets right
  within each segment).
"""
from typing import Sequence

import numpy as np

from iblip_jax.data import tokenize
from iblip_jax.losses import IGNORE

TILE = 8   # decoder rows are a multiple of this (the TPU's sublane tile)

# what each packed field holds where nothing is packed (padding rows added to agree on shapes between hosts)
FILL = {"packed_labels": IGNORE, "packed_visual_slots": -1}


def first_fit(sizes: np.ndarray, capacity: Sequence[int]) -> list[list[int]]:
  """Rows of example indices: each example (sizes (N, k), one column per packed sequence) goes to the first row
  with room for it in every column, examples taken longest first (ties by index: deterministic)."""
  sizes = np.asarray(sizes, np.int64).reshape(len(sizes), -1)
  capacity = np.asarray(capacity, np.int64)
  too_long = np.flatnonzero((sizes > capacity).any(axis=1))
  if too_long.size:
    i = int(too_long[0])
    raise ValueError(f"example {i} needs {sizes[i].tolist()} tokens; packed rows hold {capacity.tolist()}: "
                     "config.data.packing must be at least the longest example")
  order = sorted(range(len(sizes)), key=lambda i: (-float(sizes[i] @ (1 / capacity)), i))
  rows, room = [], []
  for i in order:
    for r, left in enumerate(room):
      if (sizes[i] <= left).all():
        rows[r].append(i)
        room[r] = left - sizes[i]
        break
    else:
      rows.append([i])
      room.append(capacity - sizes[i])
  return [sorted(r) for r in rows]


def pack(tok: tokenize.Tokenizers, texts_in: Sequence[str], texts_out: Sequence[str], *, visual_tokens: int,
         length: int, first_example: int = 0, qformer_texts: Sequence[str] | None = None) -> dict:
  """A training batch of len(texts_in) examples with its LLM side packed (module docstring); the Q-Former's
  instruction fields stay per example. `first_example`: the batch index of example 0 (a process's share of the
  global batch starts there), for the visual slots."""
  prompts, targets = tokenize.training_ids(tok, texts_in, texts_out)
  v = visual_tokens
  out = tokenize.encode_qformer(tok, texts_in if qformer_texts is None else qformer_texts)
  if tok.decoder_only:
    rows = first_fit([[v + len(p) + len(t)] for p, t in zip(prompts, targets)], [length])
    return dict(out, **_decoder_only_rows(rows, prompts, targets, v, length, first_example, tok.llm.pad_token_id))
  enc = np.array([v + len(p) for p in prompts])
  dec = np.array([len(t) for t in targets])
  # decoder rows get the targets' share of the encoder's room (at least the longest target), so that both fill up
  # together: a row is full when either is
  share = int(np.ceil(length * dec.sum() / max(enc.sum(), 1) / TILE)) * TILE
  rows = first_fit(np.stack([enc, dec], 1), [length, max(share, int(dec.max()))])
  return dict(out, **_encoder_decoder_rows(rows, prompts, targets, v, length, first_example, tok.llm.pad_token_id))


def _row_arrays(r: int, length: int, pad: int) -> dict:
  return dict(packed_input_ids=np.full((r, length), pad, np.int32), packed_segment_ids=np.zeros((r, length), np.int32),
              packed_positions=np.zeros((r, length), np.int32),
              packed_visual_slots=np.full((r, length), -1, np.int32))


def _place(a: dict, row: int, at: int, segment: int, example: int, v: int, ids: list[int]) -> int:
  """Writes [v visual slots of `example`][ids] into `row` from `at` as `segment`; returns the end."""
  n = v + len(ids)
  a["packed_segment_ids"][row, at:at + n] = segment
  a["packed_positions"][row, at:at + n] = np.arange(n)
  a["packed_visual_slots"][row, at:at + v] = example * v + np.arange(v)
  a["packed_input_ids"][row, at + v:at + n] = ids
  return at + n


def _decoder_only_rows(rows, prompts, targets, v, length, first, pad) -> dict:
  a = _row_arrays(len(rows), length, pad)
  labels = np.full((len(rows), length), IGNORE, np.int32)
  for r, members in enumerate(rows):
    at = 0
    for s, i in enumerate(members, 1):
      start = at + v + len(prompts[i])   # the target's first token; the position before it predicts it
      at = _place(a, r, at, s, first + i, v, prompts[i] + targets[i])
      labels[r, start - 1:at - 1] = targets[i]
  return dict(a, packed_labels=labels)


def _encoder_decoder_rows(rows, prompts, targets, v, length, first, pad) -> dict:
  a = _row_arrays(len(rows), length, pad)
  t = max(TILE, -(-max(sum(len(targets[i]) for i in m) for m in rows) // TILE) * TILE)
  labels = np.full((len(rows), t), IGNORE, np.int32)
  dec_seg, dec_pos = np.zeros((len(rows), t), np.int32), np.zeros((len(rows), t), np.int32)
  for r, members in enumerate(rows):
    at = dat = 0
    for s, i in enumerate(members, 1):
      at = _place(a, r, at, s, first + i, v, prompts[i])
      n = len(targets[i])
      labels[r, dat:dat + n] = targets[i]
      dec_seg[r, dat:dat + n] = s
      dec_pos[r, dat:dat + n] = np.arange(n)
      dat += n
  return dict(a, packed_labels=labels, packed_decoder_segment_ids=dec_seg, packed_decoder_positions=dec_pos)


def real_tokens(batch: dict) -> int:
  """The LLM's text tokens in a packed batch (visual slots and padding excluded), as counted unpacked."""
  n = int(((batch["packed_segment_ids"] > 0) & (batch["packed_visual_slots"] < 0)).sum())
  if "packed_decoder_segment_ids" in batch:
    n += int((batch["packed_decoder_segment_ids"] > 0).sum())
  return n
