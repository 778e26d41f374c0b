"""InstructBLIP with FlanT5-XL (Salesforce/instructblip-flan-t5-xl): 4.02B parameters, 187M trainable.

  python -m iblip_jax.main --config configs/instructblip_flant5xl.py --config.mode=summary
"""
from iblip_jax import config_lib


def get_config():
  return config_lib.base(dict(
      vision=config_lib.VIT_G,
      qformer=config_lib.QFORMER_BASE,
      # google/flan-t5-xl with LAVIS's exact GELU and an untied head.
      text=dict(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
                num_heads=32, dense_act_fn="gelu", tie_word_embeddings=False, scale_decoder_outputs=False),
      num_query_tokens=32,
      instruction_aware=True,
  ))
