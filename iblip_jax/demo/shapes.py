"""A procedurally generated image dataset for the embedded demo: one coloured shape on a coloured background.

  python -m iblip_jax.demo.shapes OUT_DIR [--train 2000] [--val 200] [--seed 0]

Held-in tasks (instruction tuning): captioning, VQA (colours and shape, short generated answers), question
generation. Held-out task type (zero-shot): multiple choice, the options listed in the prompt and the answer chosen
by candidate ranking; no image-text training example has that format (the language model met it in text only).
Everything is deterministic for a seed. Files: images/*.png, and JSONL files in the generic
format ({"image": relative path, "text_input", "text_output"}) or with evaluation fields.
"""
import argparse
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from iblip_jax.prompts import options_text

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
          "purple": (150, 60, 190), "white": (245, 245, 245), "black": (20, 20, 20), "orange": (245, 140, 30)}
IMAGE_SIZE = 32

CAPTION_PROMPTS = ("A short image caption:", "Briefly describe the image.", "Write a short description of the image.")
COLOR_QUESTIONS = {"shape": "What color is the shape?", "background": "What is the color of the background?"}
QA_PROMPT = "Question: {} Short answer:"
QGEN_PROMPT = "Given the image, generate a question whose answer is: {}. Question:"
SHAPE_QUESTION = "What shape is in the image?"
MC_PROMPT = "Question: {question} Options: {options}. Short answer:"
# Prompts the demo model was tuned on, for people trying it (the web demo offers them as examples).
EXAMPLE_PROMPTS = (QA_PROMPT.format(COLOR_QUESTIONS["shape"]), QA_PROMPT.format(SHAPE_QUESTION),
                   QA_PROMPT.format(COLOR_QUESTIONS["background"]), CAPTION_PROMPTS[0])


def draw(shape: str, color: str, background: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
  image = Image.new("RGB", (size, size), COLORS[background])
  d = ImageDraw.Draw(image)
  r = rng.uniform(0.22, 0.38) * size
  cx, cy = rng.uniform(r, size - r, 2)
  if shape == "circle":
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLORS[color])
  elif shape == "square":
    d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=COLORS[color])
  else:
    d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
  noise = rng.normal(0, 6, (size, size, 3))
  return Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))


def _scene(rng):
  shape = SHAPES[rng.integers(len(SHAPES))]
  color, background = rng.choice(list(COLORS), 2, replace=False)
  return shape, str(color), str(background)


def _questions(scene) -> list[tuple[str, str, list[str]]]:
  """(question, answer, the answer's category) for each thing a scene can be asked about."""
  shape, color, background = scene
  return [(COLOR_QUESTIONS["shape"], color, list(COLORS)), (COLOR_QUESTIONS["background"], background, list(COLORS)),
          (SHAPE_QUESTION, shape, list(SHAPES))]


def _options(answer: str, pool: list[str], rng: np.random.Generator) -> list[str]:
  """The answer and two other members of its category, in random order."""
  options = [answer] + [str(o) for o in rng.choice([o for o in pool if o != answer], 2, replace=False)]
  return [options[k] for k in rng.permutation(3)]


def caption(shape, color, background) -> str:
  return f"a {color} {shape} on a {background} background"


def generate(out_dir: str, *, train: int = 2000, val: int = 200, seed: int = 0) -> dict[str, str]:
  """Writes the dataset; returns {file role: path}."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  files = {name: os.path.join(out_dir, f"{name}.jsonl") for name in
           ("caption", "vqa", "qgen", "pretrain_text", "pretrain_caption", "val_vqa", "val_mc")}
  rows = {name: [] for name in files}

  def add_image(split, i, scene):
    path = f"images/{split}_{i:05d}.png"
    draw(*scene, rng).save(os.path.join(out_dir, path))
    return path

  for i in range(train):
    scene = _scene(rng)
    shape, color, background = scene
    image = add_image("train", i, scene)
    cap = caption(*scene)
    rows["caption"].append({"image": image, "text_input": str(rng.choice(CAPTION_PROMPTS)), "text_output": cap})
    question, answer = [(COLOR_QUESTIONS["shape"], color), (COLOR_QUESTIONS["background"], background),
                        (SHAPE_QUESTION, shape)][rng.integers(3)]
    rows["vqa"].append({"image": image, "text_input": QA_PROMPT.format(question), "text_output": answer})
    rows["qgen"].append({"image": image, "text_input": QGEN_PROMPT.format(answer), "text_output": question})
    # What the "pretrained" towers saw before the demo (tools/make_demo_assets.py), in two stages as in the real
    # recipe: the language model learns language and question answering from text alone, the caption written out
    # where the visual tokens will later sit ("caption" goes in front of "text_input"); then the image side learns
    # to caption with that LLM frozen.
    for q, a, pool in _questions(scene):
      rows["pretrain_text"].append({"caption": cap, "text_input": QA_PROMPT.format(q), "text_output": a})
      # like FlanT5, the language model has met multiple-choice questions in text; the multimodal demo never has
      options = _options(a, pool, rng)
      rows["pretrain_text"].append({"caption": cap, "text_input": MC_PROMPT.format(question=q, options=options_text(
          options)), "text_output": a})
    rows["pretrain_text"].append({"caption": cap, "text_input": CAPTION_PROMPTS[0], "text_output": cap})
    rows["pretrain_caption"].append({"image": image, "text_input": CAPTION_PROMPTS[0], "text_output": cap})
  for i in range(val):
    scene = _scene(rng)
    shape, color, background = scene
    image = add_image("val", i, scene)
    which = str(rng.choice(list(COLOR_QUESTIONS)))
    rows["val_vqa"].append({"id": i, "image": image, "question": COLOR_QUESTIONS[which],
                            "answers": [color if which == "shape" else background] * 10})
    question, answer, pool = _questions(scene)[rng.integers(3)]
    options = _options(answer, pool, rng)
    rows["val_mc"].append({"id": i, "image": image, "question": question, "candidates": options,
                           "answer_index": options.index(answer)})
  for name, path in files.items():
    with open(path, "w") as f:
      for row in rows[name]:
        f.write(json.dumps(row) + "\n")
  return files


def vocabulary() -> list[str]:
  """Every word the demo's texts use (for the demo's word-level tokenizers)."""
  texts = list(CAPTION_PROMPTS) + list(COLOR_QUESTIONS.values()) + [QA_PROMPT, QGEN_PROMPT, SHAPE_QUESTION,
                                                                     MC_PROMPT, "a on background"]
  words = set(SHAPES) | set(COLORS) | {"(", ")", ":", ".", "?", ",", "a", "b", "c", "d"}
  for t in texts:
    for w in t.replace("{}", " ").replace("{question}", " ").replace("{options}", " ").split():
      words.add(w.strip(".:?,").lower())
  return sorted(w for w in words if w)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("out_dir")
  parser.add_argument("--train", type=int, default=2000)
  parser.add_argument("--val", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  files = generate(args.out_dir, train=args.train, val=args.val, seed=args.seed)
  print(f"wrote {args.train} training and {args.val} validation images to {args.out_dir}: "
        + ", ".join(os.path.basename(p) for p in files.values()))


if __name__ == "__main__":
  main()
