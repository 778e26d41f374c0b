"""`--config.mode=export`: the pretrained model with the latest trained weights of --workdir, written in the
Hugging Face format (config.export_dir) that transformers' InstructBlipForConditionalGeneration loads."""
import os
import shutil

from iblip_jax import pretrained
from iblip_jax.run import common, restore


def run(config, workdir: str) -> str:
  common.validate(config, workdir, mode="export")
  if not config.export_dir:
    raise ValueError("config.export_dir is empty: where should the Hugging Face checkpoint go?")
  model, params, step = restore.params_with_latest_checkpoint(config, workdir)
  pretrained.save_pretrained(model, params, config.export_dir)
  tokenizer = config.get("tokenizer") or config.model_init
  if tokenizer and os.path.isdir(tokenizer):  # carry the tokenizers along, so the export is self-contained
    for name in os.listdir(tokenizer):
      src = os.path.join(tokenizer, name)
      if name in ("config.json", "model.safetensors", "model.safetensors.index.json") or name.endswith(".safetensors"):
        continue
      dst = os.path.join(config.export_dir, name)
      if os.path.isdir(src):
        shutil.copytree(src, dst, dirs_exist_ok=True)
      else:
        shutil.copy2(src, dst)
  print(f"exported step {step} to {config.export_dir}")
  return config.export_dir
