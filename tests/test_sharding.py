"""Mesh construction and the sharding helpers."""
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from iblip_jax import sharding


def test_mesh_resolves_the_rest_and_uses_auto_axes():
  mesh = sharding.make_mesh(dict(data=2, fsdp=-1, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh.axis_types == (AxisType.Auto,) * 3


@pytest.mark.parametrize("sizes,msg", [((3, -1, 1), "cannot cover 8"), ((2, 2, 1), "uses 4 devices"),
                                       ((-1, -1, 1), "at most one")])
def test_bad_mesh_sizes_are_clear_errors(sizes, msg):
  with pytest.raises(ValueError, match=msg):
    sharding.make_mesh(dict(zip(sharding.AXES, sizes)))


def test_multi_slice_mesh():
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=2, dcn_data=2), devices=_fake_slices())
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  # each data row of the mesh lies within one slice: slices only exchange gradients (the data axis)
  for row in mesh.devices:
    assert len({d.slice_index for d in row.flat}) == 1


def _fake_slices():
  class Dev:
    def __init__(self, i):
      self.id, self.slice_index, self.platform, self.device_kind = i, i // 4, "cpu", "cpu"
      self.process_index = 0
    def __repr__(self):
      return f"Dev({self.id})"
  return [Dev(i) for i in range(8)]


def test_undivisible_dimensions_stay_unsharded():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  assert sharding._fit(P("tensor", "fsdp"), (99, 32), mesh) == P(None, "fsdp")
  assert sharding._fit(P(("data", "fsdp")), (8, 3), mesh) == P(("data", "fsdp"), None)


def test_global_batch_from_process_local_rows():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  x = np.arange(8 * 3).reshape(8, 3)
  g = sharding.global_batch({"x": x}, mesh)["x"]
  assert g.sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(g), x)
