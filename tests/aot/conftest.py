"""Shared by the AOT tests: compile-only devices of a v5e 2x2 slice, and two programs with a known all-gather."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from iblip_jax.aot import topology


@pytest.fixture(scope="module")
def v5e_2x2():
  """Compile-only devices of a v5e 2x2 slice. Skipped only where libtpu is not installed (the test extra installs
  it); any other failure to describe the topology is a failure of the test."""
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install 'libtpu==0.0.42.*', the version jax[tpu]==0.10.2 pins); "
                "it is the TPU compiler, no TPU is needed")
  slice_ = topology.parse_topology("v5e:2x2")
  return slice_, topology.topology_devices(slice_)


@pytest.fixture(scope="module")
def all_gather_programs(v5e_2x2):
  """A known all-gather on a 4-chip mesh: bf16[1024, 256] split in 4 row blocks, gathered whole; and the same
  gather of one layer per iteration of a 7-step scan over a stacked bf16[7, 1024, 256]."""
  mesh = Mesh(np.array(v5e_2x2[1]).reshape(4), ("x",))
  whole = NamedSharding(mesh, P())
  x = jax.ShapeDtypeStruct((1024, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))
  once = jax.jit(lambda a: a * 2, out_shardings=whole).lower(x)

  def scanned(xs):
    def body(carry, layer):
      full = jax.lax.with_sharding_constraint(layer, whole)
      return carry + jnp.sum(full * full, dtype=jnp.float32), None
    return jax.lax.scan(body, jnp.float32(0), xs)[0]

  xs = jax.ShapeDtypeStruct((7, 1024, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "x")))
  return mesh, once, jax.jit(scanned).lower(xs)
