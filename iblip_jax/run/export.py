"""`--config.mode=export`: the pretrained model with the latest trained weights of --workdir, written in the
Hugging Face format (config.export_dir, local or gs://) that transformers' InstructBlipForConditionalGeneration
loads, tokenizers included. Every process takes part (the sharded parameters are gathered one at a time); process 0
writes one directory. A LoRA run's adapters are folded into the weights they adapt (W + (alpha / r) A B): the export
is a plain InstructBLIP; they are also written alone in PEFT's format to export_dir/peft_adapter/, for
`peft.PeftModel.from_pretrained(<config.model_init's model>, that directory)`."""
import os

from etils import epath

from iblip_jax import distributed, hf, lora
from iblip_jax.hf import peft as hf_peft
from iblip_jax.models import configs as model_configs
from iblip_jax.models.instructblip import InstructBlip
from iblip_jax.run import restore
from iblip_jax.run.settings import ConfigError, Settings

PEFT_ADAPTER = "peft_adapter"
_WEIGHTS = ("config.json", "model.safetensors", "model.safetensors.index.json")


def run(s: Settings) -> str:
  if not s.export_dir:
    raise ConfigError("config.export_dir is empty: where should the Hugging Face checkpoint go?")
  quantized = [f"model.{t}.quantize={getattr(s.model, t).quantize!r}" for t in ("vision", "text")
               if getattr(s.model, t).quantize]
  if quantized:
    raise ConfigError(f"export writes float weights, and {', '.join(quantized)}: export with the towers float (their "
                      "trained side is the same), then quantise when loading")
  model, params, step, _, _ = restore.inference_state(s)
  if model.config.lora is not None:   # the adapters alone too, for PEFT over config.model_init's model
    hf_peft.save_adapter(model, params, str(epath.Path(s.export_dir) / PEFT_ADAPTER))
    params = lora.merged(params, model.config.lora)
    model = InstructBlip(model_configs.with_lora(model.config, None))
  hf.save_pretrained(model, params, s.export_dir)
  if distributed.is_primary() and s.tokenizer and os.path.isdir(s.tokenizer):
    _copy_tree(epath.Path(s.tokenizer), epath.Path(s.export_dir))   # the export is self-contained
    print(f"exported step {step} to {s.export_dir}")
  distributed.sync("iblip_jax_export")
  return s.export_dir


def _copy_tree(src: epath.Path, dst: epath.Path) -> None:
  """Everything but the weights (tokenizer files, qformer_tokenizer/), to a local or remote directory."""
  for item in src.iterdir():
    if item.name in _WEIGHTS or item.name.endswith(".safetensors"):
      continue
    if item.is_dir():
      (dst / item.name).mkdir(parents=True, exist_ok=True)
      _copy_tree(item, dst / item.name)
    else:
      (dst / item.name).write_bytes(item.read_bytes())
