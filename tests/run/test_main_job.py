"""The main job end to end on a tiny checkpoint and tiny shapes data: resume after SIGKILL, restore on another
mesh, corrupt-checkpoint fallback, non-finite guard, config errors, predict, export."""
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from transformers import InstructBlipForConditionalGeneration

import oracle
from iblip_jax.demo import shapes, word_tokenizers
from main_job import env as _env, flags as _flags, leaves as _leaves, run as _run, steps as _steps
from main_job import trainable_at as _final_trainable, wait_for as _wait_for

pytestmark = pytest.mark.integration   # launches the main job as a user does

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


@pytest.fixture(scope="module")
def assets(job_assets):
  return job_assets


def test_sigkill_then_rerun_ends_bit_identical_then_resumes_on_another_mesh(assets, tmp_path):
  """With sequence packing on (config.data.packing: the batch's 8 examples share LLM rows of 160 tokens), so that
  packing is shown deterministic across a kill and on another mesh (unpacked runs resume in the other tests)."""
  packed = {"data.packing": 160, "log_mfu": True}   # the MFU line too (off in the other launches: it compiles)
  _run(_flags(assets, tmp_path / "straight", **packed))
  args = _flags(assets, tmp_path / "killed", **packed)
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
  # the step timeline: each window's parts add up to its wall time; goodput spans both runs and says so
  for r in rows:
    parts = sum(r[f"time/{p}"] for p in ("compile", "data", "step", "checkpoint", "eval", "other"))
    assert parts == pytest.approx(r["time/window"], rel=1e-6), r
    assert 0 < r["goodput"] < 1 and r["perf/tokens_per_sec"] > 0
  assert rows[-1]["perf/model_tflops_per_device"] > 0 and "perf/mfu" not in rows[-1]   # no peak known for a CPU
  assert 0 < rows[-1]["perf/frozen_forward_share"] < 1 and rows[-1]["perf/frozen_forward_tflops_per_device"] > 0
  assert json.loads((tmp_path / "killed" / "goodput.json").read_text())["restarts"] == 1
  assert "(1 restart)" in out.stdout and "goodput" in out.stdout
  # each batch shape the step compiles for is named once, at the first step that has it (the run's first, here 5)
  shapes = re.findall(r"^step (\d+): train step compiled for batch shape (.+)$", out.stdout, re.M)
  assert shapes and shapes[0][0] == "5" and "input_ids[" in shapes[0][1], out.stdout
  assert len({shape for _, shape in shapes}) == len(shapes)

  # the same workdir on another mesh with its newest checkpoint corrupted: reported, moved aside, the one before used
  w = tmp_path / "killed"
  for root, _, files in os.walk(w / "checkpoints" / "6"):
    for f in files:
      if not f.startswith("_"):
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
  out = _run(_flags(assets, w, total_steps=8, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}, **packed),
             devices=8)
  assert "step 6 is unreadable" in out.stdout and "at step 4" in out.stdout
  assert (w / "checkpoints" / "8").exists()
  assert any(p.startswith("unreadable_step_6_") for p in os.listdir(w / "checkpoints"))


def test_a_diverged_state_is_never_saved(assets, tmp_path):
  """Two good steps, then a learning rate that blows the parameters up: the step's own loss is still finite (the
  damage shows in the next forward pass), so the state is checked before it is saved and refused."""
  w = tmp_path / "w"
  _run(_flags(assets, w, total_steps=2, checkpoint_every=1))
  out = _run(_flags(assets, w, total_steps=6, checkpoint_every=1, **{"optim.lr": 1e38, "optim.warmup_lr": 1e38}),
             check=False)
  assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
  text = out.stdout + out.stderr
  assert "step 3: the update gave" in text and "this state is not saved" in text, text[-3000:]
  assert "(step 2) is intact" in text
  assert _steps(w) == [1, 2]
  trained = _final_trainable(w, 2)
  assert all(np.isfinite(x).all() for x in _leaves(trained))


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
  # a batch the mesh cannot split (fsdp=-1 spreads it over all 4 devices) and a run that would keep no checkpoint
  out = _run(_flags(assets, tmp_path / "w", batch_size=6, keep_checkpoints=0, **{"mesh.fsdp": -1}), devices=4,
             check=False)
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert "config.batch_size=6 must be a positive multiple of the mesh's batch split (data x fsdp = 4 on 4 devices)" \
      in out.stderr
  assert "config.keep_checkpoints=0 must be positive" in out.stderr


def test_predict_folder_and_export_to_transformers(assets, tmp_path):
  _run(_flags(assets, tmp_path / "w", total_steps=2))
  images = tmp_path / "images"   # the demo images, and one that is not an image at all
  images.mkdir()
  names = sorted(os.listdir(assets / "data" / "images"))[:9]
  for name in names:
    os.symlink(assets / "data" / "images" / name, images / name)
  (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  predict = {"predict.images": str(images), "predict.output": str(tmp_path / "a.jsonl"), "predict.batch_size": 4,
             "predict.max_new_tokens": 4, "predict.num_beams": 2}
  out = _run(_flags(assets, tmp_path / "w", mode="predict", **predict,
                    **{"predict.attention_maps": str(tmp_path / "maps")}))
  rows = [json.loads(l) for l in open(tmp_path / "a.jsonl")]
  assert [os.path.basename(r["image"]) for r in rows] == sorted(names + ["broken.png"])
  assert [r for r in rows if "error" in r] == [{"image": str(images / "broken.png"),
                                                "prompt": "A short image description:", "error": "unreadable image"}]
  assert all(isinstance(r["answer"], str) for r in rows if "error" not in r)
  assert "using the trainable weights" in out.stdout and "1 images that could not be read" in out.stdout
  # each answer's overlay, named in its line: the maps the Python API draws for the same image, prompt and answer
  answered = [r for r in rows if "answer" in r]
  assert sorted(os.listdir(tmp_path / "maps")) == sorted(os.path.basename(r["attention_map"]) for r in answered)
  from PIL import Image
  from iblip_jax import attention_maps
  from iblip_jax.inference import Pipeline
  pipe = Pipeline.from_pretrained(str(tmp_path / "w"))
  row = answered[0]
  maps = pipe.attention_maps(row["image"], [row["prompt"]], [row["answer"]])
  want = np.asarray(Image.open(io.BytesIO(attention_maps.render(pipe.prepare(row["image"]).image, maps))))
  got = np.asarray(Image.open(row["attention_map"]))
  assert got.shape == want.shape and np.mean(np.abs(got.astype(int) - want.astype(int)) > 2) < 1e-3
  # a mistyped workdir must not silently answer with the pretrained weights; a zero batch is a config error
  out = _run(_flags(assets, tmp_path / "w_typo", mode="predict", **predict), check=False)
  assert out.returncode == 2 and "has no checkpoints/" in out.stderr and "Traceback" not in out.stderr
  out = _run(_flags(assets, tmp_path / "w", mode="predict", **{**predict, "predict.batch_size": 0}), check=False)
  assert out.returncode == 2 and "config.predict.batch_size=0 must be positive" in out.stderr
  # nothing readable at all: the lines are written, and the exit status says the job failed
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  out = _run(_flags(assets, tmp_path / "w", mode="predict", **{**predict, "predict.images": str(broken),
                                                                "predict.output": str(tmp_path / "b.jsonl")}),
             check=False)
  assert out.returncode == 1 and "none of the 1 images could be read" in out.stderr, out.stderr[-2000:]
  assert "error" in json.loads(open(tmp_path / "b.jsonl").read())
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


def test_one_run_per_workdir_and_preemption_exit_status(assets, tmp_path):
  """A second run on a busy workdir is refused, naming the holder; SIGTERM saves and exits 75 (resume me), and
  frees the workdir; the lock of a SIGKILLed run is found stale, reported and taken over; a finished run exits 0
  and leaves no lock."""
  w = tmp_path / "w"
  args = _flags(assets, w, total_steps=500, checkpoint_every=100)
  first = subprocess.Popen([sys.executable, "-m", "iblip_jax.main", *args], cwd=ROOT, env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  _wait_for(w / "metrics.jsonl", first)   # training has begun
  second = _run(args, check=False)
  assert second.returncode == 1
  assert f"is in use by another training run: process {first.pid} on host {socket.gethostname()}" in second.stderr
  first.send_signal(signal.SIGTERM)
  out = first.communicate(timeout=300)[0]
  assert first.returncode == 75, out[-3000:]
  assert "preempted" in out and "rerun the same command to resume" in out
  assert not (w / "LOCK").exists()
  stopped_at = _steps(w)[-1]
  assert 0 < stopped_at < 500

  third = subprocess.Popen([sys.executable, "-m", "iblip_jax.main", *args], cwd=ROOT, env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_for(w / "LOCK", third)
  time.sleep(0.5)
  third.send_signal(signal.SIGKILL)
  third.wait()
  assert (w / "LOCK").exists()
  out = _run(_flags(assets, w, total_steps=stopped_at + 2, checkpoint_every=100))
  assert f"taking over a stale lock" in out.stdout and f"process {third.pid} is no longer running" in out.stdout
  assert f"at step {stopped_at}" in out.stdout
  assert not (w / "LOCK").exists()


def test_a_config_change_is_refused_not_treated_as_corruption(assets, tmp_path):
  """A finished workdir resumed or used for predict with the ablation switch flipped: the checkpoints belong to
  another config. The run stops naming what differs; nothing is moved aside; and bad input on the way is shown on
  the console as it happens and at the end."""
  data = tmp_path / "data"
  data.mkdir()
  lines = open(assets / "data" / "caption.jsonl").read().splitlines()
  bad = [dict(json.loads(line), image="images/no_such_image.png") for line in lines[:30]]   # 30 of the 78 records
  (data / "caption.jsonl").write_text("\n".join([json.dumps(b) for b in bad] + lines[30:]) + "\n")
  os.symlink(assets / "data" / "images", data / "images")
  w = tmp_path / "w"
  out = _run(_flags(assets, w, total_steps=3, checkpoint_every=1, **{"data.datasets.caption.path":
                                                                       str(data / "caption.jsonl")}))
  assert re.search(r"step \d: input \d+ skipped: \d+ missing_image", out.stdout), out.stdout
  assert re.search(r"input over the run: \d+ skipped: \d+ missing_image", out.stdout), out.stdout
  before = sorted(os.listdir(w / "checkpoints"))
  for mode in ("train", "predict"):
    out = _run(_flags(assets, w, mode=mode, total_steps=5, **{"model.instruction_aware": False,
                                                               "predict.images": str(assets / "data" / "images")}),
               check=False)
    assert out.returncode == 1, out.stdout[-2000:]
    assert "checkpoint step 3" in out.stderr and "was written by another config" in out.stderr
    assert "in the checkpoint only (60): trainable.qformer.layer_0.ffn.intermediate.bias" in out.stderr
    assert "unreadable" not in out.stdout + out.stderr
    assert sorted(os.listdir(w / "checkpoints")) == before


def test_every_configured_file_is_read_before_anything_trains(assets, tmp_path):
  """A malformed line in an evaluation file stops the run in seconds, before loading or training anything, naming
  the file and every bad line with its column and byte; exit 1 and one message, no traceback."""
  bad = tmp_path / "val_vqa.jsonl"
  lines = open(assets / "data" / "val_vqa.jsonl").read().splitlines()
  bad.write_text("\n".join(lines[:2] + ['{"image": "images/val_00000.png", "question": "cut'] + lines[2:]) + "\n")
  w = tmp_path / "w"
  out = _run(_flags(assets, w, **{"evals.held_in_vqa.path": str(bad)}), check=False)
  assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
  assert f"error: {bad}: line 3: malformed JSON (a string that is never closed" in out.stderr
  assert "Traceback" not in out.stderr and "loaded" not in out.stdout   # nothing was loaded
  assert not (w / "checkpoints").exists() and not (w / "LOCK").exists()


def test_sigterm_during_start_up_exits_75_and_releases_the_workdir(assets, tmp_path):
  """A preemption notice that arrives while the job is still loading: exit status 75 (rerun), the workdir lock
  released at once (another host is not refused for 10 minutes), nothing trained or saved."""
  w = tmp_path / "w"
  proc = subprocess.Popen([sys.executable, "-m", "iblip_jax.main", *_flags(assets, w)], cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  _wait_for(w / "LOCK", proc)   # the job holds the workdir and is starting up
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 75, out[-3000:]
  assert "stopped during start-up, before the first step" in out and "rerun the same command" in out
  assert not (w / "LOCK").exists() and not (w / "checkpoints" / "2").exists()


def test_a_full_disk_is_one_line_and_the_last_checkpoint_stays(assets, tmp_path):
  """The workdir on a 2 MB filesystem: the third checkpoint does not fit. The job says so in one line (what failed,
  which checkpoint is intact, what to do), exits 1 and releases the workdir; the intact checkpoint restores."""
  small = tmp_path / "small"
  small.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(small)], capture_output=True).returncode:
    pytest.skip("mounting a small tmpfs needs root")
  try:
    w = small / "w"
    out = _run(_flags(assets, w, total_steps=6, checkpoint_every=1), check=False)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    error = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "a checkpoint could not be written" in error[0] and "no space left" in error[0]
    assert "is intact" in error[0] and "rerun the same command" in error[0]
    # no traceback of ours, orbax's or tensorstore's (its futures completing on orbax's closed event loop printed
    # hundreds of lines straight to fd 2 before the job dropped those calls quietly: run/cli.py)
    assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) < 40, out.stderr[-4000:]
    assert not (w / "LOCK").exists()
    last = _steps(w)[-1]
    assert f"(step {last}) is intact" in error[0]
    assert all(np.isfinite(x).all() for x in _leaves(_final_trainable(w, last)))
  finally:
    subprocess.run(["umount", str(small)], capture_output=True)


def test_lora_trains_the_adapters_alone_exports_them_folded_and_a_changed_alpha_is_refused(assets, tmp_path):
  """config.lora with config.trainable=[]: the checkpoint holds adapters only (A and B of every targeted layer, the
  T5's stacked like its layers) and training moved B off zero; the export is a plain InstructBLIP whose weights are
  W + (alpha / r) A B (transformers loads it), and peft over the pretrained model with the exported adapters computes
  the same. Resuming with another alpha (same shapes, another meaning) stops
  naming it; nothing is changed."""
  w = tmp_path / "w"
  lora = {"trainable": "()", "lora.targets": '("qformer/.*/(query|value)$", "language_model/.*/(q|v)$")',
          "lora.rank": 2}
  _run(_flags(assets, w, total_steps=2, checkpoint_every=2, **lora))
  trainable = _final_trainable(w, 2)
  flat = {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(trainable)}
  assert flat and all(p.endswith(("/lora_a", "/lora_b")) for p in flat), sorted(flat)[:5]
  # 3 Q-Former layers x (self + cross every 2nd) x (query, value) + encoder (q, v) + decoder self and cross (q, v)
  assert len(flat) == 2 * (3 * 2 + 2 * 2 + 2 + 4)
  assert flat["language_model/encoder/layers/self_attn/q/lora_a"].shape == (2, 32, 2)
  assert all(np.any(x) for p, x in flat.items() if p.endswith("lora_b"))
  _run(_flags(assets, w, mode="export", export_dir=str(tmp_path / "hf"), **lora))
  exported = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "hf").state_dict()
  pretrained = InstructBlipForConditionalGeneration.from_pretrained(assets / "ckpt").state_dict()
  a, b = (flat[f"language_model/encoder/layers/self_attn/q/lora_{x}"][1] for x in "ab")   # block 1's adapter
  name = "language_model.encoder.block.1.layer.0.SelfAttention.q.weight"   # torch's Linear: (out, in)
  np.testing.assert_allclose(exported[name].numpy(), pretrained[name].numpy() + (a @ b * 16.0 / 2).T, atol=1e-6)
  unchanged = [k for k in pretrained if "SelfAttention.k" in k or "vision_model" in k]
  assert unchanged and all(np.array_equal(exported[k].numpy(), pretrained[k].numpy()) for k in unchanged)
  # the adapters alone, in PEFT's format over the pretrained model: what the folded export computes
  import peft
  over_base = peft.PeftModel.from_pretrained(InstructBlipForConditionalGeneration.from_pretrained(assets / "ckpt"),
                                             str(tmp_path / "hf" / "peft_adapter")).eval()
  folded = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
  batch = oracle.tiny_batch()
  np.testing.assert_allclose(oracle.hf_forward(over_base, batch).logits.numpy(),
                             oracle.hf_forward(folded, batch).logits.numpy(), atol=1e-5, rtol=0)
  before = sorted(os.listdir(w / "checkpoints"))
  out = _run(_flags(assets, w, total_steps=3, **lora, **{"lora.alpha": 4.0}), check=False)
  assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
  assert "checkpoint step 2" in out.stderr and "was written by another config" in out.stderr
  assert '"alpha": 16.0' in out.stderr and '"alpha": 4.0' in out.stderr
  assert sorted(os.listdir(w / "checkpoints")) == before
