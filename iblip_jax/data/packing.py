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

Packing is of the whole global batch, after the input pipeline (which still yields bucket-padded examples): every
host gathers the batch's LLM token ids (a few KB per step), fills rows first-fit, longest example first, from the
ids alone, and keeps the rows its devices hold. So every host builds the same rows, whatever the number of hosts
(only the number of devices sharing the batch rounds the row count), a resumed run rebuilds them from the batch
index alone, and examples of one host may share a row with another's (their visual tokens are gathered across
devices by XLA: B x V x D values per step, small next to the LLM's activations).

Fields (all int32; R rows, a multiple of the devices sharing the batch; L = `length`; FlanT5's decoder rows T
tokens, the smallest multiple of 8 holding the fullest row's targets, T chosen per batch to waste least):
  packed_input_ids, packed_segment_ids, packed_positions, packed_visual_slots (R, L);
  packed_labels: FlanT5 (R, T) the targets; decoder-only (R, L) the token each position predicts (shifted already);
  FlanT5 only: packed_decoder_segment_ids, packed_decoder_positions (R, T) (the model shifts the targets right
  within each segment).
"""
from typing import Sequence

import jax
import numpy as np

from iblip_jax import sharding
from iblip_jax.errors import UserError
from iblip_jax.losses import IGNORE
from iblip_jax.models.instructblip import PACKED_PREFIX

TILE = 8   # decoder rows are a multiple of this (the TPU's sublane tile)
LLM_FIELDS = ("input_ids", "attention_mask", "labels", "decoder_attention_mask")


def first_fit(sizes: np.ndarray, capacity: Sequence[int]) -> list[list[int]]:
  """Rows of example indices: each example (sizes (N, k), one column per packed sequence) goes to the first row
  with room for it in every column, examples taken longest first (ties by index: deterministic)."""
  sizes = np.asarray(sizes, np.int64).reshape(len(sizes), -1)
  capacity = np.asarray(capacity, np.int64)
  too_long = np.flatnonzero((sizes > capacity).any(axis=1))
  if too_long.size:
    i = int(too_long[0])
    raise UserError(f"a training example needs {sizes[i].tolist()} LLM tokens; packed rows hold "
                    f"{capacity.tolist()}: raise config.data.packing to at least the longest example")
  order = sorted(range(len(sizes)), key=lambda i: (-float(sizes[i] @ (1 / capacity)), i))
  rows, room = [], np.empty((0, len(capacity)), np.int64)   # room: what each row has left, per column
  for i in order:
    fits = np.flatnonzero((room >= sizes[i]).all(axis=1))
    if fits.size:
      rows[fits[0]].append(i)
      room[fits[0]] -= sizes[i]
    else:
      rows.append([i])
      room = np.concatenate([room, (capacity - sizes[i])[None]])
  return [sorted(r) for r in rows]


def examples(batch: dict) -> tuple[list[list[int]], list[list[int]]]:
  """(prompt ids, target ids) of each example of an unpacked training batch (tokenize.encode_training's layout)."""
  ids, mask, labels = (np.asarray(batch[k]) for k in ("input_ids", "attention_mask", "labels"))
  if "decoder_attention_mask" in batch:   # FlanT5: prompts and targets apart
    return ([r[m == 1].tolist() for r, m in zip(ids, mask)], [l[l != IGNORE].tolist() for l in labels])
  prompts, targets = [], []   # decoder-only: [prompt][target] in one row, labels on the target
  for r, m, l in zip(ids, mask, labels):
    first = int(np.argmax(l != IGNORE)) if (l != IGNORE).any() else int(m.sum())
    prompts.append(r[:first].tolist())
    targets.append(r[first:int(m.sum())].tolist())
  return prompts, targets


def pack(batch: dict, *, visual_tokens: int, length: int, row_multiple: int = 1) -> dict:
  """The packed LLM fields (module docstring) of an unpacked batch's examples, in rows of `length` tokens, the row
  count rounded up to `row_multiple` with empty rows."""
  prompts, targets = examples(batch)
  v = visual_tokens
  decoder_only = "decoder_attention_mask" not in batch
  if decoder_only:
    rows = first_fit([[v + len(p) + len(t)] for p, t in zip(prompts, targets)], [length])
  else:
    rows = _encoder_decoder_fit(np.array([v + len(p) for p in prompts]), np.array([len(t) for t in targets]),
                                length, row_multiple)
  rows += [[] for _ in range(-len(rows) % row_multiple)]
  build = _decoder_only_rows if decoder_only else _encoder_decoder_rows
  return build(rows, prompts, targets, v, length)


def _encoder_decoder_fit(enc: np.ndarray, dec: np.ndarray, length: int, row_multiple: int) -> list[list[int]]:
  """FlanT5's rows: an example needs room on the encoder row (`length`) and the decoder row (one width T for the
  batch). T is searched: from the longest target up, over the targets' share of the encoder's room and beyond, the
  T whose first-fit rows cost the fewest positions, rows x (length + the decoder width they need)."""
  round_up = lambda x, m: -(-int(x) // m) * m
  longest = round_up(dec.max(), TILE)
  share = round_up(length * dec.sum() / max(enc.sum(), 1), TILE)
  widths = {longest, max(longest, share)} | {max(longest, int(w) // TILE * TILE)
                                             for w in np.linspace(longest, max(length, 2 * share), 16)}
  best = None
  for width in sorted(widths):
    rows = first_fit(np.stack([enc, dec], 1), [length, width])
    cost = round_up(len(rows), row_multiple) * (length + round_up(max(dec[r].sum() for r in rows), TILE))
    if best is None or cost < best[0]:
      best = (cost, rows)
  return best[1]


def global_rows(host_batch: dict, *, query_tokens: int, length: int, row_multiple: int) -> dict:
  """This host's share of the packed global batch: its examples' pixel values and Q-Former fields as they are, and
  the packed rows its devices hold in place of the LLM fields. Every host gathers the whole batch's LLM fields
  (hosts pad them to one width first), packs them identically and keeps its block of rows; `row_multiple` = the
  devices sharing the batch (data x fsdp), a multiple of the hosts."""
  llm = {k: host_batch[k] for k in LLM_FIELDS if k in host_batch}
  hosts = jax.process_count()
  if hosts > 1:
    from jax.experimental import multihost_utils
    llm = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
           for k, v in sharding.agree_shapes(llm).items()}
  pixels = host_batch["pixel_values"]
  frames = pixels.shape[1] if pixels.ndim == 5 else 1   # a video's frames each bring their query tokens
  packed = pack(llm, visual_tokens=query_tokens * frames, length=length, row_multiple=row_multiple)
  r = packed["packed_segment_ids"].shape[0] // hosts
  mine = slice(jax.process_index() * r, (jax.process_index() + 1) * r)
  out = {k: v for k, v in host_batch.items() if k not in LLM_FIELDS}
  return dict(out, **{k: v[mine] for k, v in packed.items()})


def _row_arrays(r: int, length: int) -> dict:
  """Empty rows; input ids are 0 where nothing is (masked) and at visual slots (replaced by the visual tokens)."""
  return {PACKED_PREFIX + k: np.full((r, length), fill, np.int32)
          for k, fill in (("input_ids", 0), ("segment_ids", 0), ("positions", 0), ("visual_slots", -1))}


def _place(a: dict, row: int, at: int, segment: int, example: int, v: int, ids: list[int]) -> int:
  """Writes [v visual slots of `example`][ids] into `row` from `at` as `segment`; returns the end."""
  n = v + len(ids)
  a["packed_segment_ids"][row, at:at + n] = segment
  a["packed_positions"][row, at:at + n] = np.arange(n)
  a["packed_visual_slots"][row, at:at + v] = example * v + np.arange(v)
  a["packed_input_ids"][row, at + v:at + n] = ids
  return at + n


def _decoder_only_rows(rows, prompts, targets, v, length) -> dict:
  a = _row_arrays(len(rows), length)
  labels = np.full((len(rows), length), IGNORE, np.int32)
  for r, members in enumerate(rows):
    at = 0
    for s, i in enumerate(members, 1):
      start = at + v + len(prompts[i])   # the target's first token; the position before it predicts it
      at = _place(a, r, at, s, i, v, prompts[i] + targets[i])
      labels[r, start - 1:at - 1] = targets[i]
  return dict(a, packed_labels=labels)


def _encoder_decoder_rows(rows, prompts, targets, v, length) -> dict:
  a = _row_arrays(len(rows), length)
  t = max(TILE, -(-max(sum(len(targets[i]) for i in m) for m in rows) // TILE) * TILE)
  labels = np.full((len(rows), t), IGNORE, np.int32)
  dec_seg, dec_pos = np.zeros((len(rows), t), np.int32), np.zeros((len(rows), t), np.int32)
  for r, members in enumerate(rows):
    at = dat = 0
    for s, i in enumerate(members, 1):
      at = _place(a, r, at, s, i, v, prompts[i])
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


def text_slots(batch: dict) -> int:
  """The LLM's text positions in a packed batch, padding included (visual slots excluded): what padding is a share
  of."""
  n = int((batch["packed_visual_slots"] < 0).sum())
  if "packed_decoder_segment_ids" in batch:
    n += batch["packed_decoder_segment_ids"].size
  return n
