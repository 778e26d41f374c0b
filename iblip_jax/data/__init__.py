"""Instruction data: image preprocessing, tokenisation, templates, readers of the 26 datasets, record sources
(readers or prepared tensorflow-datasets), the balanced mixture and the grain input pipeline."""
from iblip_jax.data.preprocess import preprocess_image

__all__ = ["preprocess_image"]
