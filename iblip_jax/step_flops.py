"""FLOPs of one train step, counted by XLA before partitioning with every layer loop unrolled: what the AOT tool
reports and what training's model FLOP/s and MFU (run/timeline.py) divide by time.

Why unrolled: XLA's cost analysis counts a loop body once, and the ViT's and LLM's layers are scanned. Why before
partitioning: the count is of the model's maths, not of one device's share; the TPU compiler also adds loops of its
own to a partitioned program (see aot/compile.global_flops)."""
import dataclasses

import jax

from iblip_jax.models.instructblip import InstructBlip
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
