"""Pieces every config file shares (big_vision's configs/common.py idea). Config files stay flat `get_config()`s."""
import ml_collections

# What instruction tuning trains (regexes over "/"-joined parameter paths): ln_vision, the query tokens, the
# Q-Former and the projection into the LLM. Everything else (ViT, LLM) is frozen.
TRAINABLE = (r"^ln_vision/", r"^query_tokens$", r"^qformer/", r"^language_projection/")

# The released InstructBLIP towers: EVA-CLIP ViT-g/14 (39 blocks, LAVIS drops the 40th) and a BERT-base Q-Former
# with a 30523-token vocabulary (bert-base-uncased + [DEC]).
VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
             image_size=224, patch_size=14, layer_norm_eps=1e-6)
QFORMER_BASE = dict(vocab_size=30523, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, cross_attention_frequency=2, encoder_hidden_size=1408)


def base(model: dict) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.mode = "summary"
  config.model = ml_collections.ConfigDict(model)
  config.model_init = ""   # local Hugging Face InstructBLIP directory with the pretrained weights
  config.trainable = list(TRAINABLE)
  return config
