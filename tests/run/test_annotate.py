"""`--config.mode=annotate` (iblip_jax/run/annotate.py) launched as a user does: webdataset tars written by the
`webdataset` package, a JSONL file and an image folder, with broken records, an empty shard and a shard that cannot
be opened; killed for real and stopped by SIGTERM, then rerun, each (record, prompt) exactly once with the answers
of an uninterrupted run; 2 processes x 2 devices on gs:// against 1 x 4; memory bounded whatever the input size."""
import json
import os
import signal
import subprocess
import sys

import pytest
import webdataset as wds
from etils import epath

import main_job
from gcs_emulator import gcs_fixture

# launches the main job as a user does; one worker runs them all, so that they share the reference run
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("annotate")]

ROOT = main_job.ROOT
BUCKET = "iblip-annotate"
PROMPTS = ["A short image caption:", "Question: What color is the shape? Short answer:"]
gcs = gcs_fixture(BUCKET)


@pytest.fixture(scope="module")
def inputs(job_assets, tmp_path_factory):
  """shard-00000.tar (7 records: #2 not an image, #4 no image member), shard-00001.tar (empty), shard-00002.tar (9
  records), rows.jsonl (a missing image, a row with its own prompt, rows of 2 and 3 images, a video clip), photos/
  (3 images), broken.tar (a link to nothing: listed, cannot be opened)."""
  import video_clips
  d = tmp_path_factory.mktemp("annotate_in")
  images = sorted((job_assets / "data" / "images").glob("train_*.png"))
  with wds.TarWriter(str(d / "shard-00000.tar")) as w:
    for i in range(7):
      sample = {"__key__": f"a{i:03d}", "png": images[i].read_bytes(), "txt": f"caption {i}"}
      if i == 2:
        sample["png"] = b"these bytes are no image"
      if i == 4:
        del sample["png"]
      w.write(sample)
  with wds.TarWriter(str(d / "shard-00001.tar")):
    pass
  with wds.TarWriter(str(d / "shard-00002.tar")) as w:
    for i in range(9):
      w.write({"__key__": f"c{i:03d}", "png": images[10 + i].read_bytes()})
  rows = [{"image": str(images[20])}, {"image": "missing.png"}, {"image": str(images[21]), "prompt": "Own prompt:"},
          {"images": [str(images[22]), str(images[23])]}, {"images": [str(images[24]), str(images[25]),
                                                                       str(images[26])]},
          {"image": str(video_clips.write(d / "clip.mp4", 10))}]
  (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (d / "photos" / "sub").mkdir(parents=True)
  for i, name in enumerate(["x.png", "sub/y.png", "z.png"]):
    (d / "photos" / name).write_bytes(images[30 + i].read_bytes())
  os.symlink(d / "nowhere.tar", d / "broken.tar")
  return d


def _flags(assets, output, inputs_spec, **overrides):
  settings = {"mode": "annotate", "model_init": str(assets / "ckpt"), "mesh.data": 1, "mesh.fsdp": 1,
              "mesh.tensor": 1, "annotate.inputs": inputs_spec, "annotate.output": str(output),
              "annotate.prompts": json.dumps(PROMPTS), "annotate.batch_size": 4, "annotate.rows_per_file": 3,
              "annotate.max_new_tokens": 4, "annotate.num_beams": 1, "annotate.scores": True, **overrides}
  return ["--config", os.path.join(ROOT, "configs", "demo.py")] + [f"--config.{k}={v}" for k, v in settings.items()]


def _rows(output) -> list[dict]:
  out = []
  for p in sorted(epath.Path(output).glob("rows/*.jsonl")):
    out += [json.loads(line) for line in p.read_text().splitlines()]
  return out


def _table(rows) -> dict:
  """(shard, key, prompt) -> answer or error, failing on a duplicate."""
  out = {}
  for r in rows:
    k = (r["shard"], r["key"], r["prompt"])
    assert k not in out, f"twice: {k}"
    out[k] = r.get("answer", "ERROR " + r.get("error", ""))
  return out


@pytest.fixture(scope="module")
def reference(job_assets, inputs, tmp_path_factory):
  """An uninterrupted run over everything, the broken shard included (it exits 1 after finishing the rest)."""
  out = tmp_path_factory.mktemp("reference") / "out"
  spec = f"{inputs}/*.tar,{inputs}/rows.jsonl,{inputs}/photos"
  done = main_job.run(_flags(job_assets, out, spec), check=False)
  return out, done


def test_every_record_and_prompt_once_with_errors_named(reference, job_assets, inputs):
  out, done = reference
  assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
  assert "1 shard(s) could not be read" in done.stderr and "broken.tar: cannot be opened" in done.stderr
  table = _table(_rows(out))
  want_keys = ({("shard-00000.tar", f"a{i:03d}") for i in range(7)} | {("shard-00002.tar", f"c{i:03d}")
                                                                         for i in range(9)}
               | {("photos.part-00000", k) for k in ("x.png", "sub/y.png", "z.png")}
               | {("rows.jsonl", f"line {i}") for i in (1, 2, 4, 5, 6)})
  assert {(s, k) for s, k, _ in table} == want_keys | {("rows.jsonl", "line 3")}
  assert len(table) == 2 * len(want_keys) + 1   # the third JSONL row asks its own prompt only
  assert table[("rows.jsonl", "line 3", "Own prompt:")] and ("rows.jsonl", "line 3", PROMPTS[0]) not in table
  errors = {k[:2]: v for k, v in table.items() if v.startswith("ERROR")}
  assert set(errors) == {("shard-00000.tar", "a002"), ("shard-00000.tar", "a004"), ("rows.jsonl", "line 2")}
  assert "shard-00000.tar: a002: not an image" in errors[("shard-00000.tar", "a002")]
  assert "a004: no image member" in errors[("shard-00000.tar", "a004")]
  assert "rows.jsonl: line 2 (" in errors[("rows.jsonl", "line 2")]
  assert "missing.png): no such image file" in errors[("rows.jsonl", "line 2")]
  answered = [v for k, v in table.items() if k[:2] not in errors]
  assert not any(v.startswith("ERROR") for v in answered) and any(answered)   # (a tiny random model may say "")
  # a tar's .txt travels with its rows; files of 3 records; the manifest says what is left
  first = [json.loads(x) for x in (out / "rows" / "shard-00000.tar.part-00000.jsonl").read_text().splitlines()]
  assert [r["key"] for r in first] == ["a000", "a000", "a001", "a001", "a002", "a002"]
  assert first[0]["meta"] == {"txt": "caption 0"}
  scores = [r["score"] for r in _rows(out) if "answer" in r]   # config.annotate.scores: log p(answer | image, prompt)
  assert len(scores) == 49 - 6 and all(s <= 0 for s in scores) and len(set(scores)) > 1
  # rows of several images and a video: the Pipeline's answers for Images(...) and the clip (batches of one image
  # count, per row)
  from iblip_jax.inference import Images, Pipeline
  pipe = Pipeline.from_pretrained(str(job_assets / "ckpt"))
  rows = [json.loads(line) for line in (inputs / "rows.jsonl").read_text().splitlines()]
  for line in (4, 5, 6):
    visual = rows[line - 1]["image"] if line == 6 else Images(*rows[line - 1]["images"])
    for prompt in PROMPTS:
      want = pipe(visual, prompt, num_beams=1, max_new_tokens=4)
      assert table[("rows.jsonl", f"line {line}", prompt)] == want, (line, prompt)
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["unfinished"] == ["broken.tar"]
  assert manifest["finished"]["shard-00001.tar"] == {"records": 0, "parts": 0}
  assert manifest["finished"]["shard-00002.tar"] == {"records": 9, "parts": 3}
  assert "annotate: 22 images, 49 rows (6 errors)" in done.stdout   # 25 records, 3 unusable; 2 x 25 - 1 rows


def _faulty(job_assets, output, spec, fault, at, timeout=600):
  return subprocess.run([sys.executable, os.path.join(ROOT, "tests", "run", "annotate_faults.py"), fault, str(at),
                         "--", *_flags(job_assets, output, spec)], cwd=ROOT, env=main_job.env(), capture_output=True,
                        text=True, timeout=timeout)


def test_killed_and_stopped_runs_resume_exactly_once(job_assets, inputs, reference, tmp_path):
  spec = f"{inputs}/shard-*.tar,{inputs}/rows.jsonl,{inputs}/photos"
  out = tmp_path / "out"
  killed = _faulty(job_assets, out, spec, "kill", 3)   # annotate.json, a part, then killed writing the next
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert len(list(out.glob("rows/*.jsonl"))) == 1 and list(out.glob("rows/.*.tmp"))
  stopped = _faulty(job_assets, out, spec, "term", 2)   # a preemption notice mid-run
  assert stopped.returncode == 75, stopped.stdout[-2000:] + stopped.stderr[-3000:]
  assert "preempted: stopped by a signal" in stopped.stdout
  before = len(list(out.glob("rows/*.jsonl")))
  assert 1 < before < len(list((reference[0] / "rows").glob("*.jsonl")))
  killed = _faulty(job_assets, out, spec, "kill", 2)
  assert killed.returncode == -signal.SIGKILL
  main_job.run(_flags(job_assets, out, spec))
  got, want = _table(_rows(out)), _table(_rows(reference[0]))
  assert got == {k: v for k, v in want.items() if k[0] != "broken.tar"}
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["unfinished"] == [] and len(manifest["finished"]) == 5
  # the same folder with other settings is refused before the weights load, naming what differs
  refused = main_job.run(_flags(job_assets, out, spec, **{"annotate.max_new_tokens": 5}), check=False)
  assert refused.returncode == 2
  assert "max_new_tokens: 4 then, 5 now" in refused.stderr and "loaded" not in refused.stdout


def test_two_processes_on_gcs_write_what_one_process_writes(job_assets, inputs, reference, gcs, tmp_path):
  """2 processes x 2 devices, reading the tars from the bucket and writing there, give the rows of the one-device
  reference run (the same images once each, batches across hosts, both hosts' shards); the JSONL shard's rows of 2
  and 3 images and its video meet other hosts' one-image batches (the smallest count goes first, the others
  wait)."""
  for name in ("shard-00000.tar", "shard-00001.tar", "shard-00002.tar"):
    epath.Path(f"gs://{BUCKET}/in/{name}").write_bytes((inputs / name).read_bytes())
  out = f"gs://{BUCKET}/two"
  flags = _flags(job_assets, out, f"gs://{BUCKET}/in/*.tar,{inputs}/rows.jsonl",
                 **{"mesh.fsdp": -1, "annotate.batch_size": 8})
  log = main_job.wait_hosts(main_job.launch_hosts(flags, 2, 2, tmp_path, "two"), tmp_path, "two")
  assert "4 shards, 0 finished before, 4 to do over 2 process(es)" in log
  # shards from two places are named by their whole path ("gs__bucket__in__shard-00000.tar"), and so are their
  # errors: the answers are compared, and the errors by where they are (the reference test reads their messages)
  name = lambda shard: shard.rsplit("__", 1)[-1]   # noqa: E731
  plain = lambda table: {(name(k[0]), *k[1:]): "ERROR" if v.startswith("ERROR") else v  # noqa: E731
                         for k, v in table.items()}
  want = {k: v for k, v in _table(_rows(reference[0])).items()
          if (k[0].endswith(".tar") or k[0] == "rows.jsonl") and k[0] != "broken.tar"}
  assert plain(_table(_rows(out))) == plain(want) and len(want) == 2 * 16 + 11
  manifest = json.loads(epath.Path(f"{out}/manifest.json").read_text())
  assert sorted(map(name, manifest["finished"])) == ["rows.jsonl", "shard-00000.tar", "shard-00001.tar",
                                                     "shard-00002.tar"]


MEMORY_PROBE = """
import io, sys, tracemalloc
import numpy as np, webdataset as wds
from etils import epath
from PIL import Image
from iblip_jax.data import shards
from iblip_jax.run import annotate

folder, n = sys.argv[1], int(sys.argv[2])
def png(seed):
  out = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 255, (6, 6, 3), np.uint8)).save(out, "PNG")
  return out.getvalue()
with wds.TarWriter(f"{folder}/{n}.tar") as w:
  for i in range(n):
    w.write({"__key__": f"{i:06d}", "png": png(i % 50)})
found = shards.find(f"{folder}/{n}.tar")
root = epath.Path(f"{folder}/out{n}")
(root / "rows").mkdir(parents=True)
(root / "done").mkdir()
class Said:
  def __init__(self, text):
    self.text, self.logprob = text, 0.0
held = [0]
def answer(groups, count=1):
  held[0] = max(held[0], tracemalloc.get_traced_memory()[0])   # what the loop holds, each step
  for group in groups:
    group[0][1].result()   # the decoded image, as the real step takes it
  return {id(row): Said(str(len(row.prompt))) for group in groups for row, _ in group}
tracemalloc.start()
totals = annotate.stream(root, found, found, {}, ("a", "bb"), rows_per_file=500, image_size=16, local=8,
                         answer=answer, scores=False, per_image=2, progress=False)
assert totals["images"] == n and totals["rows"] == 2 * n and totals["parts"] == -(-n // 500), totals
print("HELD", held[0])
"""


def _held_bytes(tmp_path, n: int) -> int:
  """The most Python memory (numpy's arrays included) held at any step while the annotation loop streams a tar of
  `n` small images to its outputs, in a process of its own: queues, decoded images in flight, rows of unfinished
  parts. The model is replaced by an answer of the prompt's length that takes each group's decoded image as the
  real step does (an answer that never waits for decoding lets the decode pool's queue grow without end: the
  consumer is what bounds the producer). Sampled at each step, between the loop's batches."""
  out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path), str(n)], cwd=ROOT, env=main_job.env(),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return int(out.stdout.split("HELD")[-1])


def test_memory_does_not_grow_with_the_input(tmp_path):
  small, large = _held_bytes(tmp_path, 2_000), _held_bytes(tmp_path, 20_000)
  assert large < 1.3 * small + 2**20, (small, large)
