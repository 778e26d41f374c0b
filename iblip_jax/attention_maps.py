"""Instruction-aware attention maps: where the Q-Former's queries look in the image for a given instruction, and which
of those looks the answer depends on.

- Cross-attention: every cross-attention layer of the Q-Former (layers 0, f, 2f, ...) gives, per head and query, a
  softmax over the image tokens ([CLS] first, then the ViT's patches in row-major order). The instruction enters the
  Q-Former's self-attention, so the same image under two instructions gives two different maps.
- Relevance: the attention weighted by the gradient of the answer's log-likelihood log p(answer | image,
  instruction) with respect to the attention probabilities, positive part, averaged over layers, heads and queries
  (Grad-CAM applied to attention, as in Chefer et al. 2021, "Generic Attention-model Explainability"). The gradient
  comes from Flax's `perturb` on the probabilities (models/qformer.py computes them explicitly when asked).
- Overlays: the maps over the patch grid, drawn on the image as PNGs (matplotlib, the `viz` extra), one column per
  instruction, so that instruction-dependence is visible side by side.
"""
import dataclasses
import functools
import io
import textwrap
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iblip_jax import losses
from iblip_jax.data import tokenize
from iblip_jax.extras import require
from iblip_jax.models.instructblip import InstructBlip


@dataclasses.dataclass(frozen=True)
class AttentionMaps:
  """One image under one instruction. probs and grad: (L, H, Q, N) for the L cross-attention layers (Q-Former layer
  indices in `layers`), H heads, Q queries and N = 1 + gh * gw image tokens ([CLS] first); each probs row sums to 1.
  grad = d log p(answer) / d probs. logprob: log p(answer | image, prompt) under the model."""
  prompt: str
  answer: str
  probs: np.ndarray
  grad: np.ndarray
  layers: tuple[int, ...]
  grid: tuple[int, int]
  logprob: float

  def _patches(self, x: np.ndarray) -> np.ndarray:
    """(..., N) -> (..., gh, gw): the patch tokens on their grid ([CLS] dropped)."""
    return x[..., 1:].reshape(x.shape[:-1] + self.grid)

  @property
  def per_layer(self) -> np.ndarray:
    """(L, gh, gw): each layer's attention averaged over heads and queries."""
    return self._patches(self.probs.mean(axis=(1, 2)))

  @property
  def per_query(self) -> np.ndarray:
    """(Q, gh, gw): each query's attention averaged over layers and heads."""
    return self._patches(self.probs.mean(axis=(0, 1)))

  @property
  def mean(self) -> np.ndarray:
    """(gh, gw): the attention averaged over layers, heads and queries."""
    return self._patches(self.probs.mean(axis=(0, 1, 2)))

  @property
  def cls(self) -> float:
    """The share of the attention that goes to the [CLS] token rather than to a patch."""
    return float(self.probs[..., 0].mean())

  @property
  def relevance(self) -> np.ndarray:
    """(gh, gw): mean over layers, heads and queries of max(probs * grad, 0)."""
    return self._patches(np.maximum(self.probs * self.grad, 0).mean(axis=(0, 1, 2)))


def cross_attention_layers(model: InstructBlip) -> tuple[int, ...]:
  q = model.config.qformer
  return tuple(i for i in range(q.num_hidden_layers) if i % q.cross_attention_frequency == 0)


def _stack(tree, layers: Sequence[int], leaf: str) -> jax.Array:
  """A collection's per-layer crossattention/<leaf> entries -> (B, L, H, Q, N)."""
  def get(i):
    x = tree["qformer"][f"layer_{i}"]["crossattention"][leaf]
    return x[0] if isinstance(x, tuple) else x   # sow stores a tuple of the values sown
  return jnp.stack([get(i) for i in layers], axis=1)


def _apply(model, params, perturbations, batch):
  return model.apply({"params": params, **({"perturbations": perturbations} if perturbations else {})},
                     batch["pixel_values"], batch["qformer_input_ids"], batch["qformer_attention_mask"],
                     batch["input_ids"], batch["attention_mask"], batch["labels"],
                     batch.get("decoder_attention_mask"), method="target_logits", mutable=["intermediates"])


@functools.partial(jax.jit, static_argnames=("model",))
def _maps(model: InstructBlip, params, batch: dict):
  """-> (probs (B, L, H, Q, N), d loglik / d probs (same shape), loglik (B,))."""
  layers = cross_attention_layers(model)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
      lambda: model.apply({"params": params}, batch["pixel_values"], batch["qformer_input_ids"],
                          batch["qformer_attention_mask"], batch["input_ids"], batch["attention_mask"],
                          batch["labels"], batch.get("decoder_attention_mask"), method="target_logits",
                          mutable=["perturbations"])[1]["perturbations"]))

  def loglik(perturbations):
    logits, state = _apply(model, params, perturbations, batch)
    per_item = losses.sequence_scores(logits, batch["labels"])
    return per_item.sum(), (per_item, state["intermediates"])   # items are independent: each gets its own gradient

  grads, (per_item, intermediates) = jax.grad(loglik, has_aux=True)(zeros)
  return _stack(intermediates, layers, "attention_probs"), _stack(grads, layers, "attention_probs"), per_item


def compute(model: InstructBlip, params, tok: tokenize.Tokenizers, pixel_values: np.ndarray, prompts: Sequence[str],
            answers: Sequence[str]) -> list[AttentionMaps]:
  """Maps for each (image, prompt, answer): pixel_values (B, S, S, 3) preprocessed, prompts and answers as texts
  (an answer is scored as training scores a target: T5 labels with EOS; Vicuna [prompt][answer </s>])."""
  if model.config.decoder_only is not tok.decoder_only:
    raise ValueError("the tokenizers were loaded for another kind of LLM than the model's")
  if not model.config.instruction_aware:
    raise ValueError("attention maps compare instructions; this model's Q-Former does not see the instruction "
                     "(instruction_aware=False), so its maps are the same for every instruction")
  batch = dict(pixel_values=np.asarray(pixel_values, np.float32),
               **tokenize.encode_training(tok, list(prompts), list(answers)))
  probs, grads, loglik = jax.device_get(_maps(model, params, batch))
  vision = model.config.vision
  side = vision.image_size // vision.patch_size
  grid = (side, side)
  if probs.shape[-1] != 1 + side * side:
    raise ValueError(f"{probs.shape[-1]} image tokens do not make [CLS] + a {side}x{side} patch grid")
  layers = cross_attention_layers(model)
  return [AttentionMaps(p, a, probs[i], grads[i], layers, grid, float(loglik[i]))
          for i, (p, a) in enumerate(zip(prompts, answers))]


# --- rendering -----------------------------------------------------------------------------------------------------

ROWS = ("attention", "relevance")


def _pyplot():
  matplotlib = require("matplotlib", "viz", "attention overlays")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _heat(maps: AttentionMaps, row: str) -> np.ndarray:
  if row == "attention":
    return maps.mean
  if row == "relevance":
    return maps.relevance
  if row.startswith("layer "):
    return maps.per_layer[maps.layers.index(int(row.split()[1]))]
  raise ValueError(f"unknown overlay row {row!r}; expected one of {ROWS} or 'layer N'")


def render(image, maps: Sequence[AttentionMaps], *, rows: Sequence[str] = ROWS, per_layer: bool = False,
           width: float = 3.2, title_chars: int = 34) -> bytes:
  """PNG bytes: `image` (PIL, RGB) with each instruction's maps drawn over it, one column per instruction and one
  row per kind of map ("attention": the mean cross-attention, "relevance"; per_layer adds one row per
  cross-attention layer). A row shares one colour scale (its lowest to its highest value) across its columns, so
  that the instructions compare."""
  if not maps:
    raise ValueError("no maps to render")
  plt = _pyplot()
  rows = list(rows) + ([f"layer {i}" for i in maps[0].layers] if per_layer else [])
  pixels = np.asarray(image.convert("RGB"))
  h, w = pixels.shape[:2]
  fig, axes = plt.subplots(len(rows), len(maps), figsize=(width * len(maps) + 0.8, width * h / w * len(rows) + 0.9),
                           squeeze=False, layout="constrained")
  for r, row in enumerate(rows):
    heats = [_heat(m, row) for m in maps]
    low, top = min(float(x.min()) for x in heats), max(float(x.max()) for x in heats)
    for c, (m, heat) in enumerate(zip(maps, heats)):
      ax = axes[r, c]
      ax.imshow(pixels)
      # the patch grid covers the whole image: the model saw it resized to a square, without cropping
      shown = ax.imshow(heat, cmap="jet", alpha=0.5, vmin=low, vmax=max(top, low + 1e-12), extent=(0, w, h, 0),
                        interpolation="bilinear")
      ax.set_xticks([]), ax.set_yticks([])
      if c == 0:
        ax.set_ylabel(row)
      if r == 0:
        ax.set_title("\n".join(textwrap.wrap(m.prompt, title_chars)[:3] + textwrap.wrap(f"→ {m.answer}",
                                                                                         title_chars)[:2]),
                     fontsize=8)
    fig.colorbar(shown, ax=list(axes[r]), fraction=0.04, pad=0.02)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  return buf.getvalue()
