"""The full parameter tree for inference: the pretrained model with the trainable tree of the latest training
checkpoint in a workdir (if any) put in."""
import os

import jax
import numpy as np

from iblip_jax import checkpoints, optim
from iblip_jax import train_step as ts
from iblip_jax.run import common


def params_with_latest_checkpoint(config, workdir: str | None):
  """Returns (model, params, step); step 0 means no checkpoint was found (pretrained weights as they are)."""
  model, params = common.load_model(config)
  if not workdir or not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return model, params, 0
  trainable, frozen = ts.split(params, config.trainable)
  tx = optim.make(config.optim, config.total_steps)
  opt_shape = jax.eval_shape(tx.init, trainable)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = {"trainable": jax.tree.map(lambda _: one, trainable), "opt_state": jax.tree.map(lambda _: one,
                                                                                               opt_shape)}
  step, state = checkpoints.restore_latest(checkpoints.manager(workdir), {"trainable": trainable,
                                                                          "opt_state": opt_shape}, shardings)
  if state is None:
    return model, params, 0
  print(f"using the trainable weights of {workdir} at step {step}", flush=True)
  return model, ts.merge(jax.tree.map(np.asarray, state["trainable"]), frozen), step
