"""Fine-tuning on OCR-VQA (paper Table 3), from InstructBLIP with the LLM frozen.

Argument: the model, flant5xxl (default) or vicuna7b (Table 3's two; flant5xl and vicuna13b work too):
  python -m iblip_jax.main --config configs/paper/finetune_ocrvqa.py:vicuna7b ...
From the paper: the start (the instruction-tuned InstructBLIP, config.model_init), the ViT and the LLM frozen, the
Q-Former side trained with AdamW (0.9, 0.999, weight decay 0.05) to a 1e-5 peak and cosine decay, 224-pixel images,
instruction templates for the training text. Ours (the paper's appendix table of fine-tuning hyperparameters could
not be checked here; verify before reproducing Table 3): 1 epoch over the ~800K training questions (80% of OCR-VQA's
~1M); the batch of the model's instruction tuning (64 for FlanT5-XXL, 128 for Vicuna-7B); warmup over the first 10%
of the steps; evaluation every epoch.
Training: OCR-VQA's train split in the VQA templates. Evaluation: generation scored by exact match (as LAVIS's
held-in OCR-VQA), on val (selects the checkpoint kept in WORKDIR/best/) and on test (the reported split).
Paper (Table 3): InstructBLIP (FlanT5-XXL) 73.3, (Vicuna-7B) 72.8; BLIP-2 72.7 / 69.1.

On a pod (README "Run on a TPU pod"):
  tools/tpu/launch.sh --config configs/paper/finetune_ocrvqa.py --workdir gs://BUCKET/runs/ft-ocrvqa-xxl -- \
    --config.model_init=weights/instructblip-flan-t5-xxl
(Vicuna-7B: --config configs/paper/finetune_ocrvqa.py:vicuna7b
 and --config.model_init=weights/instructblip-vicuna-7b.)
Data: data/ocrvqa (dataset.json, images/<book id>.<ext>).
"""
import os

from iblip_jax import config_lib

ROOT = config_lib.PAPER_DATA


def get_config(model=None):
  config, batch = config_lib.paper_model_config(os.path.join(os.path.dirname(__file__), ".."), model)
  read = lambda split: dict(format="ocrvqa", path=f"{ROOT}/ocrvqa", reader_args=dict(split=split))
  return config_lib.finetune_recipe(
      config, batch_size=batch, epochs=1, train_size=800_000,
      datasets=dict(ocrvqa=read("train")),
      evals=dict(ocrvqa_val=dict(task="ocrvqa", **read("val")), ocrvqa_test=dict(task="ocrvqa", **read("test"))),
      select=("ocrvqa_val",))
