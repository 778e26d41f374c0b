"""The paper's recipe: InstructBLIP instruction-tuned from BLIP-2. Argument: the LLM (default flant5xl).

  model       parameters       trainable      batch  BLIP-2 start (weights/)  tokenizer (weights/)  slice
  flant5xl     4,022,969,088   187,262,464     192   blip2-flan-t5-xl         tokenizer-flan-t5     v5litepod-16
  flant5xxl   12,310,119,168   188,837,376      64   blip2-flan-t5-xxl        tokenizer-flan-t5     v5litepod-32
  vicuna7b     7,913,210,624   188,837,376     128   blip2-vicuna-7b          tokenizer-vicuna      v5litepod-16
  vicuna13b   14,191,448,832   189,624,832      64   blip2-vicuna-13b         tokenizer-vicuna      v5litepod-32
(tools/aot_compile.py checked that each batch fits its slice.)

Dai et al., InstructBLIP (NeurIPS 2023), section 2.6: the Q-Former side (ln_vision, query tokens, Q-Former,
projection) is trained, the ViT and the LLM are frozen; 13 held-in datasets in instruction format (the paper's
templates), sampled in proportion to sqrt(size) with the manual multipliers (OKVQA x2, A-OKVQA x0.5: the paper gives
the direction, the factors are ours); 60K steps at the batch above; AdamW (0.9, 0.999, weight decay 0.05), 1,000
warmup steps from 1e-8 to 1e-5, cosine decay to 0; held-in validation every 3K steps, the best checkpoint kept in
WORKDIR/best/ (mean of COCO Caption CIDEr, OKVQA, A-OKVQA and TextCaps CIDEr on their val splits; which held-in
sets the paper averaged is not stated). Frozen towers in bfloat16, LLM blocks rematerialised.

The paper's Vicuna models start from a BLIP-2 (Vicuna) stage 2 that the authors trained with BLIP-2's stage-2 recipe
and never released (LAVIS #292): weights/blip2-vicuna-7b / -13b must be your own, in transformers'
Blip2ForConditionalGeneration format.

Weights, in the project directory on every worker (configs/paper/README.md):
  weights/<BLIP-2 start>      BLIP-2 stage 2 (Blip2ForConditionalGeneration): ViT, ln_vision, query tokens,
                              the Q-Former's query side, projection, LLM
  weights/blip2-itm-vit-g     BLIP-2 stage 1 (Blip2ForImageTextRetrieval): the Q-Former's text side
  weights/<tokenizer>         LLM tokenizer at the top, the Q-Former's in qformer_tokenizer/
Data, one folder per dataset as its reader expects (configs/paper/README.md lists every file):
  data/coco (COCO Caption; val for selection)   data/capfilt (Web CapFilt)   data/textcaps (TextCaps; val)
  data/vqav2 (VQAv2 + its question generation)  data/okvqa (OKVQA + QG; val)   data/aokvqa (A-OKVQA + QG; val)
  data/ocrvqa (OCR-VQA)                          data/llava (LLaVA-Instruct-150K: conversation, complex reasoning,
                                                 detail)

On a pod (README "Run on a TPU pod"), FlanT5-XL:
  tools/tpu/launch.sh --config configs/paper/instructblip.py:flant5xl --workdir gs://BUCKET/runs/paper-flant5xl -- \
    --config.model_init=weights/blip2-flan-t5-xl --config.model_init_stage1=weights/blip2-itm-vit-g \
    --config.tokenizer=weights/tokenizer-flan-t5
(the other models: their argument, BLIP-2 start and tokenizer from the table.)
Ablations: add --config.model.instruction_aware=False (Table 2), --config.data.balanced=False (Table 2), or
--config.data.instruction_format=raw | dataset_name (Fig. 4), each with its own --workdir.
Then Table 1 for the selected checkpoint: configs/paper/table1.py:flant5xl with --workdir
gs://BUCKET/runs/paper-flant5xl/best and the same --config.model_init / model_init_stage1 / tokenizer.
"""
import os

from iblip_jax import config_lib


def get_config(model=None):
  config, batch = config_lib.paper_model_config(os.path.join(os.path.dirname(__file__), ".."), model, "flant5xl")
  return config_lib.paper_recipe(config, batch_size=batch)
