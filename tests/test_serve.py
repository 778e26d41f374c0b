"""The web demo on the demo checkpoint: its handlers (in process) stream the Pipeline's answer and report bad requests
as messages; the app started as `python -m iblip_jax.serve` answers through its HTTP API (gradio_client), survives
bad requests and listens on 127.0.0.1 only."""
import socket
import subprocess

import pytest
from PIL import Image

import servers

gr = pytest.importorskip("gradio", reason="the web demo needs the serve extra")

DEMO = servers.DEMO
GREEDY = ("greedy", 5, 1.0, 50, 1.0, 12, 1.5, 0)     # mode, beams, temperature, top_k, top_p, max new, penalty, seed


@pytest.fixture(scope="module")
def pipe():
  from iblip_jax.inference import Pipeline
  return Pipeline.from_pretrained(DEMO)


def test_decoding_settings_from_the_form():
  from iblip_jax.serve import decoding_settings
  assert decoding_settings(*GREEDY) == dict(num_beams=1, max_new_tokens=12, repetition_penalty=1.5)
  assert decoding_settings("beam search", 4, 1.0, 50, 1.0, 12, 1.5, 0)["num_beams"] == 4
  assert decoding_settings("sampling", 4, 0.7, 10, 0.9, 12, 1.0, 3.0) == dict(
      do_sample=True, num_beams=1, temperature=0.7, top_k=10, top_p=0.9, seed=3, max_new_tokens=12,
      repetition_penalty=1.0)


@pytest.mark.slow
def test_handlers_stream_the_pipeline_answer_and_report_bad_requests(pipe, tmp_path):
  from iblip_jax.inference import Conversation
  from iblip_jax.serve import Handlers, _friendly
  h = Handlers(pipe)
  path = servers.demo_image(tmp_path / "square.png")
  preview, notes, _, _ = h.upload(path)
  assert preview.size == (96, 96) and "96 x 96 pixels" in notes
  updates = list(h.ask(path, "what color is the shape?", [], *GREEDY, False))
  want = pipe(path, "what color is the shape?", num_beams=1, max_new_tokens=12, repetition_penalty=1.5)
  assert [u[1] for u in updates[:-1]] == [c.text for c in pipe.stream(path, "what color is the shape?",
                                                                     max_new_tokens=12, repetition_penalty=1.5)]
  messages, answer, overlay, turns = updates[-1]
  assert answer == want and overlay is None and turns == ["what color is the shape?", want]
  assert messages[-1] == {"role": "assistant", "content": want}
  # a follow-up carries the conversation (the stream's tokens are the plain call's: tests/test_inference.py)
  follow = list(h.ask(path, "what shape is it?", turns, *GREEDY, True))[-1]
  conv = Conversation(("what color is the shape?", want, "what shape is it?"))
  assert follow[1] == pipe.stream(path, conv, max_new_tokens=12, repetition_penalty=1.5).text()
  assert isinstance(follow[2], Image.Image) and len(follow[3]) == 4
  a, b, both = h.compare(path, "what color is the shape?", "what shape is it?", *GREEDY)
  assert [a, b] == pipe(path, ["what color is the shape?", "what shape is it?"], num_beams=1, max_new_tokens=12,
                        repetition_penalty=1.5)
  assert both.width > 1.5 * follow[2].width     # two columns
  # bad requests: a message for the page, never an exception that escapes
  (tmp_path / "notes.png").write_text("not an image")
  for args, match in (((str(tmp_path / "notes.png"), "q", []), "notes.png: not an image"),
                      ((path, "  ", []), "prompt is empty"), ((None, "q", []), "upload an image")):
    with pytest.raises(gr.Error, match=match):
      list(_friendly(h.ask)(*args, *GREEDY, False))
  with pytest.raises(gr.Error, match="internal error"):
    _friendly(h.compare)(path, "a", "b", "beam search", "five", 1.0, 50, 1.0, 12, 1.5, 0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  port = servers.free_port()
  proc = servers.start_server(port, tmp_path_factory.mktemp("serve") / "server.log", "--model", servers.DEMO)
  yield f"http://127.0.0.1:{port}/", port, proc
  proc.terminate()
  try:
    proc.wait(timeout=30)
  except subprocess.TimeoutExpired:
    proc.kill()


@pytest.mark.integration
def test_app_answers_through_its_http_api(server, pipe, tmp_path):
  from gradio_client import Client, handle_file
  url, port, proc = server
  client = Client(url, verbose=False)
  assert {"/ask", "/compare", "/upload"} <= set(client.view_api(print_info=False, return_format="dict")
                                                 ["named_endpoints"])
  path = servers.demo_image(tmp_path / "square.png")
  messages, answer, overlay, = client.predict(handle_file(path), "what color is the shape?", *GREEDY, True,
                                              api_name="/ask")
  assert answer == pipe(path, "what color is the shape?", num_beams=1, max_new_tokens=12, repetition_penalty=1.5)
  assert Image.open(overlay).format == "PNG"
  # bad requests are answered with their message, and the server goes on
  (tmp_path / "notes.png").write_text("not an image")
  for image, prompt, match in ((tmp_path / "notes.png", "q", "notes.png: not an image"),
                               (path, " ", "prompt is empty")):
    with pytest.raises(Exception, match=match):
      client.predict(handle_file(str(image)), prompt, *GREEDY, False, api_name="/ask")
  a, b, both = client.predict(handle_file(path), "what color is the shape?", "what shape is it?", *GREEDY,
                              api_name="/compare")
  assert a == answer and Image.open(both).width > Image.open(overlay).width
  # more images, last and optional: asked about together with the first
  from iblip_jax.inference import Images
  other = str(tmp_path / "other.png")
  Image.new("RGB", (64, 48), "red").save(other)
  _, two, no_map = client.predict(handle_file(path), "what color is the shape?", *GREEDY, True, [handle_file(other)],
                                  api_name="/ask")
  assert two == pipe(Images(path, other), "what color is the shape?", num_beams=1, max_new_tokens=12,
                     repetition_penalty=1.5) and no_map is None
  assert proc.poll() is None
  # 127.0.0.1 only
  external = servers.external_address()
  if external:
    with pytest.raises(OSError):
      socket.create_connection((external, port), timeout=2).close()


@pytest.mark.slow
def test_more_images_are_asked_about_together_in_order(pipe, tmp_path):
  """The first image and "More images": the preview shows them side by side, the answers are the Pipeline's for
  Images(first, *more) in that order, follow-ups carry the conversation, no map is drawn, a video goes alone."""
  from iblip_jax.inference import Conversation, Images
  from iblip_jax.serve import Handlers, _friendly
  h = Handlers(pipe)
  first = servers.demo_image(tmp_path / "square.png")
  second = str(tmp_path / "other.png")
  Image.new("RGB", (64, 48), "red").save(second)
  preview, notes, _, _ = h.upload(first, [second])
  assert "2 images" in notes and preview.width > 1.5 * preview.height
  settings = dict(num_beams=1, max_new_tokens=12, repetition_penalty=1.5)
  q = "what color is the shape?"
  _, answer, overlay, turns = list(h.ask(first, q, [], *GREEDY, True, [second]))[-1]
  assert answer == pipe(Images(first, second), q, **settings) and overlay is None
  follow = list(h.ask(first, "what shape is it?", turns, *GREEDY, True, [second]))[-1]
  assert follow[1] == pipe(Images(first, second), Conversation((*turns, "what shape is it?")), **settings)
  a, b, both = h.compare(first, q, "what shape is it?", *GREEDY, [second])
  assert [a, b] == pipe(Images(first, second), [q, "what shape is it?"], **settings) and both is None
  assert list(h.ask(first, q, [], *GREEDY, False))[-1][1] == pipe(first, q, **settings)   # none: the one image
  pytest.importorskip("av")
  import video_clips
  clip = str(video_clips.write(tmp_path / "clip.mp4", 6))
  with pytest.raises(gr.Error, match="clip.mp4 is a video: it is asked about alone"):
    _friendly(h.upload)(clip, [second])


@pytest.mark.slow
def test_a_video_clip_is_answered_from_its_sampled_frames(pipe, tmp_path):
  """An uploaded clip: the preview shows its 4 sampled frames side by side, the answers are the Pipeline's for the
  clip (its frames' query outputs concatenated), a follow-up carries the conversation, and no map is drawn."""
  pytest.importorskip("av")
  import video_clips
  from iblip_jax.inference import Conversation
  from iblip_jax.serve import Handlers
  h = Handlers(pipe)
  clip = str(video_clips.write(tmp_path / "clip.mp4", 10))
  preview, notes, _, _ = h.upload(clip)
  assert "a video: 4 frames" in notes and preview.width > 4 * preview.height
  settings = dict(num_beams=1, max_new_tokens=12, repetition_penalty=1.5)
  messages, answer, overlay, turns = list(h.ask(clip, "what color is the shape?", [], *GREEDY, True))[-1]
  assert answer == pipe(clip, "what color is the shape?", **settings) and overlay is None
  follow = list(h.ask(clip, "what shape is it?", turns, *GREEDY, True))[-1]
  assert follow[1] == pipe(clip, Conversation((*turns, "what shape is it?")), **settings)
  a, b, both = h.compare(clip, "what color is the shape?", "what shape is it?", *GREEDY)
  assert [a, b] == pipe(clip, ["what color is the shape?", "what shape is it?"], **settings) and both is None
  (tmp_path / "cut.mp4").write_bytes(open(clip, "rb").read()[:200])
  with pytest.raises(Exception, match="cut.mp4"):
    h.upload(str(tmp_path / "cut.mp4"))
