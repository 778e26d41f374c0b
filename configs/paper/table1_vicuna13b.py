"""Table 1 in one command: zero-shot InstructBLIP (Vicuna-13B) on the 13 held-out datasets, beside the paper.

Writes, under WORKDIR/eval/step_N/: each dataset's predictions and metrics, table1.md (this run, the paper's
InstructBLIP (Vicuna-13B) and BLIP-2 (Vicuna-13B) rows of Table 1, the differences) and table1.png (the same as a bar
chart); the table is printed too. NoCaps adds CIDEr per domain. Each dataset is read at the split its task scores
(iblip_jax/evaluation/tasks.py: split, split_note), prompts and decoding as the task table sets them; MSVD-QA and
MSRVTT-QA rank their answer lists in chunks of 128.

The released model (weights/instructblip-vicuna-13b, Salesforce/instructblip-...):
  tools/tpu/launch.sh --config configs/paper/table1_vicuna13b.py --workdir gs://BUCKET/runs/table1-vicuna13b -- \
    --config.model_init=weights/instructblip-vicuna-13b
Your run of configs/paper/instructblip_vicuna13b.py, its selected checkpoint:
  tools/tpu/launch.sh --config configs/paper/table1_vicuna13b.py --workdir gs://BUCKET/runs/paper-vicuna13b/best -- \
    --config.model_init=weights/blip2-vicuna-13b --config.model_init_stage1=weights/blip2-itm-vit-g \
    --config.tokenizer=weights/tokenizer-vicuna
On one host: python -m iblip_jax.main --config configs/paper/table1_vicuna13b.py --workdir DIR --config.model_init=...

Data, one folder per dataset under data/ (configs/paper/README.md lists every file): data/nocaps, data/flickr30k,
data/gqa, data/vsr, data/iconqa, data/textvqa, data/visdial, data/hateful_memes, data/vizwiz, data/scienceqa,
data/msvd, data/msrvtt, data/ivqa.
"""
import os

from iblip_jax import config_lib


def get_config():
  config = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "..", "instructblip_vicuna13b.py"))
  config.mode = "eval"
  config.model_init_required = True
  config.paper_model = "vicuna13b"
  config.evals = config_lib.held_out_evals()
  config.eval_batch_size = 64
  config_lib.tpu_precision(config)
  return config
