"""The main job with a gs:// workdir and export directory, against a local GCS emulator (tests/gcs_emulator.py):
train, resume, eval and export all read and write the bucket, and nothing lands in a local `gs:` folder."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from transformers import InstructBlipForConditionalGeneration

import oracle
from gcs_emulator import gcs_fixture
from iblip_jax.demo import shapes, word_tokenizers

pytestmark = pytest.mark.integration   # launches the main job as a user does

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUCKET = "iblip-workdir"
gcs = gcs_fixture(BUCKET)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("gcsjob")
  oracle.tiny_hf_model(untie_head=True, tie=False).save_pretrained(root / "ckpt")
  word_tokenizers.build(shapes.vocabulary(), str(root / "ckpt"))
  shapes.generate(str(root / "data"), train=32, val=4, seed=0)
  return root


def _job(assets, cwd, **overrides):
  data = assets / "data"
  settings = {
      "model_init": str(assets / "ckpt"), "total_steps": 4, "batch_size": 4, "checkpoint_every": 2, "log_every": 1,
      "eval_at_start": False, "eval_at_end": True, "eval_batch_size": 4, "eval_max_examples": 4,
      "data.datasets.caption.path": str(data / "caption.jsonl"), "data.datasets.vqa.path": str(data / "vqa.jsonl"),
      "data.datasets.qgen.path": str(data / "qgen.jsonl"), "evals.held_in_vqa.path": str(data / "val_vqa.jsonl"),
      "evals.held_out_mc.path": str(data / "val_mc.jsonl"), "mesh.fsdp": -1,
      "export_dir": f"gs://{BUCKET}/export", **overrides}
  args = ["--config", os.path.join(ROOT, "configs", "demo.py"), "--workdir", f"gs://{BUCKET}/run"] + [
      f"--config.{k}={v}" for k, v in settings.items()]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "PYTHONPATH": ROOT}   # os.environ carries the emulator's variables
  out = subprocess.run([sys.executable, "-m", "iblip_jax.main", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  return out.stdout


def test_train_resume_eval_export_in_a_bucket(gcs, assets, tmp_path):
  cwd = tmp_path / "cwd"   # a gs:// path taken for a local one would appear here (or in ROOT) as a gs: folder
  cwd.mkdir()
  _job(assets, cwd)
  assert {"run/checkpoints/2", "run/checkpoints/4"} <= {"/".join(n.split("/")[:3]) for n in gcs.list("run/")}
  out = _job(assets, cwd, total_steps=6)
  assert "resumed from gs://" in out and "at step 4" in out
  names = gcs.list("run/")
  assert any(n.startswith("run/checkpoints/6/") for n in names)
  rows = [json.loads(line) for line in gcs.read("run/metrics.jsonl").decode().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]   # rewritten in place, nothing lost
  assert sum("eval/held_in_vqa/vqa" in r for r in rows) == 2
  assert gcs.read("run/curves.png").startswith(b"\x89PNG")
  assert any(n.startswith("run/tensorboard/events.out.tfevents.") for n in names)
  assert json.loads(gcs.read("run/eval/step_6/held_out_mc_metrics.json"))["num_examples"] == 4
  assert json.loads(gcs.read("run/config.json"))["total_steps"] == 4   # written once, by the first run

  out = _job(assets, cwd, mode="eval", total_steps=6)
  assert json.loads(out[out.index("{"):])["step"] == 6
  _job(assets, cwd, mode="export", total_steps=6)
  local = tmp_path / "export"
  for name in gcs.list("export/"):
    (local / os.path.dirname(name[len("export/"):])).mkdir(parents=True, exist_ok=True)
    (local / name[len("export/"):]).write_bytes(gcs.read(name))
  assert (local / "qformer_tokenizer").is_dir()
  hf = InstructBlipForConditionalGeneration.from_pretrained(local)
  eval_rows = [json.loads(line) for line in gcs.read("run/eval/step_6/held_in_vqa_predictions.jsonl").decode()
               .splitlines()]
  assert len(eval_rows) == 4
  assert np.isfinite(hf.query_tokens.detach().numpy()).all()
  for d in (cwd, ROOT):
    assert not os.path.exists(os.path.join(d, "gs:")), os.listdir(d)
