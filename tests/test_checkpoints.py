"""What a restore trusts: another config's checkpoint is refused and left alone, an unreadable or silently corrupted
one is skipped (moved aside only by training), and a run never starts from scratch over checkpoints it cannot
read unless told to."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iblip_jax import checkpoints


def _state(seed=0, extra=False):
  rng = np.random.default_rng(seed)
  trainable = {"qformer": {"w": jnp.asarray(rng.standard_normal((64, 48)), jnp.float32),
                           "b": jnp.asarray(rng.standard_normal(48), jnp.float32)}}
  if extra:
    trainable["qformer"]["text"] = jnp.zeros((5, 48))
  return {"trainable": trainable, "opt_state": optax.adamw(1e-3).init(trainable)}


def _shardings(state):
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda _: one, state)


def _saved(tmp_path, steps=(1, 2, 3)):
  mngr = checkpoints.manager(str(tmp_path), keep=5)
  for step in steps:
    checkpoints.save(mngr, step, _state(step))
  mngr.wait_until_finished()
  return mngr


def _fresh(tmp_path):
  """A new manager, as a new process would have (nothing cached from the saves)."""
  return checkpoints.manager(str(tmp_path), keep=5)


def test_latest_is_restored_exactly(tmp_path):
  _saved(tmp_path)
  step, state = checkpoints.restore_latest(_fresh(tmp_path), _state(), _shardings(_state()))
  assert step == 3
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_state(3)), strict=True):
    np.testing.assert_array_equal(a, b)


def test_another_configs_checkpoint_is_refused_and_left_alone(tmp_path):
  _saved(tmp_path)
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  with pytest.raises(checkpoints.CheckpointMismatch) as e:
    checkpoints.restore_latest(_fresh(tmp_path), _state(extra=True), _shardings(_state(extra=True)),
                               move_aside=True)
  msg = str(e.value)
  assert "step 3" in msg and "in this config only (3): trainable.qformer.text (and 2 optimizer-state entries)" in msg
  assert "Nothing was changed" in msg
  bigger = {"trainable": {"qformer": {"w": jnp.zeros((64, 50)), "b": jnp.zeros(48)}}}
  bigger["opt_state"] = optax.adamw(1e-3).init(bigger["trainable"])
  with pytest.raises(checkpoints.CheckpointMismatch, match=r"trainable.qformer.w: checkpoint \(64, 48\) float32, "
                                                           r"config \(64, 50\) float32"):
    checkpoints.restore_latest(_fresh(tmp_path), bigger, _shardings(bigger), move_aside=True)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def _data_files(tmp_path, step):
  root = tmp_path / "checkpoints" / str(step) / "state"
  return sorted((p for p in root.rglob("*") if p.is_file() and "/d/" in str(p)), key=lambda p: p.stat().st_size)


def test_silent_corruption_of_array_data_is_caught(tmp_path):
  """4 KB overwritten inside the array data: either the decoder or the fingerprints notice; training moves the
  checkpoint aside and resumes from the previous one."""
  _saved(tmp_path)
  victim = _data_files(tmp_path, 3)[-1]
  data = bytearray(victim.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 4096] = np.random.default_rng(0).integers(0, 256, min(4096, len(data) - middle),
                                                                  np.uint8).tobytes()
  victim.write_bytes(bytes(data))
  step, state = checkpoints.restore_latest(_fresh(tmp_path), _state(), _shardings(_state()), move_aside=True)
  assert step == 2
  np.testing.assert_array_equal(state["trainable"]["qformer"]["w"], _state(2)["trainable"]["qformer"]["w"])
  assert any(n.startswith("unreadable_step_3_") for n in os.listdir(tmp_path / "checkpoints"))


def test_fingerprints_see_one_changed_value_on_any_mesh():
  state = _state()
  want = checkpoints.fingerprints(state)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
  spread = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  spread["trainable"]["qformer"]["w"] = jax.device_put(
      state["trainable"]["qformer"]["w"], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b")))
  assert checkpoints.fingerprints(spread) == want
  w = state["trainable"]["qformer"]["w"]
  bumped = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(w[7, 9], jnp.uint32) ^ 1, jnp.float32)
  changed = dict(state, trainable={"qformer": dict(state["trainable"]["qformer"], w=w.at[7, 9].set(bumped))})
  assert checkpoints._verify(changed, {"fingerprints": want}).startswith("fingerprints differ for 1 arrays")
  nan = dict(state, trainable={"qformer": dict(state["trainable"]["qformer"], b=w[0].at[3].set(jnp.nan)[:48])})
  assert checkpoints._verify(nan, None) == "restored values are not all finite"


def test_inference_skips_unreadable_without_renaming_and_nothing_readable_is_refused(tmp_path):
  _saved(tmp_path, steps=(1, 2))
  for step in (1, 2):
    for f in _data_files(tmp_path, step):
      f.write_bytes(b"garbage")
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  with pytest.raises(checkpoints.NoReadableCheckpoint, match="steps 2, 1.*fresh_start_if_unreadable"):
    checkpoints.restore_latest(_fresh(tmp_path), _state(), _shardings(_state()))   # eval/predict/export
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before   # nothing renamed
  step, state = checkpoints.restore_latest(_fresh(tmp_path), _state(), _shardings(_state()), move_aside=True,
                                           fresh_start_if_unreadable=True)
  assert (step, state) == (0, None)
  moved = sorted(n.rsplit("_", 1)[0] for n in os.listdir(tmp_path / "checkpoints") if n.startswith("unreadable"))
  assert moved == ["unreadable_step_1", "unreadable_step_2"], os.listdir(tmp_path / "checkpoints")


def test_checkpoints_moved_aside_keep_a_rerun_from_starting_over(tmp_path):
  """Training refuses to start from scratch over checkpoints it cannot read, and moves them aside; the same command
  run again (a scheduler retrying the failed job) is refused again, naming them, until fresh_start_if_unreadable."""
  _saved(tmp_path, steps=(1, 2))
  for step in (1, 2):
    for f in _data_files(tmp_path, step):
      f.write_bytes(b"garbage")
  with pytest.raises(checkpoints.NoReadableCheckpoint, match="steps 2, 1"):
    checkpoints.restore_latest(_fresh(tmp_path), _state(), _shardings(_state()), move_aside=True)
  assert not _fresh(tmp_path).all_steps()   # both moved aside
  with pytest.raises(checkpoints.NoReadableCheckpoint, match=r"moved aside earlier: unreadable_step_1_\d+, "
                                                             r"unreadable_step_2_\d+.*fresh_start_if_unreadable"):
    checkpoints.restore_latest(_fresh(tmp_path), _state(), _shardings(_state()), move_aside=True)
  assert checkpoints.restore_latest(_fresh(tmp_path), _state(), _shardings(_state()), move_aside=True,
                                    fresh_start_if_unreadable=True) == (0, None)
