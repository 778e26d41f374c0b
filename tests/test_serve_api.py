"""The OpenAI-compatible server (`python -m iblip_jax.serve_api`) started as a user starts it, on the demo checkpoint,
talked to with the official `openai` client and with raw HTTP: plain, streamed, n > 1 and multi-turn completions
equal the Pipeline's answers; a short request ends before a long one and nothing compiles again; every malformed or
hostile request gets a 4xx naming the problem and the server stays healthy; a full line gets 429 with Retry-After;
a client that disconnects frees its slot; SIGTERM lets the request in flight finish and exits 0."""
import base64
import concurrent.futures
import io
import json
import re
import signal
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import servers
from iblip_jax.data.conversation import Conversation
from iblip_jax.demo import shapes

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("serve_api")]
openai = pytest.importorskip("openai")

KEY = "test-key"
NAME = "instructblip-demo"
WIDTH = 256
SLOTS = 3


def _png(color="yellow", shape="square", size=96) -> bytes:
  image = shapes.draw(shape, "blue", color, np.random.default_rng(0)).resize((size, size))
  buf = io.BytesIO()
  image.save(buf, "PNG")
  return buf.getvalue()


def _url(data: bytes) -> str:
  return "data:image/png;base64," + base64.b64encode(data).decode()


def _messages(question: str, data: bytes | None = None) -> list[dict]:
  return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _url(data or _png())}},
                                       {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("serve_api")
  port = servers.free_port()
  proc = servers.start_server(port, tmp / "server.log", "--model", servers.DEMO, "--slots", str(SLOTS),
                              "--max-tokens", str(WIDTH), "--max-waiting", "2", "--api-key", KEY,
                              "--max-image-mb", "1", "--drain-timeout", "60", "--max-images", "2",
                              module="iblip_jax.serve_api")
  base = f"http://127.0.0.1:{port}"
  deadline = time.time() + 300   # it listens once the slot programs are compiled
  while time.time() < deadline:
    try:
      if _get(base + "/health")[0] == 200:
        break
    except OSError:
      time.sleep(0.5)
  yield dict(proc=proc, base=base, log=tmp / "server.log",
             client=openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120))
  if proc.poll() is None:
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def pipe():
  from iblip_jax.inference import Pipeline
  return Pipeline.from_pretrained(servers.DEMO)


def _get(url: str, headers=None) -> tuple[int, str]:
  try:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
      return r.status, r.read().decode()
  except urllib.error.HTTPError as e:
    return e.code, e.read().decode()


def _post(server, body, *, key=KEY, raw: bytes | None = None) -> tuple[int, dict, dict]:
  data = raw if raw is not None else json.dumps(body).encode()
  headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
  req = urllib.request.Request(server["base"] + "/v1/chat/completions", data=data, headers=headers)
  try:
    with urllib.request.urlopen(req, timeout=120) as r:
      return r.status, json.loads(r.read()), r.headers
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read() or b"{}"), e.headers   # case-insensitive .get


def _metric(server, name: str) -> float:
  status, text = _get(server["base"] + "/metrics")
  assert status == 200
  return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def _wait_idle(server, timeout=30):
  deadline = time.time() + timeout
  while _metric(server, "iblip_active_slots") or _metric(server, "iblip_queue_depth"):
    assert time.time() < deadline, "slots still busy"
    time.sleep(0.2)


def test_the_openai_client_gets_the_pipelines_answers(server, pipe):
  client = server["client"]
  assert [m.id for m in client.models.list().data] == [NAME]
  image = _png()
  question = "what color is the square?"
  plain = client.chat.completions.create(model=NAME, messages=_messages(question, image), temperature=0,
                                         max_tokens=20)
  want = pipe(image, question, num_beams=1, max_new_tokens=20, min_new_tokens=0, repetition_penalty=1.0)
  assert plain.choices[0].message.content == want and want
  assert plain.choices[0].finish_reason in ("stop", "length") and plain.usage.completion_tokens >= 1

  streamed = client.chat.completions.create(model=NAME, messages=_messages(question, image), temperature=0,
                                            max_tokens=20, stream=True, stream_options={"include_usage": True})
  pieces, usage, reasons = [], None, []
  for chunk in streamed:
    usage = chunk.usage or usage
    for c in chunk.choices:
      pieces.append(c.delta.content or "")
      reasons.append(c.finish_reason)
  assert "".join(pieces) == want
  assert reasons[-1] == plain.choices[0].finish_reason and usage.completion_tokens == plain.usage.completion_tokens

  several = client.chat.completions.create(model=NAME, messages=_messages(question, image), temperature=1.2,
                                           top_p=0.9, n=3, seed=5, max_tokens=12)
  want = pipe(image, question, do_sample=True, temperature=1.2, top_k=0, top_p=0.9, seed=5, num_return_sequences=3,
              max_new_tokens=12, min_new_tokens=0, repetition_penalty=1.0)
  assert [c.message.content for c in several.choices] == want

  turns = _messages(question, image) + [{"role": "assistant", "content": "yellow"},
                                        {"role": "user", "content": "what shape is it?"}]
  answer = client.chat.completions.create(model=NAME, messages=turns, temperature=0, max_tokens=20)
  want = pipe(image, Conversation((question, "yellow", "what shape is it?")), num_beams=1, max_new_tokens=20,
              min_new_tokens=0, repetition_penalty=1.0)
  assert answer.choices[0].message.content == want

  ranked = client.chat.completions.create(model=NAME, messages=_messages(question, image),
                                          extra_body={"candidates": ["red", "yellow", "green"]}).model_dump()
  want = pipe.rank(image, question, ["red", "yellow", "green"])
  assert ranked["choices"][0]["message"]["content"] == want.best
  np.testing.assert_allclose(ranked["candidate_scores"], want.scores, rtol=1e-4)


def test_two_images_in_one_request_get_the_pipelines_images_answer(server, pipe):
  """Two image_url parts (up to --max-images=2): their query outputs concatenated in order, as Images(a, b)."""
  from iblip_jax.inference import Images
  client = server["client"]
  a, b = _png("yellow", "square"), _png("red", "circle")
  question = "what color is the shape?"
  both = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _url(a)}},
                                       {"type": "image_url", "image_url": {"url": _url(b)}},
                                       {"type": "text", "text": question}]}]
  got = client.chat.completions.create(model=NAME, messages=both, temperature=0, max_tokens=12)
  want = pipe(Images(a, b), question, num_beams=1, max_new_tokens=12, min_new_tokens=0, repetition_penalty=1.0)
  assert got.choices[0].message.content == want
  ranked = client.chat.completions.create(model=NAME, messages=both,
                                          extra_body={"candidates": ["red", "yellow"]}).model_dump()
  np.testing.assert_allclose(ranked["candidate_scores"], pipe.rank(Images(a, b), question, ["red", "yellow"]).scores,
                             rtol=1e-4)
  three = [{"role": "user", "content": both[0]["content"][:2] + both[0]["content"]}]
  status, body, _ = _post(server, {"model": NAME, "messages": three, "max_tokens": 4})
  assert status == 400 and "at most 2 per request (its --max-images)" in body["error"]["message"], body


def test_a_short_request_returns_before_a_long_one_and_slots_are_reused(server):
  client = server["client"]
  compiled = _metric(server, "iblip_compiled_programs")
  done = {}

  def ask(name, **settings):
    client.chat.completions.create(model=NAME, messages=_messages("what shape is it?"), temperature=0, **settings)
    done[name] = time.monotonic()

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    long = pool.submit(ask, "long", max_tokens=WIDTH, extra_body={"min_tokens": WIDTH})
    short = pool.submit(ask, "short", max_tokens=2)
    long.result(), short.result()
  assert done["short"] < done["long"]
  with concurrent.futures.ThreadPoolExecutor(3) as pool:   # more requests than slots, other prompt lengths
    list(pool.map(lambda q: client.chat.completions.create(model=NAME, messages=_messages(q), temperature=0,
                                                           max_tokens=8),
                  ["what is it?", "describe the picture in a few words please", "what color?", "shape?"] * 2))
  assert _metric(server, "iblip_compiled_programs") == compiled


def test_malformed_and_hostile_requests_get_4xx_naming_the_problem(server, tmp_path):
  good = {"model": NAME, "messages": _messages("what color?"), "max_tokens": 4, "temperature": 0}
  not_image = {**good, "messages": _messages("what color?", b"this is not an image at all")}
  cases = [
      (dict(raw=b'{"model": "x", "messages": [}'), 400, "not JSON"),
      (dict(raw=b'[1, 2]'), 400, "JSON object"),
      (dict(body={**good, "frobnicate": 1}), 400, "frobnicate"),
      (dict(body={**good, "messages": []}), 400, "messages"),
      (dict(body={**good, "temperature": "hot"}), 400, "temperature"),
      (dict(body={**good, "model": "gpt-4"}), 404, "gpt-4"),
      (dict(body=not_image), 400, "image"),
      (dict(body={**good, "messages": _messages("what color?", base64.b64decode(
          base64.b64encode(b"x")))}), 400, "image"),
      (dict(body={**good, "messages": [{"role": "user", "content": "no image here"}]}), 400, "no image"),
      (dict(body={**good, "messages": [{"role": "user", "content": [
          {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, {"type": "text", "text": "what?"}]}]}), 400, "data: URL"),
      (dict(body={**good, "messages": [{"role": "user", "content": [
          {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, {"type": "text", "text": "what?"}]}]}), 400, "allowed-local-media-path"),
      (dict(body={**good, "messages": _messages("what " * 600)}), 400, "tokens long"),
      (dict(body={**good, "max_tokens": WIDTH + 1}), 400, "max_tokens"),
      (dict(body={**good, "n": SLOTS + 1}), 400, "n="),
      (dict(body={**good, "messages": _messages("x", b"\0" * (2 * 2**20))}), 413, "MiB"),
      (dict(body=good, key="wrong"), 401, "API key"),
      (dict(body=good, key=None), 401, "API key"),
  ]
  for kwargs, status, words in cases:
    got, body, _ = _post(server, kwargs.get("body"), raw=kwargs.get("raw"), key=kwargs.get("key", KEY))
    assert got == status, (kwargs.get("raw") or str(kwargs.get("body"))[:200], got, body)
    assert words in body["error"]["message"], body
  big = Image_of_many_pixels()
  got, body, _ = _post(server, {**good, "messages": _messages("what?", big)})
  assert got == 400 and "pixels" in body["error"]["message"], body
  assert _post(server, good)[0] == 200
  # what clients such as LiteLLM send: nulls for the defaults, no-op values of fields that mean nothing here
  status, body, _ = _post(server, {**good, "temperature": None, "top_p": None, "n": None, "logprobs": False,
                                   "response_format": {"type": "text"}, "tools": None, "stream": None})
  assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length"), body
  status, body, _ = _post(server, {**good, "logprobs": True})
  assert status == 400 and "logprobs" in body["error"]["message"]
  assert _get(server["base"] + "/health")[0] == 200


def Image_of_many_pixels() -> bytes:   # noqa: N802 - a tiny PNG that decodes to 80 megapixels (a decompression bomb)
  from PIL import Image
  buf = io.BytesIO()
  Image.new("1", (10_000, 8_000)).save(buf, "PNG")
  return buf.getvalue()


def test_a_full_line_gets_429_with_retry_after(server):
  _wait_idle(server)
  body = {"model": NAME, "messages": _messages("what color?"), "max_tokens": WIDTH, "min_tokens": WIDTH,
          "temperature": 0}
  with concurrent.futures.ThreadPoolExecutor(10) as pool:   # 3 slots + 2 waiting, 10 at once
    results = list(pool.map(lambda _: _post(server, body), range(10)))
  statuses = sorted(r[0] for r in results)
  assert statuses.count(200) >= SLOTS + 2 and 429 in statuses, statuses
  for status, payload, headers in results:
    if status == 429:
      assert headers.get("Retry-After") == "1" and "busy" in payload["error"]["message"]
  assert _metric(server, "iblip_requests_total{status=\"429\"}") >= 1


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
  _wait_idle(server)
  before = _metric(server, "iblip_generated_tokens_total")
  stream = server["client"].chat.completions.create(
      model=NAME, messages=_messages("what color?"), temperature=0, max_tokens=WIDTH, stream=True,
      extra_body={"min_tokens": WIDTH})
  for i, _ in enumerate(stream):
    if i == 3:
      break
  stream.close()
  _wait_idle(server)
  assert _metric(server, "iblip_generated_tokens_total") - before < WIDTH   # it stopped before its WIDTH tokens
  assert _get(server["base"] + "/health")[0] == 200


def test_sigterm_finishes_the_request_in_flight_and_exits_0(server):
  _wait_idle(server)
  stream = server["client"].chat.completions.create(
      model=NAME, messages=_messages("what color?"), temperature=0, max_tokens=WIDTH, stream=True,
      extra_body={"min_tokens": WIDTH}, stream_options={"include_usage": True})
  reasons, usage = [], None
  for i, chunk in enumerate(stream):
    if i == 2:
      server["proc"].send_signal(signal.SIGTERM)
    usage = chunk.usage or usage
    reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
  assert reasons == ["length"] and usage.completion_tokens == WIDTH   # all of it, after the SIGTERM
  assert server["proc"].wait(timeout=60) == 0
  with pytest.raises(OSError):
    _get(server["base"] + "/health")
