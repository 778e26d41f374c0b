"""Instruction data: image preprocessing, tokenisation, templates, readers, mixture and the input pipeline."""
from iblip_jax.data.preprocess import preprocess_image

__all__ = ["preprocess_image"]
