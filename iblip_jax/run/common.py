"""What the modes share: checking the config before anything compiles, the model config (the checkpoint's, with
config.model's settings on top), the mesh, parameters placed straight into their shardings, tokenizers, records,
instructions, the configured evaluations on the mesh."""
import dataclasses
import logging
import os

import jax
from etils import epath

from iblip_jax import pretrained, sharding
from iblip_jax import train_step as ts
from iblip_jax.data import tokenize
from iblip_jax.evaluation import evaluator, tasks
from iblip_jax.models import configs as model_configs
from iblip_jax.models.configs import InstructBlipConfig
from iblip_jax.models.instructblip import InstructBlip


def _readers():
  from iblip_jax.data import readers  # imported late: the readers module is large and only some modes need it
  return readers.READERS


def validate(config, workdir: str | None, mode: str) -> None:
  """Every problem found, in one error, before any compilation or data loading."""
  problems = []
  if mode in ("train", "eval", "export") and not workdir:
    problems.append(f"--workdir is required for mode {mode}")
  if config.model_init and not os.path.isfile(os.path.join(config.model_init, "config.json")):
    problems.append(f"config.model_init={config.model_init!r}: no Hugging Face checkpoint there (config.json)")
  else:
    try:
      model_config(config)
    except ValueError as e:
      problems.append(str(e))
  tokenizer = config.get("tokenizer") or config.model_init
  if mode in ("train", "eval", "predict") and (not tokenizer or not os.path.isdir(tokenizer)):
    problems.append(f"config.tokenizer={tokenizer!r}: not a directory with the LLM tokenizer (and "
                    "qformer_tokenizer/); it defaults to config.model_init")
  if mode == "train":
    if config.total_steps <= 0:
      problems.append(f"config.total_steps={config.total_steps} must be positive")
    if not config.data.datasets:
      problems.append("config.data.datasets is empty: nothing to train on")
    problems += _check_batch(config.batch_size, "config.batch_size", config)
    if config.data.get("mixing", "example") not in ("example", "step"):
      problems.append(f"config.data.mixing={config.data.mixing!r} must be 'example' (every example drawn from the "
                      "mixture) or 'step' (every global batch from one dataset, as LAVIS)")
    for name, spec in config.data.datasets.items():
      problems += _check_source(spec, f"config.data.datasets.{name}")
    for key in ("checkpoint_every", "log_every", "eval_every", "keep_checkpoints"):
      if config[key] <= 0:
        problems.append(f"config.{key}={config[key]} must be positive")
  if mode in ("train", "eval") and config.evals and config.eval_batch_size <= 0:
    problems.append(f"config.eval_batch_size={config.eval_batch_size} must be positive")
  if mode == "predict" and config.predict.batch_size <= 0:
    problems.append(f"config.predict.batch_size={config.predict.batch_size} must be positive")
  if mode in ("train", "eval"):
    for name, spec in config.evals.items():
      if spec.task not in tasks.TASKS:
        problems.append(f"config.evals.{name}.task={spec.task!r} is not a known task "
                        f"({', '.join(sorted(tasks.TASKS))})")
      problems += _check_source(spec, f"config.evals.{name}")
  if problems:
    raise ValueError("invalid config:\n  " + "\n  ".join(problems))


def _check_batch(size: int, where: str, config) -> list[str]:
  """A global batch must split evenly over the mesh's batch axes and over the processes."""
  try:
    split = sharding.batch_split(config.mesh, jax.device_count())
  except ValueError as e:
    return [str(e)]
  if size <= 0 or size % split or size % jax.process_count():
    return [f"{where}={size} must be a positive multiple of the mesh's batch split (data x fsdp = {split} on "
            f"{jax.device_count()} devices) and of the {jax.process_count()} processes"]
  return []


def _check_source(spec, where: str) -> list[str]:
  out = []
  readers = _readers()
  if spec.format not in readers:
    out.append(f"{where}.format={spec.format!r} is not a known dataset format ({', '.join(sorted(readers))})")
  if spec.get("tfds_data_dir"):  # prepared with iblip_jax.data.tfds_builder
    from etils import epath
    name = spec.get("tfds_name") or spec.format
    if not (epath.Path(spec.tfds_data_dir) / name).exists():
      out.append(f"{where}.tfds_data_dir={spec.tfds_data_dir!r}: no prepared dataset {name!r} there (python -m "
                 f"iblip_jax.data.tfds_builder --dataset {spec.format} --source ... --data_dir {spec.tfds_data_dir})")
  elif not os.path.exists(spec.path):
    out.append(f"{where}.path={spec.path!r} does not exist")
  return out


def record_source(spec, where: str):
  """A dataset entry's records as a grain MapDataset: a prepared tfds dataset (`tfds_data_dir`, random access,
  images as bytes) or the reader's records in memory (`path`)."""
  if spec.get("tfds_data_dir"):
    from iblip_jax.data import tfds_builder
    ds = tfds_builder.data_source(spec.tfds_data_dir, spec.get("tfds_name") or spec.format, spec.get("split", "train"))
    if not len(ds):
      raise ValueError(f"{where}: the prepared dataset in {spec.tfds_data_dir} has no records")
    return ds
  from iblip_jax.data import mixture
  return mixture.source(read_records(spec, where))


def read_records(spec, where: str) -> list[dict]:
  if spec.get("tfds_data_dir"):  # images as PIL images, as the evaluator takes them
    from iblip_jax.data import tfds_builder
    return [tfds_builder.open_media(r) for r in record_source(spec, where)]
  records = list(_readers()[spec.format](spec.path))
  if not records:
    raise ValueError(f"{where}: {spec.path} has no records")
  return records


def renderer(config):
  """(record, rng) -> (text_input, text_output): records that carry their texts keep them; the others get one of
  their dataset's instruction templates."""
  from iblip_jax.data import templates

  def render(record, rng):
    if "text_input" in record and "text_output" in record:
      return record["text_input"], record["text_output"]
    return templates.render(record["dataset"], record, rng)
  return render


def model_config(config) -> InstructBlipConfig:
  """The model: config.model_init's config.json with config.model's settings on top (sizes config.model states
  must agree with the checkpoint's), or, without a checkpoint, config.model alone."""
  if config.model_init:
    return pretrained.load_config(config.model_init, overrides=config.model.to_dict())
  return model_configs.from_dict(config.model.to_dict())


def mesh_and_rules(config) -> tuple[jax.sharding.Mesh, list[tuple]]:
  return sharding.make_mesh(config.mesh), [tuple(r) for r in config.sharding_rules]


def param_shardings(config, model: InstructBlip, mesh, rules):
  """Every parameter's NamedSharding from the logical rules (the layout of training, evaluation and prediction)."""
  from iblip_jax.pretrained import params_shape
  import flax.linen as nn
  boxed = params_shape(model, boxed=True)
  with nn.logical_axis_rules(rules):
    shardings = sharding.logical_shardings(boxed, mesh, rules)
  sharding.check_sharded(nn.meta.unbox(boxed), shardings, int(config.max_replicated_mb * 2**20))
  return shardings


def load_params(config, model: InstructBlip, shardings) -> dict:
  """The model's parameters as global arrays in `shardings`: read from config.model_init (each process reads its
  devices' part of each tensor), or initialised in place from config.seed without a checkpoint (smoke tests)."""
  if config.model_init:
    return pretrained.load_params(config.model_init, model, shardings=shardings, progress=True)
  import flax.linen as nn
  init = lambda rng: nn.meta.unbox(pretrained.init_fn(model)(rng))
  return jax.jit(init, out_shardings=shardings)(jax.random.key(config.seed))


def load_tokenizers(config, model: InstructBlip) -> tuple[InstructBlip, tokenize.Tokenizers]:
  """The tokenizers, checked against the model: an id past an embedding table would silently read NaN. Returns
  the model with the tokenizer's EOS as the one generation stops at (see align_eos)."""
  path = config.get("tokenizer") or config.model_init
  tok = tokenize.load_tokenizers(path, decoder_only=model.config.decoder_only,
                                qformer_max_len=model.config.qformer.max_position_embeddings)
  for name, size, vocab in (("Q-Former", len(tok.qformer), model.config.qformer.vocab_size),
                            ("LLM", len(tok.llm), model.config.text.vocab_size)):
    if size > vocab:
      raise ValueError(f"the {name} tokenizer in {path} has {size} tokens but the model's vocabulary has {vocab}: "
                       "tokenizer and checkpoint do not belong together")
  return align_eos(model, tok.llm.eos_token_id, path), tok


def align_eos(model: InstructBlip, eos: int | None, where: str) -> InstructBlip:
  """Targets end with the tokenizer's EOS, so generation must stop there. The Vicuna checkpoints' text_config says
  eos_token_id=1 while their tokenizer's </s> (which LAVIS trains and stops on) is 2: the tokenizer wins, loudly."""
  text = model.config.text
  if eos is None or eos == text.eos_token_id:
    return model
  logging.warning("%s: the tokenizer's EOS id is %d but the model config says %d; generation stops at %d",
                  where, eos, text.eos_token_id, eos)
  return model.clone(config=model.config.replace(text=dataclasses.replace(text, eos_token_id=eos)))


def run_evals(config, model, params, tok, out_dir: str, mesh, rules) -> dict:
  """Every configured evaluation on the mesh: {"<name>/<metric>": value}, the same on every process."""
  out = {}
  for name, spec in config.evals.items():
    records = read_records(spec, f"config.evals.{name}")
    if config.eval_max_examples:
      records = records[:config.eval_max_examples]
    result = evaluator.evaluate(tasks.get(spec.task), records, model, params, tok, out_dir=out_dir,
                                batch_size=config.eval_batch_size, mesh=mesh, rules=rules, name=name)
    out.update({f"{name}/{k}": v for k, v in result.items()})
  return out
