"""Fine-tuning on A-OKVQA (paper Table 3), from InstructBLIP with the LLM frozen.

Argument: the model, flant5xxl (default) or vicuna7b (Table 3's two; flant5xl and vicuna13b work too):
  python -m iblip_jax.main --config configs/paper/finetune_aokvqa.py:vicuna7b ...
From the paper: the start (the instruction-tuned InstructBLIP, config.model_init), the ViT and the LLM frozen, the
Q-Former side trained with AdamW (0.9, 0.999, weight decay 0.05) to a 1e-5 peak and cosine decay, 224-pixel images,
instruction templates for the training text. Ours (the paper's appendix table of fine-tuning hyperparameters could
not be checked here; verify before reproducing Table 3): 5 epochs over the train split seen twice (17,056 questions
as direct answers and as multiple choice, mixed evenly); checkpoint selection on the mean of both val scores (the
test answers are held by the A-OKVQA leaderboard, so val is also a reported split); the batch of the model's
instruction tuning (64 for FlanT5-XXL, 128 for Vicuna-7B); warmup over the first 10% of the steps; evaluation every
epoch.
Training: A-OKVQA's train split twice, direct answers in the VQA templates (aokvqa) and the choice among the
options (aokvqa_mc). Evaluation on val: direct answers by generation (VQA accuracy) and multiple choice by ranking.
Paper (Table 3): InstructBLIP (FlanT5-XXL) direct val 57.1, MC val 81.0; (Vicuna-7B) 64.0, 75.7.

On a pod (README "Run on a TPU pod"):
  tools/tpu/launch.sh --config configs/paper/finetune_aokvqa.py --workdir gs://BUCKET/runs/ft-aokvqa-xxl -- \
    --config.model_init=weights/instructblip-flan-t5-xxl
(Vicuna-7B: --config configs/paper/finetune_aokvqa.py:vicuna7b
 and --config.model_init=weights/instructblip-vicuna-7b.)
Data: data/aokvqa (aokvqa_v1p0_{train,val}.json, images train2017/ and val2017/).
"""
import os

from iblip_jax import config_lib

ROOT = config_lib.PAPER_DATA


def get_config(model=None):
  config, batch = config_lib.paper_model_config(os.path.join(os.path.dirname(__file__), ".."), model)
  read = lambda fmt, split: dict(format=fmt, path=f"{ROOT}/aokvqa", reader_args=dict(split=split))
  return config_lib.finetune_recipe(
      config, batch_size=batch, epochs=5, train_size=2 * 17_056,
      datasets=dict(aokvqa=read("aokvqa", "train"), aokvqa_mc=read("aokvqa_mc", "train")),
      evals=dict(aokvqa_val=dict(task="aokvqa", **read("aokvqa", "val")),
                 aokvqa_mc_val=dict(task="aokvqa_mc", **read("aokvqa_mc", "val"))),
      select=("aokvqa_val", "aokvqa_mc_val"))
