"""The config, read once: `resolve(config, workdir, mode)` turns the ml_collections ConfigDict into typed, checked
settings that every mode takes, so nothing downstream re-reads raw keys.

Every problem is collected and reported at once, each naming the field (`config.x.y=value` and what is expected),
before anything is loaded or compiled. The model config is resolved here too: the checkpoint's config.json with
config.model's settings on top (iblip_jax.hf.load_config), or config.model alone without a checkpoint.
"""
import dataclasses
import os
from typing import Any

import jax

from iblip_jax import hf, sharding
from iblip_jax.data import templates
from iblip_jax.data.sources import Source, problems as source_problems
from iblip_jax.errors import UserError
from iblip_jax.evaluation import paper_numbers, tasks
from iblip_jax.models import configs as model_configs
from iblip_jax.models.configs import InstructBlipConfig
from iblip_jax.run import best

MODES = ("train", "eval", "predict", "export", "summary")


class ConfigError(UserError):
  """The config (or the command line) asks for something that cannot run; the message lists every problem."""


@dataclasses.dataclass(frozen=True)
class Optim:
  """AdamW and its schedule (iblip_jax.optim reads these by name)."""
  lr: float
  warmup_lr: float
  warmup_steps: int
  min_lr: float
  b1: float
  b2: float
  eps: float
  weight_decay: float
  grad_clip_norm: float
  grad_accum_steps: int


@dataclasses.dataclass(frozen=True)
class Data:
  datasets: tuple[Source, ...]
  balanced: bool       # p ~ sqrt(size) x weight (True) or size x weight
  workers: int         # grain worker processes decoding images
  random_crop: bool    # RandomResizedCrop(0.5-1.0) in training, as LAVIS
  mixing: str          # "example" or "step" (one dataset per global batch, LAVIS)
  max_skip_rate: float # warn above this recent fraction of skipped examples
  group_by_length: int # windows (global batches) within which examples are regrouped by length; 0 = off
  fitted_buckets: int  # bucket lengths per field fitted to the data; 0 = the fixed powers of two
  instruction_format: str = "templates"   # or "raw" / "dataset_name": the paper's multitask baselines (templates.py)


@dataclasses.dataclass(frozen=True)
class Predict:
  images: str
  prompt: str
  output: str
  batch_size: int
  num_beams: int
  max_new_tokens: int
  min_new_tokens: int
  length_penalty: float
  repetition_penalty: float
  attention_maps: str = ""   # a folder (local or gs://): each answer's attention overlay as a PNG


@dataclasses.dataclass(frozen=True)
class Settings:
  mode: str
  workdir: str | None
  model: InstructBlipConfig
  model_init: str                  # "" = freshly initialised from config.model (smoke tests)
  model_init_required: bool        # refuse to run (but summary) without model_init
  model_init_stage1: str           # BLIP-2 stage 1 (the Q-Former's text side) when model_init is a BLIP-2 stage 2
  tokenizer: str                   # defaults to model_init
  trainable: tuple[str, ...]
  reinit_trainable: bool
  seed: int
  total_steps: int
  batch_size: int
  dropout: bool
  rng_impl: str                    # dropout's random-bit generator (jax.random.key impl)
  optim: Optim
  mesh: dict[str, int]
  sharding_rules: tuple[tuple, ...]
  max_replicated_bytes: int
  data: Data
  evals: tuple[Source, ...]
  eval_every: int
  eval_at_start: bool
  eval_at_end: bool
  eval_untrained_baseline: bool
  eval_batch_size: int
  eval_max_examples: int
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int
  fresh_start_if_unreadable: bool
  export_dir: str
  predict: Predict
  baselines: dict[str, float]      # chance levels per evaluation, for the final table
  best_checkpoint_metrics: tuple[str, ...]   # "<eval>/<metric>": training keeps workdir/best by their mean (best.py)
  paper_model: str                 # eval mode: the paper's LLM to set the results beside (Table 1); "" = none
  config_json: str                 # the whole config, written to workdir/config.json by training


# The config's top-level keys: the settings' fields, as config_lib.base names them.
_TOP_LEVEL = {f.name for f in dataclasses.fields(Settings)} - {"workdir", "config_json", "max_replicated_bytes"} | {
    "max_replicated_mb"}


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


def _positive(config, keys, problems):
  for key in keys:
    if config[key] <= 0:
      problems.append(f"config.{key}={config[key]} must be positive")


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


def _instruction_format(config) -> list[str]:
  value = config.data.get("instruction_format", "templates")
  if value not in templates.INSTRUCTION_FORMATS:
    return [f"config.data.instruction_format={value!r} must be one of {', '.join(templates.INSTRUCTION_FORMATS)} "
            "(instruction templates, or the paper's multitask baselines without them)"]
  return []


def _paper_model(config) -> list[str]:
  value = config.get("paper_model") or ""
  if value and value not in paper_numbers.MODELS:
    return [f"config.paper_model={value!r} is not one of the paper's models ({', '.join(paper_numbers.MODELS)})"]
  return []


def resolve(config, workdir: str | None, mode: str | None = None) -> Settings:
  """The checked settings of `config` for `mode` (default: config.mode). Raises ConfigError listing every problem.
  Needs JAX's devices (the mesh is checked against them): call after distributed start-up."""
  mode = mode or config.mode
  problems = []
  if mode not in MODES:
    raise ConfigError(f"--config.mode={mode!r} is not a mode; available: {', '.join(sorted(MODES))}")
  unknown = sorted(set(config.keys()) - _TOP_LEVEL)
  if unknown:
    problems.append(f"unknown config keys {unknown}: not settings of iblip_jax (typo?)")
  if config.rng_impl not in ("threefry2x32", "rbg", "unsafe_rbg"):
    problems.append(f"config.rng_impl={config.rng_impl!r}: expected 'threefry2x32', 'rbg' or 'unsafe_rbg'")
  if mode in ("train", "eval", "export") and not workdir:
    problems.append(f"--workdir is required for mode {mode}")
  model = _model(config, problems)
  if config.get("model_init_required") and not config.model_init and mode != "summary":
    problems.append("config.model_init is empty, and this config needs pretrained weights (model_init_required): "
                    "name them with --config.model_init=... (see the config file's docstring)")
  tokenizer = config.get("tokenizer") or config.model_init
  if mode in ("train", "eval", "predict") and (not tokenizer or not os.path.isdir(tokenizer)):
    problems.append(f"config.tokenizer={tokenizer!r}: not a directory with the LLM tokenizer (and "
                    "qformer_tokenizer/); it defaults to config.model_init")
  elif mode in ("train", "eval", "predict") and not os.path.isdir(os.path.join(tokenizer, "qformer_tokenizer")):
    problems.append(f"config.tokenizer={tokenizer!r} has no qformer_tokenizer/ (a BLIP-2 directory has the LLM's "
                    "tokenizer only): point config.tokenizer at the LLM tokenizer with the Q-Former's in "
                    "qformer_tokenizer/, e.g. the tokenizer files of an InstructBLIP release (configs/paper/README.md)")
  try:
    datasets = _sources(config.data.datasets, "config.data.datasets")
    evals = _sources(config.evals, "config.evals")
  except ConfigError as e:
    problems.append(str(e))
    datasets, evals = (), ()
  mesh = dict(config.mesh.to_dict())
  if mode == "train":
    if config.total_steps <= 0:
      problems.append(f"config.total_steps={config.total_steps} must be positive")
    if not datasets:
      problems.append("config.data.datasets is empty: nothing to train on")
    problems += _batch(config.batch_size, "config.batch_size", mesh)
    if config.data.group_by_length and config.data.mixing == "step":
      problems.append("config.data.group_by_length needs config.data.mixing='example' (grouping by length mixes "
                      "datasets in a batch)")
    if config.data.mixing not in ("example", "step"):
      problems.append(f"config.data.mixing={config.data.mixing!r} must be 'example' (every example drawn from the "
                      "mixture) or 'step' (every global batch from one dataset, as LAVIS)")
    for source in datasets:
      problems += source_problems(source)
    problems += _instruction_format(config)
    _positive(config, ("checkpoint_every", "log_every", "eval_every", "keep_checkpoints"), problems)
  if mode in ("train", "eval") and evals and config.eval_batch_size <= 0:
    problems.append(f"config.eval_batch_size={config.eval_batch_size} must be positive")
  if mode == "predict" and config.predict.batch_size <= 0:
    problems.append(f"config.predict.batch_size={config.predict.batch_size} must be positive")
  if mode in ("train", "eval"):
    for source in evals:
      if source.task not in tasks.TASKS:
        problems.append(f"{source.where}.task={source.task!r} is not a known task ({', '.join(sorted(tasks.TASKS))})")
      problems += source_problems(source)
  problems += _paper_model(config)
  best_keys, best_problems = best.selection_keys(config.get("best_checkpoint_metrics") or (), evals)
  if mode == "train":
    problems += best_problems
  if problems:
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
  return Settings(
      mode=mode, workdir=workdir, model=model, model_init=config.model_init,
      model_init_stage1=config.get("model_init_stage1") or "", tokenizer=tokenizer,
      model_init_required=bool(config.get("model_init_required")),
      trainable=tuple(config.trainable), reinit_trainable=config.reinit_trainable, seed=config.seed,
      total_steps=config.total_steps, batch_size=config.batch_size, dropout=config.dropout, rng_impl=config.rng_impl,
      optim=Optim(**config.optim.to_dict()), mesh=mesh, sharding_rules=tuple(tuple(r) for r in config.sharding_rules),
      max_replicated_bytes=int(config.max_replicated_mb * 2**20),
      data=Data(datasets=datasets, balanced=config.data.balanced, workers=config.data.workers,
                random_crop=config.data.random_crop, mixing=config.data.mixing,
                max_skip_rate=config.data.max_skip_rate,
                instruction_format=config.data.get("instruction_format", "templates"),
                group_by_length=config.data.group_by_length, fitted_buckets=config.data.fitted_buckets),
      evals=evals, eval_every=config.eval_every, eval_at_start=config.eval_at_start, eval_at_end=config.eval_at_end,
      eval_untrained_baseline=config.eval_untrained_baseline, eval_batch_size=config.eval_batch_size,
      eval_max_examples=config.eval_max_examples, log_every=config.log_every,
      checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints,
      fresh_start_if_unreadable=config.fresh_start_if_unreadable, export_dir=config.export_dir,
      predict=Predict(**config.predict.to_dict()), baselines=dict(config.get("baselines") or {}),
      paper_model=config.get("paper_model") or "", best_checkpoint_metrics=tuple(best_keys),
      config_json=config.to_json_best_effort(indent=2))


def for_tools(config, **overrides: Any) -> Settings:
  """Settings for a tool that builds the model from shapes only (the AOT compiler, benchmarks): no workdir, no
  data checks; `overrides` replace fields (e.g. model=a TPU-precision model config)."""
  return dataclasses.replace(resolve(config, None, "summary"), **overrides)
