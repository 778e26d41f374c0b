"""The main job end to end on a tiny checkpoint and tiny shapes data: resume after SIGKILL, restore on another
mesh, corrupt-checkpoint fallback, non-finite guard, config errors, predict, export."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from transformers import InstructBlipForConditionalGeneration

import oracle
from iblip_jax.data import shapes, word_tokenizers

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("job")
  oracle.tiny_hf_model(untie_head=True, tie=False).save_pretrained(root / "ckpt")
  word_tokenizers.build(shapes.vocabulary(), str(root / "ckpt"))
  shapes.generate(str(root / "data"), train=48, val=6, seed=0)
  return root


def _flags(assets, workdir, **overrides):
  data = assets / "data"
  settings = {
      "model_init": str(assets / "ckpt"), "total_steps": 6, "batch_size": 8, "checkpoint_every": 2,
      "log_every": 1, "eval_at_start": False, "eval_at_end": False, "eval_every": 1000, "eval_batch_size": 3,
      "data.datasets.caption.path": str(data / "caption.jsonl"), "data.datasets.vqa.path": str(data / "vqa.jsonl"),
      "data.datasets.qgen.path": str(data / "qgen.jsonl"),
      "evals.held_in_vqa.path": str(data / "val_vqa.jsonl"),
      "evals.held_out_mc.path": str(data / "val_mc.jsonl"), "mesh.data": 1, "mesh.fsdp": 1,
      "mesh.tensor": 1, "optim.lr": 1e-3, "optim.warmup_steps": 1, "dropout": True, **overrides}
  return ["--config", os.path.join(ROOT, "configs", "demo.py"), "--workdir", str(workdir)] + [
      f"--config.{k}={v}" for k, v in settings.items()]


def _env(devices=1):
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _run(args, devices=1, check=True):
  out = subprocess.run([sys.executable, "-m", "iblip_jax.main", *args], cwd=ROOT, env=_env(devices),
                       capture_output=True, text=True, timeout=900)
  if check:
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  return out


def _final_trainable(workdir, step):
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  state = ocp.StandardCheckpointer().restore(path)
  return state["trainable"]


def _leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_sigkill_then_rerun_ends_bit_identical(assets, tmp_path):
  _run(_flags(assets, tmp_path / "straight"))
  args = _flags(assets, tmp_path / "killed")
  proc = subprocess.Popen([sys.executable, "-m", "iblip_jax.main", *args], cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = tmp_path / "killed" / "checkpoints" / "4"
  deadline = time.time() + 600
  while not (ckpt / "_CHECKPOINT_METADATA").exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert (ckpt / "_CHECKPOINT_METADATA").exists()
  assert not (tmp_path / "killed" / "checkpoints" / "6").exists()
  out = _run(args)
  assert "resumed from" in out.stdout and "at step 4" in out.stdout
  for a, b in zip(_leaves(_final_trainable(tmp_path / "straight", 6)),
                  _leaves(_final_trainable(tmp_path / "killed", 6))):
    np.testing.assert_array_equal(a, b)
  rows = [json.loads(l) for l in open(tmp_path / "killed" / "metrics.jsonl")]
  assert [r["step"] for r in rows if "loss" in r][-2:] == [5, 6]
  assert (tmp_path / "killed" / "curves.png").exists()


def test_resume_on_another_mesh_and_corrupt_latest_falls_back(assets, tmp_path):
  _run(_flags(assets, tmp_path / "w", total_steps=4))
  # corrupt the newest checkpoint: it must be reported and the one before used
  for root, _, files in os.walk(tmp_path / "w" / "checkpoints" / "4"):
    for f in files:
      if not f.startswith("_"):
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
  out = _run(_flags(assets, tmp_path / "w", total_steps=6, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}),
             devices=8)
  assert "step 4 is unreadable" in out.stdout and "at step 2" in out.stdout
  assert (tmp_path / "w" / "checkpoints" / "6").exists()
  assert any(p.startswith("unreadable_step_4_") for p in os.listdir(tmp_path / "w" / "checkpoints"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(assets, tmp_path):
  out = _run(_flags(assets, tmp_path / "w", total_steps=6, **{"optim.lr": 1e30, "optim.warmup_lr": 1e30}),
             check=False)
  assert out.returncode != 0
  assert "training stopped" in out.stderr + out.stdout and "is intact" in out.stderr + out.stdout
  steps = sorted(int(s) for s in os.listdir(tmp_path / "w" / "checkpoints") if s.isdigit())
  assert all(s < 6 for s in steps)


def test_config_errors_are_reported_together(assets, tmp_path):
  out = _run(_flags(assets, tmp_path / "w", **{"data.datasets.vqa.path": "/nope.jsonl",
                                                  "evals.held_in_vqa.task": "vqa_typo", "batch_size": 7,
                                                  "mesh.data": 2}), devices=2, check=False)
  assert out.returncode != 0
  err = out.stderr
  assert "config.data.datasets.vqa.path='/nope.jsonl' does not exist" in err
  assert "config.evals.held_in_vqa.task='vqa_typo' is not a known task" in err
  assert "config.batch_size=7 must be a positive multiple of the mesh's batch split (data x fsdp = 2" in err
  assert "Traceback" not in err


def test_predict_folder_and_export_to_transformers(assets, tmp_path):
  _run(_flags(assets, tmp_path / "w", total_steps=2))
  images = assets / "data" / "images"
  out = _run(_flags(assets, tmp_path / "w", mode="predict", **{"predict.images": str(images),
                                                                 "predict.output": str(tmp_path / "a.jsonl"),
                                                                 "predict.batch_size": 4,
                                                                 "predict.max_new_tokens": 4,
                                                                 "predict.num_beams": 2}))
  rows = [json.loads(l) for l in open(tmp_path / "a.jsonl")]
  assert len(rows) == len(os.listdir(images)) and all(isinstance(r["answer"], str) for r in rows)
  assert "using the trainable weights" in out.stdout
  _run(_flags(assets, tmp_path / "w", mode="export", export_dir=str(tmp_path / "hf")))
  hf = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "hf")
  trained = _final_trainable(tmp_path / "w", 2)
  np.testing.assert_array_equal(hf.query_tokens.detach().numpy(), np.asarray(trained["query_tokens"]))
  assert (tmp_path / "hf" / "qformer_tokenizer").is_dir()


def test_decoder_only_llm_trains_evaluates_predicts_and_exports(assets, tmp_path):
  """The same job with a tiny Vicuna-style checkpoint (LLaMA, grouped-query attention), on a 2-device mesh:
  training, evaluation by generation and by ranking, predict, and export loaded back by transformers."""
  ckpt = tmp_path / "vicuna"
  oracle.tiny_hf_model(llama=True).save_pretrained(ckpt)
  word_tokenizers.build(shapes.vocabulary(), str(ckpt), decoder_only=True)
  flags = lambda **kw: _flags(assets, tmp_path / "w", model_init=str(ckpt), **{"mesh.fsdp": 2, **kw})
  out = _run(flags(total_steps=2, eval_at_end=True, eval_max_examples=3), devices=2)
  metrics = [json.loads(l) for l in open(tmp_path / "w" / "metrics.jsonl")]
  evals = [m for m in metrics if "eval/held_in_vqa/vqa" in m]
  assert len(evals) == 1 and "eval/held_out_mc/accuracy" in evals[0], out.stdout[-2000:]
  assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
  out = _run(flags(mode="predict", **{"predict.images": str(assets / "data" / "images" / "val_00000.png"),
                                      "predict.output": str(tmp_path / "a.jsonl"), "predict.max_new_tokens": 3,
                                      "predict.num_beams": 2}), devices=2)
  assert len([json.loads(l) for l in open(tmp_path / "a.jsonl")]) == 1
  _run(flags(mode="export", export_dir=str(tmp_path / "hf")), devices=2)
  hf = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "hf")
  assert hf.config.use_decoder_only_language_model and hf.config.text_config.model_type == "llama"
  np.testing.assert_array_equal(hf.query_tokens.detach().numpy(),
                                np.asarray(_final_trainable(tmp_path / "w", 2)["query_tokens"]))
