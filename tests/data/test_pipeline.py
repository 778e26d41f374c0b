"""The grain pipeline: bad input is skipped and counted or converted, never fatal; iterator state resumes exactly."""
import collections
import dataclasses
import contextlib
import io
import json
import math
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import warnings
import zlib

import numpy as np
import psutil
import pytest
from PIL import Image

from iblip_jax.data import mixture, pipeline, readers, tokenize
from iblip_jax.demo import word_tokenizers

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
  p = pipeline.build(mixture.source(records), tok, batch_size=len(records), image_size=30, seed=0, train=False)
  batches = list(p.dataset)
  assert len(batches) == 1
  b = batches[0]
  assert b["pixel_values"].shape == (14, 30, 30, 3) and np.isfinite(b["pixel_values"]).all()
  assert b["input_ids"].shape[1] <= 8 and b["attention_mask"].sum(1).max() == 8  # the long one was truncated
  assert dict(p.skipped.counts) == {"missing_image": 1, "unreadable_image": 2, "empty_or_invalid_text": 3}
  # 8 usable (1 good + 6 odd kinds + 1 over-long) come first; the 6 skipped rows are repeats of them
  np.testing.assert_array_equal(b["pixel_values"][8:], b["pixel_values"][:6])
  assert len({row.tobytes() for row in b["input_ids"][:8]}) == 2   # the short prompt and the truncated long one


def _bilevel_png(path, width: int, height: int) -> str:
  """A valid all-black 1-bit PNG written by hand: a few KB on disk whatever its pixel count."""
  chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale, no interlace
  rows = zlib.compress((b"\0" + bytes((width + 7) // 8)) * height, 9)  # filter byte 0 + packed pixels per row
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
  return str(path)


def _load(image):
  record = {"image": image, "text_input": "what color is it", "text_output": "red"}
  return pipeline.load_example(record, np.random.default_rng(0), image_size=8, train=False,
                               render=pipeline.record_texts)


def test_decompression_bomb_is_an_unreadable_image(tmp_path):
  """200 megapixels (over PIL's 179M limit): PIL raises DecompressionBombError, which is no OSError."""
  bomb = _bilevel_png(tmp_path / "bomb.png", 20000, 10000)
  assert (tmp_path / "bomb.png").stat().st_size < 100_000
  with pytest.raises(Image.DecompressionBombError):
    Image.open(bomb)
  assert _load(bomb) == {pipeline.SKIP: "unreadable_image"}
  assert _load((tmp_path / "bomb.png").read_bytes()) == {pipeline.SKIP: "unreadable_image"}  # as encoded bytes


def test_decompression_bomb_warning_does_not_skip_a_usable_image(tmp_path, monkeypatch):
  """Between MAX_IMAGE_PIXELS and twice that PIL only warns: the image is used even when warnings are errors. The
  limit is lowered (PIL reads it at each open) so that a 40 x 40 image is in that range, instead of decoding 90M
  pixels."""
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  path = _bilevel_png(tmp_path / "big.png", 40, 40)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    with pytest.raises(Image.DecompressionBombWarning):
      Image.open(path)
    out = _load(path)
  black = (0 - pipeline.preprocess.CLIP_MEAN) / pipeline.preprocess.CLIP_STD
  assert out["pixel_values"].shape == (8, 8, 3) and np.allclose(out["pixel_values"], black, atol=1e-6)


def test_lone_surrogate_text_is_skipped(tmp_path, tok):
  """json.loads turns the escape \\ud800 into a lone surrogate, which UTF-8 cannot encode (the tokenizer raised
  TypeError): that example is skipped, the rest of the file trains."""
  rgb = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
  _png(tmp_path / "good.png", rgb)
  bad = {"image": "good.png", "text_input": "what color \ud800", "text_output": "red"}
  assert pipeline.load_example(bad | {"image": str(tmp_path / "good.png")}, np.random.default_rng(0), image_size=8,
                               train=False, render=pipeline.record_texts) == {pipeline.SKIP: "empty_or_invalid_text"}
  lines = [f'{{"image": "good.png", "text_input": "what color is it", "text_output": "{a}"}}'
           for a in ("red", "blue", "red")]
  lines.insert(1, '{"image": "good.png", "text_input": "what color \\ud800", "text_output": "red"}')
  (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
  records = list(readers.read_jsonl(str(tmp_path / "train.jsonl")))
  assert records[1]["text_input"] == "what color \ud800"  # the reader hands it on; the pipeline decides
  p = pipeline.build(mixture.source(records), tok, batch_size=3, image_size=8, seed=0, train=False)
  batches = list(p.dataset)
  assert len(batches) == 1 and batches[0]["pixel_values"].shape == (3, 8, 8, 3)
  assert tokenize.decode(tok, np.where(batches[0]["labels"] < 0, 0, batches[0]["labels"])) == ["red", "blue", "red"]
  assert dict(p.skipped.counts) == {"empty_or_invalid_text": 1} and p.skipped.total == 1
  assert p.skipped.summary() == "1 skipped: 1 empty_or_invalid_text"


def test_skip_summary_for_people():
  counter = pipeline.SkipCounter()
  assert counter.total == 0 and counter.summary() == "none skipped"
  examples = [{pipeline.SKIP: "unreadable_image"}, {"pixel_values": 0}, {pipeline.SKIP: "empty_or_invalid_text"},
              {pipeline.SKIP: "unreadable_image"}, {pipeline.SKIP: "missing_image"}]
  assert [counter(e) for e in examples] == [False, True, False, False, False]
  assert counter.total == 4
  # most frequent first, ties in name order
  assert counter.summary() == "4 skipped: 2 unreadable_image, 1 empty_or_invalid_text, 1 missing_image"


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
  assert len(one) == len(many) == 3   # 14 records: 3 batches of 4
  for a, b in zip(one, many):
    np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
  # the third batch (records 8-11) has no usable example: it is filled from the nearest batch that has some;
  # records 12-13 are the incomplete last batch, dropped unread
  assert two.skipped.counts == {"missing_image": 1, "unreadable_image": 2, "empty_or_invalid_text": 2,
                                "batch_without_good_examples": 1}
  np.testing.assert_array_equal(one[2]["pixel_values"][:3], one[1]["pixel_values"][:3])


@pytest.mark.slow
@pytest.mark.parametrize("per_step", [False, True])
def test_processes_share_every_global_batch_exactly(tok, per_step):
  """Global batch k is records [kB, (k+1)B) of the stream whatever the number of processes: process p's rows are
  its contiguous share, with the same random crops (one generator per record, from its place in the stream)."""
  sizes = {"a": 10, "b": 30, "c": 5}
  datasets, probs = _step_datasets(sizes), mixture.weights(sizes)
  def make(batch_size, p=0, n=1):
    mixed = mixture.mix(datasets, probs, seed=1, **(dict(batch_size=batch_size * n, batch_fn=list) if per_step
                                                    else {}))
    return iter(pipeline.build(mixed, tok, batch_size=batch_size, image_size=8, seed=5, train=True,
                               per_step=per_step, process_index=p, process_count=n).dataset)
  whole, parts = make(4), [make(1, p, 4) for p in range(4)]
  for _ in range(12):
    w = next(whole)
    shares = [next(part) for part in parts]
    for p, share in enumerate(shares):
      np.testing.assert_array_equal(share["pixel_values"][0], w["pixel_values"][p])
      labels = lambda x: x[x != -100]   # widths are agreed later, between hosts (sharding.agree_shapes)
      np.testing.assert_array_equal(labels(share["labels"][0]), labels(w["labels"][p]))


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


_ITERATE_FOREVER = textwrap.dedent("""
    import sys
    import numpy as np
    from PIL import Image
    from iblip_jax.data import mixture, pipeline, tokenize
    from iblip_jax.demo import word_tokenizers
    d = sys.argv[1]
    word_tokenizers.build("a red what color is it".split(), d)
    tok = tokenize.load_tokenizers(d, max_input_len=8, max_output_len=6)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d + "/x.png")
    records = [{"image": d + "/x.png", "text_input": "what color is it", "text_output": "red"}] * 4
    pipe = pipeline.build(mixture.source(records).repeat(), tok, batch_size=2, image_size=16, seed=0, workers=1)
    for i, _ in enumerate(pipe.dataset):
      if i == 0:
        print("iterating", flush=True)
""")


def _until(predicate, timeout: float) -> bool:
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if predicate():
      return True
    time.sleep(0.1)
  return predicate()


def _alive(proc: psutil.Process) -> bool:
  return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE


@pytest.mark.slow
def test_worker_processes_die_with_a_killed_main_process(tmp_path):
  """SIGKILL leaves the main process no chance to stop its grain workers; they must notice and go by themselves,
  and multiprocessing's resource tracker with them."""
  main = subprocess.Popen([sys.executable, "-c", _ITERATE_FOREVER, str(tmp_path)], stdout=subprocess.PIPE,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  children = []
  try:
    assert main.stdout.readline() == b"iterating\n"
    children = psutil.Process(main.pid).children(recursive=True)
    kinds = {c.pid: " ".join(c.cmdline()) for c in children}
    assert any("spawn_main" in k for k in kinds.values()), kinds   # the grain worker
    assert any("resource_tracker" in k for k in kinds.values()), kinds
    os.kill(main.pid, signal.SIGKILL)
    main.wait(timeout=10)
    assert _until(lambda: not any(_alive(c) for c in children), timeout=10), \
        {kinds[c.pid]: c.status() for c in children if _alive(c)}
  finally:  # never leave a process behind, whatever failed
    main.kill()
    for c in children:
      if _alive(c):
        c.kill()


# --- datasets that cannot train, skip rates ---------------------------------------------------------------------------


def test_skip_counter_reports_recent_rate_per_dataset():
  counter = pipeline.SkipCounter(window=2)
  ok, bad = lambda d: (d, None, None), lambda d, k: (d, "missing_image", f"{d} record {k}: /x/{k}.jpg not found")
  counter.update([ok("coco"), bad("sqa", 1), bad("sqa", 2), ok("coco")])
  assert counter.recent_rate() == 0.5 and counter.report(0.1, min_batches=2) is None  # one batch: too early
  counter.update([ok("coco")] * 4, markers=["batch_without_good_examples"])
  assert counter.recent_counts() == {"coco": [0, 6], "sqa": [2, 2]} and counter.recent_rate() == 0.25
  report = counter.report(0.1, min_batches=2)
  assert report.startswith("input: 25.0% of recent examples skipped (threshold 10.0%): sqa 100.0% (2/2)")
  assert "first: sqa record 1: /x/1.jpg not found" in report and "coco" not in report  # datasets without skips
  assert counter.report(0.25, min_batches=2) is None  # at the threshold: quiet
  counter.update([ok("coco")] * 4)  # the window (2 batches) has moved past the bad one
  assert counter.recent_rate() == 0.0 and counter.recent_counts() == {"coco": [0, 8]}
  # over the run: per dataset and per reason, the marker counted by reason only
  assert counter.dataset_counts() == {"coco": [0, 10], "sqa": [2, 2]}
  assert counter.counts == {"missing_image": 2, "batch_without_good_examples": 1} and counter.total == 3
  assert counter.first_reasons == {"sqa": ["sqa record 1: /x/1.jpg not found", "sqa record 2: /x/2.jpg not found"]}
  # counts from several processes, summed by the caller, give the same report
  assert pipeline.skip_report({"a": [1, 4], "b": [3, 4]}, 0.2).startswith(
      "input: 50.0% of recent examples skipped (threshold 20.0%): b 75.0% (3/4), a 25.0% (1/4)")


@contextlib.contextmanager
def _deadline(seconds: int):
  """TimeoutError if the block runs longer: a stream that never stops fails the test instead of hanging it."""
  def expire(signum, frame):
    raise TimeoutError(f"still running after {seconds} s")
  previous = signal.signal(signal.SIGALRM, expire)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _labelled_records(tmp_path, name, n, bad=False):
  image = _png(tmp_path / f"{name}.png", np.zeros((6, 6, 3), np.uint8))
  return [{"id": k, "dataset": name, "image": str(tmp_path / "gone.png") if bad else image,
           "text_input": "what color is it", "text_output": "red"} for k in range(n)]


@pytest.mark.parametrize("process_count", [1, 2])
def test_a_dataset_whose_first_records_all_fail_stops_the_stream_naming_it(tmp_path, tok, process_count):
  """Mixed with a good dataset, an all-bad one never leaves a share empty, so nothing else would stop it: it
  would train on the other data for good. Every process stops on its own share."""
  datasets = {"good": mixture.source(_labelled_records(tmp_path, "good", 20)),
              "broken": mixture.source(_labelled_records(tmp_path, "broken", 20, bad=True))}
  mixed = mixture.mix(datasets, {"good": 0.5, "broken": 0.5}, seed=0)
  for p in range(process_count):
    pipe = pipeline.build(mixed, tok, batch_size=2, image_size=8, seed=0, check_first=8, process_index=p,
                          process_count=process_count)
    with _deadline(10), pytest.raises(pipeline.BadDatasetError) as e:
      for _ in pipe.dataset:  # infinite: only the error ends it
        pass
    message = str(e.value)
    assert message.startswith("dataset 'broken': the first 8 records loaded by this process all failed "
                              "(8 missing_image); first reasons: broken record ")
    assert message.count("gone.png not found") == 3 and "'good'" not in message


def test_lookaround_error_names_the_datasets_and_reasons(tmp_path, tok):
  records = _labelled_records(tmp_path, "broken", 12, bad=True)
  records[3]["text_output"] = ""
  with pytest.raises(pipeline.BadDatasetError, match=r"no readable example in 33 consecutive batches of this "
                     r"process's data: broken: 12 records \(11 missing_image, 1 empty_or_invalid_text\), first "
                     r"reasons: broken record 0: \S+gone.png not found"):
    next(iter(pipeline.build(mixture.source(records), tok, batch_size=2, image_size=8, seed=0,
                             check_first=0).dataset))


def test_probe_checks_every_dataset_before_the_first_batch(tmp_path, tok):
  """check_datasets loads each dataset's records in order until one is good: all bad datasets are named together,
  in one error, before anything is iterated; a good dataset costs one load."""
  loads = collections.Counter()

  def render(record, rng):
    loads[record["dataset"]] += 1
    return pipeline.record_texts(record, rng)
  probe = {"good": _labelled_records(tmp_path, "good", 50),
           "broken": _labelled_records(tmp_path, "broken", 50, bad=True),
           "mute": [dict(r, text_output=" ") for r in _labelled_records(tmp_path, "mute", 5)]}
  with pytest.raises(pipeline.BadDatasetError) as e:
    pipeline.build(mixture.source(probe["good"]), tok, batch_size=2, image_size=8, seed=0, render=render,
                   probe=probe, check_first=10)
  lines = str(e.value).splitlines()
  assert len(lines) == 2
  assert lines[0].startswith("dataset 'broken': the first 10 records in its source all failed (10 missing_image); "
                             "first reasons: broken record 0: ")
  assert lines[1].startswith("dataset 'mute': the first 5 records in its source all failed (5 empty_or_invalid_text)")
  assert loads == {"good": 1, "broken": 10, "mute": 5}
  pipeline.build(mixture.source(probe["good"]), tok, batch_size=2, image_size=8, seed=0, probe={"good": probe["good"]})


def test_video_records_train_on_their_middle_frame(tmp_path):
  frames = [_png(tmp_path / f"f{k}.png", np.full((6, 6, 3), 40 * k, np.uint8)) for k in range(5)]
  record = {"dataset": "msvd_qa", "id": 1, "frames": frames, "text_input": "what", "text_output": "red"}
  load = lambda r: pipeline.load_example(r, np.random.default_rng(0), image_size=6, train=False,
                                         render=pipeline.record_texts)
  middle = load({**record, "frames": [], "image": frames[2]})
  np.testing.assert_array_equal(load(record)["pixel_values"], middle["pixel_values"])
  assert load({**record, "frames": []}) == {pipeline.SKIP: "missing_image"}  # frames not extracted


def _mixed_length_records(n: int, seed: int = 0):
  """Short answers and long ones, as VQA and LLaVA mix: padding follows the longest of a batch."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    long = rng.random() < 0.15
    words = rng.choice(WORDS, int(rng.integers(30, 60) if long else rng.integers(1, 3)))
    out.append({"image": rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "text_input": "what color is it",
                "text_output": " ".join(words)})
  return out


def _padding(batches) -> float:
  real = sum(int(b["decoder_attention_mask"].sum()) for b in batches)
  return 1 - real / sum(b["decoder_attention_mask"].size for b in batches)


def test_grouping_by_length_cuts_padding_and_keeps_every_example(tok):
  long_tok = dataclasses.replace(tok, max_output_len=64)
  records = _mixed_length_records(256)
  build = lambda **kw: pipeline.build(mixture.source(records), long_tok, batch_size=8, image_size=8, seed=3,
                                      train=False, **kw)
  plain = list(build().dataset)
  grouped_pipe = build(group_by_length=8, fitted_buckets=3)
  grouped = list(grouped_pipe.dataset)
  assert len(plain) == len(grouped) == 32
  labels = lambda bs: sorted(tuple(r[r != -100]) for b in bs for r in b["labels"])
  assert labels(plain) == labels(grouped)   # the same examples, regrouped within each window of 8 batches
  assert _padding(grouped) < 0.65 * _padding(plain)   # short targets still round up to 8 (TPU tiles)


def test_length_grouped_batches_are_split_exactly_over_processes(tok):
  long_tok = dataclasses.replace(tok, max_output_len=64)
  records = _mixed_length_records(128, seed=1)
  make = lambda b, p, n: iter(pipeline.build(mixture.source(records), long_tok, batch_size=b, image_size=8, seed=3,
                                             train=True, group_by_length=4, process_index=p,
                                             process_count=n).dataset)
  whole, parts = make(4, 0, 1), [make(2, p, 2) for p in range(2)]
  for _ in range(8):
    w = next(whole)
    for p, part in enumerate(parts):
      share = next(part)
      np.testing.assert_array_equal(share["pixel_values"], w["pixel_values"][2 * p:2 * p + 2])


def test_skips_name_the_configured_dataset_and_its_file(tmp_path, tok):
  """Two JSONL sources are both "jsonl" to their reader: a skip names the dataset as the config does and the file it
  came from, and counts it under that name."""
  from iblip_jax.data import sources
  for name in ("captions", "questions"):
    rows = [{"image": "gone.png" if i == 1 else "ok.png", "text_input": "a red", "text_output": "red"}
            for i in range(4)]
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
  spec = lambda n: sources.Source(n, f"config.data.datasets.{n}", "jsonl", str(tmp_path / f"{n}.jsonl"))
  records = sources.read_records(spec("questions"))
  example, why = pipeline._load_example(records[1], np.random.default_rng(0), image_size=8, train=False,
                                        render=pipeline.record_texts)
  assert example == {pipeline.SKIP: "missing_image"}
  assert why == f"questions record 2 ({tmp_path / 'questions.jsonl'}): {tmp_path / 'gone.png'} not found"
  pipe = pipeline.build(mixture.source(records), tok, batch_size=4, image_size=8, seed=0, check_first=0)
  next(iter(pipe.dataset))
  assert pipe.skipped.dataset_counts() == {"questions": [1, 4]}
