"""Pieces every config file shares (big_vision's configs/common.py idea). Config files stay flat `get_config()`s."""
import ml_collections

from iblip_jax.trainable import INSTRUCTION_TUNING

# The released InstructBLIP towers: EVA-CLIP ViT-g/14 (39 blocks, LAVIS drops the 40th) and a BERT-base Q-Former
# with a 30523-token vocabulary (bert-base-uncased + [DEC]).
VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
             image_size=224, patch_size=14, layer_norm_eps=1e-6)
QFORMER_BASE = dict(vocab_size=30523, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, cross_attention_frequency=2, encoder_hidden_size=1408)


# Logical axis -> mesh axes (MaxText/t5x style). Weights: FSDP over their embedding dimension, tensor parallelism
# over heads and MLP. Activations (act_*) split the batch over data x fsdp.
SHARDING_RULES = (
    ("act_batch", ("data", "fsdp")), ("act_length", None), ("act_embed", None), ("act_vocab", "tensor"),
    ("embed", "fsdp"), ("image_embed", "fsdp"), ("llm_embed", "tensor"),
    ("mlp", "tensor"), ("heads_joined", "tensor"), ("kv_joined", "tensor"), ("qkv", "tensor"), ("vocab", "tensor"),
    ("heads", None), ("relpos_buckets", None), ("layers", None),
)


def optim() -> ml_collections.ConfigDict:
  """The paper's / LAVIS's optimizer: AdamW, warmup 1e-8 -> 1e-5 over 1,000 steps, cosine to 0."""
  return ml_collections.ConfigDict(dict(
      lr=1e-5, warmup_lr=1e-8, warmup_steps=1000, min_lr=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
      grad_clip_norm=0.0, grad_accum_steps=1))


def base(model: dict) -> ml_collections.ConfigDict:
  """`model`: the model's sizes and switches (models/configs.py field names). With config.model_init, the
  checkpoint's config.json decides the architecture and config.model adds settings on top; sizes stated here must
  then agree with the checkpoint (a contradiction is an error, not a silent choice)."""
  config = ml_collections.ConfigDict()
  config.mode = "summary"
  model = dict(model)
  # Precision and remat of the frozen towers are settings every config has, so that the command line can set them
  # (--config.model.vision.dtype=bfloat16 --config.model.text.dtype=bfloat16 --config.model.text.remat=True, the
  # TPU setup). A frozen tower stores its weights in its compute dtype.
  model["vision"] = {"dtype": "float32", **model.get("vision", {})}
  model["text"] = {"dtype": "float32", "remat": False, "remat_policy": "full", **model.get("text", {})}
  config.model = ml_collections.ConfigDict(model)
  config.model_init = ""   # local Hugging Face InstructBLIP directory with the pretrained weights
  # With a BLIP-2 stage-2 directory as model_init (Blip2ForConditionalGeneration, the paper's starting point): the
  # BLIP-2 stage-1 directory (Blip2ForImageTextRetrieval) that gives the Q-Former's text side, as LAVIS does. Empty:
  # the documented fallback, with a warning (iblip_jax/hf_checkpoint.py, BLIP-2 section).
  config.model_init_stage1 = ""
  config.trainable = list(INSTRUCTION_TUNING)   # ln_vision, query tokens, Q-Former, projection
  config.seed = 0
  config.total_steps = 10_000
  config.batch_size = 192          # global batch, split over data x fsdp
  config.dropout = True            # LAVIS trains with the Q-Former's and (frozen) T5's dropout active
  config.optim = optim()
  # data/fsdp/tensor within a slice (-1 = the rest); dcn_* across slices of a multi-slice pod.
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
  config.sharding_rules = [list(r) for r in SHARDING_RULES]
  # A larger replicated tensor is a sharding mistake: fail before compiling. (128: the Q-Former's 94 MB word embedding
  # has a vocabulary of 30523, which no mesh axis divides, so it stays whole when `fsdp` is 1.)
  config.max_replicated_mb = 128.0

  config.tokenizer = ""            # defaults to model_init (its top level + qformer_tokenizer/)
  config.reinit_trainable = False  # True: the Q-Former side starts from scratch instead of model_init's weights
  # Training data: {name: {"format": a reader name (see iblip_jax.data.readers), "path": ..., "weight": 1.0}}, or
  # a prepared dataset (iblip_jax.data.tfds_builder): {"format", "tfds_data_dir", "split": "train", "weight"}.
  # random_crop: RandomResizedCrop(0.5-1.0) in training, as LAVIS (no horizontal flip: it breaks left/right).
  # mixing: "example" (every example drawn from the mixture) or "step" (every global batch from one dataset, LAVIS).
  # max_skip_rate: warn when more than this fraction of recent examples is skipped as bad (per dataset, with reasons).
  # instruction_format: "templates" (instruction tuning), or the paper's multitask baselines without instructions:
  # "raw" (the question alone, an empty instruction for captions) or "dataset_name" ("[Task:Dataset] question").
  config.data = ml_collections.ConfigDict(dict(datasets={}, balanced=True, workers=0, random_crop=True,
                                               mixing="example", max_skip_rate=0.1, instruction_format="templates"))
  # Evaluations: {name: {"task": an iblip_jax.evaluation.tasks name, "format": ..., "path": ...}}
  config.evals = ml_collections.ConfigDict()
  config.eval_every = 1000
  config.eval_at_start = False
  config.eval_at_end = True
  config.eval_untrained_baseline = False  # also evaluate a randomly initialised trainable side at the start
  config.eval_batch_size = 8
  config.eval_max_examples = 0     # 0 = all
  config.log_every = 50
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  # Checkpoints exist but none can be read: True starts over from model_init instead of stopping (see
  # iblip_jax/checkpoints.py: unreadable ones are moved aside, never deleted).
  config.fresh_start_if_unreadable = False
  config.export_dir = ""
  config.predict = ml_collections.ConfigDict(dict(
      images="", prompt="A short image description:", output="", batch_size=8, num_beams=5, max_new_tokens=30,
      min_new_tokens=1, length_penalty=1.0, repetition_penalty=1.5))
  return config
