"""Prepared datasets: reader records -> tfds ArrayRecord shards -> tfds.data_source -> the grain pipeline, exactly."""
import glob
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from iblip_jax.data import mixture, pipeline, readers, sources, tfds_builder, tokenize
from iblip_jax.demo import word_tokenizers


def _write_image(path, seed: int, fmt: str = "PNG", **save) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rgb = np.random.default_rng(seed).integers(0, 256, (9, 12, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(path, format=fmt, **save)
  return str(path)


def _coco(root) -> str:
  """Karpathy-split COCO: two train images (a PNG, an EXIF-rotated JPEG), one restval image that is missing, and
  one test image."""
  def img(cocoid, split, folder):
    return {"filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "cocoid": cocoid, "split": split,
            "sentences": [{"raw": f"caption {cocoid} {k}"} for k in range(cocoid)]}
  images = [img(1, "train", "train2014"), img(2, "train", "train2014"), img(3, "restval", "val2014"),
            img(4, "test", "val2014")]
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "dataset_coco.json"), "w") as f:
    json.dump({"images": images}, f)
  _write_image(os.path.join(root, "train2014", images[0]["filename"]), 1, "PNG")
  exif = Image.Exif()
  exif[0x0112] = 6
  _write_image(os.path.join(root, "train2014", images[1]["filename"]), 2, "JPEG", exif=exif)
  _write_image(os.path.join(root, "val2014", images[3]["filename"]), 4, "JPEG")
  return str(root)


def _by_id(records):  # a prepared dataset's order is tfds' (hashed), not the reader's
  return sorted(records, key=lambda r: json.dumps(r["id"]))


def _expected(records):
  """The reader's records as a prepared dataset gives them back: image files as their bytes; missing ones gone."""
  out = []
  for r in records:
    if "image" in r and os.path.exists(r["image"]):
      out.append({**r, "image": open(r["image"], "rb").read()})
    elif r.get("frames"):
      out.append({**r, "frames": [open(p, "rb").read() for p in r["frames"]]})
  return _by_id(out)


def _read_all(data_dir, name, split):
  ds = tfds_builder.data_source(data_dir, name, split)
  return _by_id(ds[i] for i in range(len(ds)))


def test_coco_caption_round_trip_is_exact(tmp_path):
  root = _coco(tmp_path / "coco")
  builder = tfds_builder.prepare("coco_caption", root, str(tmp_path / "tfds"), splits=["train", "test"])
  assert glob.glob(str(tmp_path / "tfds" / "coco_caption" / "1.0.0" / "coco_caption-train.array_record-*"))
  assert builder.written == {"train": 2, "test": 1} and builder.left_out["train"] == {"missing_image": 1}
  for split in ("train", "test"):
    got = _read_all(str(tmp_path / "tfds"), "coco_caption", split)
    assert got == _expected(readers.read_coco_caption(root, split=split))
  assert [type(r["id"]) for r in got] == [int]


def test_heterogeneous_fields_keep_their_types_and_absence(tmp_path):
  image = _write_image(tmp_path / "a.png", 0)
  rows = [  # ids int and str (-> JSON), a test line without answers, nested values, empty and float fields
      {"id": 7, "image": "a.png", "question": "q1", "answers": ["x", "y"], "candidates": ["x", "z"],
       "answer_index": 0, "label": True, "score": 0.25, "meta": {"k": [1, 2]}, "ocr_tokens": []},
      {"id": "s", "image": "a.png", "question": "q2", "answer_index": -1, "label": False, "score": 1.0,
       "meta": None, "ocr_tokens": ["sign"], "counts": [3, 4]},
      {"image": "a.png", "text_input": "Describe.", "text_output": "Noise. \u00e9\u00e8 \u2603"},
  ]
  with open(tmp_path / "data.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  source = str(tmp_path / "data.jsonl")
  builder = tfds_builder.prepare("jsonl", source, str(tmp_path / "tfds"), name="mine")
  assert builder._schema == {"answer_index": "int", "answers": "list_str", "candidates": "list_str",
                             "counts": "list_int", "dataset": "str", "id": "json", "label": "bool", "meta": "json",
                             "ocr_tokens": "list_str", "question": "str", "score": "float", "text_input": "str",
                             "text_output": "str"}
  got = _read_all(str(tmp_path / "tfds"), "mine", "train")
  want = _expected(readers.read_jsonl(source))
  assert got == want and open(image, "rb").read() == got[0]["image"]
  assert [{k: type(v) for k, v in r.items()} for r in got] == [{k: type(v) for k, v in r.items()} for r in want]


def test_video_frames_round_trip(tmp_path):
  with open(tmp_path / "test_qa.json", "w") as f:
    json.dump([{"answer": "man", "id": 1, "question": "who?", "video_id": 10},
               {"answer": "car", "id": 2, "question": "what?", "video_id": 11}], f)
  for k in (1, 2, 10):
    _write_image(tmp_path / "frames" / "video10" / f"frame_{k}.jpg", k, "JPEG")
  builder = tfds_builder.prepare("msrvtt_qa", str(tmp_path), str(tmp_path / "tfds"), splits=["test"],
                                 reader_args={"answer_vocab": ["man", "woman"]})
  assert builder.left_out["test"] == {"missing_frames": 1}
  got = _read_all(str(tmp_path / "tfds"), "msrvtt_qa", "test")
  assert got == _expected(readers.read_msrvtt_qa(str(tmp_path), answer_vocab=["man", "woman"]))
  assert len(got[0]["frames"]) == 3
  opened = tfds_builder.open_media(got[0])  # what the evaluator gets: images, not bytes
  assert [f.size for f in opened["frames"]] == [(12, 9)] * 3


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok")
  word_tokenizers.build("a short image caption 1 2 0 describe noise".split(), str(path))
  return tokenize.load_tokenizers(str(path), max_input_len=8, max_output_len=6)


def _render(record, rng):
  del rng
  return "a short image caption", record["captions"][0]


def test_pipeline_gives_the_same_batches_from_prepared_data_as_from_the_reader(tmp_path, tok):
  root = _coco(tmp_path / "coco")
  tfds_builder.prepare("coco_caption", root, str(tmp_path / "tfds"))
  prepared = tfds_builder.data_source(str(tmp_path / "tfds"), "coco_caption", "train")
  by_id = {r["id"]: r for r in readers.read_coco_caption(root)}  # the reader's records (paths), in tfds' order
  in_memory = mixture.source([by_id[prepared[i]["id"]] for i in range(len(prepared))] + [by_id[3]])
  build = lambda ds, workers=0: list(pipeline.build(ds, tok, batch_size=2, image_size=16, seed=0, train=True,
                                                    render=_render, workers=workers).dataset)
  want = build(in_memory)
  assert len(want) == 1  # the missing image was skipped in memory and left out when preparing
  for got in (build(prepared), build(prepared, workers=1)):  # worker processes unpickle the tfds source
    assert len(got) == 1 and got[0].keys() == want[0].keys()
    for k in want[0]:
      np.testing.assert_array_equal(got[0][k], want[0][k])


def test_reading_needs_neither_tensorflow_nor_the_prepare_extra(tmp_path):
  root = _coco(tmp_path / "coco")
  tfds_builder.prepare("coco_caption", root, str(tmp_path / "tfds"))
  code = ("import importlib.util, sys\n"
          "from iblip_jax.data import tfds_builder\n"
          f"ds = tfds_builder.data_source({str(tmp_path / 'tfds')!r}, 'coco_caption', 'train')\n"
          "print(len(ds), ds[1]['captions'], len(ds[1]['image']) > 0)\n"
          "print(importlib.util.find_spec('tensorflow') is None,\n"
          "      sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'importlib_resources')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  lines = out.stdout.strip().split("\n")
  assert lines[-2] == "2 ['caption 2 0', 'caption 2 1'] True"
  assert lines[-1].endswith(" []")  # neither module imported while reading
  if lines[-1].startswith("False"):
    pytest.skip("tensorflow is installed here: reading without it is shown only where it is not")


def test_cli_prepares_reports_and_keeps_an_existing_dataset(tmp_path, capsys):
  root = _coco(tmp_path / "coco")
  args = ["--dataset", "coco_caption", "--source", root, "--data_dir", str(tmp_path / "tfds"),
          "--arg", "include_restval=false", "--name", "coco_no_restval"]
  tfds_builder.main(args)
  assert "coco_no_restval/train: 2 records written" in capsys.readouterr().out
  assert len(tfds_builder.data_source(str(tmp_path / "tfds"), "coco_no_restval", "train")) == 2
  tfds_builder.main(args)
  assert "kept (--overwrite rebuilds it)" in capsys.readouterr().out
  with pytest.raises(ValueError, match="no split argument"):
    tfds_builder.make_builder("jsonl", str(tmp_path / "x.jsonl"), str(tmp_path / "tfds"), splits=["val"])


def test_config_entries_read_prepared_data_and_bad_ones_are_named(tmp_path):
  from iblip_jax.data import sources
  root = _coco(tmp_path / "coco")
  tfds_builder.prepare("coco_caption", root, str(tmp_path / "tfds"))
  spec = sources.Source("coco", "config.data.datasets.coco", "coco_caption", tfds_data_dir=str(tmp_path / "tfds"))
  ds = sources.record_source(spec)
  # each record tagged with the config's name for it and where it came from (what a skip message names)
  tagged = [{**r, "source": "coco", "source_file": str(tmp_path / "tfds")} for r in readers.read_coco_caption(root)]
  assert _by_id(ds[i] for i in range(len(ds))) == _expected(tagged)
  evals = sources.read_records(spec)  # the evaluator takes images, not bytes
  assert [isinstance(r["image"], Image.Image) for r in evals] == [True, True]
  missing = sources.Source("x", "config.data.datasets.x", "coco_caption", tfds_data_dir=str(tmp_path / "tfds"),
                           tfds_name="nothing")
  assert "config.data.datasets.x.tfds_data_dir" in " ".join(sources.problems(missing))
  assert "no prepared dataset" in " ".join(sources.problems(missing))
  assert sources.problems(spec) == []


def test_bytes_decode_like_files(tmp_path):
  path = _write_image(tmp_path / "r.jpg", 5, "JPEG")
  raw = open(path, "rb").read()
  rng = lambda: np.random.default_rng(0)
  from_file = pipeline.load_example({"image": path}, rng(), image_size=8, train=False, render=_render_fixed)
  from_bytes = pipeline.load_example({"image": raw}, rng(), image_size=8, train=False, render=_render_fixed)
  np.testing.assert_array_equal(from_file["pixel_values"], from_bytes["pixel_values"])
  bad = pipeline.load_example({"image": raw[:40]}, rng(), image_size=8, train=False, render=_render_fixed)
  assert bad == {pipeline.SKIP: "unreadable_image"}


def _render_fixed(record, rng):
  del record, rng
  return "describe", "noise"


def test_training_data_from_the_config_mixes_prepared_and_jsonl_datasets_per_step(tmp_path, tok):
  import types
  from iblip_jax import config_lib, sharding
  from iblip_jax.run import settings, train
  root = _coco(tmp_path / "coco")
  tfds_builder.prepare("coco_caption", root, str(tmp_path / "tfds"))
  _write_image(tmp_path / "j.png", 9)
  with open(tmp_path / "d.jsonl", "w") as f:
    f.writelines(json.dumps({"image": "j.png", "text_input": "describe", "text_output": "noise"}) + "\n"
                 for _ in range(3))
  config = config_lib.base({})
  config.batch_size = 2
  config.data.datasets = dict(coco=dict(format="coco_caption", tfds_data_dir=str(tmp_path / "tfds")),
                              mine=dict(format="jsonl", path=str(tmp_path / "d.jsonl")))
  config.data.mixing = "step"
  config.mesh.fsdp = 1
  s = settings.resolve(config, None, "summary")   # the data checks of "train" need a tokenizer; checked below
  assert all(not settings.source_problems(source) for source in s.data.datasets)
  model = types.SimpleNamespace(config=types.SimpleNamespace(vision=types.SimpleNamespace(image_size=8)))
  mesh = sharding.make_mesh(s.mesh, jax.devices()[:1])
  datasets = {source.name: sources.record_source(source) for source in s.data.datasets}
  pipe, probs = train._data(s, datasets, tok, model, mesh)
  assert set(probs) == {"coco", "mine"}
  it = iter(pipe.dataset)
  seen = set()
  for _ in range(12):  # every batch all coco captions ("caption ...") or all jsonl answers ("noise")
    labels = next(it)["labels"]
    kinds = {t.split()[0] for t in tokenize.decode(tok, np.where(labels < 0, tok.llm.pad_token_id, labels))}
    assert len(kinds) == 1 and kinds <= {"caption", "noise"}
    seen |= kinds
  assert seen == {"caption", "noise"}
  config.data.mixing = "steps"
  with pytest.raises(settings.ConfigError, match="config.data.mixing='steps' must be"):
    settings.resolve(config, str(tmp_path / "work"), mode="train")


def test_preparing_without_the_prepare_extra_says_what_to_install(tmp_path, monkeypatch):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "importlib_resources" else real(n, *a))
  with pytest.raises(ModuleNotFoundError, match=r"iblip_jax\[prepare\]"):
    tfds_builder.prepare("coco_caption", _coco(tmp_path / "coco"), str(tmp_path / "tfds"))


def test_an_original_clip_is_stored_as_the_frames_a_video_input_uses(tmp_path):
  """A record whose "frames" is a video file (readers/video.py without extracted frames) is stored as its 4
  uniformly sampled frames (PNG), which the evaluator then uses as they are; training takes the middle one of them;
  a damaged clip is left out / skipped, named."""
  pytest.importorskip("av")
  import video_clips
  from iblip_jax.data import images
  clip = str(video_clips.write(tmp_path / "clip.mp4", 10, size=32))
  example = tfds_builder.encode({"id": 1, "frames": clip, "question": "q"}, {"question": "str"}, "frames")
  stored = [np.asarray(Image.open(io.BytesIO(b))) for b in example["frames"]]
  decoded = [np.asarray(f) for f in images.video_frames(clip, 4)]
  assert len(stored) == 4 and all(np.array_equal(a, b) for a, b in zip(stored, decoded))
  (tmp_path / "cut.mp4").write_bytes(open(clip, "rb").read()[:100])
  assert tfds_builder.encode({"id": 2, "frames": str(tmp_path / "cut.mp4")}, {}, "frames") == "missing_frames"
  render = lambda record, rng: ("q", "a")
  loaded = pipeline.load_example({"id": 1, "dataset": "msrvtt_qa", "frames": clip}, np.random.default_rng(0),
                                 image_size=16, train=False, render=render)
  np.testing.assert_allclose(loaded["pixel_values"], images.pixels(decoded[2], 16), atol=1e-6)
  bad = pipeline.load_example({"id": 2, "dataset": "msrvtt_qa", "frames": str(tmp_path / "cut.mp4")},
                              np.random.default_rng(0), image_size=16, train=False, render=render)
  assert bad == {pipeline.SKIP: "unreadable_image"}


def test_inference_and_annotation_inputs_need_no_tensorflow_datasets(tmp_path):
  """tfds is the `prepare` extra: without it the Pipeline, the servers and the JSONL/folder/tar readers import and
  work, and only a prepared dataset's use names the missing extra."""
  (tmp_path / "rows.jsonl").write_text('{"image": "a.png"}\n')
  code = f"""
import sys
sys.modules["tensorflow_datasets"] = None   # as if not installed
import iblip_jax.inference, iblip_jax.serve, iblip_jax.serve_api, iblip_jax.run.annotate
from iblip_jax.data import shards, tfds_builder
from iblip_jax.extras import MissingExtra
[shard] = shards.find({str(tmp_path / "rows.jsonl")!r})
assert [r.image for r in shards.read(shard)] == [{str(tmp_path / "a.png")!r}]
try:
  tfds_builder.data_source("/nowhere", "x")
except MissingExtra as e:
  print("MISSING:", e)
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  assert "MISSING: preparing or reading tensorflow-datasets ArrayRecord datasets needs tensorflow_datasets" in \
      out.stdout and "iblip_jax[prepare]" in out.stdout
