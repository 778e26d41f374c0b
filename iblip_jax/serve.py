"""The local web demo: `python -m iblip_jax.serve [--model DIR] [--port 7860] [--dtype bfloat16]` (`make serve`).

Upload an image, type an instruction, choose the decoding, watch the answer stream in and see where the Q-Former
looked (its cross-attention and the answer-relevance map, iblip_jax.attention_maps); follow-up questions continue
the conversation (data/conversation.py); the "Compare instructions" tab answers two instructions about the same
image with their maps side by side. A video clip (mp4, webm, avi, mkv, mov; the `video` extra) is answered from its
4 uniformly sampled frames, and "More images" are asked about together with the first, in order (their query
outputs concatenated: zero-shot use, the released weights saw one image); the preview shows them side by side, and
no attention map is drawn for either (a map is drawn on one image). Without --model it serves the demo: the
checkpoint `make demo` trained (runs/demo) when there is one, else the demo checkpoint before tuning
(demo_assets/instructblip-demo); the page and the console say which.

In the page, a person's mistake (a file that is not an image, an empty prompt) is a message in the status line; the
conversation, answer and map stay as they were, and the server's log gets one line. The answer streams first and
the map follows as its own step, so a follow-up typed meanwhile is queued behind it, with the history it belongs
to; "New conversation" cancels an answer still pending. The HTTP API (gradio_client) is /ask, /compare and /upload:
there a mistake is an error naming it.

Needs gradio (the `serve` extra: pip install 'iblip_jax[serve]'). Binds to 127.0.0.1 only: the demo has no
authentication and is for the person at this machine (an SSH tunnel shows it elsewhere).
"""
import argparse
import functools
import inspect
import json
import logging
import os
import sys

from PIL import Image

from iblip_jax import distributed
from iblip_jax.data import images as images_lib, video_files
from iblip_jax.data.conversation import Conversation
from iblip_jax.demo import shapes
from iblip_jax.errors import UserError
from iblip_jax.extras import require
from iblip_jax.inference import Images, Pipeline

log = logging.getLogger(__name__)

PROJECT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
DEMO_MODEL = os.path.normpath(os.path.join(PROJECT, "demo_assets", "instructblip-demo"))
TRAINED_DEMO = os.path.normpath(os.path.join(PROJECT, "runs", "demo"))   # where `make demo` trains
MAX_UPLOAD = "100mb"   # a video clip; an image is checked against its own pixel limit when read
MODES = ("greedy", "beam search", "sampling")


def _gradio():
  return require("gradio", "serve", "the web demo")


def decoding_settings(mode: str, beams, temperature, top_k, top_p, max_new_tokens, repetition_penalty,
                      seed) -> dict:
  """The form's controls -> Pipeline decoding settings."""
  if mode not in MODES:
    raise UserError(f"decoding {mode!r}: choose one of {', '.join(MODES)}")
  settings = dict(max_new_tokens=int(max_new_tokens), repetition_penalty=float(repetition_penalty))
  if mode == "sampling":
    return dict(settings, do_sample=True, num_beams=1, temperature=float(temperature), top_k=int(top_k),
                top_p=float(top_p), seed=int(seed or 0))
  return dict(settings, num_beams=1 if mode == "greedy" else int(beams))


def _friendly(fn):
  """For the HTTP API: a request's failure becomes an error naming it (gr.Error) and the server goes on. A UserError
  says what to fix (one log line); anything else is a bug, logged with its traceback."""
  gr = _gradio()

  def fail(e):
    if isinstance(e, gr.Error):
      raise e
    if isinstance(e, UserError):
      log.info("request refused: %s", e)
      raise gr.Error(str(e)) from None
    log.exception("request failed")
    raise gr.Error(f"internal error ({type(e).__name__}: {str(e)[:300]}); the server's log has the details") from None

  if inspect.isgeneratorfunction(fn):   # a streaming handler: its failures surface while it is iterated
    @functools.wraps(fn)
    def gen(*args):
      try:
        yield from fn(*args)
      except Exception as e:  # noqa: BLE001 - every failure is reported, none is fatal
        fail(e)
    return gen

  @functools.wraps(fn)
  def call(*args):
    try:
      return fn(*args)
    except Exception as e:  # noqa: BLE001
      fail(e)
  return call


def _status(e: Exception) -> str:
  """The status line for a failed request in the page (and one log line)."""
  if isinstance(e, UserError):
    log.info("request refused: %s", e)
    return f"⚠️ {e}"
  log.exception("request failed")
  return f"⚠️ internal error ({type(e).__name__}: {str(e)[:300]}); the server's log has the details"


def _messages(turns) -> list[dict]:
  """Alternating question/answer turns -> the chatbot's messages."""
  return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


class Handlers:
  """The app's request handlers over one Pipeline (also what the tests call directly)."""

  def __init__(self, pipe: Pipeline):
    self.pipe = pipe
    self._prepared: dict[str, object] = {}

  def image(self, path, more=None):
    """A prepared image from an uploaded file; a video's sampled frames, or the image and `more` images (paths), as
    Images (kept for the next requests about them)."""
    if not path:
      raise UserError("upload an image first")
    path, more = str(path), tuple(str(m) for m in more or ())
    if (path, more) not in self._prepared:
      # one upload at a time is all a person looks at; messages name the file, not gradio's upload folder
      name = os.path.basename(path)
      if video_files.is_video_file(path):
        if more:
          raise UserError(f"{name} is a video: it is asked about alone (clear the more images)")
        frames = images_lib.video_frames(path, video_files.FRAMES)
        prepared = Images(*(self.pipe.prepare(f, name=f"{name} frame {i}") for i, f in enumerate(frames)))
      elif more:
        prepared = Images(*(self.pipe.prepare(p, name=os.path.basename(p)) for p in (path, *more)))
      else:
        prepared = self.pipe.prepare(path, name=name)
      self._prepared = {(path, more): prepared}
    return self._prepared[(path, more)]

  def upload(self, path, more=None):
    """-> (what the model sees, notes, a fresh conversation)."""
    if not path:
      return None, "", [], []
    prepared = self.image(path, more)
    s = self.pipe.image_size
    if isinstance(prepared, Images):   # a video's frames, or several images: side by side
      w, h = prepared[0].image.size
      if video_files.is_video_file(str(path)):
        note = (f"a video: {len(prepared)} frames sampled uniformly over the clip ({w} x {h} pixels), each seen by "
                f"the model as {s} x {s}; their query outputs are concatenated (no attention maps for a video)")
      else:
        note = (f"{len(prepared)} images, each seen by the model as {s} x {s}; their query outputs are concatenated "
                "in order (zero-shot: the released weights saw one image per example; no attention maps)")
      return _side_by_side([p.image for p in prepared]), f"- {note}", [], []
    w, h = prepared.image.size
    notes = [f"{w} x {h} pixels, seen by the model as {s} x {s}"]
    return prepared.image, "\n".join(f"- {n}" for n in notes + list(prepared.notes)), [], []

  def unknown_words(self, prompt: str) -> list[str]:
    """Words of `prompt` that a tokenizer only reads as its unknown token (a small vocabulary's blind spots)."""
    out = []
    for tok in (self.pipe.tok.llm, self.pipe.tok.qformer):
      unk = tok.unk_token_id
      for word in prompt.split():
        if unk is not None and word not in out and unk in tok(word, add_special_tokens=False)["input_ids"]:
          out.append(word)
    return out

  def answer(self, path, prompt, turns, mode, beams, temperature, top_k, top_p, max_new_tokens,
             repetition_penalty, seed, more=None):
    """Streams (conversation, answer, turns) as the answer grows; the last update has the turns with it."""
    prepared = self.image(path, more)
    prompt = (prompt or "").strip()
    if not prompt:
      raise UserError("the prompt is empty: type an instruction or a question about the image")
    turns = list(turns or [])
    conversation = Conversation(tuple(turns) + (prompt,))
    settings = decoding_settings(mode, beams, temperature, top_k, top_p, max_new_tokens, repetition_penalty, seed)
    history = _messages(turns)
    if settings.get("num_beams", 1) == 1:
      stream = self.pipe.stream(prepared, conversation, **settings)
      for chunk in stream:
        yield history + _messages([prompt, chunk.text]), chunk.text, turns
      answer = stream.answer.text
    else:   # beam search knows its answer only at the end
      yield history + _messages([prompt, "…"]), "", turns
      answer = self.pipe(prepared, conversation, **settings)
    turns = turns + [prompt, answer]
    yield _messages(turns), answer, turns

  def last_map(self, path, turns, more=None) -> Image.Image | None:
    """The attention overlay of the conversation's last question and answer (None for a video or several images: a
    map is drawn on one image)."""
    *earlier, question, answer = turns
    prepared = self.image(path, more)
    if isinstance(prepared, Images):
      return None
    return self.pipe.attention_overlay(prepared, [Conversation(tuple(earlier) + (question,))], [answer])

  def ask(self, path, prompt, turns, mode, beams, temperature, top_k, top_p, max_new_tokens, repetition_penalty,
          seed, show_maps, more=None):
    """The API's /ask: streams (conversation, answer, overlay, turns); the overlay comes with the last update."""
    updates = self.answer(path, prompt, turns, mode, beams, temperature, top_k, top_p, max_new_tokens,
                          repetition_penalty, seed, more)
    last = next(updates)
    for update in updates:
      yield last[0], last[1], None, last[2]
      last = update
    messages, answer, new_turns = last   # the complete answer, with the map if asked for
    yield messages, answer, self.last_map(path, new_turns, more) if show_maps else None, new_turns

  def compare(self, path, prompt_a, prompt_b, mode, beams, temperature, top_k, top_p, max_new_tokens,
              repetition_penalty, seed, more=None):
    """Two instructions about the same image(s) -> (answer a, answer b, their maps side by side)."""
    prepared = self.image(path, more)
    prompts = [(p or "").strip() for p in (prompt_a, prompt_b)]
    if not all(prompts):
      raise UserError("type both instructions to compare them")
    settings = decoding_settings(mode, beams, temperature, top_k, top_p, max_new_tokens, repetition_penalty, seed)
    answers = self.pipe(prepared, prompts, **settings)
    if isinstance(prepared, Images):
      return answers[0], answers[1], None
    return answers[0], answers[1], self.pipe.attention_overlay(prepared, prompts, answers)


def _side_by_side(pictures: list[Image.Image], height: int = 160) -> Image.Image:
  """Pictures scaled to one height and placed left to right (a video's frames as the preview)."""
  scaled = [p.resize((max(1, round(p.width * height / p.height)), height)) for p in pictures]
  out = Image.new("RGB", (sum(p.width for p in scaled) + 4 * (len(scaled) - 1), height), "white")
  x = 0
  for p in scaled:
    out.paste(p, (x, 0))
    x += p.width + 4
  return out


def describe_model(path: str) -> tuple[str, bool]:
  """(one line for a person saying which weights answer, whether they are the demo's)."""
  path = os.path.normpath(path)
  try:
    with open(os.path.join(path, "config.json")) as f:
      config = json.load(f)
  except (OSError, ValueError):
    config = {}
  demo = path == DEMO_MODEL or os.path.normpath(str(config.get("model_init", ""))).endswith("instructblip-demo")
  steps = sorted(int(n) for n in os.listdir(os.path.join(path, "checkpoints")) if n.isdigit()) \
      if os.path.isdir(os.path.join(path, "checkpoints")) else []
  if path == DEMO_MODEL:
    text = (f"the demo checkpoint before instruction tuning (`{path}`); `make demo` trains it, and the next "
            "`make serve` serves the trained one")
  elif demo and steps:
    text = f"the demo trained by `make demo` (`{path}`, step {steps[-1]})"
  else:
    text = f"`{path}`" + (f" (training workdir, step {steps[-1]})" if steps else "")
  if demo:
    text += (". A tiny model that knows shapes, colours and a few dozen words (a word-level vocabulary): ask it "
             "about the shape's colour or kind, as in the examples")
  return text, demo


def build_app(pipe: Pipeline, *, title: str = "InstructBLIP (iblip_jax)", model_text: str = "",
              examples=()):
  """The gradio Blocks app over `pipe` (an iblip_jax Pipeline)."""
  gr = _gradio()
  h = Handlers(pipe)
  with gr.Blocks(title=title) as app:
    gr.Markdown(f"## {title}\nModel: {model_text or pipe.source or 'in memory'}.", elem_id="model")
    turns = gr.State([])
    with gr.Row():
      with gr.Column(scale=1):
        upload = gr.File(label="Image (JPEG, PNG, WebP, GIF, BMP) or video clip (MP4, WebM, AVI, MKV, MOV)",
                         file_types=["image", *video_files.EXTENSIONS], type="filepath", elem_id="upload",
                         height=120)
        more = gr.File(label="More images (optional): asked about together with the first, in order",
                       file_types=["image"], file_count="multiple", type="filepath", elem_id="more", height=80)
        preview = gr.Image(label="The image", interactive=False, elem_id="preview", height=200)
        notes = gr.Markdown(elem_id="notes")
        with gr.Accordion("Decoding", open=False):
          mode = gr.Radio(list(MODES), value="greedy", label="Decoding", elem_id="mode")
          beams = gr.Slider(1, 10, value=5, step=1, label="Beams (beam search)")
          temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature (sampling)")
          top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k (sampling; 0 = off)")
          top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.01, label="Top-p (sampling; 1 = off)")
          max_new = gr.Slider(1, 256, value=30, step=1, label="Max new tokens")
          repetition = gr.Slider(1.0, 2.0, value=1.5, step=0.05, label="Repetition penalty")
          seed = gr.Number(value=0, precision=0, label="Seed (sampling)")
          show_maps = gr.Checkbox(value=True, label="Attention maps")
      with gr.Column(scale=3):
        with gr.Tab("Ask"):
          with gr.Row():
            chat = gr.Chatbot(label="Conversation", elem_id="conversation", height=330)
            overlay = gr.Image(label="Where the Q-Former looked", interactive=False, elem_id="overlay",
                               format="png", height=330)
          prompt = gr.Textbox(label="Instruction", placeholder=examples[0] if examples else
                              "What is unusual about this image?", elem_id="prompt")
          if examples:
            gr.Examples([[e] for e in examples], [prompt], label="Prompts this model knows")
          with gr.Row():
            ask = gr.Button("Ask", variant="primary", elem_id="ask")
            new = gr.Button("New conversation", elem_id="new")
          status = gr.Markdown(elem_id="status")
          answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
        with gr.Tab("Compare instructions"):
          with gr.Row():
            prompt_a = gr.Textbox(label="Instruction A", elem_id="prompt_a")
            prompt_b = gr.Textbox(label="Instruction B", elem_id="prompt_b")
          compare = gr.Button("Compare", variant="primary", elem_id="compare")
          compare_status = gr.Markdown(elem_id="compare_status")
          with gr.Row():
            answer_a = gr.Textbox(label="Answer A", interactive=False, elem_id="answer_a")
            answer_b = gr.Textbox(label="Answer B", interactive=False, elem_id="answer_b")
          overlay_ab = gr.Image(label="A and B side by side", interactive=False, elem_id="overlay_ab",
                                format="png")
    decoding = [mode, beams, temperature, top_k, top_p, max_new, repetition, seed]

    def on_upload(path, more):
      """A new image starts a new conversation; a cleared field or a bad file leaves the conversation as it is."""
      if not path:
        return None, "", gr.skip(), gr.skip(), gr.skip(), gr.skip(), ""
      try:
        return (*h.upload(path, more), None, "", "")
      except Exception as e:  # noqa: BLE001 - reported in the page
        return None, "", gr.skip(), gr.skip(), gr.skip(), gr.skip(), _status(e)

    def on_ask(path, text, old_turns, *args):
      """Streams the answer; the Ask button and the prompt box are off meanwhile (the question has moved into the
      conversation) and back on when the answer is complete, while its map is still being drawn."""
      *settings, more = args
      try:
        h.image(path, more)
        if not (text or "").strip():
          raise UserError("the prompt is empty: type an instruction or a question about the image")
        unknown = h.unknown_words(text)
        note = (f"The model's vocabulary lacks {', '.join(repr(w) for w in unknown)}: it reads them as unknown "
                "words." if unknown else "")
        yield (gr.skip(), gr.skip(), gr.skip(), note or "answering…", gr.update(interactive=False),
               gr.update(value="", interactive=False))
        for messages, text_so_far, new_turns in h.answer(path, text, old_turns, *settings, more):
          yield messages, text_so_far, new_turns, gr.skip(), gr.skip(), gr.skip()
        yield gr.skip(), gr.skip(), gr.skip(), note, gr.update(interactive=True), gr.update(interactive=True)
      except Exception as e:  # noqa: BLE001 - reported in the page; the conversation stays as it was
        yield (gr.skip(), gr.skip(), gr.skip(), _status(e), gr.update(interactive=True),
               gr.update(interactive=True))

    def on_map(path, new_turns, wanted, more):
      if not wanted or len(new_turns) < 2:
        return gr.skip(), gr.skip()
      try:
        return h.last_map(path, new_turns, more), gr.skip()
      except Exception as e:  # noqa: BLE001
        return gr.skip(), _status(e)

    def on_compare(path, a, b, *settings):   # settings end with the more images
      try:
        return (*h.compare(path, a, b, *settings), "")
      except Exception as e:  # noqa: BLE001
        return gr.skip(), gr.skip(), gr.skip(), _status(e)

    for field in (upload, more):   # either one changes what is asked about: a new conversation
      field.change(on_upload, [upload, more], [preview, notes, chat, turns, overlay, answer, status], api_name=False)
    pending = []
    for trigger in (ask.click, prompt.submit):
      event = trigger(on_ask, [upload, prompt, turns] + decoding + [more], [chat, answer, turns, status, ask, prompt],
                      api_name=False, trigger_mode="multiple")
      pending += [event, event.then(on_map, [upload, turns, show_maps, more], [overlay, status], api_name=False)]
    new.click(lambda: ([], [], "", None, "", gr.update(interactive=True), gr.update(interactive=True)), None,
              [chat, turns, answer, overlay, status, ask, prompt], cancels=pending, api_name=False)
    compare.click(on_compare, [upload, prompt_a, prompt_b] + decoding + [more],
                  [answer_a, answer_b, overlay_ab, compare_status], api_name=False)
    # The HTTP API (gradio_client): the same handlers, with errors that name the mistake; the more images come last
    # and may be left out.
    api = gr.Button(visible=False)
    api.click(_friendly(h.upload), [upload, more], [preview, notes, chat, turns], api_name="upload")
    api.click(_friendly(h.ask), [upload, prompt, turns] + decoding + [show_maps, more],
              [chat, answer, overlay, turns], api_name="ask")
    api.click(_friendly(h.compare), [upload, prompt_a, prompt_b] + decoding + [more],
              [answer_a, answer_b, overlay_ab], api_name="compare")
  return app


def default_model() -> str:
  """The demo `make demo` trained, when it has a checkpoint; else the demo checkpoint before tuning."""
  return TRAINED_DEMO if os.path.isdir(os.path.join(TRAINED_DEMO, "checkpoints")) else DEMO_MODEL


def _args(argv):
  p = argparse.ArgumentParser(prog="python -m iblip_jax.serve", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default=None, help="Hugging Face InstructBLIP directory or training workdir (default: "
                 f"the trained demo {TRAINED_DEMO} if `make demo` has run, else {DEMO_MODEL})")
  p.add_argument("--dtype", default=None, help="the frozen towers' dtype: float32 (default) or bfloat16")
  p.add_argument("--port", type=int, default=7860)
  p.add_argument("--max-batch", type=int, default=4)
  return p.parse_args(argv)


def start_process() -> None:
  """What a server process does first (this one and the API, serve_api): the platform, and logs a person reads."""
  distributed.default_platform()
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
  for noisy in ("httpx", "absl"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv=None) -> int:
  args = _args(argv)
  start_process()
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # nothing leaves this machine
  model = os.path.normpath(args.model or default_model())
  try:
    _gradio()
    if not os.path.isdir(model):
      raise UserError(f"--model={model}: no such directory"
                      + (" (the demo checkpoint ships with the repository: run from a source checkout or pass "
                         "--model)" if model == DEMO_MODEL else ""))
    pipe = Pipeline.from_pretrained(model, args.dtype, max_batch=args.max_batch)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  text, demo = describe_model(model)
  app = build_app(pipe, model_text=text, examples=shapes.EXAMPLE_PROMPTS if demo else ())
  app.queue(default_concurrency_limit=1)
  print(f"serving {text}\non http://127.0.0.1:{args.port} (Ctrl-C stops)", flush=True)
  app.launch(server_name="127.0.0.1", server_port=args.port, max_file_size=MAX_UPLOAD, show_error=True,
             ssr_mode=False, quiet=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
