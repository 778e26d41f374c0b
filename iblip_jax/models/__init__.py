"""Flax Linen modules: vit.py (EVA-CLIP ViT), qformer.py (the instruction-aware Q-Former), t5.py (FlanT5),
llama.py (Vicuna), instructblip.py (the whole model and its interface over both LLMs), layers.py (shared pieces),
configs.py (frozen config dataclasses, field names as transformers')."""
