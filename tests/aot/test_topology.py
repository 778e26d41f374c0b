"""The TPU topologies and meshes of ahead-of-time compiles: names parsed, presets resolved."""
import pytest

from iblip_jax.aot import topology


@pytest.mark.parametrize("text, libtpu_name, chips", [
    ("v5e:4x4", "v5e:4x4", 16),
    ("v5litepod-16", "v5e:4x4", 16),
    ("v5litepod-32", "v5e:4x8", 32),
    ("v4:2x2x4", "v4:2x2x4", 16),
    ("v4-32", "v4:2x2x4", 16),          # v4-N counts TensorCores: 2 per chip
    ("v5p-32", "v5:2x2x4", 16),         # libtpu spells v5p "v5"
    ("v5p:2x4x4", "v5:2x4x4", 32),
])
def test_parse_topology(text, libtpu_name, chips):
  slice_ = topology.parse_topology(text)
  assert slice_.libtpu_name == libtpu_name
  assert slice_.num_chips == chips


@pytest.mark.parametrize("text, message", [
    ("v9:2x2", "unknown TPU generation"),
    ("v5e:2x2x2", "v5e grids have 2 dimensions"),
    ("v4-6", "no default grid for 3 chips"),
    ("v5e", "expected <chip>:<grid>"),
])
def test_parse_topology_errors(text, message):
  with pytest.raises(ValueError, match=message):
    topology.parse_topology(text)


def test_parse_mesh():
  assert topology.parse_mesh("data=2,fsdp=-1,tensor=1") == {"data": 2, "fsdp": -1, "tensor": 1}
  with pytest.raises(ValueError, match="unknown axis 'model'"):
    topology.parse_mesh("model=2")


def test_presets_resolve(v5e_2x2):
  from iblip_jax import sharding
  _, devices = v5e_2x2
  small = topology.parse_topology("v5e:2x2")
  for preset, shape in (("fsdp", (1, 4, 1)), ("data_fsdp", (2, 2, 1)), ("tensor4", (1, 1, 4))):
    mesh = sharding.make_mesh(topology.preset_mesh(preset, small), devices)
    assert tuple(mesh.shape.values()) == shape
  assert topology.preset_mesh("data_fsdp", topology.parse_topology("v5e:4x8")) == dict(data=4, fsdp=8, tensor=1)
  assert topology.preset_mesh("tensor4", topology.parse_topology("v5litepod-32")) == dict(data=1, fsdp=8, tensor=4)
  assert topology.preset_mesh("fsdp", topology.parse_topology("v4-32")) == dict(data=1, fsdp=16, tensor=1)
  with pytest.raises(ValueError, match="unknown --preset"):
    topology.preset_mesh("pipeline", small)
