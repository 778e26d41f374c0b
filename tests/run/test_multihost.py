"""The main job as a pod runs it: `python -m iblip_jax.main` launched as 2 processes x 2 CPU devices with the
environment tools/tpu/worker.sh sets (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), against the
same job as 1 process x 4 devices; one process killed for real mid-run, the other saying so and stopping with the
preemption status. Nothing in the test starts JAX before the job does."""
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from transformers import InstructBlipForConditionalGeneration

import main_job

pytestmark = pytest.mark.integration   # launches the main job as a user does

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
TIMEOUT = 600   # a job that hangs (hosts disagreeing on a shape) fails here instead of blocking CI


@pytest.fixture(scope="module")
def assets(job_assets):
  return job_assets


def _flags(assets, workdir, **overrides):
  data = assets / "data"
  return main_job.flags(assets, workdir, **{
      "eval_at_end": True, "eval_batch_size": 4,
      "eval_max_examples": 5,   # not a multiple of the batch: the padded tail must be dropped
      "data.datasets.qgen.path": str(data / "long.jsonl"), "data.datasets.qgen.weight": 0.3,
      "data.random_crop": True, "mesh.fsdp": -1,
      "predict.images": str(data / "pairs.jsonl"), "predict.batch_size": 4, "predict.max_new_tokens": 4,
      "predict.num_beams": 2, "export_dir": str(workdir) + "_export",
      # packed training (each host packs its share of the batch into rows; hosts agree on the row count and width)
      "data.packing": 160,
      # QLoRA beside the trained Q-Former side: adapters on the frozen T5, whose weights and the ViT's are int8
      "lora.targets": '("language_model/.*/(q|v)$",)', "lora.rank": 2, "lora.alpha": 4.0,
      "model.vision.quantize": "int8", "model.text.quantize": "int8", **overrides})


FLOAT_TOWERS = {"model.vision.quantize": "", "model.text.quantize": ""}


_launch, _logs = main_job.launch_hosts, main_job.host_logs


def _wait(procs, logdir, tag):
  return main_job.wait_hosts(procs, logdir, tag, TIMEOUT)


def _run(args, processes, devices, logdir, tag):
  return _wait(_launch(args, processes, devices, logdir, tag), logdir, tag)


def _kill_process_1_once(marker, procs, logdir, tag):
  """SIGKILL to process 1 once `marker` (a checkpoint's) exists: a lost host. Process 0 must find out and stop."""
  deadline = time.time() + TIMEOUT
  while not marker.exists() and all(p.poll() is None for p in procs) and time.time() < deadline:
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGKILL)
  procs[1].wait()
  try:
    procs[0].wait(timeout=TIMEOUT)
  except subprocess.TimeoutExpired:
    procs[0].kill()
    pytest.fail("process 0 hung after losing process 1:\n" + _logs(logdir, tag, 2))


def _losses(workdir):
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _evals(workdir):
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  return [{k: v for k, v in r.items() if k.startswith("eval/")} for r in rows if any(k.startswith("eval/") for k in r)]


def _restore_on_one_device(path):
  """A checkpoint written by several processes, read back here (one process, one device)."""
  import jax
  import orbax.checkpoint as ocp
  checkpointer = ocp.StandardCheckpointer()
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                        checkpointer.metadata(path).item_metadata.tree)
  return checkpointer.restore(path, target)


def test_hosts_see_different_token_buckets(assets):
  """The premise of the next test: with this data, the two hosts' shares of some global batch tokenise to
  different widths (before sharding.agree_shapes), which without agreement would be two different programs."""
  from iblip_jax.data import mixture, pipeline, sources, tokenize
  tok = tokenize.load_tokenizers(str(assets / "ckpt"))
  spec = lambda n, f: sources.Source(n, n, "jsonl", str(assets / "data" / f"{f}.jsonl"))
  recs = {n: sources.read_records(spec(n, f)) for n, f in (("caption", "caption"), ("vqa", "vqa"), ("qgen", "long"))}
  datasets = {n: mixture.source(r) for n, r in recs.items()}
  probs = mixture.weights({n: len(r) for n, r in recs.items()}, {"qgen": 0.3})
  its = [iter(pipeline.build(mixture.mix(datasets, probs, seed=0), tok, batch_size=4, image_size=30, seed=0,
                             train=False, process_index=p, process_count=2).dataset) for p in range(2)]
  widths = [(next(its[0])["input_ids"].shape[1], next(its[1])["input_ids"].shape[1]) for _ in range(6)]
  assert any(a != b for a, b in widths), widths


def test_two_processes_train_resume_evaluate_predict_export_like_one(assets, tmp_path):
  """Trained packed (config.data.packing: the 1-process run packs each global batch of 8 into rows, each of the 2
  processes its own 4 examples, so rows differ and the maths must not), with the Q-Former side trained in full and
  rank-2 LoRA adapters on the T5's attention over the ViT and T5 quantised to int8 as each process loads its shards
  (QLoRA). One job stands for the float and the QLoRA runs (once two pod jobs, a fifth of CI's time): the trained
  tree, its shardings, optimizer state and checkpoints are the same code for all, quantising changes the frozen
  weights' storage only, and export loads the towers float in 2 processes (export writes float weights)."""
  # --- 1 process x 4 devices: the reference -------------------------------------------------------------------
  one = tmp_path / "one"
  _run(_flags(assets, one), 1, 4, tmp_path, "one_train")
  _run(_flags(assets, one, mode="predict", **{"predict.output": str(tmp_path / "one.jsonl")}), 1, 4, tmp_path,
       "one_predict")

  # --- 2 processes x 2 devices: train, killed after the step-4 checkpoint, resumed --------------------------------
  two = tmp_path / "two"
  procs = _launch(_flags(assets, two), 2, 2, tmp_path, "two_train")
  marker = two / "checkpoints" / "4" / "_CHECKPOINT_METADATA"
  _kill_process_1_once(marker, procs, tmp_path, "two_train")
  log = (tmp_path / "two_train_0.log").read_text()
  assert procs[0].returncode == 75, log[-3000:]
  # which of JAX's reports reaches process 0 first is a race: the one naming the lost task (process 1), or a
  # failed collective that does not say which
  assert any(f"error: {who} of this job is gone (JAX's distributed runtime lost it), so process 0 stopped too. The "
             f"last checkpoint in {two} is step 4. Rerun the same command on every host to resume." in log
             for who in ("another process", "process 1")), log[-3000:]
  assert "Check failure stack trace" not in log and "Fatal Python error" not in log
  assert marker.exists(), _logs(tmp_path, "two_train", 2)
  assert not (two / "checkpoints" / "6").exists()
  out = _run(_flags(assets, two), 2, 2, tmp_path, "two_resume")
  assert "resumed from" in out and "at step 4" in out

  # identical training: every logged loss (steps 1-6, from before and after the kill) equals the 1-process run
  want, got = _losses(one), _losses(two)
  assert sorted(want) == sorted(got) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-5)
  assert want[1] != want[6]
  # the checkpoints hold the same trained tree: the Q-Former side and the adapters, no frozen weight
  trained = {w: _flatten(_restore_on_one_device(w / "checkpoints" / "6" / "state")["trainable"]) for w in (one, two)}
  adapters = [p for p in trained[one] if p.endswith(("/lora_a", "/lora_b"))]
  assert adapters and all(p.startswith("language_model/") for p in adapters), sorted(trained[one])[:5]
  assert "query_tokens" in trained[one] and not any(p.startswith("vision_model/") for p in trained[one])
  assert sorted(trained[one]) == sorted(trained[two])
  for p in trained[one]:
    # a key bias's gradient is zero up to rounding (softmax ignores a shift shared by every key), and Adam scales
    # that rounding up to a step of about lr: there the two runs agree to the step size only
    atol = 1e-4 if p.endswith("/key/bias") else 1e-6
    np.testing.assert_allclose(np.asarray(trained[two][p]), np.asarray(trained[one][p]), rtol=1e-4, atol=atol,
                               err_msg=p)
  # the in-training evaluation at the end, computed once and identical
  assert len(_evals(two)) == len(_evals(one)) == 1
  assert _evals(two)[0] == pytest.approx(_evals(one)[0], abs=1e-9)
  lines = (two / "eval" / "step_6" / "held_in_vqa_predictions.jsonl").read_text().splitlines()
  assert len(lines) == 5   # the padded tail is not in the predictions
  assert lines == (one / "eval" / "step_6" / "held_in_vqa_predictions.jsonl").read_text().splitlines()

  # --- predict and export as 2 processes (mode=eval restores as they do, then evaluates as the step above did) --
  _run(_flags(assets, two, mode="predict", **{"predict.output": str(tmp_path / "two.jsonl")}), 2, 2, tmp_path,
       "two_predict")
  answers = [json.loads(line) for line in open(tmp_path / "two.jsonl")]
  assert len(answers) == 6 and answers == [json.loads(line) for line in open(tmp_path / "one.jsonl")]
  _run(_flags(assets, two, mode="export", **FLOAT_TOWERS), 2, 2, tmp_path, "two_export")
  export = str(two) + "_export"
  assert (two.parent / "two_export" / "qformer_tokenizer").is_dir()
  # the adapters folded into the T5 as peft folds its own export of them; the Q-Former side as trained
  import peft
  base = InstructBlipForConditionalGeneration.from_pretrained(assets / "ckpt")
  by_peft = peft.PeftModel.from_pretrained(base, export + "/peft_adapter").merge_and_unload().state_dict()
  base = InstructBlipForConditionalGeneration.from_pretrained(assets / "ckpt").state_dict()
  hf = InstructBlipForConditionalGeneration.from_pretrained(export)
  ours = hf.state_dict()
  np.testing.assert_array_equal(hf.query_tokens.detach().numpy(), np.asarray(trained[two]["query_tokens"]))
  assert sorted(ours) == sorted(by_peft)
  changed = {k for k in ours if not np.array_equal(ours[k].numpy(), base[k].numpy())}
  assert {k for k in changed if k.startswith("language_model.")} and all(
      k.endswith(("q.weight", "v.weight")) for k in changed if k.startswith("language_model.")), sorted(changed)
  # the frozen ViT unchanged (its post_layernorm is LAVIS's trained ln_vision)
  assert all(k.startswith("vision_model.post_layernorm.") for k in changed if k.startswith("vision_model.")), changed
  for name in ours:
    if name.startswith("language_model."):
      np.testing.assert_allclose(ours[name].numpy(), by_peft[name].numpy(), atol=1e-6, err_msg=name)


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out
