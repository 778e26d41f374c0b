"""InstructBLIP with Vicuna-7B v1.1 (Salesforce/instructblip-vicuna-7b): 7.91B parameters, 189M trainable.

  python -m iblip_jax.main --config configs/instructblip_vicuna7b.py --config.mode=summary
  python -m iblip_jax.main --config configs/instructblip_vicuna7b.py --config.mode=eval \
    --config.model_init=weights/instructblip-vicuna-7b --workdir runs/vicuna7b_eval
"""
from iblip_jax import config_lib


def get_config():
  config = config_lib.base(dict(
      vision=config_lib.VIT_G,
      qformer=config_lib.QFORMER_BASE,
      # lmsys/vicuna-7b-v1.1 with LAVIS's [PAD] row (vocabulary 32001); </s> (2) is BOS and EOS.
      text=dict(model_type="llama", vocab_size=32001, hidden_size=4096, intermediate_size=11008,
                num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-6, pad_token_id=32000,
                bos_token_id=2, eos_token_id=2),
      num_query_tokens=32,
      instruction_aware=True,
  ))
  config.batch_size = 128
  return config
