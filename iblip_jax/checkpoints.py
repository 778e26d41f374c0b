"""Training checkpoints with orbax: trainable params, optimizer state, step, data-iterator state, and fingerprints.

Frozen weights are not copied into checkpoints: they come from the pretrained checkpoint every run. Saves are
asynchronous; the last `keep` are kept. Restoring takes the target shardings, so a run resumes on any mesh shape.

What a restore trusts, and what it does when it cannot:
- A checkpoint whose tree or shapes differ from what the config builds (another model size, another
  instruction-aware switch, other trainable patterns) is not damaged: it belongs to another config. That stops the
  run with CheckpointMismatch, naming what differs; nothing is renamed.
- A checkpoint that cannot be read (an I/O or decode error, a crash mid-save), or whose restored values are not
  finite or do not match the fingerprints saved with them (silent corruption of the array data), is unreadable.
  Training moves it aside (renamed, never deleted) and tries the previous one; eval, predict and export only skip
  it, with a warning, and rename nothing.
- When checkpoints exist but none is readable, training refuses to start from scratch unless told to
  (`fresh_start_if_unreadable`): the alternative is silently throwing away a run. Checkpoints an earlier run moved
  aside count as existing, so a scheduler that retries the refused command is refused again, not given a fresh run.

Fingerprints: for every array, the sum over its elements of (bits of the element) x (2654435761 x index + 1),
wrapping at 2^32, computed on the devices. Integer addition modulo 2^32 does not depend on order, so the value is the
same on any mesh; a changed bit changes it.
"""
import contextlib
import json
import logging
import os
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from iblip_jax.errors import UserError

log = logging.getLogger(__name__)


class CheckpointMismatch(UserError):
  """A checkpoint written by another config: its tree or shapes differ from this run's state."""


class NoReadableCheckpoint(UserError):
  """Checkpoints exist, and none of them can be read."""


def directory(workdir: str) -> epath.Path:
  """workdir/checkpoints; a local workdir is made absolute (orbax wants it so), a gs:// one is left as it is."""
  root = str(workdir) if "://" in str(workdir) else os.path.abspath(workdir)
  return epath.Path(root) / "checkpoints"


def manager(workdir: str, *, keep: int = 3) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
  # Handlers named up front: a fresh process can then read a checkpoint's metadata before restoring it.
  handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
              "checks": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory(workdir), item_handlers=handlers, options=options)


# --- fingerprints -----------------------------------------------------------------------------------------------


def _bits(x: jax.Array) -> jax.Array:
  """The elements' bit patterns as uint32 (8-byte elements folded into one word)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size < 4:
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  halves = jax.lax.bitcast_convert_type(x, jnp.uint32)   # (..., 2)
  return halves[..., 0] ^ (halves[..., 1] * jnp.uint32(0x9E3779B9))


def _fingerprint(x: jax.Array) -> jax.Array:
  bits = _bits(x)
  index = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape)
  return jnp.sum(bits * (index * jnp.uint32(2654435761) + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _fingerprints(tree):
  return jax.tree.map(_fingerprint, tree)


@jax.jit
def _all_finite(tree):
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def fingerprints(tree) -> dict[str, int]:
  """{orbax parameter name: fingerprint} of a tree of (global) arrays, the same on every process."""
  values = [int(np.asarray(x.addressable_data(0))) for x in jax.tree.leaves(_fingerprints(tree))]  # replicated
  return dict(zip(_names(tree), values))


def _names(tree) -> list[str]:
  """Each leaf's name as orbax writes it in checkpoint metadata ("opt_state.0.mu.qformer...")."""
  def name(path):
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
  return [name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


# --- save ---------------------------------------------------------------------------------------------------------


class CheckpointWriteError(UserError):
  """A checkpoint could not be written (a full disk, a bucket that refuses writes); the earlier ones are intact."""


def save(mngr: ocp.CheckpointManager, step: int, state: dict, data_iterator=None, *, force: bool = False,
         meaning: dict | None = None) -> None:
  """state: {"trainable", "opt_state"} (global arrays); data_iterator: a grain DatasetIterator (per process);
  `meaning`: settings (JSON) that change what the arrays mean without changing their shapes (LoRA's alpha), checked
  on restore. Saves are asynchronous: a failure to write shows here at the next save or in wait(), as a
  CheckpointWriteError."""
  checks = {"fingerprints": fingerprints(state)}
  if meaning is not None:
    checks["meaning"] = meaning
  items = {"state": ocp.args.StandardSave(state), "checks": ocp.args.JsonSave(checks)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  with _write_errors(mngr):
    mngr.save(step, args=ocp.args.Composite(**items), force=force)


def wait(mngr: ocp.CheckpointManager) -> None:
  """Until the pending save is written (or a CheckpointWriteError says why it was not)."""
  with _write_errors(mngr):
    mngr.wait_until_finished()


@contextlib.contextmanager
def _write_errors(mngr: ocp.CheckpointManager):
  """orbax's failure to write (raised from its writer threads, often as ValueError("RESOURCE_EXHAUSTED: ...")) as one
  line saying what failed and what is intact."""
  try:
    yield
  except Exception as e:  # noqa: BLE001 - classified below; anything that is not a write failure is re-raised
    text = " ".join(str(e).split())
    if not isinstance(e, OSError) and not any(k in text for k in _WRITE_FAILURES):
      raise
    full = "no space left on the device" if any(k in text for k in _FULL) else "the write failed"
    latest = mngr.latest_step()
    kept = (f"the last complete checkpoint (step {latest}) is intact" if latest is not None else
            "no checkpoint was complete yet")
    raise CheckpointWriteError(f"a checkpoint could not be written to {mngr.directory}: {full} ({text[:160]}); "
                               f"{kept}. Free space (or fix the destination) and rerun the same command to resume "
                               "from it") from None


_FULL = ("RESOURCE_EXHAUSTED", "No space left", "ENOSPC", "Errno 28")
_WRITE_FAILURES = _FULL + ("Failed writing", "Error writing", "PERMISSION_DENIED", "Permission denied")


# --- restore ------------------------------------------------------------------------------------------------------


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _mismatch(mngr: ocp.CheckpointManager, step: int, target: dict) -> str | None:
  """What differs between checkpoint `step`'s arrays and `target`'s (names, shapes, dtypes), or None. Raises if
  the metadata cannot be read (then the checkpoint is unreadable)."""
  stored = {m.name: m for m in jax.tree.leaves(mngr.item_metadata(step)["state"].tree,
                                                 is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "name"))}
  wanted = dict(zip(_names(target), jax.tree.leaves(target)))
  only_ckpt = sorted(set(stored) - set(wanted))
  only_config = sorted(set(wanted) - set(stored))
  shapes = [f"{n}: checkpoint {tuple(stored[n].shape)} {np.dtype(stored[n].dtype).name}, config "
            f"{tuple(wanted[n].shape)} {np.dtype(wanted[n].dtype).name}" for n in sorted(set(stored) & set(wanted))
            if tuple(stored[n].shape) != tuple(wanted[n].shape) or np.dtype(stored[n].dtype) != np.dtype(wanted[n].dtype)]
  if not (only_ckpt or only_config or shapes):
    return None
  lines = []
  for title, items in (("in the checkpoint only", only_ckpt), ("in this config only", only_config),
                       ("shape or dtype differs", shapes)):
    if items:
      # the parameters say what changed; their Adam moments only repeat it
      params = [i for i in items if i.startswith("trainable.")] or items
      more = len(items) - len(params)
      lines.append(f"{title} ({len(items)}): " + ", ".join(params[:8]) + (" ..." if len(params) > 8 else "")
                   + (f" (and {more} optimizer-state entries)" if more else ""))
  return "\n  ".join(lines)


def _verify(restored: dict, checks: dict | None) -> str | None:
  """Why restored values cannot be trusted (not finite, fingerprints differ), or None."""
  if not bool(_all_finite(restored)):
    return "restored values are not all finite"
  if checks and "fingerprints" in checks:
    got = fingerprints(restored)
    bad = sorted(n for n, v in checks["fingerprints"].items() if got.get(n) != v)
    if bad:
      return f"fingerprints differ for {len(bad)} arrays ({', '.join(bad[:4])}): the array data changed after the save"
  return None


def _move_aside(mngr: ocp.CheckpointManager, step: int) -> str:
  """Renames an unreadable checkpoint out of the manager's way (so the step can be saved again) without deleting
  anything someone may want to inspect."""
  src = epath.Path(mngr.directory) / str(step)
  dst = epath.Path(mngr.directory) / f"unreadable_step_{step}_{int(time.time())}"
  if jax.process_index() == 0 and src.exists():
    src.rename(dst)
  multihost_utils.sync_global_devices("iblip_jax_move_aside")
  mngr.reload()
  return str(dst)


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    log.warning(message)


def restore_latest(mngr: ocp.CheckpointManager, target_state: dict, target_shardings: dict, data_iterator=None, *,
                   move_aside: bool = False, fresh_start_if_unreadable: bool = False, meaning: dict | None = None):
  """Restores the newest readable checkpoint into the target shardings. Returns (step, state) or (0, None) when
  there is none. `target_state` gives shapes/dtypes (arrays or ShapeDtypeStructs); the data iterator, if given, is
  restored in place. `move_aside`: training renames unreadable checkpoints (see the module docstring). `meaning`:
  what save() was given; a checkpoint saved with other values is a CheckpointMismatch."""
  steps = sorted(mngr.all_steps(), reverse=True)
  unreadable = []
  for step in steps:
    try:
      differs = _mismatch(mngr, step, target_state)
    except Exception as e:  # noqa: BLE001 - metadata that cannot be read: the checkpoint is unreadable
      differs, error = None, e
    else:
      error = None
    if differs:
      raise CheckpointMismatch(
          f"checkpoint step {step} in {mngr.directory} was written by another config than this one:\n  {differs}\n"
          "Run with the config that wrote it (model sizes, model.instruction_aware, trainable patterns), or use "
          "another --workdir. Nothing was changed.")
    if error is None:
      items = {"state": ocp.args.StandardRestore(_abstract(target_state, target_shardings))}
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      has_checks = (epath.Path(mngr.directory) / str(step) / "checks").exists()   # older checkpoints have none
      if has_checks:
        items["checks"] = ocp.args.JsonRestore()
      try:
        restored = mngr.restore(step, args=ocp.args.Composite(**items))
        why = _verify(restored["state"], restored["checks"] if has_checks else None)
      except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous checkpoint
        error = e
      else:
        if why is None:
          _check_meaning(mngr, step, restored["checks"].get("meaning") if has_checks else None, meaning)
          if unreadable:
            _warn(f"using checkpoint step {step}; newer ones were unreadable: {', '.join(map(str, unreadable))}")
          return step, restored["state"]
        error = ValueError(why)
    unreadable.append(step)
    reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
    if move_aside:
      _warn(f"checkpoint step {step} is unreadable ({reason}); moved to {_move_aside(mngr, step)} and trying the "
            "previous one")
    else:
      _warn(f"checkpoint step {step} is unreadable ({reason}); trying the previous one (nothing renamed)")
  aside = moved_aside(mngr.directory)
  if (unreadable or aside) and not fresh_start_if_unreadable:
    found = [f"steps {', '.join(map(str, unreadable))}"] if unreadable else []
    found += [f"moved aside earlier: {', '.join(p.name for p in aside)}"] if aside else []
    raise NoReadableCheckpoint(
        f"{mngr.directory} has checkpoints ({'; '.join(found)}) but none can be read (see the warnings above). "
        "Refusing to start from scratch over them: fix or remove them, or pass "
        "--config.fresh_start_if_unreadable=True to start from the pretrained weights.")
  return 0, None


def _check_meaning(mngr: ocp.CheckpointManager, step: int, stored: dict | None, wanted: dict | None) -> None:
  wanted = None if wanted is None else json.loads(json.dumps(wanted))   # tuples as JSON lists, as stored
  if stored is None or wanted is None or stored == wanted:
    return
  keys = sorted(set(stored) | set(wanted))
  differs = [f"{k}: checkpoint {json.dumps(stored.get(k))}, config {json.dumps(wanted.get(k))}" for k in keys
             if stored.get(k) != wanted.get(k)]
  raise CheckpointMismatch(f"checkpoint step {step} in {mngr.directory} was written by another config than this one:"
                           f"\n  {'; '.join(differs)}\nRun with the config that wrote it, or use another --workdir. "
                           "Nothing was changed.")


def moved_aside(directory) -> list[epath.Path]:
  """The checkpoints an earlier run moved aside as unreadable (_move_aside): they still count as work that exists,
  so that a rerun after a refusal refuses again instead of starting from scratch."""
  directory = epath.Path(directory)
  return sorted(p for p in directory.iterdir() if p.name.startswith("unreadable_step_")) if directory.exists() else []
