"""Validation-based checkpoint selection (run/best.py): the state of the best evaluation so far is kept in
workdir/best, across resumes, and the main job evaluates it with --workdir DIR/best."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import main_job
import oracle
from iblip_jax import checkpoints
from iblip_jax.data.sources import Source
from iblip_jax.demo import shapes, word_tokenizers
from iblip_jax.run import best

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": main_job.xla_flags(1)}


def _state(value: float) -> dict:
  return {"trainable": {"w": jnp.full((3, 2), value)}, "opt_state": {"mu": jnp.full((3, 2), -value)}}


def test_the_best_evaluation_is_kept_across_resumes(tmp_path):
  keys = ["coco/CIDEr", "okvqa/vqa"]
  keeper = best.BestKeeper(str(tmp_path), keys)
  lines = [keeper.consider(100, {"coco/CIDEr": 50.0, "okvqa/vqa": 30.0}, _state(1.0)),   # 40: first, saved
           keeper.consider(200, {"coco/CIDEr": 70.0, "okvqa/vqa": 40.0}, _state(2.0)),   # 55: better, saved
           keeper.consider(300, {"coco/CIDEr": 80.0, "okvqa/vqa": 10.0}, _state(3.0)),   # 45: worse
           keeper.consider(400, {"coco/CIDEr": 90.0}, _state(4.0))]                      # incomplete: no score
  assert "new best" in lines[0] and "new best" in lines[1] and "new best" not in lines[2]
  assert "best so far 55.00 at step 200" in lines[2] and "no selection score" in lines[3]
  record = json.loads((tmp_path / "best" / "best.json").read_text())
  assert record == {"step": 200, "score": 55.0, "keys": keys, "mixing": "mean",
                    "values": {"coco/CIDEr": 70.0, "okvqa/vqa": 40.0},
                    "reference": {"coco/CIDEr": 50.0, "okvqa/vqa": 30.0}}
  mngr = checkpoints.manager(str(tmp_path / "best"))
  assert mngr.all_steps() == [200]   # one kept: the old best goes once the new one is saved
  step, state = checkpoints.restore_latest(mngr, _state(0.0), jax.tree.map(lambda x: x.sharding, _state(0.0)))
  assert step == 200 and float(state["trainable"]["w"][0, 0]) == 2.0
  # a resumed run knows the best so far; a changed selection starts over
  assert "new best" not in best.BestKeeper(str(tmp_path), keys).consider(500, {"coco/CIDEr": 60.0,
                                                                                "okvqa/vqa": 40.0}, _state(5.0))
  assert "new best" in best.BestKeeper(str(tmp_path), ["coco/CIDEr"]).consider(600, {"coco/CIDEr": 1.0}, _state(6.0))


def test_selection_keys_name_the_headline_metric_or_the_mistake():
  evals = [Source("coco_val", "config.evals.coco_val", "coco_caption", "x", task="coco_caption"),
           Source("okvqa_val", "config.evals.okvqa_val", "okvqa", "x", task="okvqa")]
  # an evaluation's name alone: LAVIS's agg_metrics, CIDEr + BLEU-4 for captions, accuracy for VQA
  assert best.selection_keys(["coco_val", "okvqa_val", "coco_val/CIDEr"], evals) == (
      ["coco_val/CIDEr+BLEU-4", "okvqa_val/vqa", "coco_val/CIDEr"], [])
  _, problems = best.selection_keys(["vqav2_val"], evals)
  assert problems and "names no evaluation in config.evals (coco_val, okvqa_val)" in problems[0]


def test_relative_mixing_weighs_every_evaluation_alike(tmp_path):
  """CIDEr + BLEU-4 near 150 against an accuracy near 50: by the plain mean, +6 CIDEr beats +5 accuracy points;
  relative to the first evaluation, +5 accuracy (+10%) beats +6 on 150 (+4%). Hand-computed."""
  keys = ["coco/CIDEr+BLEU-4", "okvqa/vqa"]
  first = {"coco/CIDEr": 110.0, "coco/BLEU-4": 40.0, "okvqa/vqa": 50.0}        # 150 and 50
  more_cider = {"coco/CIDEr": 116.0, "coco/BLEU-4": 40.0, "okvqa/vqa": 50.0}   # 156 and 50
  more_vqa = {"coco/CIDEr": 110.0, "coco/BLEU-4": 40.0, "okvqa/vqa": 55.0}     # 150 and 55
  assert best.score(more_cider, keys) == 103.0 and best.score(more_vqa, keys) == 102.5
  reference = best.values(first, keys)
  assert best.score(more_cider, keys, "relative", reference) == pytest.approx((104 + 100) / 2)
  assert best.score(more_vqa, keys, "relative", reference) == pytest.approx((100 + 110) / 2)
  keeper = best.BestKeeper(str(tmp_path), keys, "relative")
  lines = [keeper.consider(step, r, _state(step)) for step, r in ((1, first), (2, more_cider), (3, more_vqa))]
  assert "score 100.00" in lines[0] and "new best" in lines[1] and "new best" in lines[2]
  assert json.loads((tmp_path / "best" / "best.json").read_text())["step"] == 3
  # the reference survives a resume; a changed mixing starts the selection over
  assert "new best" not in best.BestKeeper(str(tmp_path), keys, "relative").consider(4, more_cider, _state(4.0))
  assert "new best" in best.BestKeeper(str(tmp_path), keys, "mean").consider(5, first, _state(5.0))


def _trainable(checkpoint_dir):
  import orbax.checkpoint as ocp
  return jax.tree.leaves(ocp.StandardCheckpointer().restore(os.path.join(checkpoint_dir, "state"))["trainable"])


@pytest.mark.integration
@pytest.mark.slow   # the main job: 2 training steps with 3 evaluations (~40 s on 2 cores)
def test_the_main_job_keeps_the_best(tmp_path):
  """Training with config.best_checkpoint_metrics: workdir/best holds the state of the evaluation with the best
  score (the evaluation of workdir/best itself is tests/evaluation/test_table1.py's)."""
  oracle.tiny_hf_model(untie_head=True, tie=False).save_pretrained(tmp_path / "ckpt")
  word_tokenizers.build(shapes.vocabulary(), str(tmp_path / "ckpt"))
  shapes.generate(str(tmp_path / "data"), train=32, val=6, seed=0)
  data, workdir = tmp_path / "data", tmp_path / "run"
  settings = {"model_init": tmp_path / "ckpt", "total_steps": 2, "batch_size": 4, "checkpoint_every": 1,
              "keep_checkpoints": 5, "log_every": 1, "eval_at_start": True, "eval_every": 1, "eval_batch_size": 6,
              "data.datasets.caption.path": data / "caption.jsonl", "data.datasets.vqa.path": data / "vqa.jsonl",
              "data.datasets.qgen.path": data / "qgen.jsonl", "evals.held_in_vqa.path": data / "val_vqa.jsonl",
              "evals.held_out_mc.path": data / "val_mc.jsonl", "mesh.fsdp": 1, "optim.lr": 3e-3,
              "optim.warmup_steps": 1, "eval_untrained_baseline": False,
              "best_checkpoint_metrics": "('held_in_vqa', 'held_out_mc/accuracy')"}
  out = subprocess.run([sys.executable, "-m", "iblip_jax.main", "--config", "configs/demo.py", "--workdir",
                        str(workdir), *[f"--config.{k}={v}" for k, v in settings.items()]], cwd=ROOT,
                       capture_output=True, text=True, timeout=900,
                       env=ENV)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  scores = {}
  for line in open(workdir / "metrics.jsonl"):
    row = json.loads(line)
    if "eval/held_in_vqa/vqa" in row:
      scores[row["step"]] = (row["eval/held_in_vqa/vqa"] + row["eval/held_out_mc/accuracy"]) / 2
  assert sorted(scores) == [0, 1, 2]
  want = max(scores, key=lambda k: (scores[k], -k))   # a tie keeps the earlier evaluation
  record = json.loads((workdir / "best" / "best.json").read_text())
  assert record["step"] == want and record["score"] == pytest.approx(scores[want])
  assert os.listdir(workdir / "best" / "checkpoints") == [str(want)]
  if want:   # the same state as training's own checkpoint of that step (step 0 has none)
    for a, b in zip(_trainable(workdir / "best" / "checkpoints" / str(want)),
                    _trainable(workdir / "checkpoints" / str(want)), strict=True):
      np.testing.assert_array_equal(a, b)
  assert f"step {want}: held-in validation score" in out.stdout and "new best" in out.stdout
