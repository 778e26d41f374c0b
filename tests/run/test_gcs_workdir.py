"""The main job with a gs:// workdir and export directory, against a local GCS emulator (tests/gcs_emulator.py):
train, resume, eval (in training and --config.mode=eval) and export all read and write the bucket, and nothing
lands in a local `gs:` folder."""
import gzip
import json
import os

import numpy as np
import pytest
from transformers import InstructBlipForConditionalGeneration

import main_job
from gcs_emulator import gcs_fixture

pytestmark = pytest.mark.integration   # launches the main job as a user does

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUCKET = "iblip-workdir"
gcs = gcs_fixture(BUCKET)


@pytest.fixture(scope="module")
def assets(job_assets):
  return job_assets


def _job(assets, cwd, **overrides):
  args = main_job.flags(assets, f"gs://{BUCKET}/run", **{
      "total_steps": 4, "batch_size": 4, "eval_at_end": True, "eval_batch_size": 4, "eval_max_examples": 4,
      "mesh.fsdp": -1, "export_dir": f"gs://{BUCKET}/export", **overrides})
  # os.environ carries the emulator's variables
  return main_job.run(args, devices=2, cwd=cwd, timeout=600, PYTHONPATH=ROOT).stdout


def test_train_resume_eval_export_in_a_bucket(gcs, assets, tmp_path):
  cwd = tmp_path / "cwd"   # a gs:// path taken for a local one would appear here (or in ROOT) as a gs: folder
  cwd.mkdir()
  out = _job(assets, cwd, profile_steps="(3, 4)")
  assert {"run/checkpoints/2", "run/checkpoints/4"} <= {"/".join(n.split("/")[:3]) for n in gcs.list("run/")}
  # the profiler trace of steps 3-4 (run/profiler.py), copied into the bucket: steps 3 and 4 marked, no other (not
  # steps 1-2: the first compiles, and its events would pass the JSON export's cap of 1M, which xprof's xplane has not)
  assert f"step 4: profiler trace written to gs://{BUCKET}/run/profile/steps_3-4" in out
  traces = gcs.list("run/profile/")
  assert {n.split("/")[2] for n in traces} == {"steps_3-4"} and any(n.endswith(".xplane.pb") for n in traces)
  [trace] = [n for n in traces if n.endswith(".trace.json.gz")]
  events = json.loads(gzip.decompress(gcs.read(trace)))["traceEvents"]
  assert sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train" and "args" in e) == [3, 4]
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
