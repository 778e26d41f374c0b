"""The grain pipeline: bad input is skipped and counted or converted, never fatal; iterator state resumes exactly."""
import collections
import io
import math

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


# --- per-step mixing (LAVIS: every global batch from one dataset) -----------------------------------------------------

STEP_ANSWERS = {"a": "red", "b": "blue", "c": "circle"}  # each dataset's one answer: a batch's labels name its dataset


def _step_datasets(sizes, bad_every: int = 0):
  rng = np.random.default_rng(3)
  out = {}
  for n, size in sizes.items():
    recs = [{"image": rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "text_input": f"what color {n}",
             "text_output": STEP_ANSWERS[n]} for _ in range(size)]
    if bad_every:
      for r in recs[::bad_every]:
        r["text_output"] = ""
    out[n] = mixture.source(recs)
  return out


def _step_pipeline(tok, datasets, probs, *, batch_size=2, process_index=0, process_count=1, seed=4):
  mixed = mixture.mix(datasets, probs, seed=seed, batch_size=batch_size * process_count, batch_fn=list)
  return pipeline.build(mixed, tok, batch_size=batch_size, image_size=8, seed=seed, train=True, per_step=True,
                        process_index=process_index, process_count=process_count)


def _dataset_of(tok, batch) -> str:
  answers = set(tokenize.decode(tok, np.where(batch["labels"] < 0, tok.llm.pad_token_id, batch["labels"])))
  assert len(answers) == 1, f"a per-step batch mixes datasets: {answers}"
  return {v: k for k, v in STEP_ANSWERS.items()}[answers.pop()]


def test_per_step_batches_are_single_dataset_in_mixture_proportion(tok):
  sizes = {"a": 40, "b": 160, "c": 9}
  probs = mixture.weights(sizes)
  it = iter(_step_pipeline(tok, _step_datasets(sizes), probs).dataset)
  n = 1500
  counts = collections.Counter(_dataset_of(tok, next(it)) for _ in range(n))
  for name, p in probs.items():
    sigma = math.sqrt(p * (1 - p) / n)
    assert counts[name] / n == pytest.approx(p, abs=4 * sigma)


def test_per_step_resumes_from_iterator_state_with_the_same_batches(tok):
  sizes = {"a": 7, "b": 12}
  probs = mixture.weights(sizes)
  make = lambda: _step_pipeline(tok, _step_datasets(sizes, bad_every=5), probs, batch_size=3).dataset
  it = iter(make())
  for _ in range(6):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(8)]
  resumed = iter(make())
  resumed.set_state(state)
  for w in want:
    got = next(resumed)
    assert got.keys() == w.keys()
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])


def test_per_step_processes_train_on_the_same_dataset_each_step(tok):
  sizes = {"a": 10, "b": 30, "c": 5}
  probs = mixture.weights(sizes)
  datasets = _step_datasets(sizes)
  whole = iter(_step_pipeline(tok, datasets, probs, batch_size=4).dataset)
  parts = [iter(_step_pipeline(tok, datasets, probs, batch_size=2, process_index=p, process_count=2).dataset)
           for p in range(2)]
  for _ in range(30):
    w, p0, p1 = next(whole), next(parts[0]), next(parts[1])
    assert _dataset_of(tok, w) == _dataset_of(tok, p0) == _dataset_of(tok, p1)


def test_per_step_skipped_examples_are_replaced_within_their_batch(tok):
  sizes = {"a": 6, "b": 6}
  datasets = _step_datasets(sizes, bad_every=2)  # half of each dataset has an empty answer
  p = _step_pipeline(tok, datasets, mixture.weights(sizes), batch_size=4)
  it = iter(p.dataset)
  for _ in range(20):
    batch = next(it)
    assert batch["pixel_values"].shape[0] == 4
    _dataset_of(tok, batch)
  assert p.skipped.counts["empty_or_invalid_text"] >= 20 and "batch_without_good_examples" not in p.skipped.counts
  wrong = mixture.mix(datasets, mixture.weights(sizes), seed=0, batch_size=4, batch_fn=list)  # not x 2 processes
  with pytest.raises(ValueError, match="global batch"):
    next(iter(pipeline.build(wrong, tok, batch_size=4, image_size=8, seed=0, per_step=True, process_count=2).dataset))
