"""Bulk inputs (iblip_jax/data/shards.py): webdataset tars written by the `webdataset` package as img2dataset lays
them out, JSONL/CSV rows, image folders; what a broken input becomes (an error record, never a dead job)."""
import io
import json
import os

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from iblip_jax.data import shards
from iblip_jax.errors import UserError


def png(seed: int) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, "PNG")
  return out.getvalue()


def write_tar(path, samples):
  with wds.TarWriter(str(path)) as w:
    for s in samples:
      w.write(s)


def test_a_webdataset_tar_is_read_as_img2dataset_wrote_it(tmp_path):
  write_tar(tmp_path / "00000.tar", [
      {"__key__": "000000000", "jpg": png(0), "txt": "a red cat", "json": json.dumps({"url": "http://x/0"})},
      {"__key__": "000000001", "png": png(1)},
      {"__key__": "000000002", "txt": "a caption without its image"},
      {"__key__": "000000003", "webp": b"not really a webp"},   # read as bytes: decoding it is the model side's
  ])
  shard, = shards.find(str(tmp_path / "*.tar"))
  assert (shard.name, shard.kind, shard.size) == ("00000.tar", "tar", os.path.getsize(tmp_path / "00000.tar"))
  records = list(shards.read(shard))
  assert [r.key for r in records] == ["000000000", "000000001", "000000002", "000000003"]
  assert records[0].image == png(0) and records[0].meta == {"txt": "a red cat", "json": {"url": "http://x/0"}}
  assert records[1].image == png(1) and records[1].meta is None and records[1].error is None
  assert records[2].image is None and "000000002: no image member" in records[2].error
  assert records[3].image == b"not really a webp" and records[3].error is None
  assert sum(r.nbytes for r in records) <= shard.size


def test_a_cut_tar_keeps_what_came_before_and_says_where_it_broke(tmp_path):
  write_tar(tmp_path / "whole.tar", [{"__key__": f"{i:03d}", "png": png(i) * 40} for i in range(6)])
  data = (tmp_path / "whole.tar").read_bytes()
  (tmp_path / "cut.tar").write_bytes(data[:len(data) // 2])
  write_tar(tmp_path / "empty.tar", [])
  (tmp_path / "zero.tar").write_bytes(b"")
  (tmp_path / "text.tar").write_bytes(b"hello, not a tar at all" * 100)
  found = {s.name: s for s in shards.find(f"{tmp_path}/cut.tar,{tmp_path}/empty.tar,{tmp_path}/text.tar,"
                                          f"{tmp_path}/zero.tar")}
  cut = list(shards.read(found["cut.tar"]))
  assert all(r.image is not None for r in cut[:-1]) and len(cut) >= 2
  assert "the tar is cut or corrupt" in cut[-1].error and cut[-1].image is None
  assert [r.key for r in cut[:-1]] == [f"{i:03d}" for i in range(len(cut) - 1)]
  assert list(shards.read(found["empty.tar"])) == []
  zero, = shards.read(found["zero.tar"])
  assert "zero.tar: not a tar file (ReadError: empty file)" in zero.error
  text, = shards.read(found["text.tar"])
  assert "text.tar" in text.error and text.image is None


def test_jsonl_and_csv_rows_with_relative_paths_and_their_own_prompts(tmp_path):
  (tmp_path / "imgs").mkdir()
  (tmp_path / "imgs" / "a.png").write_bytes(png(0))
  (tmp_path / "rows.jsonl").write_text(
      json.dumps({"image": "imgs/a.png", "prompt": "What is it?", "key": "first"}) + "\n\n"
      + json.dumps({"image": "/abs/b.png"}) + "\n" + "{cut\n" + json.dumps({"prompt": "no image"}) + "\n"
      + json.dumps({"images": ["imgs/a.png", "imgs/a.png"]}) + "\n")
  (tmp_path / "rows.csv").write_text("image,prompt\nimgs/a.png,Describe it.\nimgs/a.png,\n")
  (tmp_path / "bad.csv").write_text("path,prompt\nimgs/a.png,x\n")
  found = {s.name: s for s in shards.find(f"{tmp_path}/rows.jsonl,{tmp_path}/rows.csv,{tmp_path}/bad.csv")}
  rows = list(shards.read(found["rows.jsonl"]))
  assert [(r.key, r.image, r.prompt) for r in rows[:2]] == [
      ("first", f"{tmp_path}/imgs/a.png", "What is it?"), ("line 3", "/abs/b.png", None)]
  assert "line 4: not a JSON object" in rows[2].error and "line 5: expected an \"image\" path" in rows[3].error
  assert rows[4].image == [f"{tmp_path}/imgs/a.png"] * 2 and rows[4].key == "line 6"
  csv_rows = list(shards.read(found["rows.csv"]))
  assert [(r.image, r.prompt) for r in csv_rows] == [(f"{tmp_path}/imgs/a.png", "Describe it."),
                                                      (f"{tmp_path}/imgs/a.png", None)]
  bad, = shards.read(found["bad.csv"])
  assert "bad.csv" in bad.error and "\"image\" column" in bad.error


def test_a_folder_is_its_images_recursively_in_shards_and_names_are_unique(tmp_path):
  for sub in ("a", "a/deep", "b"):
    (tmp_path / "photos" / sub).mkdir(parents=True)
  names = ["a/1.jpg", "a/deep/2.PNG", "b/3.webp", "b/4.jpeg", "b/5.bmp"]
  for n in names:
    (tmp_path / "photos" / n).write_bytes(png(0))
  (tmp_path / "photos" / "b" / "notes.txt").write_text("not an image")
  found = shards.find(str(tmp_path / "photos"), folder_shard=2)
  assert [s.name for s in found] == ["photos.part-00000", "photos.part-00001", "photos.part-00002"]
  keys = [r.key for s in found for r in shards.read(s)]
  assert keys == sorted(names)
  # two folders' tars with the same file name stay apart
  for d in ("x", "y"):
    (tmp_path / d).mkdir()
    write_tar(tmp_path / d / "00000.tar", [{"__key__": "k", "png": png(0)}])
  assert [s.name for s in shards.find(f"{tmp_path}/x/00000.tar,{tmp_path}/y/00000.tar")] == ["x__00000.tar",
                                                                                            "y__00000.tar"]


def test_spec_mistakes_are_named(tmp_path):
  (tmp_path / "notes.txt").write_text("x")
  (tmp_path / "empty").mkdir()
  for spec, message in [(str(tmp_path / "*.tar"), "matches nothing"), (str(tmp_path / "nope"), "no such file"),
                        (str(tmp_path / "notes.txt"), "is not a webdataset tar"), ("", "is empty"),
                        (str(tmp_path / "empty"), "holds no tars"),
                        (f"{tmp_path}/notes.txt,{tmp_path}/notes.txt", "is not a webdataset tar")]:
    with pytest.raises(UserError, match=message):
      shards.find(spec)


def test_a_shard_that_cannot_be_opened_is_unreadable_not_an_error_record(tmp_path):
  os.symlink(tmp_path / "gone.tar", tmp_path / "0.tar")   # listed by the glob, gone when opened
  shard, = shards.find(str(tmp_path / "*.tar"))
  with pytest.raises(shards.UnreadableShard, match="0.tar: cannot be opened"):
    list(shards.read(shard))


def test_a_prepared_dataset_is_read_by_index_in_shards(tmp_path):
  """ArrayRecord shards written by our tensorflow-datasets builder: each split in shards of records read by index,
  the image bytes as the file's, the record's other fields as meta."""
  from iblip_jax.data import tfds_builder
  for i in range(5):
    (tmp_path / f"{i}.png").write_bytes(png(i))
  (tmp_path / "data.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "text_input": f"caption {i}",
                                                           "text_output": "x"}) + "\n"
                                               for i in range(5)))
  tfds_builder.prepare("jsonl", str(tmp_path / "data.jsonl"), str(tmp_path / "tfds"), name="mine")
  found = shards.find(str(tmp_path / "tfds" / "mine" / "1.0.0"), folder_shard=2)
  assert [(s.name, s.kind, s.start, s.stop) for s in found] == [
      ("mine.1.0.0.train.part-00000", "tfds", 0, 2), ("mine.1.0.0.train.part-00001", "tfds", 2, 4),
      ("mine.1.0.0.train.part-00002", "tfds", 4, 5)]
  records = [r for s in found for r in shards.read(s)]
  assert [r.key for r in records] == [f"train/{i}" for i in range(5)]
  assert sorted(r.image for r in records) == sorted(png(i) for i in range(5))
  assert sorted(r.meta["text_input"] for r in records) == [f"caption {i}" for i in range(5)]
  by_caption = {r.meta["text_input"]: r.image for r in records}
  assert all(by_caption[f"caption {i}"] == png(i) for i in range(5))


def test_output_names_that_would_collide_are_refused(tmp_path):
  (tmp_path / "a").mkdir()
  for path in (tmp_path / "a" / "b.tar", tmp_path / "a__b.tar"):
    write_tar(path, [{"__key__": "k", "png": png(0)}])
  with pytest.raises(UserError, match="shards whose output names collide: a__b.tar"):
    shards.find(f"{tmp_path}/a/b.tar,{tmp_path}/a__b.tar")


def test_a_read_that_fails_midway_leaves_the_shard_for_the_next_run(tmp_path):
  """A network error in the middle of a tar is not a cut tar: the shard stays unfinished (retried), rather than
  ending with an error row and being marked done with its later records never answered."""
  write_tar(tmp_path / "0.tar", [{"__key__": f"{i:03d}", "png": png(i) * 40} for i in range(6)])
  shard, = shards.find(str(tmp_path / "0.tar"))

  class Flaky(io.BytesIO):
    def read(self, n=-1):
      if self.tell() > 20_000:
        raise ConnectionResetError("connection reset by peer")
      return super().read(n)

  records = shards._tar(shard, Flaky((tmp_path / "0.tar").read_bytes()))
  with pytest.raises(shards.UnreadableShard, match="reading failed after .*ConnectionResetError"):
    list(records)
