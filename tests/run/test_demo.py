"""`make demo`'s job as committed (configs/demo.py + demo_assets/): it runs end to end on CPU and its held-out
zero-shot metric ends clearly above chance and above a randomly initialised Q-Former, as the README says."""
import pytest
import os
import subprocess
import sys
import time

from iblip_jax.demo import shapes

pytestmark = pytest.mark.integration   # launches the main job as a user does

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _table(stdout: str) -> dict[str, list[float]]:
  """The printed results table: {metric: [chance, untrained, step 0, trained]}."""
  lines = stdout[stdout.index("metric ") :].splitlines()[1:3]
  return {l.split()[0]: [float(x) for x in l.split()[1:]] for l in lines}


def test_demo_end_to_end(tmp_path):
  data = tmp_path / "data"
  shapes.generate(str(data))   # the demo's defaults: 2000 training and 200 validation images
  flags = {"data.datasets.caption.path": data / "caption.jsonl", "data.datasets.vqa.path": data / "vqa.jsonl",
           "data.datasets.qgen.path": data / "qgen.jsonl", "evals.held_in_vqa.path": data / "val_vqa.jsonl",
           "evals.held_out_mc.path": data / "val_mc.jsonl"}
  start = time.time()
  out = subprocess.run([sys.executable, "-m", "iblip_jax.main", "--config", "configs/demo.py", "--workdir",
                        str(tmp_path / "run")] + [f"--config.{k}={v}" for k, v in flags.items()],
                       cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  assert out.returncode == 0, out.stderr[-4000:]
  assert time.time() - start < 600   # the budget for a 2-core laptop (it took ~100 s alone here)
  table = _table(out.stdout)
  chance, untrained, before, trained = table["held_out_mc/accuracy"]
  assert trained > max(chance, untrained) + 20, table
  chance, untrained, before, trained = table["held_in_vqa/vqa"]
  assert trained > 90 and trained > before, table
  assert (tmp_path / "run" / "curves.png").stat().st_size > 0
