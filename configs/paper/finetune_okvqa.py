"""Fine-tuning on OK-VQA (paper Table 3), from InstructBLIP with the LLM frozen.

Argument: the model, flant5xxl (default) or vicuna7b (Table 3's two; flant5xl and vicuna13b work too):
  python -m iblip_jax.main --config configs/paper/finetune_okvqa.py:vicuna7b ...
From the paper: the start (the instruction-tuned InstructBLIP, config.model_init), the ViT and the LLM frozen, the
Q-Former side trained with AdamW (0.9, 0.999, weight decay 0.05) to a 1e-5 peak and cosine decay, 224-pixel images,
instruction templates for the training text. Ours (the paper's appendix table of fine-tuning hyperparameters could
not be checked here; verify before reproducing Table 3): 5 epochs over the 9,009 training questions; no checkpoint
selection (OK-VQA has no test answers: val is the reported split, so the last checkpoint is the result); the batch
of the model's instruction tuning (64 for FlanT5-XXL, 128 for Vicuna-7B); warmup over the first 10% of the steps;
evaluation every epoch.
Training: OK-VQA's train split in the VQA templates. Evaluation: generation scored by VQA accuracy on val.
Paper (Table 3): InstructBLIP (FlanT5-XXL) 55.5, (Vicuna-7B) 62.1; BLIP-2 54.7 / 59.3.

On a pod (README "Run on a TPU pod"):
  tools/tpu/launch.sh --config configs/paper/finetune_okvqa.py --workdir gs://BUCKET/runs/ft-okvqa-xxl -- \
    --config.model_init=weights/instructblip-flan-t5-xxl
(Vicuna-7B: --config configs/paper/finetune_okvqa.py:vicuna7b
 and --config.model_init=weights/instructblip-vicuna-7b.)
Data: data/okvqa (OpenEnded_mscoco_{train,val}2014_questions.json, mscoco_{train,val}2014_annotations.json,
images train2014/ and val2014/).
"""
import os

from iblip_jax import config_lib

ROOT = config_lib.PAPER_DATA


def get_config(model=None):
  config, batch = config_lib.paper_model_config(os.path.join(os.path.dirname(__file__), ".."), model)
  read = lambda split: dict(format="okvqa", path=f"{ROOT}/okvqa", reader_args=dict(split=split))
  return config_lib.finetune_recipe(
      config, batch_size=batch, epochs=5, train_size=9009,
      datasets=dict(okvqa=read("train")), evals=dict(okvqa_val=dict(task="okvqa", **read("val"))))
