"""InstructBLIP with FlanT5-XXL (Salesforce/instructblip-flan-t5-xxl): 12.3B parameters, 189M trainable.

  python -m iblip_jax.main --config configs/instructblip_flant5xxl.py --config.mode=summary
"""
from iblip_jax import config_lib


def get_config():
  return config_lib.base(dict(
      vision=config_lib.VIT_G,
      qformer=config_lib.QFORMER_BASE,
      # google/flan-t5-xxl with LAVIS's exact GELU and an untied head.
      text=dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24,
                num_heads=64, dense_act_fn="gelu", tie_word_embeddings=False, scale_decoder_outputs=False),
      num_query_tokens=32,
      instruction_aware=True,
  ))
