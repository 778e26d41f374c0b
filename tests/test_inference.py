"""The one-call Pipeline on tiny T5 and Vicuna checkpoints with word-level tokenizers: its answers equal
iblip_jax.generate / rank on hand-prepared inputs (single images, mixed-prompt batches, chunked batches), streaming
yields the plain call's tokens, best-of-n keeps its likeliest sample, conversations render as documented, bad inputs
get clear messages, compiled programs are reused, and a training workdir answers with its checkpoint's weights."""
import io
import json
import os
import threading

import jax
import numpy as np
import pytest
from PIL import Image

import iblip_jax
import oracle
from iblip_jax import inference, sampling
from iblip_jax.data import preprocess, readers, tokenize
from iblip_jax.errors import UserError
from iblip_jax.inference import BadInput, Conversation, Pipeline

WORDS = ("what color is the cat dog red blue green a picture of where left right sky describe this image short "
         "answer question history q dialog yes no").split()
# one token bucket (8) for all of them, Q-Former and LLM, so that subsets of them share compiled programs
PROMPTS = ["what color is the cat", "describe this image", "where is the dog", "is it the sky"]
# Settings shared by the tests, so that they share compiled programs (one per shape and static setting).
GREEDY = dict(num_beams=1, max_new_tokens=7, min_new_tokens=1, repetition_penalty=1.0)
BEAM = dict(num_beams=3, max_new_tokens=7, min_new_tokens=1, repetition_penalty=1.3)
SAMPLE = dict(do_sample=True, temperature=1.3, top_k=20, top_p=0.95, max_new_tokens=7)


def _images(n: int = 4, seed: int = 0) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (20 + 7 * i, 40 - 5 * i, 3), dtype=np.uint8) for i in range(n)]


def _checkpoint(root, name: str, llama: bool, seed: int):
  return oracle.word_checkpoint(root / name, WORDS, llama=llama, seed=seed)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  return {"t5": _checkpoint(root, "t5", False, 7), "vicuna": _checkpoint(root, "vicuna", True, 8)}


@pytest.fixture(scope="module")
def pipes(paths):
  return {name: Pipeline.from_pretrained(path) for name, path in paths.items()}


def _by_hand(pipe: Pipeline, images, prompts) -> dict:
  """The model's inputs prepared without the pipeline: preprocess + encode_prompts, exactly the items given."""
  size = pipe.model.config.vision.image_size
  return dict(pixel_values=np.stack([preprocess.preprocess_image(im, size) for im in images]),
              **tokenize.encode_prompts(pipe.tok, prompts))


def _generate(pipe: Pipeline, images, prompts, **settings) -> list[str]:
  return tokenize.decode(pipe.tok, iblip_jax.generate(pipe.model, pipe.params, **_by_hand(pipe, images, prompts),
                                                      **settings))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["t5", "vicuna"])
def test_answers_equal_generate_on_hand_prepared_inputs(pipes, which):
  pipe = pipes[which]
  images = _images()
  want = _generate(pipe, images, PROMPTS, **BEAM)                 # a mixed-prompt batch of 4
  assert pipe(images, PROMPTS, **BEAM) == want
  assert len(set(want)) > 1
  assert pipe(images[:3], PROMPTS[:3], **BEAM) == want[:3]        # 3 items padded to the batch bucket of 4
  # one image, several prompts; several images, one prompt
  assert pipe(images[0], PROMPTS[:3], **BEAM) == pipe([images[0]] * 3, PROMPTS[:3], **BEAM)
  assert pipe(images[:3], PROMPTS[0], **BEAM) == pipe(images[:3], [PROMPTS[0]] * 3, **BEAM)
  # one image alone, greedy
  assert pipe(images[1], PROMPTS[1], **GREEDY) == _generate(pipe, images[1:2], PROMPTS[1:2], **GREEDY)[0]
  # chunks of 2, with each item's 2 best beams (best first)
  beams = _generate(pipe, images[2:], PROMPTS[2:], num_return_sequences=2, **BEAM)
  chunked = Pipeline(pipe.model, pipe.params, pipe.tok, max_batch=2)
  assert chunked(images, PROMPTS, num_return_sequences=2, **BEAM)[2:] == [beams[:2], beams[2:]]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["t5", "vicuna"])
def test_stream_yields_the_tokens_of_the_plain_call(pipes, which, monkeypatch):
  pipe = pipes[which]
  image = _images()[2]
  # XLA compiles on the consumer's thread, never on the stream's own (sampling.precompile says why)
  from jax._src import compiler
  compiled_on, compile_ = [], compiler.backend_compile_and_load
  monkeypatch.setattr(compiler, "backend_compile_and_load",
                      lambda *a, **k: compiled_on.append(threading.current_thread().name) or compile_(*a, **k))
  for settings in (GREEDY, dict(SAMPLE, seed=4)):
    plain = pipe(image, "describe this image", details=True, **settings)
    jax.clear_caches()   # every program the stream needs is compiled in it
    compiled_on.clear()
    stream = pipe.stream(image, "describe this image", **settings)
    chunks = list(stream)
    assert compiled_on and set(compiled_on) == {threading.current_thread().name}, compiled_on
    assert tuple(c.token for c in chunks) == plain.tokens == stream.answer.tokens
    assert chunks[-1].text == plain.text == stream.answer.text
    assert "".join(c.delta for c in chunks) == plain.text
    # greedy: the streamed log-probability (in the loop) equals the plain call's (teacher-forced ranking score)
    assert stream.answer.logprob == pytest.approx(plain.logprob, rel=1e-4, abs=1e-4)
  eos = pipe.model.config.text.eos_token_id
  direct = np.asarray(iblip_jax.generate(pipe.model, pipe.params, **_by_hand(pipe, [image], ["describe this image"]),
                                         **GREEDY))[0]
  hit = np.flatnonzero(direct == eos)
  assert pipe(image, "describe this image", details=True, **GREEDY).tokens == \
      tuple(int(x) for x in (direct[:hit[0] + 1] if len(hit) else direct))


@pytest.mark.slow
def test_sampling_seeds_and_best_of(pipes):
  pipe = pipes["vicuna"]
  image, prompt = _images()[0], "describe this image"
  settings = dict(SAMPLE, top_k=0, seed=3)
  four = pipe(image, prompt, num_return_sequences=4, details=True, **settings)
  assert four == pipe(image, prompt, num_return_sequences=4, details=True, **settings)     # the seed reproduces
  assert len({a.tokens for a in four}) > 1
  scores = [a.logprob / len(a.tokens) for a in four]   # length_penalty 1: per-token log-probability
  best = pipe(image, prompt, best_of=4, details=True, **settings)
  assert best == four[int(np.argmax(scores))]
  two = pipe(image, prompt, best_of=4, num_return_sequences=2, details=True, **settings)
  assert two == [four[i] for i in np.argsort(scores)[::-1][:2]]
  # an item's samples do not depend on the batch it is in
  batch = pipe([_images()[1], image], ["what color is the cat", prompt], num_return_sequences=4, details=True,
               **settings)
  assert batch[1] == four
  assert pipe(image, prompt, **dict(GREEDY, do_sample=True, temperature=0)) == pipe(image, prompt, **GREEDY)


def test_rank_equals_iblip_jax_rank(pipes):
  pipe = pipes["t5"]
  images = _images()
  cands = [["red", "blue", "green"], ["yes", "no"], ["left", "right", "sky", "dog"], ["cat", "dog"]]
  got = pipe.rank(images, PROMPTS, cands)
  scores, _ = iblip_jax.rank(pipe.model, pipe.params, **_by_hand(pipe, images, PROMPTS),
                             candidate_labels=tokenize.encode_candidates(pipe.tok, cands))
  for i, r in enumerate(got):
    np.testing.assert_allclose(r.scores, np.asarray(scores)[i, :len(cands[i])], rtol=1e-5)
    assert r.best == cands[i][r.index] and r.index == int(np.argmax(r.scores)) and r.candidates == tuple(cands[i])
  # padding candidates (score 0, above every real log-likelihood) never win
  assert all(max(r.scores) < 0 for r in got) and got[1].index in (0, 1)
  shared = pipe.rank(images, PROMPTS, cands[2])
  assert shared[2].scores == pytest.approx(got[2].scores, rel=1e-5)


def test_conversation_renders_llava_turns(tmp_path):
  conversation = [{"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A cat."},
                  {"from": "human", "value": "What colour is it? "}, {"from": "gpt", "value": " Red. "},
                  {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "On a mat."}]
  (tmp_path / "detail_23k.json").write_text(json.dumps([{"id": "1", "image": "1.jpg",
                                                          "conversations": conversation}]))
  records = list(readers.read_llava_instruct(str(tmp_path), "llava_detail", turns="all"))
  conv = Conversation.from_llava(conversation)   # the final gpt turn is what is asked for: dropped
  assert conv.turns[::2] == tuple(r["text_input"] for r in records)      # the reader's rendering of human turns
  assert conv.turns[1::2] == tuple(r["text_output"] for r in records[:2])
  assert Conversation(("<image> What is in the picture? ",)).render() == "What is in the picture?"
  assert conv.render() == ("Dialog history: q: What is in the picture? a: A cat. q: What colour is it? a: Red.\n"
                           " Question: Where is it?")
  assert Conversation(("a", "b", "c")).then("d", "e").turns == ("a", "b", "c", "d", "e")
  for bad in ((), ("q", "a")):
    with pytest.raises(BadInput, match="ends with a question"):
      Conversation(bad)


@pytest.mark.slow
def test_chat_puts_earlier_turns_into_the_prompt(pipes):
  pipe = pipes["t5"]
  image = _images()[0]
  chat = pipe.chat(image, **GREEDY)
  first = chat.ask("what color is the cat")
  assert first == pipe(image, "what color is the cat", **GREEDY)
  streamed = chat.stream("where is the dog")
  second = streamed.text()
  conv = Conversation(("what color is the cat", first, "where is the dog"))
  assert second == pipe(image, conv, **GREEDY) == pipe(image, conv.render(), **GREEDY)
  assert chat.turns == ["what color is the cat", first, "where is the dog", second]
  chat.reset()
  assert chat.turns == []


def test_bad_inputs_are_named(pipes, tmp_path):
  pipe = pipes["t5"]
  image = _images()[0]
  (tmp_path / "notes.txt").write_text("not an image")
  cases = [((str(tmp_path / "notes.txt"), "q"), "not an image"),
           ((str(tmp_path / "missing.png"), "q"), "no such image file"),
           ((b"\x89PNG\r\n\x1a\n garbage", "q"), "not an image|cannot be read"),
           ((image, "   "), "prompt is empty"),
           ((image, ""), "prompt is empty"),
           ((_images(2), PROMPTS), "2 images and 4 prompts"),
           ((np.zeros((4, 4, 3), np.float32), "q"), "dtype float32")]
  for args, match in cases:
    with pytest.raises(BadInput, match=match):
      pipe(*args, num_beams=1, max_new_tokens=2)
  # a huge image is refused from its header, before decoding (a 1-bit PNG of 81 megapixels is a few kB)
  huge = tmp_path / "huge.png"
  Image.new("1", (9000, 9000)).save(huge)
  assert huge.stat().st_size < 100_000
  with pytest.raises(BadInput, match="9000 x 9000 pixels"):
    pipe(str(huge), "q", num_beams=1, max_new_tokens=2)
  for settings, match in ((dict(temperatur=1.0), "unknown decoding settings"),
                          (dict(do_sample=True, num_beams=3), "beam sampling"),
                          (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
                          (dict(best_of=2), "best_of needs do_sample"),
                          (dict(do_sample=True, top_p=1.5), "top_p")):
    with pytest.raises(BadInput, match=match):
      pipe(image, "q", **settings)
  with pytest.raises(BadInput, match="streaming"):
    pipe.stream(image, "q", num_beams=4)
  assert issubclass(BadInput, UserError)


def test_cmyk_and_animated_images_are_used_with_a_note(tmp_path):
  cmyk = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).convert("CMYK")
  cmyk.save(tmp_path / "cmyk.jpg")
  rgb, notes = inference.open_image(str(tmp_path / "cmyk.jpg"))
  assert rgb.mode == "RGB" and rgb.size == (30, 20) and "CMYK" in notes[0]
  frames = [Image.new("RGB", (16, 12), c) for c in ("red", "blue", "green")]
  frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
  rgb, notes = inference.open_image(str(tmp_path / "anim.gif"))
  assert "first of its 3 frames" in notes[0]
  assert np.asarray(rgb)[0, 0].tolist() == [255, 0, 0]    # the first frame
  with open(tmp_path / "anim.gif", "rb") as f:
    assert inference.open_image(f.read())[1] == notes     # bytes, as an upload arrives
  truncated = io.BytesIO()
  Image.new("RGB", (64, 64), "red").save(truncated, "PNG")
  with pytest.raises(BadInput, match="cannot be decoded|cannot be read"):
    inference.open_image(truncated.getvalue()[:60])


@pytest.mark.slow
def test_compiled_programs_are_reused(pipes):
  pipe = pipes["t5"]
  images = _images()
  before = sampling._decode._cache_size()
  pipe(images, PROMPTS, do_sample=True, max_new_tokens=10, seed=1)                     # batch 4, width 16
  after_first = sampling._decode._cache_size()
  pipe(images[:3], PROMPTS[:3], do_sample=True, max_new_tokens=12, seed=2, temperature=0.5, top_k=3, top_p=0.9,
       repetition_penalty=1.2, min_new_tokens=2)                                       # batch 4, width 16 again
  assert sampling._decode._cache_size() == after_first <= before + 1


@pytest.mark.slow
def test_workdir_answers_with_its_latest_checkpoint(paths, tmp_path, monkeypatch):
  """A workdir as training leaves it (config.json naming model_init relative to where the job ran, checkpoints/
  with the trainable tree and optimizer state): the pipeline answers with the checkpoint's trainable weights."""
  from iblip_jax import checkpoints, config_lib, trainable as trainable_lib
  from iblip_jax.run import common, settings
  monkeypatch.chdir(tmp_path)
  os.symlink(paths["t5"], tmp_path / "weights")
  workdir = tmp_path / "runs" / "one"
  workdir.mkdir(parents=True)
  config = config_lib.base({})
  config.model_init = "weights"                       # relative, as configs/demo.py names its assets
  config.mesh.fsdp, config.max_replicated_mb = -1, 1024.0
  s = settings.resolve(config, str(workdir), "predict")
  model = iblip_jax.InstructBlip(s.model)
  setup = common.setup(s, model)
  trainable, frozen = trainable_lib.split(common.load_params(s, model, setup), s.trainable)
  trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(0), x.shape, x.dtype), trainable)
  mngr = checkpoints.manager(str(workdir))
  checkpoints.save(mngr, 7, {"trainable": trained, "opt_state": setup.init_opt_state(trained)}, force=True)
  mngr.wait_until_finished()
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  monkeypatch.chdir(tmp_path / "runs")                # elsewhere: "weights" is found next to an ancestor of the workdir
  pipe = Pipeline.from_pretrained(str(workdir))
  merged = jax.device_get(trainable_lib.merge(trained, frozen))
  for got, want in zip(jax.tree.leaves(jax.device_get(pipe.params)), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(got, want)
  images = _images()
  direct = np.asarray(iblip_jax.generate(pipe.model, merged, **_by_hand(pipe, images, PROMPTS), **GREEDY))
  assert pipe(images, PROMPTS, **GREEDY) == tokenize.decode(pipe.tok, direct)
  empty = tmp_path / "runs" / "empty"
  empty.mkdir()
  (empty / "config.json").write_text(config.to_json_best_effort(indent=2))
  with pytest.raises(UserError, match="no checkpoints"):
    Pipeline.from_pretrained(str(empty))


def test_annotate_streams_answers_in_batches_equal_to_the_plain_call(pipes):
  """Pipeline.annotate reads its iterable lazily (about two batches ahead of what it yields), asks every prompt of
  every image, and gives the plain call's answers; an unreadable image is an error row, the others go on."""
  pipe = Pipeline(pipes["t5"].model, pipes["t5"].params, pipes["t5"].tok, max_batch=4)
  images = _images(6)
  taken = []

  def source():
    for i, image in enumerate(images):
      taken.append(i)
      yield (f"k{i}", b"not an image" if i == 3 else image)

  rows = pipe.annotate(source(), PROMPTS[:2], **GREEDY)
  first = next(rows)
  assert first["key"] == "k0" and first["prompt"] == PROMPTS[0] and len(taken) <= 4   # 2 images a batch, 2 ahead
  rows = [first, *rows]
  assert [(r["key"], r["prompt"]) for r in rows] == [(f"k{i}", p) for i in range(6) for p in PROMPTS[:2]]
  good = [im for i, im in enumerate(images) if i != 3]
  for p in PROMPTS[:2]:
    want = pipe(good, p, **GREEDY)
    assert [r["answer"] for r in rows if r["prompt"] == p and r["key"] != "k3"] == want
  assert all("not an image" in r["error"] for r in rows if r["key"] == "k3")
  # several images for one row, beside single ones: the plain call's answers for Images(...)
  from iblip_jax.inference import Images
  mixed = [images[0], Images(images[1], images[2]), ("pair", Images(images[2], images[0]))]
  rows = list(pipe.annotate(mixed, PROMPTS[0], **GREEDY))
  assert [r["key"] for r in rows] == [0, 1, "pair"]
  assert [r["answer"] for r in rows] == [pipe(x, PROMPTS[0], **GREEDY) for x in
                                         (images[0], Images(images[1], images[2]), Images(images[2], images[0]))]


@pytest.mark.parametrize("which", ["t5"])   # the LLM sees a video as any visual input: the T5 path stands for both
def test_a_video_file_is_answered_as_its_four_uniformly_sampled_frames(pipes, which, tmp_path):
  """pipe("clip.mp4", prompt): the answer generate gives for frames 0, 2, 5 and 7 of the 10-frame clip (the
  uniform sampling of 4), decoded here with PyAV itself; a damaged clip fails the call naming it."""
  av = pytest.importorskip("av")
  import video_clips
  pipe, size = pipes[which], pipes[which].model.config.vision.image_size
  path = video_clips.write(tmp_path / "clip.mp4", 10)
  with av.open(str(path)) as container:
    decoded = [frame.to_image() for frame in container.decode(video=0)]
  assert len(decoded) == 10
  pixel_values = np.stack([preprocess.preprocess_image(decoded[i], size) for i in (0, 2, 5, 7)])[None]
  want = tokenize.decode(pipe.tok, iblip_jax.generate(pipe.model, pipe.params, pixel_values=pixel_values,
                                                      **tokenize.encode_prompts(pipe.tok, [PROMPTS[1]]), **GREEDY))
  assert pipe(str(path), PROMPTS[1], **GREEDY) == want[0]
  (tmp_path / "cut.mp4").write_bytes(path.read_bytes()[:200])
  with pytest.raises(BadInput, match="cut.mp4"):
    pipe(str(tmp_path / "cut.mp4"), PROMPTS[1])


@pytest.mark.parametrize("which", ["t5", "vicuna"])
def test_several_images_in_one_prompt(pipes, which):
  """Images(a, b): the LLM's visual input is a's 32 query outputs then b's, each computed alone with the same
  instruction (order matters); the answer is generate's on that input; a call mixing one-image and two-image items
  answers each as it would alone."""
  from iblip_jax.inference import Images
  pipe = pipes[which]
  a, b, c = _images(3)
  prep = lambda x: preprocess.preprocess_image(x, pipe.model.config.vision.image_size)
  q = tokenize.encode_prompts(pipe.tok, [PROMPTS[0]])
  tokens = lambda pixel_values: np.asarray(pipe.model.apply(
      {"params": pipe.params}, pixel_values, q["qformer_input_ids"], q["qformer_attention_mask"],
      method="visual_tokens"))
  two = tokens(np.stack([prep(a), prep(b)])[None])
  alone = [tokens(prep(x)[None]) for x in (a, b)]
  np.testing.assert_allclose(two, np.concatenate(alone, axis=1), atol=1e-5)
  assert not np.allclose(two, tokens(np.stack([prep(b), prep(a)])[None]), atol=1e-3)
  want = tokenize.decode(pipe.tok, iblip_jax.generate(pipe.model, pipe.params,
                                                      pixel_values=np.stack([prep(a), prep(b)])[None], **q, **GREEDY))
  assert pipe(Images(a, b), PROMPTS[0], **GREEDY) == want[0]
  items = [a, Images(a, b), c, Images(b, c)]
  assert pipe(items, PROMPTS[0], **GREEDY) == [pipe(x, PROMPTS[0], **GREEDY) for x in items]
  with pytest.raises(BadInput, match="at least one image"):
    Images()


def test_predict_jsonl_with_several_images_answers_as_the_pipeline(pipes, paths, tmp_path, monkeypatch):
  """--config.mode=predict on a JSONL mixing {"image"} and {"images": [...]} lines: each answer is the Pipeline's for
  that image or those Images (in order), the output keeps the field it was given; bad "images" values are named."""
  from iblip_jax import config_lib
  from iblip_jax.inference import Images
  from iblip_jax.run import predict, settings
  pipe = pipes["t5"]
  names = []
  for i, image in enumerate(_images(3)):
    Image.fromarray(image).save(tmp_path / f"{i}.png")
    names.append(f"{i}.png")
  lines = [{"image": names[0], "prompt": PROMPTS[0]}, {"images": [names[0], names[1]], "prompt": PROMPTS[0]},
           {"images": [names[1], names[0]], "prompt": PROMPTS[1]}, {"images": [names[2]]}]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  config = config_lib.base({})
  config.model_init = paths["t5"]
  config.mesh.fsdp, config.max_replicated_mb = -1, 1024.0
  config.predict.update(images=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out.jsonl"), prompt=PROMPTS[2],
                        num_beams=GREEDY["num_beams"], max_new_tokens=GREEDY["max_new_tokens"],
                        min_new_tokens=GREEDY["min_new_tokens"], repetition_penalty=1.0, batch_size=2)
  predict.run(settings.resolve(config, "", "predict"))
  rows = [json.loads(l) for l in open(tmp_path / "out.jsonl")]
  path = lambda n: str(tmp_path / n)   # noqa: E731
  assert [r.get("image") or r["images"] for r in rows] == [path(names[0]), [path(names[0]), path(names[1])],
                                                          [path(names[1]), path(names[0])], [path(names[2])]]
  a, b, c = (Image.open(path(n)) for n in names)
  want = [pipe(a, PROMPTS[0], **GREEDY), pipe(Images(a, b), PROMPTS[0], **GREEDY),
          pipe(Images(b, a), PROMPTS[1], **GREEDY), pipe(Images(c), PROMPTS[2], **GREEDY)]
  assert [r["answer"] for r in rows] == want
  for bad, message in [({"images": []}, '"images" is \\[\\]; expected a non-empty list'),
                       ({"images": [names[0], 3]}, '"images"\\[1\\] is 3; expected a path'),
                       ({"images": ["clip.mp4"]}, '"images" lists the video file'),
                       ({"image": names[0], "images": [names[0]]}, "expected")]:
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(settings.ConfigError, match=f"bad.jsonl: line 1: {message}"):
      predict.records_from(str(tmp_path / "bad.jsonl"), "p")


@pytest.mark.parametrize("which", ["t5"])
def test_chat_over_several_images(pipes, which):
  """pipe.chat(Images(a, b)): each turn answers as the plain call on Images(a, b) with the earlier turns."""
  from iblip_jax.inference import Images
  pipe = pipes[which]
  a, b = _images(2)
  chat = pipe.chat(Images(a, b), **GREEDY)
  first = chat.ask(PROMPTS[2])   # a prompt the tiny model answers with words, so that the turn is in the next prompt
  assert first and first == pipe(Images(a, b), PROMPTS[2], **GREEDY)
  second = chat.ask(PROMPTS[3])
  assert second == pipe(Images(a, b), Conversation((PROMPTS[2], first, PROMPTS[3])), **GREEDY)
