"""Pieces every config file shares (big_vision's configs/common.py idea): the defaults of every setting (declared in
run/settings.py), the released towers' sizes, the paper's recipes. Config files stay flat `get_config()`s."""
import importlib.util
import os

import ml_collections

from iblip_jax.evaluation import tasks
from iblip_jax.run import settings

# The released InstructBLIP towers: EVA-CLIP ViT-g/14 (39 blocks, LAVIS drops the 40th) and a BERT-base Q-Former
# with a 30523-token vocabulary (bert-base-uncased + [DEC]).
VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
             image_size=224, patch_size=14, layer_norm_eps=1e-6)
QFORMER_BASE = dict(vocab_size=30523, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, cross_attention_frequency=2, encoder_hidden_size=1408)


def optim() -> ml_collections.ConfigDict:
  """The paper's / LAVIS's optimizer (run/settings.py Optim): AdamW, warmup 1e-8 -> 1e-5 over 1,000 steps, cosine."""
  return ml_collections.ConfigDict(settings.config_defaults(settings.Optim))


def base(model: dict) -> ml_collections.ConfigDict:
  """Every setting at its default (declared once, in run/settings.py), with `model`: the model's sizes and switches
  (models/configs.py field names). With config.model_init, the checkpoint's config.json decides the architecture and
  config.model adds settings on top; sizes stated here must then agree with the checkpoint (a contradiction is an
  error, not a silent choice)."""
  config = ml_collections.ConfigDict(settings.config_defaults())
  model = dict(model)
  # Precision and remat of the frozen towers are settings every config has, so that the command line can set them
  # (--config.model.vision.dtype=bfloat16 --config.model.text.dtype=bfloat16 --config.model.text.remat=True, the
  # TPU setup). A frozen tower stores its weights in its compute dtype, or quantised ("int8", "int4": weight-only,
  # --config.model.text.quantize=int8, int4 in groups of quantize_group inputs; models/quantize.py).
  quantize = {"quantize": "", "quantize_group": 128}
  model["vision"] = {"dtype": "float32", **quantize, **model.get("vision", {})}
  model["text"] = {"dtype": "float32", "remat": False, "remat_policy": "full", **quantize, **model.get("text", {})}
  config.model = ml_collections.ConfigDict(model)
  return config


# --- The paper's recipe (configs/paper/) -----------------------------------------------------------------------
# Dai et al., InstructBLIP (NeurIPS 2023), section 2.6 and Table 1; the team's notes: lavis_instructblip.md 3.1-3.7.
# Every dataset lives in its own folder under one data root (default: data/ in the project directory, beside
# weights/, so that pod workers find it), laid out as its reader expects (iblip_jax/data/readers.py; the layouts
# are listed in configs/paper/README.md).
PAPER_DATA = "data"
PAPER_STEPS = 60_000            # "a maximum of 60K steps"
PAPER_EVAL_EVERY = 3_000        # "validate every 3K steps"
# The paper's manual adjustment of the sqrt-balanced sampling: A-OKVQA (multiple choice) down, OKVQA (open-ended)
# up. It states the direction only; the factors (x0.5, x2) are ours.
PAPER_WEIGHTS = {"okvqa": 2.0, "aokvqa": 0.5}

# The 13 held-in datasets (templates.HELD_IN_TASKS): format -> folder under the data root.
HELD_IN_FOLDERS = {
    "coco_caption": "coco", "web_capfilt": "capfilt", "textcaps": "textcaps", "vqav2": "vqav2", "vqg": "vqav2",
    "okvqa": "okvqa", "okvqa_qg": "okvqa", "aokvqa": "aokvqa", "aokvqa_qg": "aokvqa", "ocrvqa": "ocrvqa",
    "llava_conversation": "llava", "llava_complex_reasoning": "llava", "llava_detail": "llava"}
# Held-in validation for checkpoint selection: eval name -> (format/task, folder, split).
HELD_IN_VALIDATION = {"coco_val": ("coco_caption", "coco", "val"), "okvqa_val": ("okvqa", "okvqa", "val"),
                      "aokvqa_val": ("aokvqa", "aokvqa", "val"), "textcaps_val": ("textcaps", "textcaps", "val")}
# The 13 held-out datasets of Table 1: task -> folder.
HELD_OUT_FOLDERS = {
    "nocaps": "nocaps", "flickr30k": "flickr30k", "gqa": "gqa", "vsr": "vsr", "iconqa": "iconqa",
    "textvqa": "textvqa", "visdial": "visdial", "hateful_memes": "hateful_memes", "vizwiz": "vizwiz",
    "scienceqa_img": "scienceqa", "msvd_qa": "msvd", "msrvtt_qa": "msrvtt", "ivqa": "ivqa"}


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """get_config() of another config file (the paper configs start from the model configs in configs/), or
  get_config(VARIANT) for FILE.py:VARIANT, as --config takes it."""
  path, _, variant = path.partition(":")
  spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def held_in_datasets(root: str = PAPER_DATA) -> dict:
  """config.data.datasets of the 13 held-in datasets (train splits), with the paper's manual multipliers. Web
  CapFilt's annotation file is reader_args.ann_file (default BLIP's release, which lists image URLs); the
  downloaded images are found through reader_args.url_to_path ("basename", or a .json/.tsv file mapping each URL
  to its file; readers/captions.py), or the file's items give an "image" path (LAVIS's capfilt14m
  annotation.json): --config.data.datasets.web_capfilt.reader_args.url_to_path=basename."""
  out = {}
  for name, folder in HELD_IN_FOLDERS.items():
    out[name] = dict(format=name, path=f"{root}/{folder}", weight=PAPER_WEIGHTS.get(name, 1.0))
    if name == "web_capfilt":
      out[name]["reader_args"] = dict(ann_file="ccs_synthetic_filtered_large.json", url_to_path="")
  return out


def held_in_validation(root: str = PAPER_DATA) -> dict:
  """config.evals of the held-in validation sets that choose the checkpoint."""
  return {name: dict(task=fmt, format=fmt, path=f"{root}/{folder}", reader_args=dict(split=split))
          for name, (fmt, folder, split) in HELD_IN_VALIDATION.items()}


def held_out_evals(root: str = PAPER_DATA) -> dict:
  """config.evals of Table 1's 13 held-out datasets, each read at the split its task scores (tasks.Task.split)."""
  return {task: dict(task=task, format=task, path=f"{root}/{folder}", reader_args=dict(split=tasks.get(task).split))
          for task, folder in HELD_OUT_FOLDERS.items()}


def tpu_precision(config: ml_collections.ConfigDict) -> None:
  """The frozen towers in bfloat16 with the LLM's blocks rematerialised (what tools/aot_compile.py checks)."""
  config.model.vision.dtype = "bfloat16"
  config.model.text.dtype = "bfloat16"
  config.model.text.remat = True


def paper_recipe(config: ml_collections.ConfigDict, *, batch_size: int, root: str = PAPER_DATA):
  """Instruction tuning as the paper: the 13 held-in datasets with their templates, sqrt-balanced sampling with the
  manual multipliers, 60K steps at `batch_size`, AdamW with 1,000 warmup steps to 1e-5 and cosine decay stepped every 3K steps (LAVIS's
  staircase), held-in
  validation every 3K steps keeping the best checkpoint (workdir/best)."""
  config.mode = "train"
  config.model_init_required = True
  config.total_steps = PAPER_STEPS
  config.batch_size = batch_size
  config.optim = optim()
  # LAVIS's iteration runner: the cosine steps once per inner epoch, and the inner epoch is the validation interval.
  config.optim.schedule = "lavis"
  config.optim.inner_epoch_steps = PAPER_EVAL_EVERY
  config.data.datasets = held_in_datasets(root)
  config.data.balanced = True
  # Per example: LAVIS draws one dataset per step on each of its 16 GPUs, so a global batch mixes ~16 draws; one
  # dataset per global batch ("step") would be coarser than the paper's runs.
  config.data.mixing = "example"
  config.data.instruction_format = "templates"
  config.text_processing = "lavis"    # LAVIS's blip_caption / blip_question cleaning (data/text.py)
  config.evals = held_in_validation(root)
  config.eval_every = PAPER_EVAL_EVERY
  config.eval_at_start = False
  config.eval_at_end = True
  config.eval_batch_size = 64
  config.best_checkpoint_metrics = tuple(HELD_IN_VALIDATION)
  config.best_checkpoint_mixing = "relative"   # each validation set weighs the same (run/best.py)
  config.checkpoint_every = 1000
  tpu_precision(config)
  return config


# --- Downstream fine-tuning (paper Table 3; configs/paper/finetune_*.py) ------------------------------------------
# The paper fine-tunes InstructBLIP (FlanT5-XXL, Vicuna-7B) on each dataset with the LLM frozen, as instruction
# tuning trains. What follows from the paper: the initialisation (the instruction-tuned model), the frozen ViT and
# LLM, the trained Q-Former side, the optimizer family and its schedule shape. Its appendix table of fine-tuning
# hyperparameters could not be read here, so epochs, batch and warmup below are our choices (listed in each config's
# docstring): check them against the appendix before a run meant to reproduce Table 3.
PAPER_MODELS = {"flant5xl": ("instructblip_flant5xl.py", 192), "flant5xxl": ("instructblip_flant5xxl.py", 64),
                "vicuna7b": ("instructblip_vicuna7b.py", 128), "vicuna13b": ("instructblip_vicuna13b.py", 64)}


def paper_model_config(configs_dir: str, model: str | None, default: str = "flant5xxl"):
  """(model config, batch size) of a paper model by name ("flant5xxl", "vicuna7b", ...; a config's argument)."""
  model = model or default
  if model not in PAPER_MODELS:
    raise ValueError(f"model {model!r}: expected one of {', '.join(PAPER_MODELS)} (configs/paper/X.py:{default})")
  name, batch = PAPER_MODELS[model]
  return load_config_file(os.path.join(configs_dir, name)), batch


def finetune_recipe(config: ml_collections.ConfigDict, *, batch_size: int, datasets: dict, evals: dict,
                    train_size: int, epochs: int, select: tuple[str, ...] = ()):
  """Fine-tuning of the Q-Former side from an InstructBLIP checkpoint (config.model_init): `epochs` over
  `train_size` examples at `batch_size`, warmup over the first 10% of the steps (at most the paper's 1,000), AdamW
  peak 1e-5 with cosine decay stepped once per epoch (LAVIS's), evaluation every epoch, the best on `select` kept in workdir/best/."""
  steps_per_epoch = -(-train_size // batch_size)
  config.mode = "train"
  config.model_init_required = True
  config.total_steps = epochs * steps_per_epoch
  config.batch_size = batch_size
  config.optim = optim()
  # LAVIS's epoch runner: the cosine steps once per epoch, warming up within the first.
  config.optim.schedule = "lavis"
  config.optim.inner_epoch_steps = steps_per_epoch
  config.optim.warmup_steps = min(1000, max(1, config.total_steps // 10), steps_per_epoch)
  config.data.datasets = datasets
  config.data.balanced = True
  config.text_processing = "lavis"
  config.evals = evals
  config.eval_every = steps_per_epoch
  config.eval_at_start = True      # the instruction-tuned model before fine-tuning, as a baseline
  config.eval_at_end = True
  config.eval_batch_size = 64
  config.checkpoint_every = min(1000, steps_per_epoch)
  config.best_checkpoint_metrics = tuple(select)
  config.best_checkpoint_mixing = "relative"
  tpu_precision(config)
  return config
