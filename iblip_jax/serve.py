"""The local web demo: `python -m iblip_jax.serve [--model DIR] [--port 7860] [--dtype bfloat16]` (`make serve`).

Upload an image, type an instruction, choose the decoding, watch the answer stream in and see where the Q-Former
looked (its cross-attention and the answer-relevance map, iblip_jax.attention_maps); follow-up questions continue
the conversation (data/conversation.py); the "Compare instructions" tab answers two instructions about the same
image with their maps side by side. The model is the demo checkpoint (demo_assets/instructblip-demo, configs/demo.py)
unless --model names a Hugging Face InstructBLIP directory or a training workdir.

Needs gradio (the `serve` extra: pip install 'iblip_jax[serve]'). Binds to 127.0.0.1 only: the demo has no
authentication and is for the person at this machine (an SSH tunnel shows it elsewhere). A request can fail (a file
that is not an image, an animated or CMYK image is used with a note, a huge one is refused, an empty prompt), and its
message is shown; it never takes the server down. The same handlers are the HTTP API (gradio_client): /ask and
/compare.
"""
import argparse
import functools
import io
import logging
import os
import sys

import numpy as np
from PIL import Image

from iblip_jax.data.conversation import Conversation
from iblip_jax.errors import UserError
from iblip_jax.extras import require
from iblip_jax.inference import Pipeline

log = logging.getLogger(__name__)

DEMO_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "demo_assets", "instructblip-demo")
MAX_UPLOAD = "25mb"
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
  """A request's failure becomes a message in the page (gr.Error) and a line in the server's log; the server goes on.
  A UserError says what to fix; anything else is a bug, logged with its traceback."""
  gr = _gradio()

  def fail(e):
    if isinstance(e, gr.Error):
      raise e
    if isinstance(e, UserError):
      raise gr.Error(str(e)) from None
    log.exception("request failed")
    raise gr.Error(f"internal error ({type(e).__name__}: {str(e)[:300]}); the server's log has the details") from None

  if getattr(fn, "_generator", False):
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


def _generator(fn):
  fn._generator = True
  return fn


class Handlers:
  """The app's request handlers over one Pipeline (also what the tests call directly)."""

  def __init__(self, pipe):
    self.pipe = pipe
    self._prepared: dict[str, object] = {}

  def image(self, path):
    """A prepared image from an uploaded file (kept for the next requests about it)."""
    if not path:
      raise UserError("upload an image first")
    path = str(path)
    if path not in self._prepared:
      # one image at a time is all a person looks at; messages name the file, not gradio's upload folder
      self._prepared = {path: self.pipe.prepare(path, name=os.path.basename(path))}
    return self._prepared[path]

  def upload(self, path):
    """-> (what the model sees, notes, a fresh conversation)."""
    if not path:
      return None, "", [], []
    prepared = self.image(path)
    w, h = prepared.image.size
    notes = [f"{w} x {h} pixels, seen by the model as {self.pipe.image_size} x {self.pipe.image_size}"]
    return prepared.image, "\n".join(f"- {n}" for n in notes + list(prepared.notes)), [], []

  def overlay(self, prepared, prompts, answers) -> Image.Image:
    return self.pipe.attention_overlay(prepared, prompts, answers)

  @_generator
  def ask(self, path, prompt, turns, mode, beams, temperature, top_k, top_p, max_new_tokens, repetition_penalty,
          seed, show_maps):
    """Streams (conversation, answer, overlay, turns) as the answer grows; the overlay comes with the last update."""
    prepared = self.image(path)
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
        yield history + _messages([prompt, chunk.text]), chunk.text, None, turns
      answer = stream.answer.text
    else:   # beam search knows its answer only at the end
      yield history + _messages([prompt, "…"]), "", None, turns
      answer = self.pipe(prepared, conversation, **settings)
    turns = turns + [prompt, answer]
    image = self.overlay(prepared, [conversation], [answer]) if show_maps else None
    yield _messages(turns), answer, image, turns

  def compare(self, path, prompt_a, prompt_b, mode, beams, temperature, top_k, top_p, max_new_tokens,
              repetition_penalty, seed):
    """Two instructions about the same image -> (answer a, answer b, their maps side by side)."""
    prepared = self.image(path)
    prompts = [(p or "").strip() for p in (prompt_a, prompt_b)]
    if not all(prompts):
      raise UserError("type both instructions to compare them")
    settings = decoding_settings(mode, beams, temperature, top_k, top_p, max_new_tokens, repetition_penalty, seed)
    answers = self.pipe(prepared, prompts, **settings)
    return answers[0], answers[1], self.overlay(prepared, prompts, answers)


def _messages(turns) -> list[dict]:
  """Alternating question/answer turns -> the chatbot's messages."""
  return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def build_app(pipe, *, title: str = "InstructBLIP (iblip_jax)"):
  """The gradio Blocks app over `pipe` (an iblip_jax Pipeline)."""
  gr = _gradio()
  h = Handlers(pipe)
  with gr.Blocks(title=title) as app:
    gr.Markdown(f"## {title}\nModel: `{pipe.source or 'in memory'}`. Upload an image, type an instruction, watch the "
                "answer stream in. Follow-up questions continue the conversation; the maps show where the Q-Former's "
                "queries looked for this instruction (attention) and what the answer depended on (relevance).")
    turns = gr.State([])
    with gr.Row():
      with gr.Column(scale=1):
        upload = gr.File(label="Image (JPEG, PNG, WebP, GIF, BMP)", file_types=["image"], type="filepath",
                         elem_id="upload")
        preview = gr.Image(label="The image", interactive=False, elem_id="preview", height=240)
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
      with gr.Column(scale=2):
        with gr.Tab("Ask"):
          chat = gr.Chatbot(label="Conversation", elem_id="conversation", height=260)
          prompt = gr.Textbox(label="Instruction", placeholder="What is unusual about this image?", elem_id="prompt")
          with gr.Row():
            ask = gr.Button("Ask", variant="primary", elem_id="ask")
            new = gr.Button("New conversation", elem_id="new")
          answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
          overlay = gr.Image(label="Where the Q-Former looked", interactive=False, elem_id="overlay", format="png")
        with gr.Tab("Compare instructions"):
          with gr.Row():
            prompt_a = gr.Textbox(label="Instruction A", elem_id="prompt_a")
            prompt_b = gr.Textbox(label="Instruction B", elem_id="prompt_b")
          compare = gr.Button("Compare", variant="primary", elem_id="compare")
          with gr.Row():
            answer_a = gr.Textbox(label="Answer A", interactive=False, elem_id="answer_a")
            answer_b = gr.Textbox(label="Answer B", interactive=False, elem_id="answer_b")
          overlay_ab = gr.Image(label="A and B side by side", interactive=False, elem_id="overlay_ab",
                                format="png")
    decoding = [mode, beams, temperature, top_k, top_p, max_new, repetition, seed]
    upload.change(_friendly(h.upload), [upload], [preview, notes, chat, turns], api_name="upload")
    for trigger in (ask.click, prompt.submit):
      trigger(_friendly(h.ask), [upload, prompt, turns] + decoding + [show_maps], [chat, answer, overlay, turns],
              api_name="ask" if trigger == ask.click else False)
    new.click(lambda: ([], [], "", None), None, [chat, turns, answer, overlay], api_name=False)
    compare.click(_friendly(h.compare), [upload, prompt_a, prompt_b] + decoding, [answer_a, answer_b, overlay_ab],
                  api_name="compare")
  return app


def _args(argv):
  p = argparse.ArgumentParser(prog="python -m iblip_jax.serve", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default=DEMO_MODEL, help="Hugging Face InstructBLIP directory or training workdir "
                 "(default: the demo checkpoint)")
  p.add_argument("--dtype", default=None, help="the frozen towers' dtype: float32 (default) or bfloat16")
  p.add_argument("--port", type=int, default=7860)
  p.add_argument("--max-batch", type=int, default=4)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = _args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # nothing leaves this machine
  try:
    gr = _gradio()
    model = os.path.normpath(args.model)
    if not os.path.isdir(model):
      raise UserError(f"--model={args.model}: no such directory"
                      + (" (the demo checkpoint ships with the repository: run from a source checkout or pass "
                         "--model)" if args.model == DEMO_MODEL else ""))
    pipe = Pipeline.from_pretrained(model, args.dtype, max_batch=args.max_batch)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  app = build_app(pipe)
  app.queue(default_concurrency_limit=1)
  print(f"serving {model} on http://127.0.0.1:{args.port} (Ctrl-C stops)", flush=True)
  app.launch(server_name="127.0.0.1", server_port=args.port, max_file_size=MAX_UPLOAD, show_error=True,
             ssr_mode=False, quiet=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
