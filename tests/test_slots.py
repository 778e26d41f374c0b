"""Continuous batching (iblip_jax.slots) on tiny T5 and Vicuna checkpoints: requests of mixed prompt and answer
lengths that join and leave three slots mid-flight get the Pipeline's answers (greedy: num_beams=1; sampled: the
same seed's samples), a short request submitted with a long one ends first, the compiled programs do not grow with
the requests, stop strings cut the answer (and the stream holds back what may be one), cancelled and timed-out
requests free their slots."""
import threading
import time

import numpy as np
import pytest

import oracle
from iblip_jax import slots as slots_lib
from iblip_jax.data import images
from iblip_jax.inference import Pipeline

WORDS = ("what color is the cat dog red blue green a picture of where left right sky describe this image short "
         "answer question please tell me about and in detail").split()
SHORT = ["what color is the cat", "describe this image", "where is the dog"]
# past the first token bucket (8): another prefill program, a wider prompt padded into the slots
LONG = ["please tell me about the cat and the dog in this picture and describe the sky in detail"]
WIDTH = 12
PENALTY = 1.3

# one worker runs every test here, so that each model's `served` (its compile takes a minute) is built once
pytestmark = pytest.mark.xdist_group("slots")


@pytest.fixture(scope="module", params=["t5", "vicuna"])
def served(request, tmp_path_factory):
  llama = request.param == "vicuna"
  pipe = Pipeline.from_pretrained(oracle.word_checkpoint(tmp_path_factory.mktemp("slots") / request.param, WORDS,
                                                         llama=llama, seed=11 if llama else 12))
  # caches sized for two images: one-image requests run padded in them (and must still equal the Pipeline)
  slots = slots_lib.Slots(pipe.engine, slots=3, width=WIDTH, max_waiting=16, prefill_batch=2, max_images=2)
  slots.warm_up(progress=False)
  slots.start()
  yield pipe, slots
  slots.stop()


def _images(n: int):
  rng = np.random.default_rng(3)
  return [rng.integers(0, 256, (24 + 5 * i, 30, 3), dtype=np.uint8) for i in range(n)]


class Collector:
  """A request's events, and when it ended."""

  def __init__(self):
    self.events, self.ended = [], threading.Event()
    self.end_time = None

  def __call__(self, event):
    self.events.append(event)
    if event[0] == "end":
      self.end_time = time.monotonic()
      self.ended.set()

  def streamed(self, choice: int = 0) -> str:
    return "".join(e[2] for e in self.events if e[0] == "token" and e[1] == choice)


def _request(pipe, image, prompt, **settings):
  c = Collector()
  return slots_lib.Request(images.pixels(image, pipe.image_size), prompt, c, **settings), c


def _wait(*collectors, timeout=120):
  for c in collectors:
    assert c.ended.wait(timeout), c.events


def test_answers_equal_the_pipelines_while_requests_join_and_leave(served):
  pipe, slots = served
  compiled = slots.compiled_programs()
  prompts = SHORT + LONG + SHORT[:2]
  ims = _images(len(prompts))
  lengths = [WIDTH, 3, 8, WIDTH, 5, 10]
  sampled = {1: 7, 4: 3}          # request index -> seed (n=2 samples each); the others are greedy
  requests = []
  for i, (im, p) in enumerate(zip(ims, prompts)):   # 8 rows for 3 slots: most wait and join mid-flight
    settings = dict(max_tokens=lengths[i], repetition_penalty=PENALTY)
    if i in sampled:
      settings.update(n=2, temperature=1.3, top_k=20, top_p=0.95, seed=sampled[i])
    else:
      settings.update(temperature=0)
    requests.append(_request(pipe, im, p, **settings))
  before = dict(slots.stats)
  # a request holding every slot first: the others all wait, and when it ends they are prefilled in pairs
  blocker, blocker_c = _request(pipe, ims[0], SHORT[0], n=3, max_tokens=WIDTH, min_tokens=WIDTH, temperature=0)
  slots.submit(blocker)
  deadline = time.monotonic() + 60
  while slots.active < 3 and time.monotonic() < deadline:
    time.sleep(0.01)
  for r, _ in requests:
    slots.submit(r)
  _wait(blocker_c, *(c for _, c in requests))
  prefills = slots.stats["prefills"] - before.get("prefills", 0)
  assert slots.stats["prefilled"] - before.get("prefilled", 0) == len(requests) + 1 > prefills   # some together
  for i, ((r, c), im, p) in enumerate(zip(requests, ims, prompts)):
    common = dict(max_new_tokens=lengths[i], min_new_tokens=0, repetition_penalty=PENALTY)
    if i in sampled:
      want = pipe(im, p, do_sample=True, temperature=1.3, top_k=20, top_p=0.95, seed=sampled[i],
                  num_return_sequences=2, **common)
    else:
      want = [pipe(im, p, num_beams=1, **common)]
    assert r.texts == want, (i, p)
    assert [c.streamed(j) for j in range(r.n)] == want
    assert all(f in ("stop", "length") for f in r.finish)
  assert slots.active == 0 and slots.waiting == 0
  assert slots.compiled_programs() == compiled   # the slots were reused by 8 rows, nothing compiled again


def test_several_images_in_one_request_equal_the_pipelines_images(served):
  """Requests about two images (their query outputs concatenated in order) mixed with one-image requests: each
  answer is the Pipeline's for Images(a, b) or the single image; a third image is refused by name."""
  from iblip_jax.inference import Images
  pipe, slots = served
  a, b, c = _images(3)
  two = lambda x, y: np.stack([images.pixels(x, pipe.image_size), images.pixels(y, pipe.image_size)])  # noqa: E731
  asked = [(two(a, b), Images(a, b), SHORT[0]), (images.pixels(c, pipe.image_size), c, SHORT[1]),
           (two(b, a), Images(b, a), SHORT[0]), (two(c, a), Images(c, a), LONG[0])]
  requests = []
  for pixels, _, prompt in asked:
    col = Collector()
    requests.append((slots_lib.Request(pixels, prompt, col, max_tokens=8, temperature=0,
                                       repetition_penalty=PENALTY), col))
    slots.submit(requests[-1][0])
  _wait(*(col for _, col in requests))
  for (r, _), (_, visual, prompt) in zip(requests, asked):
    assert r.texts == [pipe(visual, prompt, num_beams=1, max_new_tokens=8, min_new_tokens=0,
                            repetition_penalty=PENALTY)], prompt
  three = np.stack([images.pixels(x, pipe.image_size) for x in (a, b, c)])
  with pytest.raises(slots_lib.BadInput, match="3 images: this server takes at most 2"):
    slots.submit(slots_lib.Request(three, SHORT[0], Collector()))


def test_a_short_request_ends_before_a_long_one_submitted_with_it(served):
  pipe, slots = served
  im = _images(1)[0]
  long, long_c = _request(pipe, im, SHORT[0], max_tokens=WIDTH, min_tokens=WIDTH, temperature=0)
  short, short_c = _request(pipe, im, SHORT[1], max_tokens=2, temperature=0)
  slots.submit(long)
  slots.submit(short)
  _wait(long_c, short_c)
  assert short_c.end_time < long_c.end_time
  assert len(long.tokens[0]) == WIDTH and long.finish == ["length"]
  assert len(short.tokens[0]) <= 2


def test_stop_strings_cut_the_answer_and_the_stream_holds_them_back(served):
  pipe, slots = served
  im = _images(1)[0]
  answer = pipe(im, SHORT[0], num_beams=1, max_new_tokens=WIDTH, min_new_tokens=WIDTH, repetition_penalty=PENALTY)
  words = answer.split()
  assert len(words) >= 3, answer
  stop = " ".join(words[1:3])           # two words, so that the first alone must be held back
  r, c = _request(pipe, im, SHORT[0], max_tokens=WIDTH, min_tokens=WIDTH, temperature=0,
                  repetition_penalty=PENALTY, stop=(stop, "never said"))
  slots.submit(r)
  _wait(c)
  want = answer[:answer.find(stop)]
  assert r.texts == [want] and r.finish == ["stop"]
  assert c.streamed() == want
  assert len(r.tokens[0]) < WIDTH       # it stopped early


def test_cancelled_and_timed_out_requests_free_their_slots(served):
  pipe, slots = served
  im = _images(1)[0]
  r, c = _request(pipe, im, SHORT[0], max_tokens=WIDTH, min_tokens=WIDTH, temperature=0)
  r.cancelled = True   # as the server does when the client goes away
  slots.submit(r)
  late, late_c = _request(pipe, im, SHORT[1], max_tokens=WIDTH, min_tokens=WIDTH, temperature=0, timeout=0.0)
  slots.submit(late)
  _wait(c, late_c)
  assert r.finish == ["cancelled"] and late.finish == ["timeout"]
  assert len(r.tokens[0]) < WIDTH and len(late.tokens[0]) < WIDTH
  deadline = time.monotonic() + 10
  while slots.active and time.monotonic() < deadline:
    time.sleep(0.05)
  assert slots.active == 0


def test_requests_that_cannot_be_served_are_named(served):
  pipe, slots = served
  im = _images(1)[0]
  with pytest.raises(slots_lib.BadInput, match="n=4"):
    slots.submit(_request(pipe, im, SHORT[0], n=4)[0])
  with pytest.raises(slots_lib.BadInput, match=f"max_tokens={WIDTH + 1}"):
    slots.submit(_request(pipe, im, SHORT[0], max_tokens=WIDTH + 1)[0])
  with pytest.raises(slots_lib.BadInput, match="the prompt is .* tokens long; this model takes at most"):
    slots.submit(_request(pipe, im, " ".join(["cat"] * 400), max_tokens=WIDTH)[0])


def test_a_failed_prefill_ends_its_requests_and_a_failed_loop_ends_every_request(served, monkeypatch):
  """Run last (it breaks the slots): nobody waits for ever, whatever fails."""
  pipe, slots = served
  im = _images(1)[0]
  run_prefill = slots._run_prefill

  def flaky(pixels, prompts, bucket=None):
    if "boom" in prompts:
      raise RuntimeError("out of memory (a stand-in)")
    return run_prefill(pixels, prompts, bucket)

  monkeypatch.setattr(slots, "_run_prefill", flaky)
  bad, bad_c = _request(pipe, im, "boom", max_tokens=4, temperature=0)
  slots.submit(bad)
  _wait(bad_c)
  assert ("error", "prefill failed: RuntimeError: out of memory (a stand-in)") in bad_c.events
  assert bad_c.events[-1][0] == "end"
  good, good_c = _request(pipe, im, SHORT[0], max_tokens=4, temperature=0)   # the loop goes on
  slots.submit(good)
  _wait(good_c)
  assert good.finish[0] in ("stop", "length") and slots.alive()

  submitted = threading.Event()

  def broken(*args):
    submitted.wait(60)   # fails once every request is in (a slot or the line)
    raise RuntimeError("the device is gone (a stand-in)")

  monkeypatch.setattr(slots, "_step", broken)
  waiting = [_request(pipe, im, SHORT[i % 3], max_tokens=WIDTH, temperature=0) for i in range(5)]
  for r, _ in waiting:   # 3 in slots, 2 waiting
    slots.submit(r)
  submitted.set()
  _wait(*(c for _, c in waiting))
  for r, c in waiting:
    assert c.events[-1][0] == "end" and any(e[0] == "error" and "device is gone" in e[1] for e in c.events)
  assert not slots.alive()
  with pytest.raises(slots_lib.Unavailable, match="decode loop has failed"):
    slots.submit(_request(pipe, im, SHORT[0], max_tokens=4)[0])
