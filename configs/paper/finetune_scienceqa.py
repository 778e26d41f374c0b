"""Fine-tuning on ScienceQA (IMG) (paper Table 3), from InstructBLIP with the LLM frozen.

Argument: the model, flant5xxl (default) or vicuna7b (Table 3's two; flant5xl and vicuna13b work too):
  python -m iblip_jax.main --config configs/paper/finetune_scienceqa.py:vicuna7b ...
From the paper: the start (the instruction-tuned InstructBLIP, config.model_init), the ViT and the LLM frozen, the
Q-Former side trained with AdamW (0.9, 0.999, weight decay 0.05) to a 1e-5 peak and cosine decay, 224-pixel images,
instruction templates for the training text. Ours (the paper's appendix table of fine-tuning hyperparameters could
not be checked here; verify before reproducing Table 3): 5 epochs over the 6,218 IMG training questions; the batch
of the model's instruction tuning (64 for FlanT5-XXL, 128 for Vicuna-7B); warmup over the first 10% of the steps;
evaluation every epoch.
Training: ScienceQA's train split, IMG subset, as multiple choice in the VQA templates with the hint as
context (data/templates.py); the target is the right option's text. Evaluation: ranking of the options (as
zero-shot), on val (selects the checkpoint kept in WORKDIR/best/) and on test (the reported split).
Paper (Table 3): InstructBLIP (FlanT5-XXL) 90.7, (Vicuna-7B) 79.5; BLIP-2 89.5 / 77.3.

On a pod (README "Run on a TPU pod"):
  tools/tpu/launch.sh --config configs/paper/finetune_scienceqa.py --workdir gs://BUCKET/runs/ft-scienceqa-xxl -- \
    --config.model_init=weights/instructblip-flan-t5-xxl
(Vicuna-7B: --config configs/paper/finetune_scienceqa.py:vicuna7b
 and --config.model_init=weights/instructblip-vicuna-7b.)
Data: data/scienceqa (problems.json, pid_splits.json, images/{train,val,test}/<pid>/image.png).
"""
import os

from iblip_jax import config_lib

ROOT = config_lib.PAPER_DATA


def get_config(model=None):
  config, batch = config_lib.paper_model_config(os.path.join(os.path.dirname(__file__), ".."), model)
  read = lambda split: dict(format="scienceqa_img", path=f"{ROOT}/scienceqa", reader_args=dict(split=split))
  return config_lib.finetune_recipe(
      config, batch_size=batch, epochs=5, train_size=6218,
      datasets=dict(scienceqa_img=read("train")),
      evals=dict(scienceqa_val=dict(task="scienceqa_img", **read("val")),
                 scienceqa_test=dict(task="scienceqa_img", **read("test"))),
      select=("scienceqa_val",))
