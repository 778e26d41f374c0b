"""The model for inference, on the mesh: the pretrained weights (each process reading its devices' part) with the
trainable tree of the latest training checkpoint in a workdir (if any) put in.

The parameter layout is the training one (FSDP over `fsdp`, heads and MLP over `tensor`, config.sharding_rules):
evaluations during training then need no second copy of the frozen towers, which would not fit beside training for
FlanT5-XXL or Vicuna-13B. Decoding gathers each layer's FSDP-sharded weights as it runs them; for eval or predict
alone, a mesh with `tensor` > 1 and `fsdp` = 1 keeps the weights where they are (tensor-parallel decoding)."""
import jax
from etils import epath

from iblip_jax import checkpoints
from iblip_jax import trainable as trainable_lib
from iblip_jax.models.instructblip import InstructBlip
from iblip_jax.run import common
from iblip_jax.run.settings import Settings


def inference_state(s: Settings):
  """Returns (model, params, step, mesh, rules); step 0 means no training checkpoint was found (the pretrained
  weights as they are)."""
  model = InstructBlip(s.model)
  setup = common.setup(s, model)
  params = common.load_params(s, model, setup)
  if not s.workdir or not (epath.Path(s.workdir) / "checkpoints").exists():
    return model, params, 0, setup.mesh, setup.rules
  trainable, frozen = trainable_lib.split(params, s.trainable)
  _, _, opt_shape = setup.abstract()
  step, state = checkpoints.restore_latest(checkpoints.manager(s.workdir), {"trainable": trainable,
                                                                            "opt_state": opt_shape},
                                           {"trainable": setup.shardings.trainable,
                                            "opt_state": setup.shardings.opt_state})
  if state is None:
    return model, params, 0, setup.mesh, setup.rules
  if jax.process_index() == 0:
    print(f"using the trainable weights of {s.workdir} at step {step}", flush=True)
  return model, trainable_lib.merge(state["trainable"], frozen), step, setup.mesh, setup.rules
