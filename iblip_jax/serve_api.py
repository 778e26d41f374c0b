"""An OpenAI-compatible HTTP API over continuous batching (iblip_jax.slots), for applications and many users.

    python -m iblip_jax.serve_api --model DIR [--port 8000] [--dtype bfloat16] [--quantize int8] [--adapter DIR]

Speaks what OpenAI's clients send (FastAPI + uvicorn):
- POST /v1/chat/completions: `messages` with `text` and `image_url` content parts (one image per conversation, or up
  to --max-images, whose query outputs are concatenated in order, as the Pipeline's Images: zero-shot use, the
  released weights saw one image; as data: URLs; file:// URLs only under --allowed-local-media-path), earlier
  user/assistant turns rendered as the model's conversation prompt (data/conversation.py; a system message is put
  in front of the first question),
  `max_tokens` / `max_completion_tokens`, `temperature` (0: greedy, the Pipeline's num_beams=1 answer), `top_p`,
  `seed`, `n`, `stop`, `stream` (server-sent events, `stream_options.include_usage`).
  Extensions (vLLM's names where vLLM has them): `top_k`, `min_tokens`, `repetition_penalty`; and ours for multiple
  choice, `candidates`: a list of answers ranked by log-likelihood (Pipeline.rank); the best is the message's
  content and `candidate_scores` gives every candidate's score (not streamed).
- GET /v1/models, GET /health (503 once the decode loop has failed), GET /metrics (Prometheus text: queue depth,
  active slots, tokens/s, tokens and requests by outcome, compiled programs).
- Errors are OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for a malformed body, an unknown
  field, a bad image or a prompt longer than the model takes; 401 without the --api-key; 404 for another model;
  413 for a body over the limit; 429 with Retry-After when the waiting line is full; 504 past --request-timeout.
  A client that goes away frees its slots. SIGTERM: no new connections, what is in flight finishes (at most
  --drain-timeout seconds), exit 0.
"""
import argparse
import asyncio
import base64
import binascii
import json
import logging
import os
import secrets
import signal
import sys
import time
import urllib.parse
from typing import Literal

import numpy as np

from iblip_jax import extras
from iblip_jax.data import images
from iblip_jax.data.conversation import Conversation, prompt_text
from iblip_jax.errors import BadInput, UserError
from iblip_jax.inference import Images, Pipeline
from iblip_jax.serve import DEMO_MODEL, TRAINED_DEMO, default_model, start_process
from iblip_jax.slots import QueueFull, Request, Slots, Unavailable

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 20 * 2**20


def _fastapi():
  return extras.require("fastapi", "serve", "the OpenAI-compatible server")


class ApiError(Exception):
  def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, *,
               headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers or {}


# --- the request body --------------------------------------------------------------------------------------------

def _models():
  """The body's pydantic models (built on first use: pydantic comes with the server's extra)."""
  from pydantic import BaseModel, ConfigDict, Field

  class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

  class TextPart(Strict):
    type: Literal["text"]
    text: str

  class ImageUrl(Strict):
    url: str
    detail: str | None = None

  class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageUrl

  class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart]
    name: str | None = None

  class StreamOptions(Strict):
    include_usage: bool = False

  class ChatRequest(Strict):
    """OpenAI's fields (null means the default, as clients send it); those with no meaning here are accepted at
    their no-op values only (Parsed names the others)."""
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None
    # extensions
    top_k: int | None = None
    min_tokens: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    candidates: list[str] | None = None

  return ChatRequest


class Parsed:
  """A chat request turned into the model's input: the image sources (where, url) in order, the prompt (a
  Conversation), the settings."""

  def __init__(self, body, max_tokens: int, max_images: int = 1):
    if body.frequency_penalty or body.presence_penalty:
      raise ApiError(400, "frequency_penalty and presence_penalty are not supported; use repetition_penalty "
                     "(an extension: 1 is off, >1 penalises repeats)", param="frequency_penalty")
    unsupported = {"logprobs": body.logprobs, "top_logprobs": body.top_logprobs, "logit_bias": body.logit_bias,
                   "tools": body.tools, "tool_choice": body.tool_choice not in (None, "none")}
    for name, value in unsupported.items():
      if value:
        raise ApiError(400, f"{name} is not supported by this server", param=name)
    if body.response_format not in (None, {"type": "text"}):
      raise ApiError(400, 'response_format: only {"type": "text"} is supported', param="response_format")
    self.images, turns, roles, system = [], [], [], []
    for i, m in enumerate(body.messages):
      parts = [m.content] if isinstance(m.content, str) else m.content
      texts = []
      for j, part in enumerate(parts):
        if isinstance(part, str):
          texts.append(part)
        elif part.type == "text":
          texts.append(part.text)
        else:
          where = f"messages[{i}].content[{j}].image_url"
          if m.role != "user":
            raise ApiError(400, f"{where}: images go in user messages", param=where)
          if len(self.images) == max_images:
            raise ApiError(400, f"{where}: image {max_images + 1} of the conversation; this server answers about "
                           f"at most {max_images} per request (its --max-images)", param=where)
          self.images.append((where, part.image_url.url))
      text = "\n".join(t for t in texts if t.strip())
      if m.role in ("system", "developer"):
        if turns:
          raise ApiError(400, f"messages[{i}]: a {m.role} message goes before the conversation", param="messages")
        system.append(text)
        continue
      want = "user" if len(turns) % 2 == 0 else "assistant"
      if m.role != want:
        raise ApiError(400, f"messages[{i}]: expected a {want} message (turns alternate user, assistant, ..., "
                       "and end with the user's)", param="messages")
      turns.append(text)
      roles.append(m.role)
    if not turns or len(turns) % 2 == 0:
      raise ApiError(400, "messages must end with a user message (the question to answer)", param="messages")
    if not self.images:
      raise ApiError(400, "no image: InstructBLIP answers about an image; add an image_url content part (a data: "
                     "URL) to a user message", param="messages")
    if system and any(s.strip() for s in system):
      turns[0] = "\n".join([*system, turns[0]])
    try:
      self.prompt = Conversation(tuple(turns))
      prompt_text(self.prompt)
    except BadInput as e:
      raise ApiError(400, str(e), param="messages") from None
    self.max_tokens = next((x for x in (body.max_completion_tokens, body.max_tokens) if x is not None), max_tokens)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    pick = lambda value, default: default if value is None else value
    self.settings = dict(n=pick(body.n, 1), max_tokens=self.max_tokens, min_tokens=pick(body.min_tokens, 0),
                         temperature=pick(body.temperature, 1.0), top_p=pick(body.top_p, 1.0),
                         top_k=max(pick(body.top_k, 0), 0), repetition_penalty=pick(body.repetition_penalty, 1.0),
                         stop=tuple(stop), seed=secrets.randbits(31) if body.seed is None else body.seed)


def read_image(where: str, url: str, *, media_dir: str | None, max_bytes: int):
  """A data: URL (or file:// URL under media_dir) -> the image's bytes or path; ApiError naming what is wrong."""
  if url.startswith("data:"):
    head, _, data = url.partition(",")
    if ";base64" not in head:
      raise ApiError(400, f"{where}: a data: URL must be base64 (data:image/png;base64,...)", param=where)
    if len(data) * 3 // 4 > max_bytes:
      raise ApiError(413, f"{where}: the image is over {max_bytes // 2**20} MiB", param=where)
    try:
      return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
      raise ApiError(400, f"{where}: the data: URL is not valid base64", param=where) from None
  if url.startswith("file://"):
    if media_dir is None:
      raise ApiError(400, f"{where}: file:// URLs are off; start the server with --allowed-local-media-path DIR to "
                     "answer about files under DIR", param=where)
    path = os.path.realpath(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    if os.path.commonpath([path, media_dir]) != media_dir:
      raise ApiError(400, f"{where}: {path} is outside --allowed-local-media-path {media_dir}", param=where)
    if not os.path.isfile(path):
      raise ApiError(400, f"{where}: no such file {path}", param=where)
    if os.path.getsize(path) > max_bytes:
      raise ApiError(413, f"{where}: {path} is over {max_bytes // 2**20} MiB", param=where)
    return path
  raise ApiError(400, f"{where}: only data: URLs (and file:// with --allowed-local-media-path) are read; this "
                 "server fetches nothing from the network", param=where)


# --- the app -----------------------------------------------------------------------------------------------------

def build_app(slots: Slots, pipe, *, model_name: str, api_key: str | None = None, media_dir: str | None = None,
              max_image_bytes: int = MAX_IMAGE_BYTES, request_timeout: float | None = 600.0,
              drain_timeout: float = 30.0):
  """The FastAPI app; its lifespan starts the slots' scheduler and, at shutdown, lets it drain."""
  fastapi = _fastapi()
  from fastapi.exceptions import RequestValidationError
  from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
  from starlette.concurrency import run_in_threadpool
  from starlette.exceptions import HTTPException

  chat_request = _models()
  media_dir = os.path.realpath(media_dir) if media_dir else None
  outcomes = {}
  started = int(time.time())

  def count(outcome: str):
    outcomes[outcome] = outcomes.get(outcome, 0) + 1

  async def lifespan(app):
    if not slots.alive():
      slots.start()
    yield
    await run_in_threadpool(slots.stop, drain_timeout)

  app = fastapi.FastAPI(title="iblip_jax OpenAI-compatible API", lifespan=lifespan)

  def error(status, message, kind="invalid_request_error", param=None, headers=None):
    count(str(status))
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)

  @app.exception_handler(ApiError)
  async def on_api_error(_, e: ApiError):
    return error(e.status, e.message, e.kind, e.param, e.headers)

  @app.exception_handler(Exception)
  async def on_bug(_, e: Exception):   # a bug answers in OpenAI's shape too; the traceback goes to the log
    log.exception("request failed")
    return error(500, f"internal error: {type(e).__name__}: {e}", "server_error")

  @app.exception_handler(RequestValidationError)
  async def on_invalid(_, e: RequestValidationError):
    problems = []
    for x in e.errors()[:5]:
      where = ".".join(str(p) for p in x.get("loc", ())[1:]) or "body"
      problems.append(f"{where}: {x.get('msg')}")
    return error(400, "invalid request: " + "; ".join(problems))

  @app.exception_handler(HTTPException)
  async def on_http(_, e: HTTPException):
    return error(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else "invalid_request_error")

  def check_key(request):
    if api_key and not secrets.compare_digest(request.headers.get("authorization", ""), f"Bearer {api_key}"):
      raise ApiError(401, "a valid API key is needed (Authorization: Bearer ...)", "authentication_error")

  async def read_body(request) -> bytes:
    """The body, or 413 when it is over the limit; an oversize body is read and dropped first (up to a bound) so
    that the client is not cut off mid-send and gets the answer."""
    length = request.headers.get("content-length")
    limit = max_image_bytes * 4 // 3 + 2**20    # the image in base64, and the rest of the request
    if length and length.isdigit() and int(length) > limit:
      seen = 0
      async for piece in request.stream():
        seen += len(piece)
        if seen > 16 * max_image_bytes:
          break
      raise ApiError(413, f"the request body is {int(length) // 2**20} MiB; at most {max_image_bytes // 2**20} "
                     "MiB of image is taken")
    return await request.body()

  @app.get("/health")
  async def health():
    if not slots.alive():
      return JSONResponse({"status": "failed" if slots.failure else "stopped"}, status_code=503)
    return {"status": "ok"}

  @app.get("/v1/models")
  async def models(request: fastapi.Request):
    check_key(request)
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                        "owned_by": "iblip_jax"}]}

  @app.get("/metrics")
  async def metrics():
    gauges = [("iblip_queue_depth", "gauge", "Requests waiting for a decode slot.", slots.waiting),
              ("iblip_active_slots", "gauge", "Decode slots in use.", slots.active),
              ("iblip_slots", "gauge", "Decode slots.", slots.slots),
              ("iblip_tokens_per_second", "gauge", "Generated tokens per second, last 10 s.",
               round(slots.tokens_per_second(), 3)),
              ("iblip_generated_tokens_total", "counter", "Tokens generated.", slots.stats["tokens"]),
              ("iblip_decode_steps_total", "counter", "Decode steps run.", slots.stats["steps"]),
              ("iblip_prefills_total", "counter", "Prefill calls (each for 1 to --prefill-batch requests).",
               slots.stats["prefills"]),
              ("iblip_prefilled_requests_total", "counter", "Requests prefilled.", slots.stats["prefilled"]),
              ("iblip_compiled_programs", "gauge", "Programs compiled (prefill per bucket, insert, step).",
               slots.compiled_programs())]
    lines = []
    for name, kind, text, value in gauges:
      lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    lines += ["# HELP iblip_requests_total Chat completion requests by outcome (HTTP status).",
              "# TYPE iblip_requests_total counter"]
    lines += [f'iblip_requests_total{{status="{k}"}} {v}' for k, v in sorted(outcomes.items())]
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

  @app.post("/v1/chat/completions")
  async def chat(request: fastapi.Request):
    check_key(request)
    raw = await read_body(request)
    try:
      payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
      raise ApiError(400, f"the body is not JSON: {e}") from None
    if not isinstance(payload, dict):
      raise ApiError(400, "the body must be a JSON object")
    try:
      body = chat_request.model_validate(payload)
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError, reported field by field
      errors = getattr(e, "errors", lambda: [])()
      problems = [f"{'.'.join(str(p) for p in x.get('loc', ())) or 'body'}: {x.get('msg')}" for x in errors[:5]]
      raise ApiError(400, "invalid request: " + ("; ".join(problems) or str(e))) from None
    if body.model != model_name:
      raise ApiError(404, f"the model {body.model!r} does not exist; this server has {model_name!r}",
                     "not_found_error", "model")
    parsed = Parsed(body, slots.width, slots.max_images)
    seen = []
    for where, url in parsed.images:
      source = read_image(where, url, media_dir=media_dir, max_bytes=max_image_bytes)
      try:
        seen.append(await run_in_threadpool(images.prepare, source, slots.engine.image_size, name=where))
      except BadInput as e:
        raise ApiError(400, str(e), param=where) from None
    prepared = seen[0] if len(seen) == 1 else Images(*seen)
    if body.candidates is not None:
      return await rank(body, parsed, prepared)

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    pixels = seen[0].pixels if len(seen) == 1 else np.stack([p.pixels for p in seen])
    r = Request(pixels, prompt_text(parsed.prompt),
                lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), timeout=request_timeout,
                **parsed.settings)
    try:
      await run_in_threadpool(slots.submit, r)
    except QueueFull as e:
      raise ApiError(429, f"the server is busy ({e}); retry shortly", "rate_limit_error",
                     headers={"Retry-After": "1"}) from None
    except Unavailable as e:
      raise ApiError(503, str(e), "server_error") from None
    except BadInput as e:
      raise ApiError(400, str(e)) from None
    rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    head = {"id": rid, "created": created, "model": model_name}
    if body.stream:
      include_usage = bool(body.stream_options and body.stream_options.include_usage)
      count("200")
      return StreamingResponse(stream(r, events, head, include_usage), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
    return await complete(request, r, events, head)

  async def complete(request, r: Request, events: asyncio.Queue, head: dict):
    failure, usage, checked = None, None, time.monotonic()
    while usage is None:
      if time.monotonic() - checked > 0.5:   # every half second, tokens arriving or not: is the client still there?
        checked = time.monotonic()
        if await request.is_disconnected():
          r.cancelled = True
          count("client_gone")
          return JSONResponse({}, status_code=499)
      try:
        ev = await asyncio.wait_for(events.get(), 0.5)
      except asyncio.TimeoutError:
        continue
      if ev[0] == "error":
        failure = ev[1]
      elif ev[0] == "end":
        usage = ev[1]
    if failure:
      raise ApiError(500, failure, "server_error")
    if "timeout" in r.finish:
      raise ApiError(504, f"the request took longer than --request-timeout={request_timeout:g} s", "timeout")
    count("200")
    return {**head, "object": "chat.completion",
            "choices": [{"index": j, "message": {"role": "assistant", "content": r.texts[j]},
                         "finish_reason": _reason(r.finish[j]), "logprobs": None} for j in range(r.n)],
            "usage": usage}

  async def stream(r: Request, events: asyncio.Queue, head: dict, include_usage: bool):
    def chunk(choices, usage=None):
      out = {**head, "object": "chat.completion.chunk", "choices": choices}
      if include_usage:
        out["usage"] = usage
      return f"data: {json.dumps(out)}\n\n"

    try:
      for j in range(r.n):
        yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
      while True:
        ev = await events.get()
        if ev[0] == "token":
          yield chunk([{"index": ev[1], "delta": {"content": ev[2]}, "finish_reason": None}])
        elif ev[0] == "finish":
          reason = ev[2]
          if reason == "timeout":
            yield f"data: {json.dumps({'error': {'message': 'the request took longer than --request-timeout', 'type': 'timeout', 'code': 504}})}\n\n"
          yield chunk([{"index": ev[1], "delta": {}, "finish_reason": _reason(reason)}])
        elif ev[0] == "error":
          yield f"data: {json.dumps({'error': {'message': ev[1], 'type': 'server_error', 'code': 500}})}\n\n"
        elif ev[0] == "end":
          if include_usage:
            out = {**head, "object": "chat.completion.chunk", "choices": [], "usage": ev[1]}
            yield f"data: {json.dumps(out)}\n\n"
          yield "data: [DONE]\n\n"
          return
    finally:   # the client went away (the generator is closed early): free the slots
      if None in r.finish:
        r.cancelled = True

  async def rank(body, parsed: Parsed, prepared):
    if body.stream or body.n not in (None, 1):
      raise ApiError(400, "candidates (ranking) returns one choice and is not streamed", param="candidates")
    if not body.candidates or any(not isinstance(c, str) or not c.strip() for c in body.candidates):
      raise ApiError(400, "candidates must be a non-empty list of non-empty strings", param="candidates")
    try:   # the same length rule as answers: refused, never truncated
      await run_in_threadpool(slots.encode, prompt_text(parsed.prompt))
    except BadInput as e:
      raise ApiError(400, str(e), param="messages") from None
    ranking = await run_in_threadpool(pipe.rank, prepared, parsed.prompt, list(body.candidates))
    count("200")
    return {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ranking.best},
                         "finish_reason": "stop", "logprobs": None}],
            "candidate_scores": [float(s) for s in ranking.scores],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}

  return app


def _reason(finish: str) -> str:
  """OpenAI's finish_reason: "stop" / "length"; a request ended otherwise (cancelled, timed out, failed) is
  "abort", as vLLM says it."""
  return finish if finish in ("stop", "length") else "abort"


# --- the command -------------------------------------------------------------------------------------------------

def _args(argv):
  p = argparse.ArgumentParser(prog="python -m iblip_jax.serve_api", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default=None, help="Hugging Face InstructBLIP directory or training workdir (default: "
                 f"the trained demo {TRAINED_DEMO} if `make demo` has run, else {DEMO_MODEL})")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
  p.add_argument("--dtype", default=None, help="the frozen towers' dtype: float32 (default) or bfloat16")
  p.add_argument("--quantize", default=None, choices=("int8", "int4"), help="quantise the frozen towers as they load")
  p.add_argument("--adapter", default=None, help="a PEFT LoRA directory applied to a Hugging Face directory's model")
  p.add_argument("--served-model-name", default=None, help="the model id clients name (default: the directory's name)")
  p.add_argument("--api-key", default=os.environ.get("IBLIP_API_KEY"),
                 help="clients must send it as a Bearer token (default: $IBLIP_API_KEY, else none)")
  p.add_argument("--slots", type=int, default=8, help="decode slots: requests answered together")
  p.add_argument("--max-tokens", type=int, default=256, help="the longest answer in tokens (each slot's room)")
  p.add_argument("--prefill-batch", type=int, default=4, help="waiting requests prefilled together (1 or this many)")
  p.add_argument("--max-waiting", type=int, default=64, help="requests that may wait for a slot; more get 429")
  p.add_argument("--max-images", type=int, default=1, help="images one request may ask about (their query outputs "
                 "concatenated; each count up to this has its own compiled prefill and the slots room for them)")
  p.add_argument("--request-timeout", type=float, default=600.0, help="seconds from arrival to the last token")
  p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM gives the requests in flight")
  p.add_argument("--allowed-local-media-path", default=None, help="answer file:// image URLs under this folder")
  p.add_argument("--max-image-mb", type=float, default=MAX_IMAGE_BYTES / 2**20, help="the largest image taken")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = _args(argv)
  start_process()
  model = os.path.normpath(args.model or default_model())
  try:
    _fastapi()
    uvicorn = extras.require("uvicorn", "serve", "the OpenAI-compatible server")
    if not os.path.isdir(model):
      raise UserError(f"--model={model}: no such directory (a Hugging Face InstructBLIP directory or a training "
                      "workdir)")
    if args.slots < 1 or args.max_tokens < 1 or args.max_waiting < 0 or args.max_images < 1:
      raise UserError("--slots, --max-tokens and --max-images must be >= 1, --max-waiting >= 0")
    if args.allowed_local_media_path and not os.path.isdir(args.allowed_local_media_path):
      raise UserError(f"--allowed-local-media-path={args.allowed_local_media_path}: no such directory")
    pipe = Pipeline.from_pretrained(model, args.dtype, adapter=args.adapter, quantize=args.quantize)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  slots = Slots(pipe.engine, slots=args.slots, width=args.max_tokens, max_waiting=args.max_waiting,
                prefill_batch=args.prefill_batch, max_images=args.max_images)
  print(f"compiling the slot programs ({len(slots.buckets)} prompt lengths, {args.slots} slots, answers up to "
        f"{args.max_tokens} tokens)", flush=True)
  slots.warm_up()
  name = args.served_model_name or os.path.basename(model)
  app = build_app(slots, pipe, model_name=name, api_key=args.api_key, media_dir=args.allowed_local_media_path,
                  max_image_bytes=int(args.max_image_mb * 2**20), request_timeout=args.request_timeout,
                  drain_timeout=args.drain_timeout)
  print(f"serving {model} as {name!r} on http://{args.host}:{args.port}/v1 (Ctrl-C or SIGTERM stops)", flush=True)
  # uvicorn drains on SIGTERM, then raises it again under the handler it found: this one makes that a clean exit 0
  signal.signal(signal.SIGTERM, lambda *_: None)
  uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
              timeout_graceful_shutdown=int(args.drain_timeout) + 1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
