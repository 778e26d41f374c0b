"""One of two processes of a multi-process run (see test_train_step.py): argv = process_id port out.npz."""
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(__file__))


def main(process_id: int, port: int, out: str):
  # the same environment a cluster launcher would set
  os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                    JAX_PROCESS_ID=str(process_id))
  from iblip_jax import distributed
  assert distributed.maybe_initialize()
  import numpy as np
  from jax.experimental import multihost_utils
  import train_helper
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  rows = np.arange(8).reshape(2, 4)[process_id]  # each process feeds its own half of the global batch
  losses, trainable, *_ = train_helper.run_steps((2, 2, 2), local_rows=rows)
  leaves = [np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in jax.tree.leaves(trainable)]
  if process_id == 0:
    np.savez(out, losses=np.asarray(losses), **{f"leaf{i}": x for i, x in enumerate(leaves)})
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
