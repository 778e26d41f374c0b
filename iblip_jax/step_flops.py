"""FLOPs of one train step, counted by XLA before partitioning with every layer loop unrolled: what the AOT tool
reports and what training's model FLOP/s and MFU (run/timeline.py) divide by time.

Why unrolled: XLA's cost analysis counts a loop body once, and the ViT's and LLM's layers are scanned. Why before
partitioning: the count is of the model's maths, not of one device's share; the TPU compiler also adds loops of its
own to a partitioned program (see aot/compile.global_flops)."""
import dataclasses

import jax
import jax.numpy as jnp

from iblip_jax.models.instructblip import InstructBlip, packed_fields
from iblip_jax.train_step import make_train_step


def fully_unrolled(cfg):
  """The same model (parameters and maths) with no layer loops left, for counting FLOPs."""
  t = cfg.text
  text_layers = t.num_hidden_layers if cfg.decoder_only else max(t.num_layers, t.num_decoder_layers)
  return cfg.replace(vision=dataclasses.replace(cfg.vision, scan_unroll=cfg.vision.num_hidden_layers),
                     text=dataclasses.replace(cfg.text, scan_unroll=text_layers))


def without_remat(cfg):
  """The model whose FLOPs MFU counts: remat's recomputed forward is executed but not model work."""
  return cfg.replace(text=dataclasses.replace(cfg.text, remat=False))


def shapes(tree):
  """`tree` as unsharded ShapeDtypeStructs: what counting needs, and nothing that a later step may donate."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def train_step_flops(cfg, tx, trainable, opt_state, frozen, batch, *, dropout: bool) -> float:
  """FLOPs of one step of the train step (forward, backward, optimizer) of the model `cfg` on `batch`. The trees
  may be arrays, sharded or not, or ShapeDtypeStructs: only shapes and dtypes are read; nothing is compiled."""
  step = jax.jit(make_train_step(InstructBlip(fully_unrolled(cfg)), tx, vision_frozen="vision" not in trainable,
                                 dropout=dropout))
  rng = jax.eval_shape(jax.random.key, 0)
  lowered = step.lower(shapes(trainable), shapes(opt_state), shapes(frozen), shapes(batch), rng)
  return float(lowered.cost_analysis()["flops"])


def _frozen_forward(m: InstructBlip, batch: dict):
  """The frozen towers' forward passes on a training batch's shapes: the ViT over every image (or video frame) and
  the LLM over the batch's rows, packed or not, the visual tokens' places filled with zeros (their values do not
  change a FLOP count)."""
  pixels = batch["pixel_values"]
  seen = m.vision(pixels.reshape((-1,) + pixels.shape[-3:]))   # returned: an unused result would not be counted
  llm = m.language_model
  packed = packed_fields(batch)
  if packed is not None:
    embeds = llm.embed(packed["input_ids"])
    if m.config.decoder_only:
      return seen, llm(embeds, None, packed["positions"], packed["segment_ids"])
    return seen, llm.packed_logits(embeds, packed["segment_ids"], packed["labels"], packed["decoder_segment_ids"])
  text = llm.embed(batch["input_ids"])
  visual = m.config.num_query_tokens * (pixels.shape[1] if pixels.ndim == 5 else 1)
  embeds = jnp.concatenate([jnp.zeros((text.shape[0], visual, text.shape[2]), text.dtype), text], axis=1)
  mask = jnp.concatenate([jnp.ones((text.shape[0], visual), jnp.int32), batch["attention_mask"]], axis=1)
  if m.config.decoder_only:
    return seen, llm(embeds, mask)
  return seen, llm(embeds, mask, batch["labels"], batch.get("decoder_attention_mask"))


def frozen_forward_flops(cfg, params, batch) -> float:
  """FLOPs of the frozen towers' forward passes in one train step (ViT and LLM, layers unrolled): work every step
  does on weights it never updates, reported apart from the step's model FLOPs as MaxText reports a frozen vision
  tower's. `params`: the whole tree (LoRA adapters included), arrays or ShapeDtypeStructs."""
  model = InstructBlip(fully_unrolled(cfg))
  forward = jax.jit(lambda p, b: model.apply({"params": p}, b, method=_frozen_forward))
  return float(forward.lower(shapes(params), shapes(batch)).cost_analysis()["flops"])
