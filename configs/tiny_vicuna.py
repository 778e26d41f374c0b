"""A tiny decoder-only InstructBLIP (LLaMA with grouped-query attention, toy sizes) for tests and CPU smoke runs.

  python -m iblip_jax.main --config configs/tiny_vicuna.py --config.mode=summary
"""
from iblip_jax import config_lib


def get_config():
  return config_lib.base(dict(
      vision=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30,
                  patch_size=2),
      qformer=dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                   cross_attention_frequency=2),
      text=dict(model_type="llama", vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
      num_query_tokens=10,
      instruction_aware=True,
  ))
