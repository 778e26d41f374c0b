"""Test set-up: 8 emulated CPU devices (for the mesh tests), and the fixtures several test files share.

The helper modules beside the tests (oracle, train_helper, main_job, gcs_emulator) are importable through setup.cfg's
`pythonpath = tests`. Fixtures that launch something expensive are session-scoped, and the tests that use one share
an xdist group (`@pytest.mark.xdist_group`, with `--dist loadgroup`), so that it is launched once per run.
"""
import os
import pathlib
import subprocess
import sys
import tempfile
import time

# LLVM at -O0: the tests' programs are tiny and each is compiled once or twice, so compiling is most of their time
# (about a fifth less of it at -O0) and running them is not; dots and convolutions call the same runtime library
# either way, and no fast-math is involved, so the numbers are the same.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent compilation cache for every job the tests launch (the variables are inherited): a program that one
# launch compiled is read back by the next instead of compiled again...
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), "iblip_jax_test_jax_cache", os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import main_job  # noqa: E402
import oracle  # noqa: E402
from iblip_jax.demo import shapes, word_tokenizers  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


# ... except in the test processes themselves: serialising an executable for the cache segfaulted a test worker (in
# jax's put_executable_and_time, twice in three full runs), and pytest-xdist 3.8 then hung the run (--dist loadgroup
# with a replaced worker: pytest-dev/pytest-xdist#1323, #1378) until CI's limit (the Makefile now ends the run on a
# crashed worker instead: --max-worker-restart=0). A job the tests launch that crashes
# fails its test only. In-process tests gained little from the cache (three test files: 146 s with it, 152 s without).
jax.config.update("jax_enable_compilation_cache", False)


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory):
  """The demo as `make demo` trains it (configs/demo.py on the shapes data at its defaults), once per run:
  (workdir, the job's stdout, seconds it took). Its tests carry @pytest.mark.xdist_group("demo").
  IBLIP_TEST_TRAINED_DEMO=DIR reuses a trained demo workdir instead (when iterating on those tests)."""
  if os.environ.get("IBLIP_TEST_TRAINED_DEMO"):
    return pathlib.Path(os.environ["IBLIP_TEST_TRAINED_DEMO"]), "", 0.0
  root = tmp_path_factory.mktemp("demo")
  data = root / "data"
  shapes.generate(str(data))   # the demo's defaults: 2000 training and 200 validation images
  flags = {"data.datasets.caption.path": data / "caption.jsonl", "data.datasets.vqa.path": data / "vqa.jsonl",
           "data.datasets.qgen.path": data / "qgen.jsonl", "evals.held_in_vqa.path": data / "val_vqa.jsonl",
           "evals.held_out_mc.path": data / "val_mc.jsonl"}
  start = time.time()
  out = subprocess.run([sys.executable, "-m", "iblip_jax.main", "--config", "configs/demo.py", "--workdir",
                        str(root / "run")] + [f"--config.{k}={v}" for k, v in flags.items()],
                       cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  assert out.returncode == 0, out.stderr[-4000:]
  return root / "run", out.stdout, time.time() - start


@pytest.fixture(scope="session")
def job_assets(tmp_path_factory):
  """What the main-job tests launch on: a tiny InstructBLIP checkpoint with word tokenizers and the shapes data
  (48 training, 6 validation images), plus longer instructions and predict pairs (tests/main_job.py)."""
  return main_job.assets(tmp_path_factory.mktemp("job"))


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
  """The evaluator tests' model: a tiny re-randomised checkpoint (tests/oracle.py), its word tokenizers, 5 images.
  -> (model, params, tokenizers, images)."""
  import iblip_jax
  from iblip_jax.data import tokenize
  path = tmp_path_factory.mktemp("eval")
  oracle.tiny_hf_model().save_pretrained(path / "hf")
  model, params = iblip_jax.from_pretrained(str(path / "hf"))
  word_tokenizers.build(oracle.EVAL_WORDS, str(path / "hf"))
  tok = tokenize.load_tokenizers(str(path / "hf"))
  rng = np.random.default_rng(0)
  return model, params, tok, [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(5)]
