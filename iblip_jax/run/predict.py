"""`--config.mode=predict`: answers for images and a prompt.

  --config.predict.images=photo.jpg --config.predict.prompt="What is unusual about this image?"   (prints it)
  --config.predict.images=folder/ [--config.predict.output=answers.jsonl]                       (one line each)
`images` is a file, a folder (its .jpg/.jpeg/.png/.webp/.bmp files, sorted) or a comma-separated list. Uses the
latest training checkpoint of --workdir when given.
"""
import json
import os

import numpy as np
from PIL import Image
from tqdm import tqdm

from iblip_jax.data import preprocess, tokenize
from iblip_jax.decoding import generate
from iblip_jax.run import common, restore

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def image_paths(spec: str) -> list[str]:
  if os.path.isdir(spec):
    paths = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(EXTENSIONS))
  else:
    paths = [p.strip() for p in spec.split(",") if p.strip()]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing or not paths:
    raise ValueError(f"config.predict.images={spec!r}: " + (f"missing {missing[:5]}" if missing else "no images"))
  return paths


def run(config, workdir: str | None) -> list[dict]:
  common.validate(config, workdir, mode="predict")
  p = config.predict
  paths = image_paths(p.images)
  model, params, _ = restore.params_with_latest_checkpoint(config, workdir)
  model, tok = common.load_tokenizers(config, model)
  size = model.config.vision.image_size
  out = []
  for start in tqdm(range(0, len(paths), p.batch_size), desc="predict", disable=len(paths) <= p.batch_size):
    batch = paths[start:start + p.batch_size]
    padded = batch + [batch[-1]] * (p.batch_size - len(batch))  # one compiled shape
    pixels = []
    for path in padded:
      with Image.open(path) as im:
        pixels.append(preprocess.preprocess_image(im, size))
    inputs = tokenize.encode_prompts(tok, [p.prompt] * len(padded))
    tokens = generate(model, params, pixel_values=np.stack(pixels), **inputs, num_beams=p.num_beams,
                      max_new_tokens=p.max_new_tokens, min_new_tokens=p.min_new_tokens,
                      length_penalty=p.length_penalty, repetition_penalty=p.repetition_penalty)
    out += [{"image": path, "prompt": p.prompt, "answer": a}
            for path, a in zip(batch, tokenize.decode(tok, tokens)[:len(batch)])]
  if p.output:
    with open(p.output, "w") as f:
      for row in out:
        f.write(json.dumps(row) + "\n")
    print(f"wrote {len(out)} answers to {p.output}")
  else:
    for row in out:
      print(f"{row['image']}: {row['answer']}" if len(out) > 1 else row["answer"])
  return out
