"""The model for inference, on the mesh: the pretrained weights (each process reading its devices' part) with the
trainable tree of the latest training checkpoint in a workdir (if any) put in. `from_workdir` does the same for the
Python API and the servers (iblip_jax.inference), from nothing but the workdir's path.

The parameter layout is the training one (FSDP over `fsdp`, heads and MLP over `tensor`, config.sharding_rules):
evaluations during training then need no second copy of the frozen towers, which would not fit beside training for
FlanT5-XXL or Vicuna-13B. Decoding gathers each layer's FSDP-sharded weights as it runs them; for eval or predict
alone, a mesh with `tensor` > 1 and `fsdp` = 1 keeps the weights where they are (tensor-parallel decoding)."""
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from iblip_jax import checkpoints
from iblip_jax import trainable as trainable_lib
from iblip_jax.errors import UserError
from iblip_jax.models.instructblip import InstructBlip
from iblip_jax.run import common, settings
from iblip_jax.run.settings import Settings

log = logging.getLogger(__name__)


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
                                            "opt_state": setup.shardings.opt_state},
                                           meaning=s.checkpoint_meaning)
  if state is None:
    return model, params, 0, setup.mesh, setup.rules
  if jax.process_index() == 0:
    log.info("using the trainable weights of %s at step %d", s.workdir, step)
  return model, trainable_lib.merge(state["trainable"], frozen), step, setup.mesh, setup.rules


def is_workdir(path: str) -> bool:
  """A training workdir has checkpoints/ or a config.json written by the main job (a Hugging Face directory's
  config.json has "model_type" instead)."""
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return True
  try:
    with open(os.path.join(path, "config.json")) as f:
      return "model_init" in json.load(f)
  except (OSError, ValueError):
    return False


def _near(path: str, workdir: str) -> str:
  """A relative path of a workdir's config: as given (the training job's working directory was probably this one),
  else relative to the workdir or one of its parents."""
  if not path or os.path.isabs(path) or os.path.exists(path):
    return path
  base = os.path.abspath(workdir)
  while True:
    if os.path.exists(os.path.join(base, path)):
      return os.path.join(base, path)
    if os.path.dirname(base) == base:
      return path
    base = os.path.dirname(base)


def from_workdir(workdir: str, dtype=None, model_init: str | None = None, tokenizer: str | None = None,
                 *, one_device: bool = True):
  """(model, params, tokenizers, step) of a training workdir's latest checkpoint, through predict mode's restore
  path: config.json's model and paths (relative ones found from here or from the workdir and its parents;
  `model_init` / `tokenizer` replace them when they have moved), `dtype` for the frozen towers. `one_device`:
  gathered onto this process's first device for interactive use (else in the training layout over this host)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"{workdir}: a workdir without config.json (the main job writes it when training starts)")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.model_init = model_init or _near(config.model_init, workdir)
  config.tokenizer = tokenizer or _near(config.get("tokenizer", ""), workdir)
  # the training layout over this host's devices, as predict mode uses it
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
  if dtype is not None:
    config.model.vision.dtype = config.model.text.dtype = jnp.dtype(dtype).name
  s = settings.resolve(config, workdir, "predict")
  if not checkpoints.directory(workdir).exists():
    raise UserError(f"{workdir}: no checkpoints/ (nothing trained to answer with); to answer with the pretrained "
                    f"weights, load {config.model_init!r} itself")
  model, params, step, _, _ = inference_state(s)
  if not step:
    raise UserError(f"{workdir}: no readable checkpoint (see the warnings above)")
  model, tok = common.load_tokenizers(s, model)
  return model, _onto_one_device(params) if one_device else params, tok, step


def _onto_one_device(params):
  """Leaf by leaf through host memory (one leaf's copy at a time): jax.device_put of an array sharded over a mesh
  keeps that mesh in the array's type (jax 0.10), and tracing under the one-device mesh then fails with
  "use_abstract_mesh cannot change the size of the mesh"."""
  device = jax.local_devices()[0]
  return jax.tree.map(lambda x: jax.device_put(np.asarray(x), device), params)
