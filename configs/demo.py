"""The embedded demo: instruction tuning of the Q-Former side on a procedural shapes dataset, on a laptop CPU.

  make demo     (= python -m iblip_jax.demo.shapes runs/demo/data
                   python -m iblip_jax.main --config configs/demo.py --workdir runs/demo)

The frozen ViT and T5 come from demo_assets/instructblip-demo (tiny towers "pretrained" by
tools/make_demo_assets.py, loaded through from_pretrained like the released weights). The checkpoint's Q-Former
was trained for captioning only (the "BLIP-2" stage), as InstructBLIP starts from BLIP-2. Held-in: captioning,
colour and shape VQA, question generation. Held-out, zero-shot: multiple choice about colours and shapes with the
options listed in the prompt and the answer chosen by candidate ranking, a format no image-text training example
has (the LLM met it in text only). `--config.model.instruction_aware=False` runs the paper's ablation on the same
data.

Variants (`--config configs/demo.py:<variant>`):
  lora   LoRA adapters (rank 2) on the Q-Former's attention and the frozen T5's attention (query/value, q/v) train
         alone; the Q-Former side and both towers stay as loaded.
  qlora  the same adapters over the ViT and the T5 quantised to int8 (weight-only, models/quantize.py).
"""
from iblip_jax import config_lib

DATA = "runs/demo/data"

# The demo checkpoint's sizes (tools/make_demo_assets.py builds it from these; vocabularies are those of the
# word-level tokenizers it writes).
MODEL = dict(
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                patch_size=4),
    qformer=dict(vocab_size=86, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 cross_attention_frequency=1, max_position_embeddings=64),
    text=dict(vocab_size=46, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
              relative_attention_num_buckets=16, relative_attention_max_distance=32, dense_act_fn="gelu",
              tie_word_embeddings=False),
    num_query_tokens=8, instruction_aware=True)


def get_config(variant: str = ""):
  # The architecture comes from the checkpoint's config.json (MODEL above is what built it); the config adds the
  # switches only.
  config = config_lib.base(dict(instruction_aware=True))
  config.mode = "train"
  config.model_init = "demo_assets/instructblip-demo"
  # Instruction tuning starts from the Q-Former of the "BLIP-2" stage (captioning only), as in the paper; a
  # randomly initialised one is evaluated too, as the untrained baseline.
  config.eval_untrained_baseline = True
  config.dropout = False           # at this toy scale dropout in the frozen T5 costs more than it regularises
  config.total_steps = 1500
  config.batch_size = 32
  # A gentle learning rate: at 1e-3 the held-in scores reach 100 but the held-out multiple choice falls from 66.5
  # (before tuning) to 46; at 1e-4 held-in reaches 96.0-96.5 and held-out rises to 73.5 (measured; see the README).
  config.optim.lr, config.optim.warmup_lr, config.optim.warmup_steps = 1e-4, 1e-6, 50
  config.mesh.fsdp = -1
  config.max_replicated_mb = 1024.0
  jsonl = lambda name: dict(format="jsonl", path=f"{DATA}/{name}.jsonl")
  config.data.datasets = dict(caption=jsonl("caption"), vqa=jsonl("vqa"), qgen=dict(weight=0.3, **jsonl("qgen")))
  config.data.random_crop = False  # a crop of a 32-pixel image can cut the shape away
  config.evals = dict(held_in_vqa=dict(task="vqa", **jsonl("val_vqa")),
                      held_out_mc=dict(task="multiple_choice", **jsonl("val_mc")))
  config.eval_at_start = True      # the untrained Q-Former's numbers, printed as the baseline
  config.eval_every = 500
  config.eval_batch_size = 50
  config.log_every = 20
  config.checkpoint_every = 500
  config.baselines = dict(held_in_vqa=100 / 8, held_out_mc=100 / 3)  # chance: 8 colours; 3 options
  # int4 towers (--config.model.<tower>.quantize=int4) in groups of 32 inputs: these towers are 64 and 128 wide, so
  # the default group of 128 would be one scale per column (FlanT5-XL gets 16 per column at 128); with 2-4, int4
  # answers stay within a point of float (1,000 questions of each kind, BENCHMARKS.md), with one they did not.
  config.model.vision.quantize_group = config.model.text.quantize_group = 32
  if variant in ("lora", "qlora"):
    config.trainable = []
    config.lora.targets = [r"qformer/.*/(query|value)$", r"language_model/.*/(q|v)$"]
    # rank 2 keeps the adapters under 5% of the Q-Former side's parameters at this toy width (64): 5,120 of 148,416
    config.lora.rank, config.lora.alpha = 2, 4.0
    config.optim.lr = 1e-3         # adapters start at zero and have few parameters: the usual LoRA rate
    config.eval_untrained_baseline = False   # fresh adapters change nothing: "untrained" is the model before tuning
    if variant == "qlora":
      config.model.vision.quantize = config.model.text.quantize = "int8"
  elif variant:
    raise ValueError(f"configs/demo.py:{variant}: no such variant; expected configs/demo.py, configs/demo.py:lora or "
                     "configs/demo.py:qlora")
  return config
