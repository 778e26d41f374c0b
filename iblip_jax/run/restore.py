"""The model for inference, on the mesh: the pretrained weights (each process reading its devices' part) with the
trainable tree of the latest training checkpoint in a workdir (if any) put in.

The parameter layout is the training one (FSDP over `fsdp`, heads and MLP over `tensor`, config.sharding_rules):
evaluations during training then need no second copy of the frozen towers, which would not fit beside training for
FlanT5-XXL or Vicuna-13B. Decoding gathers each layer's FSDP-sharded weights as it runs them; for eval or predict
alone, a mesh with `tensor` > 1 and `fsdp` = 1 keeps the weights where they are (tensor-parallel decoding)."""
import jax
from etils import epath

from iblip_jax import checkpoints, optim
from iblip_jax import train_step as ts
from iblip_jax.models.instructblip import InstructBlip
from iblip_jax.run import common
from iblip_jax import trainable as trainable_lib


def inference_state(config, workdir: str | None):
  """Returns (model, params, step, mesh, rules); step 0 means no training checkpoint was found (the pretrained
  weights as they are)."""
  model = InstructBlip(common.model_config(config))
  mesh, rules = common.mesh_and_rules(config)
  tx = optim.make(config.optim, config.total_steps)
  sh = ts.state_shardings(model, tx, config.trainable, mesh, rules,
                          max_replicated_bytes=int(config.max_replicated_mb * 2**20))
  params = common.load_params(config, model, trainable_lib.merge(sh.trainable, sh.frozen))
  if not workdir or not (epath.Path(workdir) / "checkpoints").exists():
    return model, params, 0, mesh, rules
  trainable, frozen = trainable_lib.split(params, config.trainable)
  opt_shape = jax.eval_shape(tx.init, trainable)
  step, state = checkpoints.restore_latest(checkpoints.manager(workdir), {"trainable": trainable,
                                                                          "opt_state": opt_shape},
                                           {"trainable": sh.trainable, "opt_state": sh.opt_state})
  if state is None:
    return model, params, 0, mesh, rules
  if jax.process_index() == 0:
    print(f"using the trainable weights of {workdir} at step {step}", flush=True)
  return model, trainable_lib.merge(state["trainable"], frozen), step, mesh, rules
