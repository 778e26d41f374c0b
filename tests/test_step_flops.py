"""The frozen towers' forward FLOPs: the ViT's forward plus the LLM's, each counted on its own module."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iblip_jax
import train_helper
from iblip_jax import step_flops
from iblip_jax.data import packing
from iblip_jax.models import configs as model_configs
from iblip_jax.models.instructblip import InstructBlip
from iblip_jax.models.t5 import T5
from iblip_jax.models.vit import VisionTransformer


def _flops(fn, *args) -> float:
  return float(jax.jit(fn).lower(*args).cost_analysis()["flops"])


@pytest.mark.parametrize("packed", [False, True])
def test_frozen_forward_is_the_vits_forward_plus_the_llms(packed):
  cfg = step_flops.fully_unrolled(model_configs.from_dict(train_helper.load_config("tiny").model.to_dict()))
  params = iblip_jax.params_shape(InstructBlip(cfg))
  batch = train_helper.make_batch()
  if packed:
    batch = dict(pixel_values=batch["pixel_values"], qformer_input_ids=batch["qformer_input_ids"],
                 qformer_attention_mask=batch["qformer_attention_mask"],
                 **packing.pack(batch, visual_tokens=cfg.num_query_tokens, length=48))
  got = step_flops.frozen_forward_flops(cfg, params, batch)

  vit = VisionTransformer(cfg.vision)
  vision = _flops(lambda p, x: vit.apply({"params": p}, x), params["vision"],
                  jax.ShapeDtypeStruct(batch["pixel_values"].shape, jnp.float32))
  t5 = T5(cfg.text)
  d = cfg.text.d_model
  if packed:
    r, length = batch["packed_input_ids"].shape
    t = batch["packed_labels"].shape[1]
    llm = _flops(lambda p, e, s, ids, ds: t5.apply({"params": p}, e, s, ids, ds, method="packed_logits"),
                 params["language_model"], jax.ShapeDtypeStruct((r, length, d), jnp.float32),
                 jax.ShapeDtypeStruct((r, length), jnp.int32), jax.ShapeDtypeStruct((r, t), jnp.int32),
                 jax.ShapeDtypeStruct((r, t), jnp.int32))
  else:
    b, length = batch["input_ids"].shape
    t = batch["labels"].shape[1]
    s = length + cfg.num_query_tokens
    llm = _flops(lambda p, e, m, ids, dm: t5.apply({"params": p}, e, m, ids, dm), params["language_model"],
                 jax.ShapeDtypeStruct((b, s, d), jnp.float32), jax.ShapeDtypeStruct((b, s), jnp.int32),
                 jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.int32))
  assert vision > 0 and llm > 0
  # the two towers' own programs, up to the few elementwise ops around them (the visual tokens' zeros and mask:
  # ~2e3 of 2e8 here); leaving a tower out would miss 5% (T5) or 95% (ViT) of the count
  assert got == pytest.approx(vision + llm, rel=1e-4)
  assert min(vision, llm) > 1e-3 * got
