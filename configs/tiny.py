"""A tiny InstructBLIP (same architecture, toy sizes) for tests and CPU smoke runs.

  python -m iblip_jax.main --config configs/tiny.py --config.mode=summary
"""
from iblip_jax import config_lib


def get_config():
  return config_lib.base(dict(
      vision=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30,
                  patch_size=2),
      qformer=dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                   cross_attention_frequency=2),
      text=dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=20, dense_act_fn="gelu"),
      num_query_tokens=10,
      instruction_aware=True,
  ))
