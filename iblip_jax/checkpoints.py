"""Training checkpoints with orbax: trainable params, optimizer state, step and data-iterator state.

Frozen weights are not copied into checkpoints: they come from the pretrained checkpoint every run. Saves are
asynchronous; the last `keep` are kept. Restoring takes the target shardings, so a run resumes on any mesh shape.
A latest checkpoint that cannot be read (a crash mid-save, a corrupt file) is reported and the previous one is
used instead: nothing already trained is lost beyond the interval between two saves.
"""
import logging
import os

import grain
import jax
import orbax.checkpoint as ocp


def manager(workdir: str, *, keep: int = 3) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               item_names=("state", "data"), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: dict, data_iterator=None, *, force: bool = False) -> None:
  """state: {"trainable", "opt_state"} (global arrays); data_iterator: a grain DatasetIterator (per process)."""
  items = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  mngr.save(step, args=ocp.args.Composite(**items), force=force)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


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
      logging.warning("checkpoint at step %d in %s cannot be restored (%s: %s); falling back to an earlier one",
                      step, mngr.directory, type(e).__name__, str(e).splitlines()[0][:300])
      print(f"WARNING: checkpoint step {step} is unreadable ({type(e).__name__}); trying the previous one",
            flush=True)
      continue
    return step, restored["state"]
  return 0, None
