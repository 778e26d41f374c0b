"""The main job's settings, declared once: each is a dataclass field here, with its default and what it means.
config_lib.base() builds the ml_collections ConfigDict that config files and --config.key=value edit from these
declarations (config_defaults), and `resolve(config, workdir, mode)` reads it back into them, checked, so that
nothing downstream reads raw keys.

Every problem is collected and reported at once, each naming the field (`config.x.y=value` and what is expected),
before anything is loaded or compiled. The model config is resolved here too: the checkpoint's config.json with
config.model's settings on top (iblip_jax.hf.load_config), or config.model alone without a checkpoint.
"""
import dataclasses
import math
import os
import re
from typing import Any

import jax

from iblip_jax import hf, prompts, sharding
from iblip_jax import lora as lora_lib
from iblip_jax.data import templates
from iblip_jax.hf import names as hf_names
from iblip_jax.hf import peft as hf_peft
from iblip_jax.data.sources import Source, problems as source_problems
from iblip_jax.decoding import Decoding
from iblip_jax.errors import UserError
from iblip_jax.evaluation import paper_numbers, tasks
from iblip_jax.models import configs as model_configs
from iblip_jax.models import quantize as quantize_lib
from iblip_jax.models.configs import InstructBlipConfig
from iblip_jax.models.instructblip import InstructBlip, params_shape
from iblip_jax.run import best
from iblip_jax.trainable import INSTRUCTION_TUNING

MODES = ("train", "eval", "predict", "annotate", "export", "summary")

# Logical axis -> mesh axes (MaxText/t5x style). Weights: FSDP over their embedding dimension, tensor parallelism
# over heads and MLP. Activations (act_*) split the batch over data x fsdp.
SHARDING_RULES = (
    ("act_batch", ("data", "fsdp")), ("act_length", None), ("act_embed", None), ("act_vocab", "tensor"),
    ("embed", "fsdp"), ("image_embed", "fsdp"), ("llm_embed", "tensor"),
    ("mlp", "tensor"), ("heads_joined", "tensor"), ("kv_joined", "tensor"), ("qkv", "tensor"), ("vocab", "tensor"),
    ("heads", None), ("relpos_buckets", None), ("layers", None),
)
LAVIS = Decoding()


class ConfigError(UserError):
  """The config (or the command line) asks for something that cannot run; the message lists every problem."""


def _config(value, **metadata):
  """A setting whose config form differs from its typed one (a dict of entries, a list): `value` is the form a
  config file edits."""
  return {"config": value, **metadata}


NOT_IN_CONFIG = {"in_config": False}


@dataclasses.dataclass(frozen=True)
class Optim:
  """AdamW and its schedule (iblip_jax.optim reads these by name): the paper's / LAVIS's, warmup from 1e-8 to 1e-5
  over 1,000 steps, then cosine decay to min_lr."""
  lr: float = 1e-5
  warmup_lr: float = 1e-8
  warmup_steps: int = 1000
  min_lr: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.05
  grad_clip_norm: float = 0.0      # 0: no clipping
  grad_accum_steps: int = 1
  # "smooth" (optax's warmup + cosine, a new rate every step) or "lavis" (LAVIS's runner: the cosine steps once per
  # inner epoch of inner_epoch_steps, warmup within the first; what the paper recipe uses); iblip_jax/optim.py
  schedule: str = "smooth"
  inner_epoch_steps: int = 0


@dataclasses.dataclass(frozen=True)
class Data:
  # Training data: {name: {"format": a reader name (iblip_jax.data.readers), "path": ..., "weight": 1.0}}, or a
  # prepared dataset (iblip_jax.data.tfds_builder): {"format", "tfds_data_dir", "split": "train", "weight"}.
  datasets: tuple[Source, ...] = dataclasses.field(default=(), metadata=_config({}))
  balanced: bool = True            # p ~ sqrt(size) x weight (True) or size x weight
  workers: int = 0                 # grain worker processes decoding images
  random_crop: bool = True         # RandomResizedCrop(0.5-1.0) in training, as LAVIS (no flip: it breaks left/right)
  mixing: str = "example"          # "example" (every example drawn from the mixture) or "step" (one dataset per
                                   # global batch, LAVIS)
  max_skip_rate: float = 0.1       # warn above this recent fraction of examples skipped as bad
  # "templates" (instruction tuning), or the paper's multitask baselines without instructions: "raw" (the question
  # alone, an empty instruction for captions) or "dataset_name" ("[Task:Dataset] question") (templates.py)
  instruction_format: str = "templates"
  group_by_length: int = 0         # regroup examples by padded shape within windows of this many global batches
  fitted_buckets: int = 0          # at most this many bucket lengths per field fitted to the data; 0 = powers of 2
  # Sequence packing (data/packing.py): examples share LLM rows of this many tokens (segment ids keep them apart;
  # the same loss and gradients as unpacked). At least the longest example: visual tokens + max prompt (128)
  # (+ max target (256) for a decoder-only LLM). 0 = one example per row, bucket-padded.
  packing: int = 0


@dataclasses.dataclass(frozen=True)
class Lora:
  """LoRA adapters (iblip_jax/lora.py, models/layers.Dense) on every linear layer whose module path matches one of
  `targets` (regexes, re.search), in any tower: e.g. ["qformer/.*/(query|value)$",
  "language_model/.*/self_attn/(q|v)$"]. [] = none. The adapters join config.trainable's parameters as the trained
  ones; config.trainable=[] trains the adapters alone."""
  targets: tuple[str, ...] = ()    # --config.lora.targets="('qformer/.*/query$', ...)"
  rank: int = 8
  alpha: float = 16.0              # the update is scaled by alpha / rank (PEFT's lora_alpha)
  dropout: float = 0.0             # on the adapter's input, in training (PEFT's lora_dropout)


@dataclasses.dataclass(frozen=True)
class Predict:
  """--config.mode=predict (run/predict.py); decoding as LAVIS's (iblip_jax.decoding.Decoding)."""
  images: str = ""                 # a file, folder, comma list, or JSONL of {"image", "prompt"}
  prompt: str = prompts.CAPTION
  output: str = ""                 # answers.jsonl (local or gs://); "" prints them
  batch_size: int = 8
  num_beams: int = LAVIS.beams
  max_new_tokens: int = LAVIS.max_new_tokens
  min_new_tokens: int = LAVIS.min_new_tokens
  length_penalty: float = LAVIS.length_penalty
  repetition_penalty: float = LAVIS.repetition_penalty
  attention_maps: str = ""         # a folder (local or gs://): each answer's attention overlay as a PNG


@dataclasses.dataclass(frozen=True)
class Annotate:
  """--config.mode=annotate (run/annotate.py): a dataset answered in bulk, resumable; decoding as predict's."""
  inputs: str = ""                 # globs, files, folders (comma list; local or gs://): tars, JSONL/CSV, images,
                                   # prepared datasets (a tfds version folder of ArrayRecord files)
  prompts: str = prompts.CAPTION   # one prompt, or a JSON list: '["A short caption:", "What is in the image?"]'
  output: str = ""                 # a folder (local or gs://): rows/, done/, annotate.json, manifest.json
  batch_size: int = 8              # global rows (image x prompt) per model call
  num_beams: int = LAVIS.beams
  max_new_tokens: int = LAVIS.max_new_tokens
  min_new_tokens: int = LAVIS.min_new_tokens
  length_penalty: float = LAVIS.length_penalty
  repetition_penalty: float = LAVIS.repetition_penalty
  scores: bool = False             # each answer's log-probability under the model, as "score"
  rows_per_file: int = 1000        # records per output file: the unit a preemption can lose
  folder_shard: int = 1000         # image files (or prepared records) per shard of a folder (or prepared split)


@dataclasses.dataclass(frozen=True)
class Settings:
  mode: str = "summary"
  # The model's sizes and switches (models/configs.py field names; config_lib.base fills it). With model_init, the
  # checkpoint's config.json decides the architecture and config.model adds settings on top; sizes stated there
  # must then agree with the checkpoint.
  model: InstructBlipConfig | None = dataclasses.field(default=None, metadata=_config({}))
  model_init: str = ""             # a local Hugging Face InstructBLIP (or BLIP-2 stage-2) directory; "" = random
  # With a BLIP-2 stage-2 model_init (Blip2ForConditionalGeneration, the paper's start): the stage-1 directory
  # (Blip2ForImageTextRetrieval) that gives the Q-Former's text side, as LAVIS does; "" = the documented fallback,
  # with a warning (iblip_jax/hf/blip2.py).
  model_init_stage1: str = ""
  model_init_required: bool = False  # train/eval/predict/export refuse to run without model_init (paper configs)
  tokenizer: str = ""              # defaults to model_init (its top level + qformer_tokenizer/)
  # regexes over parameter paths; a tuple, so that the command line can set it: --config.trainable="()"
  trainable: tuple[str, ...] = INSTRUCTION_TUNING
  reinit_trainable: bool = False   # True: the Q-Former side starts from scratch instead of model_init's weights
  lora: Lora = Lora()
  # A PEFT LoRA directory made for model_init (peft's save_pretrained on transformers' InstructBLIP): its adapters
  # (targets, rank, alpha from its adapter_config.json) go on the model; training goes on from them. "" = none.
  model_adapter: str = ""
  seed: int = 0
  total_steps: int = 10_000
  batch_size: int = 192            # global batch, split over data x fsdp
  dropout: bool = True             # LAVIS trains with the Q-Former's and (frozen) T5's dropout active
  # The random-bit generator of dropout: "threefry2x32" (the same bits on any mesh and number of hosts: the
  # multi-host tests compare runs bit for bit), or the cheaper "rbg" / "unsafe_rbg" (BENCHMARKS.md).
  rng_impl: str = "threefry2x32"
  # "none": texts as the files write them; "lavis": LAVIS's blip_caption / blip_question cleaning (lower case, no
  # . ! " ( ) * # : ; ~, at most 50 words) of training captions and questions and of evaluation questions, as the
  # paper recipes do (iblip_jax/data/text.py)
  text_processing: str = "none"
  optim: Optim = Optim()
  # data/fsdp/tensor within a slice (-1 = the rest); dcn_* across slices of a multi-slice pod.
  mesh: dict = dataclasses.field(default_factory=lambda: dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1,
                                                              dcn_tensor=1))
  sharding_rules: tuple = dataclasses.field(default=SHARDING_RULES,
                                            metadata=_config([list(r) for r in SHARDING_RULES]))
  # A larger replicated tensor is a sharding mistake: fail before compiling. (128: the Q-Former's 94 MB word
  # embedding has a vocabulary of 30523, which no mesh axis divides, so it stays whole when `fsdp` is 1.)
  max_replicated_mb: float = 128.0
  data: Data = Data()
  # Evaluations: {name: {"task": an iblip_jax.evaluation.tasks name, "format": ..., "path": ...}}
  evals: tuple[Source, ...] = dataclasses.field(default=(), metadata=_config({}))
  eval_every: int = 1000
  eval_at_start: bool = False
  eval_at_end: bool = True
  eval_untrained_baseline: bool = False  # also evaluate a randomly initialised trainable side at the start
  eval_batch_size: int = 8
  eval_max_examples: int = 0       # 0 = all
  # Validation-based checkpoint selection (the paper keeps the best on held-in validation): evaluations ("<eval
  # name>" = its task's headline metric, or "<eval name>/<metric>") whose mean, after every evaluation during
  # training, decides the checkpoint kept in workdir/best/ (run/best.py). A tuple on the command line:
  # --config.best_checkpoint_metrics="('coco_val', 'okvqa_val')"
  best_checkpoint_metrics: tuple[str, ...] = ()
  # How several of them combine: "mean" (plain) or "relative" (each in % of its first value, so a CIDEr near 140
  # does not outweigh an accuracy near 50; the paper recipes); run/best.py
  best_checkpoint_mixing: str = "mean"
  # eval mode: the paper's LLM ("flant5xl", "flant5xxl", "vicuna7b", "vicuna13b") to set the results beside, in
  # table1.md / table1.png under the evaluation's directory (evaluation/report.py); "" = none.
  paper_model: str = ""
  baselines: dict = dataclasses.field(default_factory=dict)   # chance level per evaluation, for the final table
  log_every: int = 50
  # Steps to trace with jax.profiler, e.g. --config.profile_steps="(101, 102, 103)": each run of consecutive steps
  # is one trace under workdir/profile/steps_<first>-<last>/ for TensorBoard's profile plugin or xprof
  # (run/profiler.py); process 0 only unless profile_all_processes. () = none; the other steps are untouched. The
  # first step after each start compiles: trace later ones.
  profile_steps: tuple[int, ...] = ()
  profile_all_processes: bool = False
  # The step timeline (run/timeline.py): model FLOPs of each batch shape are counted by XLA in a background thread on
  # process 0 (the step lowered with its layers unrolled), for model TFLOP/s per device and MFU in the log. MFU
  # divides by peak_tflops (per device, bf16); 0 = the published figure of TPU chips (iblip_jax/chips.py), and no MFU
  # on other devices (the TFLOP/s are still logged).
  log_mfu: bool = True
  peak_tflops: float = 0.0
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  # Checkpoints exist but none can be read: True starts over from model_init instead of stopping (checkpoints.py:
  # unreadable ones are moved aside, never deleted).
  fresh_start_if_unreadable: bool = False
  export_dir: str = ""
  predict: Predict = Predict()
  annotate: Annotate = Annotate()
  workdir: str | None = dataclasses.field(default=None, metadata=NOT_IN_CONFIG)
  config_json: str = dataclasses.field(default="", metadata=NOT_IN_CONFIG)  # written to workdir/config.json

  @property
  def max_replicated_bytes(self) -> int:
    return int(self.max_replicated_mb * 2**20)

  @property
  def checkpoint_meaning(self) -> dict | None:
    """Settings that change what the checkpointed arrays mean and not their shapes (checkpoints.save): a resumed or
    evaluated LoRA run must scale its adapters as the run that trained them."""
    lora = self.model.lora if self.model is not None else None
    return {"lora": dataclasses.asdict(lora)} if lora is not None else None


def config_defaults(cls=Settings) -> dict:
  """The settings' defaults in the form a config edits (nested dicts, lists), for config_lib.base."""
  out = {}
  for f in dataclasses.fields(cls):
    if not f.metadata.get("in_config", True):
      continue
    if "config" in f.metadata:
      out[f.name] = f.metadata["config"]
    elif dataclasses.is_dataclass(f.default):
      out[f.name] = config_defaults(type(f.default))
    else:
      out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
  return out


def _unknown(config, cls, where: str) -> list[str]:
  """Keys of `config` that no setting of `cls` declares, at every level of nested settings."""
  fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("in_config", True)}
  out = [f"{where}.{k}" for k in sorted(config.keys()) if k not in fields]
  for name, f in fields.items():
    if dataclasses.is_dataclass(f.default) and name in config:
      out += _unknown(config[name], type(f.default), f"{where}.{name}")
  return out


def _read(config, cls, given: dict):
  """`cls` from `config`: nested settings read the same way, lists as tuples, missing keys at their defaults (a
  workdir's config.json from an older version), and `given` (the fields resolved apart) as they are."""
  values = {}
  for f in dataclasses.fields(cls):
    if f.name in given:
      values[f.name] = given[f.name]
    elif f.metadata.get("in_config", True) and f.name in config:
      value = config[f.name]
      if dataclasses.is_dataclass(f.default):
        value = _read(value, type(f.default), {})
      elif isinstance(value, list):
        value = tuple(value)
      values[f.name] = value
  return cls(**values)


def _sources(entries, where: str) -> tuple[Source, ...]:
  out = []
  for name, spec in entries.items():
    spec = dict(spec)
    known = {f.name for f in dataclasses.fields(Source)} - {"name", "where"}
    unknown = sorted(set(spec) - known)
    if unknown:
      raise ConfigError(f"{where}.{name}: unknown field(s) {unknown}; expected some of {sorted(known)}")
    out.append(Source(name=name, where=f"{where}.{name}", **spec))
  return tuple(out)


def _positive(s: Settings, keys, problems):
  for key in keys:
    if getattr(s, key) <= 0:
      problems.append(f"config.{key}={getattr(s, key)} must be positive")


def _optim_problems(o: Optim) -> list[str]:
  """Numbers the optimizer cannot train with: a rate or decay that is negative, zero where it must move, or not
  finite would train for nothing (or backwards) and exit 0."""
  checks = [("lr", o.lr > 0, "a positive number (the peak learning rate)"),
            ("warmup_lr", o.warmup_lr >= 0, "a number >= 0 (the rate warmup starts from)"),
            ("min_lr", 0 <= o.min_lr <= o.lr, f"a number in [0, lr={o.lr}] (where the cosine ends)"),
            ("warmup_steps", o.warmup_steps >= 0, "an integer >= 0"),
            ("weight_decay", o.weight_decay >= 0, "a number >= 0"),
            ("b1", 0 <= o.b1 < 1, "a number in [0, 1)"), ("b2", 0 <= o.b2 < 1, "a number in [0, 1)"),
            ("eps", o.eps > 0, "a positive number"),
            ("grad_clip_norm", o.grad_clip_norm >= 0, "a number >= 0 (0: off)"),
            ("grad_accum_steps", o.grad_accum_steps >= 1, "an integer >= 1")]
  out = [f"config.optim.{name}={getattr(o, name)!r}: expected {what}" for name, ok, what in checks
         if not ok or not math.isfinite(getattr(o, name))]
  if o.schedule not in ("smooth", "lavis"):
    out.append(f"config.optim.schedule={o.schedule!r}: expected 'smooth' or 'lavis'")
  elif o.schedule == "lavis" and not o.inner_epoch_steps >= max(o.warmup_steps, 1):
    out.append(f"config.optim.inner_epoch_steps={o.inner_epoch_steps}: the 'lavis' schedule steps its cosine once "
               f"per inner epoch and warms up within the first, so it needs inner epochs of at least warmup_steps="
               f"{o.warmup_steps} steps")
  return out


def _batch(size: int, where: str, mesh: dict) -> list[str]:
  """A global batch must split evenly over the mesh's batch axes and over the processes."""
  try:
    split = sharding.batch_split(mesh, jax.device_count())
  except ValueError as e:
    return [str(e)]
  if size <= 0 or size % split or size % jax.process_count():
    return [f"{where}={size} must be a positive multiple of the mesh's batch split (data x fsdp = {split} on "
            f"{jax.device_count()} devices) and of the {jax.process_count()} processes"]
  return []


def _model(config, problems) -> InstructBlipConfig | None:
  stage1 = config.get("model_init_stage1") or ""
  if stage1 and not config.model_init:
    problems.append(f"config.model_init_stage1={stage1!r} but config.model_init is empty: the stage-1 checkpoint "
                    "completes a BLIP-2 stage-2 directory given as config.model_init")
  if stage1 and not os.path.isfile(os.path.join(stage1, "config.json")):
    problems.append(f"config.model_init_stage1={stage1!r}: no Hugging Face checkpoint there (config.json)")
    return None
  if config.model_init and not os.path.isfile(os.path.join(config.model_init, "config.json")):
    problems.append(f"config.model_init={config.model_init!r}: no Hugging Face checkpoint there (config.json)")
    return None
  try:
    if config.model_init:
      return hf.load_config(config.model_init, overrides=config.model.to_dict(),
                            stage1=config.get("model_init_stage1") or None)
    return model_configs.from_dict(config.model.to_dict())
  except ValueError as e:
    problems.append(str(e))
    return None


def resolve(config, workdir: str | None, mode: str | None = None) -> Settings:
  """The checked settings of `config` for `mode` (default: config.mode). Raises ConfigError listing every problem.
  Needs JAX's devices (the mesh is checked against them): call after distributed start-up."""
  mode = mode or config.mode
  if mode not in MODES:
    raise ConfigError(f"--config.mode={mode!r} is not a mode; available: {', '.join(sorted(MODES))}")
  problems = [f"{key}: no such setting of iblip_jax (typo?)" for key in _unknown(config, Settings, "config")]
  model = _model(config, problems)
  try:
    datasets = _sources(config.data.datasets, "config.data.datasets")
    evals = _sources(config.evals, "config.evals")
  except ConfigError as e:
    problems.append(str(e))
    datasets, evals = (), ()
  best_keys, best_problems = best.selection_keys(config.get("best_checkpoint_metrics") or (), evals)
  s = _read(config, Settings, dict(
      mode=mode, workdir=workdir, model=model, tokenizer=config.get("tokenizer") or config.get("model_init", ""),
      data=_read(config.data, Data, dict(datasets=datasets)), evals=evals, mesh=dict(config.mesh.to_dict()),
      sharding_rules=tuple(tuple(r) for r in config.get("sharding_rules", SHARDING_RULES)),
      baselines=dict(config.get("baselines") or {}), best_checkpoint_metrics=tuple(best_keys),
      config_json=config.to_json_best_effort(indent=2)))
  s, lora_problems = _with_lora(s)
  problems += lora_problems + _quantized_trainable(s)
  if s.rng_impl not in ("threefry2x32", "rbg", "unsafe_rbg"):
    problems.append(f"config.rng_impl={s.rng_impl!r}: expected 'threefry2x32', 'rbg' or 'unsafe_rbg'")
  if s.best_checkpoint_mixing not in best.MIXINGS:
    problems.append(f"config.best_checkpoint_mixing={s.best_checkpoint_mixing!r}: expected one of "
                    f"{', '.join(map(repr, best.MIXINGS))}")
  if s.text_processing not in ("none", "lavis"):
    problems.append(f"config.text_processing={s.text_processing!r}: expected 'none' (texts as written) or 'lavis' "
                    "(LAVIS's caption and question cleaning)")
  if mode in ("train", "eval", "export") and not workdir:
    problems.append(f"--workdir is required for mode {mode}")
  if s.model_init_required and not s.model_init and mode != "summary":
    problems.append("config.model_init is empty, and this config needs pretrained weights (model_init_required): "
                    "name them with --config.model_init=... (see the config file's docstring)")
  if mode in ("train", "eval", "predict", "annotate"):
    problems += _tokenizer_problems(s.tokenizer)
  if mode == "train":
    problems += _train_problems(s, datasets) + best_problems
  if mode in ("train", "eval") and evals and s.eval_batch_size <= 0:
    problems.append(f"config.eval_batch_size={s.eval_batch_size} must be positive")
  if mode == "predict" and s.predict.batch_size <= 0:
    problems.append(f"config.predict.batch_size={s.predict.batch_size} must be positive")
  if mode == "annotate":
    problems += _annotate_problems(s.annotate)
  if mode in ("train", "eval"):
    for source in evals:
      if source.task not in tasks.TASKS:
        problems.append(f"{source.where}.task={source.task!r} is not a known task ({', '.join(sorted(tasks.TASKS))})")
      problems += source_problems(source)
  if s.paper_model and s.paper_model not in paper_numbers.MODELS:
    problems.append(f"config.paper_model={s.paper_model!r} is not one of the paper's models "
                    f"({', '.join(paper_numbers.MODELS)})")
  if problems:
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
  return s


def _with_lora(s: Settings) -> tuple[Settings, list[str]]:
  """config.lora applied: the model config carries it to its layers and the adapters join the trainable
  patterns; or what is wrong with it."""
  if s.model_adapter:
    return _with_adapter(s)
  if not s.lora.targets:
    return s, []
  lora = model_configs.LoraConfig(targets=s.lora.targets, rank=s.lora.rank, alpha=s.lora.alpha,
                                  dropout=s.lora.dropout)
  if s.model is None:   # the model config itself is wrong (reported already)
    return s, []
  bad = lora_lib.problems(lora, params_shape(InstructBlip(s.model)))
  if bad:
    return s, bad
  return dataclasses.replace(s, model=model_configs.with_lora(s.model, lora),
                             trainable=s.trainable + (lora_lib.ADAPTERS,)), []


def _quantized_trainable(s: Settings) -> list[str]:
  """A quantised weight is frozen: a config.trainable pattern that matches one is an error (LoRA adapters over it,
  QLoRA, are the way to train there)."""
  if s.model is None or not (s.model.vision.quantize or s.model.text.quantize):
    return []
  kernels = ["/".join(p) for p, leaf in hf_names.flat(params_shape(InstructBlip(s.model))).items()
             if p[-1] == "kernel" and quantize_lib.mode_of(leaf.dtype)]
  out = []
  for pattern in s.trainable:
    hit = [k for k in kernels if re.search(pattern, k)]
    if hit:
      out.append(f"config.trainable pattern {pattern!r} matches quantised weights ({len(hit)}, e.g. {hit[0]}; "
                 f"model.vision.quantize={s.model.vision.quantize!r}, model.text.quantize={s.model.text.quantize!r})"
                 ": a quantised weight is frozen; train LoRA adapters over it (config.lora) or keep the tower float")
  return out


def _with_adapter(s: Settings) -> tuple[Settings, list[str]]:
  """config.model_adapter applied (its own LoRA settings), or what is wrong with it."""
  where = f"config.model_adapter={s.model_adapter!r}"
  if s.lora.targets:
    return s, [f"{where} and config.lora.targets are both set: the adapter brings its own targets, rank and alpha "
               "(adapter_config.json); set one of them"]
  if not s.model_init:
    return s, [f"{where} needs config.model_init, the model it was made for"]
  if s.model is None:
    return s, []
  try:
    adapted, _ = hf_peft.load_adapter(InstructBlip(s.model), s.model_adapter)
  except UserError as e:
    return s, [f"{where}: {e}"]
  return dataclasses.replace(s, model=adapted.config, trainable=s.trainable + (lora_lib.ADAPTERS,)), []


def _annotate_problems(a: Annotate) -> list[str]:
  out = []
  if not a.inputs.strip():
    out.append("config.annotate.inputs is empty: name webdataset tars, JSONL/CSV files or image folders")
  if not a.output.strip():
    out.append("config.annotate.output is empty: name a folder (local or gs://) for the rows")
  for name in ("batch_size", "rows_per_file", "folder_shard"):
    if getattr(a, name) <= 0:
      out.append(f"config.annotate.{name}={getattr(a, name)} must be positive")
  return out


def _tokenizer_problems(tokenizer: str) -> list[str]:
  if not tokenizer or not os.path.isdir(tokenizer):
    return [f"config.tokenizer={tokenizer!r}: not a directory with the LLM tokenizer (and qformer_tokenizer/); it "
            "defaults to config.model_init"]
  if not os.path.isdir(os.path.join(tokenizer, "qformer_tokenizer")):
    return [f"config.tokenizer={tokenizer!r} has no qformer_tokenizer/ (a BLIP-2 directory has the LLM's tokenizer "
            "only): point config.tokenizer at the LLM tokenizer with the Q-Former's in qformer_tokenizer/, e.g. the "
            "tokenizer files of an InstructBLIP release (configs/paper/README.md)"]
  return []


def _train_problems(s: Settings, datasets) -> list[str]:
  problems = []
  if s.total_steps <= 0:
    problems.append(f"config.total_steps={s.total_steps} must be positive")
  if not datasets:
    problems.append("config.data.datasets is empty: nothing to train on")
  problems += _batch(s.batch_size, "config.batch_size", s.mesh)
  if s.data.group_by_length and s.data.mixing == "step":
    problems.append("config.data.group_by_length needs config.data.mixing='example' (grouping by length mixes "
                    "datasets in a batch)")
  if s.data.packing < 0:
    problems.append(f"config.data.packing={s.data.packing}: a row length in tokens, or 0 (no packing)")
  if s.data.mixing not in ("example", "step"):
    problems.append(f"config.data.mixing={s.data.mixing!r} must be 'example' (every example drawn from the "
                    "mixture) or 'step' (every global batch from one dataset, as LAVIS)")
  for source in datasets:
    problems += source_problems(source)
  if s.data.instruction_format not in templates.INSTRUCTION_FORMATS:
    problems.append(f"config.data.instruction_format={s.data.instruction_format!r} must be one of "
                    f"{', '.join(templates.INSTRUCTION_FORMATS)} (instruction templates, or the paper's multitask "
                    "baselines without them)")
  _positive(s, ("checkpoint_every", "log_every", "eval_every", "keep_checkpoints"), problems)
  bad = [n for n in s.profile_steps if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= s.total_steps]
  if bad:
    problems.append(f"config.profile_steps={s.profile_steps!r}: {bad} are not steps of this run (whole numbers "
                    f"from 1 to total_steps={s.total_steps})")
  return problems + _optim_problems(s.optim)


def packing_problems(packing: int, model: InstructBlipConfig) -> list[str]:
  """A packed row must hold the longest example the tokenizers let through: an image's query tokens and a prompt
  of tokenize's 128 tokens (a decoder-only LLM: and its target of 256, in the same row). Checked once the model
  (model_init's config.json) is known."""
  if not packing:
    return []
  parts = [(model.num_query_tokens, "query tokens"), (128, "prompt tokens")]
  parts += [(256, "target tokens")] if model.decoder_only else []
  longest = sum(k for k, _ in parts)
  if packing < longest:
    return [f"config.data.packing={packing}: a packed row must hold the longest example, {longest} LLM tokens "
            f"({' + '.join(f'{k} {what}' for k, what in parts)}); 0 turns packing off"]
  return []


def for_tools(config, **overrides: Any) -> Settings:
  """Settings for a tool that builds the model from shapes only (the AOT compiler, benchmarks): no workdir, no
  data checks; `overrides` replace fields (e.g. model=a TPU-precision model config)."""
  return dataclasses.replace(resolve(config, None, "summary"), **overrides)
