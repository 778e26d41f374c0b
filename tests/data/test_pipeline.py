"""The grain pipeline: bad input is skipped and counted or converted, never fatal; iterator state resumes exactly."""
import io

import numpy as np
import pytest
from PIL import Image

from iblip_jax.data import mixture, pipeline, tokenize, word_tokenizers

WORDS = "a red blue circle square what color is it caption".split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok")
  word_tokenizers.build(WORDS, str(path))
  return tokenize.load_tokenizers(str(path), max_input_len=8, max_output_len=6)


def _png(path, array, **save):
  Image.fromarray(array).save(path, **save)
  return str(path)


def _records(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  good = _png(tmp_path / "good.png", rgb)
  truncated = tmp_path / "truncated.png"
  truncated.write_bytes(open(good, "rb").read()[:200])
  garbage = tmp_path / "garbage.jpg"
  garbage.write_bytes(b"\xff\xd8 not an image at all")
  exif = Image.Exif()
  exif[0x0112] = 6
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format="JPEG", exif=exif)
  (tmp_path / "rotated.jpg").write_bytes(buf.getvalue())
  odd = {
      "gray": _png(tmp_path / "gray.png", rgb[:, :, 0]),
      "rgba": _png(tmp_path / "rgba.png", np.dstack([rgb, rgb[:, :, :1]])),
      "cmyk": str(tmp_path / "cmyk.jpg"), "palette": str(tmp_path / "palette.png"),
      "16bit": _png(tmp_path / "16bit.png", (rgb[:, :, 0].astype(np.uint16) * 257)),
      "exif": str(tmp_path / "rotated.jpg"),
  }
  Image.fromarray(rgb).convert("CMYK").save(odd["cmyk"])
  Image.fromarray(rgb).convert("P").save(odd["palette"])
  ok = lambda image, **kw: {"image": image, "text_input": "what color is it", "text_output": "red", **kw}
  records = [ok(good)] + [ok(p, kind=k) for k, p in odd.items()] + [
      ok(str(tmp_path / "missing.png")), ok(str(truncated)), ok(str(garbage)),
      ok(good, text_output=""), ok(good, text_input="   "), ok(good, text_output=b"\xff\xfe bad utf8"),
      ok(good, text_input="a " * 500),  # over-long: truncated by the tokenizer, kept
  ]
  return records


def test_bad_input_is_skipped_and_counted_odd_images_are_converted(tmp_path, tok):
  records = _records(tmp_path)
  p = pipeline.build(mixture.source(records), tok, batch_size=8, image_size=30, seed=0, train=False)
  batches = list(p.dataset)
  assert len(batches) == 1  # 8 usable: 1 good + 6 odd kinds + 1 over-long
  b = batches[0]
  assert b["pixel_values"].shape == (8, 30, 30, 3) and np.isfinite(b["pixel_values"]).all()
  assert b["input_ids"].shape[1] <= 8 and b["attention_mask"].sum(1).max() == 8  # the long one was truncated
  assert dict(p.skipped.counts) == {"missing_image": 1, "unreadable_image": 2, "empty_or_invalid_text": 3}


def test_training_crops_are_random_but_reproducible(tmp_path, tok):
  records = [r for r in _records(tmp_path)[:1]] * 4
  run = lambda: next(iter(pipeline.build(mixture.source(records), tok, batch_size=4, image_size=30, seed=5,
                                         train=True).dataset))["pixel_values"]
  a, b = run(), run()
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a[0], a[1])  # different crops of the same image


def test_random_resized_crop_box():
  image = Image.new("RGB", (200, 100))
  rng = np.random.default_rng(0)
  for _ in range(200):
    w, h = pipeline.random_resized_crop(image, rng).size
    assert 0.5 * 200 * 100 * 0.97 <= w * h <= 200 * 100 and 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05


def test_resuming_from_iterator_state_gives_the_same_batches(tmp_path, tok):
  rng = np.random.default_rng(1)
  recs = {n: [{"image": rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), "text_input": f"what color {n}",
               "text_output": ["red", "blue"][i % 2]} for i in range(7 + 5 * k)]
          for k, n in enumerate(["a", "b"])}
  datasets = {n: mixture.source(r) for n, r in recs.items()}
  make = lambda: pipeline.build(mixture.mix(datasets, mixture.weights({n: len(r) for n, r in recs.items()}),
                                            seed=2), tok, batch_size=3, image_size=16, seed=7).dataset
  it = iter(make())
  for _ in range(4):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(5)]
  resumed = iter(make())
  resumed.set_state(state)
  for w in want:
    got = next(resumed)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])


def test_worker_processes_give_the_same_batches(tmp_path, tok):
  records = [r for r in _records(tmp_path)]
  one = list(pipeline.build(mixture.source(records), tok, batch_size=4, image_size=16, seed=0, train=False).dataset)
  two = pipeline.build(mixture.source(records), tok, batch_size=4, image_size=16, seed=0, train=False, workers=2)
  many = list(two.dataset)
  assert len(one) == len(many) == 2
  for a, b in zip(one, many):
    np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
  assert sum(two.skipped.counts.values()) == 6
