"""Load on the OpenAI-compatible server (iblip_jax.serve_api) against a sequential Pipeline loop, side by side.

  python tools/load_api.py [--shape base|tiny] [--requests 64] [--clients 16] [--slots 16] [--hostile 500]
                           [--good 50] [--dir DIR]

1. Writes a base-size InstructBLIP (tools/bench.py's `base` shape: ViT-B/16 224 px, BERT-base Q-Former, T5 512-d
   8+8 layers, vocab 32128; random weights) with word-level tokenizers whose filler words cover the vocabulary, and
   starts `python -m iblip_jax.serve_api --model DIR` on a free loopback port, as a user starts it (loopback only).
2. Sequential: `Pipeline.from_pretrained(DIR)` in this process answers the requests one after another (greedy,
   num_beams=1; each prompt and answer length's program compiled before the clock starts), the server idle meanwhile.
3. Concurrent: `--clients` threads with the official openai client stream the same requests (mixed prompt lengths
   and answer lengths, `max_tokens` 4 to 64) to the server. Every answer must equal the Pipeline's (exit 3 if not).
   Prints requests/s and tokens/s of both, their ratio (target >= 3x), and the server's p50/p99 latency and time to
   first token.
4. Hostile: `--hostile` malformed or hostile requests (bad JSON, unknown fields, a non-image, a decompression bomb,
   an over-long prompt, a wrong model, a bad API key, too many choices, a disconnect mid-stream) interleaved with
   `--good` good ones, from the same clients: every good one must get its answer, every bad one a 4xx (never a 5xx
   or a dropped connection), and /health must answer 200 at the end (exit 3 if not).
"""
import argparse
import base64
import concurrent.futures
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools"), os.path.join(ROOT, "tests")]

WORDS = ("what is in the image describe picture detail color shape of a an this please tell me about where are "
         "there how many objects short answer question write caption for").split()
PROMPTS = ["what is in the image?", "describe the picture in detail please",
           "tell me about the color and the shape of the objects in this picture, and where they are",
           "write a short caption for this image", "how many objects are there?"]
LENGTHS = (4, 8, 16, 32, 64)


def write_model(shape: str, out: str) -> str:
  """A random model of `shape` with word tokenizers in `out`; filler words ("zz...", sorted after the real ones)
  fill the LLM's vocabulary so that every generated id decodes to a word."""
  from iblip_jax.demo import word_tokenizers
  if shape == "tiny":
    import oracle
    hf = oracle.tiny_hf_model(seed=0)
  else:
    import bench
    hf = bench.hf_model("base")
  vocab = hf.config.text_config.vocab_size
  hf.save_pretrained(out)
  word_tokenizers.build(WORDS, out)   # the Q-Former's tokenizer: the prompts' words (its vocabulary is smaller)
  filler = [f"zz{i:05d}" for i in range(vocab - len(set(WORDS)) - len(word_tokenizers.LLM_SPECIALS))]
  with tempfile.TemporaryDirectory() as llm:
    word_tokenizers.build(WORDS + filler, llm)
    for f in os.listdir(llm):
      if os.path.isfile(os.path.join(llm, f)):
        shutil.copy(os.path.join(llm, f), out)
  return out


def images(n: int, size: int = 320) -> list[bytes]:
  rng = np.random.default_rng(0)
  out = []
  from PIL import Image
  for i in range(n):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size + 16 * (i % 5), 3), dtype=np.uint8)).save(buf, "PNG")
    out.append(buf.getvalue())
  return out


def workload(n: int, pictures: list[bytes]) -> list[dict]:
  """n requests: image, prompt and answer length mixed (a fixed shuffle)."""
  rng = random.Random(0)
  return [dict(image=pictures[i % len(pictures)], prompt=PROMPTS[rng.randrange(len(PROMPTS))],
               max_tokens=LENGTHS[rng.randrange(len(LENGTHS))]) for i in range(n)]


def messages(prompt: str, image: bytes) -> list[dict]:
  url = "data:image/png;base64," + base64.b64encode(image).decode()
  return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                       {"type": "text", "text": prompt}]}]


def start_server(model: str, port: int, slots: int, log_path: str, api_key: str) -> subprocess.Popen:
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  proc = subprocess.Popen([sys.executable, "-m", "iblip_jax.serve_api", "--model", model, "--port", str(port),
                           "--slots", str(slots), "--max-tokens", str(max(LENGTHS)), "--max-waiting", "256",
                           "--api-key", api_key], cwd=ROOT, env=env, stdout=open(log_path, "w"),
                          stderr=subprocess.STDOUT)
  deadline = time.time() + 900
  while time.time() < deadline:
    if proc.poll() is not None:
      raise SystemExit(f"the server exited with {proc.returncode}:\n{open(log_path).read()[-3000:]}")
    try:
      with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
        if r.status == 200:
          return proc
    except OSError:
      time.sleep(1)
  proc.kill()
  raise SystemExit("the server did not come up in 900 s")


def sequential(model: str, work: list[dict]) -> tuple[list[str], float]:
  from iblip_jax.inference import Pipeline
  pipe = Pipeline.from_pretrained(model, max_batch=1)
  settings = lambda w: dict(num_beams=1, max_new_tokens=w["max_tokens"], min_new_tokens=0, repetition_penalty=1.0)
  for w in {(w["prompt"], w["max_tokens"]): w for w in work}.values():   # every program compiled before the clock
    pipe(w["image"], w["prompt"], **settings(w))
  start = time.perf_counter()
  answers = [pipe(w["image"], w["prompt"], **settings(w)) for w in work]
  return answers, time.perf_counter() - start


def concurrent_run(client, name: str, work: list[dict], clients: int):
  """-> (answers, wall seconds, latencies, times to first token, completion tokens)."""
  results = [None] * len(work)

  def one(i):
    w = work[i]
    start = time.perf_counter()
    first, pieces, usage = None, [], None
    stream = client.chat.completions.create(model=name, messages=messages(w["prompt"], w["image"]), temperature=0,
                                            max_tokens=w["max_tokens"], stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
      usage = chunk.usage or usage
      for c in chunk.choices:
        if c.delta.content:
          first = first or time.perf_counter()
          pieces.append(c.delta.content)
    end = time.perf_counter()
    results[i] = ("".join(pieces), end - start, (first or end) - start, usage.completion_tokens)

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    list(pool.map(one, range(len(work))))
  wall = time.perf_counter() - start
  return [r[0] for r in results], wall, [r[1] for r in results], [r[2] for r in results], sum(r[3] for r in results)


def _post(base: str, data: bytes, key: str | None, timeout=120) -> int:
  headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
  try:
    with urllib.request.urlopen(urllib.request.Request(base + "/v1/chat/completions", data=data, headers=headers),
                                timeout=timeout) as r:
      r.read()
      return r.status
  except urllib.error.HTTPError as e:
    e.read()
    return e.code


def hostile_cases(name: str, key: str, picture: bytes) -> list:
  """(kind, body bytes, api key) of each kind of bad request; "disconnect" is a stream abandoned midway."""
  from PIL import Image
  bomb = io.BytesIO()
  Image.new("1", (10_000, 8_000)).save(bomb, "PNG")
  good = {"model": name, "messages": messages("what is in the image?", picture), "max_tokens": 8, "temperature": 0}
  enc = lambda body: json.dumps(body).encode()
  return [
      ("bad json", b'{"model": ', key),
      ("not an object", b"[]", key),
      ("unknown field", enc({**good, "frobnicate": True}), key),
      ("wrong type", enc({**good, "max_tokens": "many"}), key),
      ("not an image", enc({**good, "messages": messages("what?", b"GIF89a-not-really")}), key),
      ("decompression bomb", enc({**good, "messages": messages("what?", bomb.getvalue())}), key),
      ("prompt too long", enc({**good, "messages": messages("what " * 2000, picture)}), key),
      ("wrong model", enc({**good, "model": "gpt-4o"}), key),
      ("bad key", enc(good), "not-the-key"),
      ("too many choices", enc({**good, "n": 10_000}), key),
      ("remote url", enc({**good, "messages": [{"role": "user", "content": [
          {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}},
          {"type": "text", "text": "what?"}]}]}), key),
      ("disconnect", enc({**good, "max_tokens": max(LENGTHS), "min_tokens": max(LENGTHS), "stream": True}), key),
  ]


def disconnect(base: str, data: bytes, key: str) -> int:
  """Opens a stream, reads a little, and hangs up."""
  req = urllib.request.Request(base + "/v1/chat/completions", data=data,
                               headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
  with urllib.request.urlopen(req, timeout=120) as r:
    r.read(64)
    return 499


def hostile_run(base: str, name: str, key: str, work: list[dict], want: list[str], hostile: int, good: int,
                clients: int) -> dict:
  cases = hostile_cases(name, key, work[0]["image"])
  jobs = [("bad", i % len(cases)) for i in range(hostile)] + [("good", i % len(work)) for i in range(good)]
  random.Random(1).shuffle(jobs)
  out = {"good_ok": 0, "good_wrong": [], "bad_4xx": 0, "bad_other": []}
  lock = threading.Lock()

  def one(job):
    kind, i = job
    if kind == "good":
      w = work[i]
      body = json.dumps({"model": name, "messages": messages(w["prompt"], w["image"]), "temperature": 0,
                         "max_tokens": w["max_tokens"]}).encode()
      req = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                   headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
      with urllib.request.urlopen(req, timeout=300) as r:
        answer = json.loads(r.read())["choices"][0]["message"]["content"]
      with lock:
        if answer == want[i]:
          out["good_ok"] += 1
        else:
          out["good_wrong"].append(i)
      return
    what, data, k = cases[i]
    try:
      status = disconnect(base, data, k) if what == "disconnect" else _post(base, data, k)
    except OSError as e:
      status = f"{type(e).__name__}: {e}"
    with lock:
      if status == 499 or (isinstance(status, int) and 400 <= status < 500):
        out["bad_4xx"] += 1
      else:
        out["bad_other"].append((what, status))

  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    list(pool.map(one, jobs))
  with urllib.request.urlopen(base + "/health", timeout=10) as r:
    out["health"] = r.status
  return out


def pct(xs, q):
  return float(np.percentile(np.asarray(xs), q))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--shape", choices=("base", "tiny"), default="base")
  p.add_argument("--requests", type=int, default=64)
  p.add_argument("--clients", type=int, default=16)
  p.add_argument("--slots", type=int, default=16)
  p.add_argument("--hostile", type=int, default=500)
  p.add_argument("--good", type=int, default=50)
  p.add_argument("--dir", default=None)
  args = p.parse_args()
  import jax
  import openai
  from servers import free_port
  model = write_model(args.shape, args.dir or tempfile.mkdtemp(prefix="load_api_"))
  work = workload(args.requests, images(8))
  key, port = "load-test", free_port()
  log_path = os.path.join(model, "server.log")
  print(f"jax {jax.__version__}, openai {openai.__version__}, {os.cpu_count()} CPUs; model {args.shape} in {model}",
        flush=True)
  t = time.perf_counter()
  server = start_server(model, port, args.slots, log_path, key)
  print(f"server up in {time.perf_counter() - t:.0f} s (load + compile), {args.slots} slots", flush=True)
  try:
    want, seq_s = sequential(model, work)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=600)
    name = client.models.list().data[0].id
    got, wall, latency, ttft, tokens = concurrent_run(client, name, work, args.clients)
    same = sum(a == b for a, b in zip(got, want))
    seq_tokens = tokens   # the same answers: the same tokens
    print(f"\n{args.requests} requests, answer lengths {LENGTHS}, {len(PROMPTS)} prompts of 5-20 words")
    print(f"sequential Pipeline loop : {seq_s:7.1f} s  {args.requests / seq_s:6.2f} req/s  "
          f"{seq_tokens / seq_s:7.1f} tokens/s")
    print(f"server, {args.clients} clients    : {wall:7.1f} s  {args.requests / wall:6.2f} req/s  "
          f"{tokens / wall:7.1f} tokens/s")
    print(f"throughput ratio         : {seq_s / wall:.2f}x (target >= 3x)")
    print(f"latency p50 {pct(latency, 50):.2f} s  p99 {pct(latency, 99):.2f} s; time to first token "
          f"p50 {pct(ttft, 50):.2f} s  p99 {pct(ttft, 99):.2f} s")
    print(f"answers equal to the Pipeline's: {same}/{len(work)}", flush=True)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
      metrics = dict(line.split() for line in r.read().decode().splitlines() if line and line[0] != "#")
    print(f"requests per prefill call: {float(metrics['iblip_prefilled_requests_total']) / float(metrics['iblip_prefills_total']):.2f}")
    h = hostile_run(f"http://127.0.0.1:{port}", name, key, work, want, args.hostile, args.good, args.clients)
    print(f"\nhostile: {args.hostile} bad requests interleaved with {args.good} good ones: good answered and "
          f"equal {h['good_ok']}/{args.good}, bad answered 4xx {h['bad_4xx']}/{args.hostile}, /health "
          f"{h['health']}")
    if h["bad_other"] or h["good_wrong"]:
      print(f"  not as expected: {h['bad_other'][:10]} wrong good answers: {h['good_wrong'][:10]}")
    ok = same == len(work) and h["good_ok"] == args.good and h["bad_4xx"] == args.hostile and h["health"] == 200
  finally:
    server.terminate()
    code = server.wait(timeout=120)
    print(f"server exited {code} after SIGTERM")
  sys.exit(0 if ok else 3)


if __name__ == "__main__":
  main()
