"""What the modes share, all from the resolved settings (run/settings.py): the mesh, the training state's
shardings, the parameters placed straight into them, the tokenizers, the configured evaluations on the mesh."""
import logging

import jax
from etils import epath

from iblip_jax import hf, lora, sharding, train_state
from iblip_jax.hf import peft
from iblip_jax import trainable as trainable_lib
from iblip_jax.data import sources, text, tokenize
from iblip_jax.errors import UserError
from iblip_jax.evaluation import evaluator, tasks
from iblip_jax.models.instructblip import InstructBlip
from iblip_jax.run.settings import Settings

log = logging.getLogger(__name__)


def setup(s: Settings, model: InstructBlip, mesh=None) -> train_state.TrainSetup:
  """The training state's optimizer and shardings on the configured mesh (training's parameter layout is also the
  one evaluation and prediction use: see run/restore.py)."""
  mesh = mesh or sharding.make_mesh(s.mesh)
  return train_state.build(model, patterns=s.trainable, optim=s.optim, total_steps=s.total_steps, mesh=mesh,
                           rules=s.sharding_rules, max_replicated_bytes=s.max_replicated_bytes)


def load_params(s: Settings, model: InstructBlip, setup_: train_state.TrainSetup) -> dict:
  """The model's parameters as global arrays in their shardings: read from the checkpoint (each process reads its
  devices' part of each tensor), or initialised in place from the seed without one (smoke tests)."""
  if s.model_init:
    params = hf.load_params(s.model_init, model, shardings=setup_.param_shardings, progress=True,
                            stage1=s.model_init_stage1 or None, adapter_rng=jax.random.key(s.seed))
    if s.model_adapter:   # the fresh adapters replaced by config.model_adapter's
      adapters = peft.load_adapter(model, s.model_adapter, setup_.param_shardings)[1]
      params = trainable_lib.merge(lora.split(params)[1], adapters)
    return params
  return trainable_lib.merge(*setup_.init_random(jax.random.key(s.seed)))


def load_tokenizers(s: Settings, model: InstructBlip) -> tuple[InstructBlip, tokenize.Tokenizers]:
  """config.tokenizer's tokenizers, checked against the model (tokenize.for_model)."""
  return tokenize.for_model(s.tokenizer, model)


def eval_dir(workdir: str, step) -> str:
  """workdir/eval/step_<N> (or workdir/eval/<name> for a named baseline)."""
  return str(epath.Path(workdir) / "eval" / (step if isinstance(step, str) else f"step_{step}"))


def read_evals(s: Settings) -> dict[str, list[dict]]:
  """Every configured evaluation's records (up to config.eval_max_examples; questions cleaned as LAVIS's with
  config.text_processing="lavis"), each one's prompt rendered: a bad
  annotation file or a record its task cannot use stops the job here, naming it, before anything trains."""
  out = {}
  for source in s.evals:
    records = sources.read_records(source)
    if s.eval_max_examples:
      records = records[:s.eval_max_examples]
    if s.text_processing == "lavis":
      records = [text.for_evaluation(r) for r in records]
    task = tasks.get(source.task)
    for r in records:
      try:
        tasks.render_prompt(task, r)
      except ValueError as e:
        raise UserError(f"{source.where} ({source.path}): {e}") from None
    out[source.name] = records
  return out


def run_evals(s: Settings, model, params, tok, out_dir: str, mesh, rules, records=None) -> dict:
  """Every configured evaluation on the mesh: {"<name>/<metric>": value}, the same on every process. `records`:
  read_evals' (read once for a run); default: read now."""
  records = read_evals(s) if records is None else records
  out = {}
  for source in s.evals:
    result = evaluator.evaluate(tasks.get(source.task), records[source.name], model, params, tok, out_dir=out_dir,
                                batch_size=s.eval_batch_size, mesh=mesh, rules=rules, name=source.name)
    out.update({f"{source.name}/{k}": v for k, v in result.items()})
  return out
