"""Table 1 in one command: zero-shot InstructBLIP on the 13 held-out datasets, beside the paper. Argument: the LLM,
flant5xl (default), flant5xxl, vicuna7b or vicuna13b.

Writes, under WORKDIR/eval/step_N/: each dataset's predictions and metrics, table1.md (this run, the paper's
InstructBLIP and BLIP-2 rows of Table 1 for the same LLM, the differences) and table1.png (the same as a bar
chart); the table is printed too. NoCaps adds CIDEr per domain. Each dataset is read at the split its task scores
(iblip_jax/evaluation/tasks.py: split, split_note), prompts and decoding as the task table sets them; MSVD-QA and
MSRVTT-QA rank their answer lists in chunks of 128.

The released model (weights/instructblip-flan-t5-xl, Salesforce/instructblip-...):
  tools/tpu/launch.sh --config configs/paper/table1.py:flant5xl --workdir gs://BUCKET/runs/table1-flant5xl -- \
    --config.model_init=weights/instructblip-flan-t5-xl
Your run of configs/paper/instructblip.py:flant5xl, its selected checkpoint:
  tools/tpu/launch.sh --config configs/paper/table1.py:flant5xl --workdir gs://BUCKET/runs/paper-flant5xl/best -- \
    --config.model_init=weights/blip2-flan-t5-xl --config.model_init_stage1=weights/blip2-itm-vit-g \
    --config.tokenizer=weights/tokenizer-flan-t5
On one host: python -m iblip_jax.main --config configs/paper/table1.py:flant5xl --workdir DIR --config.model_init=...

Data, one folder per dataset under data/ (configs/paper/README.md lists every file): data/nocaps, data/flickr30k,
data/gqa, data/vsr, data/iconqa, data/textvqa, data/visdial, data/hateful_memes, data/vizwiz, data/scienceqa,
data/msvd, data/msrvtt, data/ivqa.
"""
import os

from iblip_jax import config_lib


def get_config(model=None):
  model = model or "flant5xl"
  config, _ = config_lib.paper_model_config(os.path.join(os.path.dirname(__file__), ".."), model)
  config.mode = "eval"
  config.model_init_required = True
  config.paper_model = model
  config.evals = config_lib.held_out_evals()
  config.eval_batch_size = 64
  config_lib.tpu_precision(config)
  return config
