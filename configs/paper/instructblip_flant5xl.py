"""The paper's recipe: InstructBLIP (FlanT5-XL) instruction-tuned from BLIP-2.
4,022,969,088 parameters, 187,262,464 trainable.

Dai et al., InstructBLIP (NeurIPS 2023), section 2.6: the Q-Former side (ln_vision, query tokens, Q-Former,
projection) is trained, the ViT and the LLM are frozen; 13 held-in datasets in instruction format (the paper's
templates), sampled in proportion to sqrt(size) with the manual multipliers (OKVQA x2, A-OKVQA x0.5: the paper gives
the direction, the factors are ours); 60K steps at batch 192; AdamW (0.9, 0.999, weight decay 0.05), 1,000 warmup
steps from 1e-8 to 1e-5, cosine decay to 0; held-in validation every 3K steps, the best checkpoint kept in
WORKDIR/best/ (mean of COCO Caption CIDEr, OKVQA, A-OKVQA and TextCaps CIDEr on their val splits; which held-in
sets the paper averaged is not stated). Frozen towers in bfloat16, LLM blocks rematerialised.

Weights, in the project directory on every worker (configs/paper/README.md):
  weights/blip2-flan-t5-xl    BLIP-2 stage 2 (Blip2ForConditionalGeneration): ViT, ln_vision, query tokens,
                              the Q-Former's query side, projection, LLM
  weights/blip2-itm-vit-g     BLIP-2 stage 1 (Blip2ForImageTextRetrieval): the Q-Former's text side
  weights/tokenizer-flan-t5   LLM tokenizer at the top, the Q-Former's in qformer_tokenizer/
Data, one folder per dataset as its reader expects (configs/paper/README.md lists every file):
  data/coco (COCO Caption; val for selection)   data/capfilt (Web CapFilt)   data/textcaps (TextCaps; val)
  data/vqav2 (VQAv2 + its question generation)  data/okvqa (OKVQA + QG; val)   data/aokvqa (A-OKVQA + QG; val)
  data/ocrvqa (OCR-VQA)                          data/llava (LLaVA-Instruct-150K: conversation, complex reasoning,
                                                 detail)

On a pod (v5litepod-16; README "Run on a TPU pod"; tools/aot_compile.py checked this batch fits):
  tools/tpu/launch.sh --config configs/paper/instructblip_flant5xl.py --workdir gs://BUCKET/runs/paper-flant5xl -- \
    --config.model_init=weights/blip2-flan-t5-xl --config.model_init_stage1=weights/blip2-itm-vit-g \
    --config.tokenizer=weights/tokenizer-flan-t5
Ablations: add --config.model.instruction_aware=False (Table 2), --config.data.balanced=False (Table 2), or
--config.data.instruction_format=raw | dataset_name (Fig. 4), each with its own --workdir.
Then Table 1 for the selected checkpoint: configs/paper/table1_flant5xl.py
with --workdir gs://BUCKET/runs/paper-flant5xl/best and the same --config.model_init / model_init_stage1 / tokenizer.
"""
import os

from iblip_jax import config_lib


def get_config():
  config = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "..", "instructblip_flant5xl.py"))
  return config_lib.paper_recipe(config, batch_size=192)
