"""InstructBLIP in JAX/Flax: frozen EVA ViT + instruction-aware Q-Former + frozen FlanT5 or Vicuna (LLaMA).

    model, params = iblip_jax.from_pretrained(path, dtype=jnp.float32)
    logits = model.apply({"params": params}, pixel_values, qformer_input_ids, qformer_attention_mask,
                         input_ids, attention_mask, decoder_input_ids=..., decoder_attention_mask=...)
    iblip_jax.save_pretrained(model, params, out_dir)
"""
from iblip_jax.hf_checkpoint import CheckpointError
from iblip_jax.models.configs import InstructBlipConfig, LlamaConfig, QFormerConfig, T5Config, VisionConfig
from iblip_jax.models.instructblip import InstructBlip
from iblip_jax.decoding import generate
from iblip_jax.pretrained import from_pretrained, params_shape, save_pretrained
from iblip_jax.ranking import rank

__all__ = ["CheckpointError", "generate", "rank", "InstructBlip", "InstructBlipConfig", "LlamaConfig", "QFormerConfig",
           "T5Config", "VisionConfig", "from_pretrained", "params_shape", "save_pretrained"]
