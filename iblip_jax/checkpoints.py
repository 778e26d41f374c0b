"""Training checkpoints with orbax: trainable params, optimizer state, step and data-iterator state.

Frozen weights are not copied into checkpoints: they come from the pretrained checkpoint every run. Saves are
asynchronous; the last `keep` are kept. Restoring takes the target shardings, so a run resumes on any mesh shape.
A latest checkpoint that cannot be read (a crash mid-save, a corrupt file) is reported and the previous one is
used instead: nothing already trained is lost beyond the interval between two saves.
"""
import logging
import os
import time

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils


def directory(workdir: str) -> epath.Path:
  """workdir/checkpoints; a local workdir is made absolute (orbax wants it so), a gs:// one is left as it is."""
  root = str(workdir) if "://" in str(workdir) else os.path.abspath(workdir)
  return epath.Path(root) / "checkpoints"


def manager(workdir: str, *, keep: int = 3) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
  return ocp.CheckpointManager(directory(workdir), item_names=("state", "data"), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: dict, data_iterator=None, *, force: bool = False) -> None:
  """state: {"trainable", "opt_state"} (global arrays); data_iterator: a grain DatasetIterator (per process)."""
  items = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  mngr.save(step, args=ocp.args.Composite(**items), force=force)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _move_aside(mngr: ocp.CheckpointManager, step: int) -> str:
  """Renames an unreadable checkpoint out of the manager's way (so the step can be saved again) without deleting
  anything someone may want to inspect."""
  src = epath.Path(mngr.directory) / str(step)
  dst = epath.Path(mngr.directory) / f"unreadable_step_{step}_{int(time.time())}"
  if jax.process_index() == 0 and src.exists():
    src.rename(dst)
  multihost_utils.sync_global_devices("iblip_jax_move_aside")
  mngr.reload()
  return dst


def restore_latest(mngr: ocp.CheckpointManager, target_state: dict, target_shardings: dict, data_iterator=None):
  """Restores the newest readable checkpoint into the target shardings. Returns (step, state) or (0, None).

  `target_state` gives shapes/dtypes (arrays or ShapeDtypeStructs); the data iterator, if given, is restored in
  place.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    items = {"state": ocp.args.StandardRestore(_abstract(target_state, target_shardings))}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous checkpoint
      aside = _move_aside(mngr, step)
      message = (f"checkpoint step {step} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                 f"moved to {aside} and trying the previous one")
      logging.warning(message)
      print(f"WARNING: {message}", flush=True)
      continue
    return step, restored["state"]
  return 0, None
