"""The Hugging Face format: InstructBLIP (and BLIP-2) checkpoint directories in and out.

  names       our parameter paths <-> transformers' state-dict names (the one table, both directions)
  safetensors the file format, read by region (each process its devices' part) and written as a stream
  config      config.json <-> InstructBlipConfig, every field checked
  params      a parameter tree filled straight into its shardings; written back as safetensors shards
  blip2       a BLIP-2 stage-2 (+ stage-1) start, read as if it were an InstructBLIP directory
  peft        LoRA adapters in PEFT's directory format, both ways (transformers' module names)
  pretrained  from_pretrained / save_pretrained / load_config: what the rest of iblip_jax calls
Only safetensors is read: pickle files (pytorch_model.bin) can run code when loaded and are refused.
"""
from iblip_jax.errors import CheckpointError
from iblip_jax.hf.pretrained import from_pretrained, load_config, load_params, open_reader, save_pretrained

__all__ = ["CheckpointError", "from_pretrained", "load_config", "load_params", "open_reader", "save_pretrained"]
