"""`--config.mode=predict`: answers for images and prompts, on the mesh.

  --config.predict.images=photo.jpg --config.predict.prompt="What is unusual about this image?"   (prints it)
  --config.predict.images=folder/ [--config.predict.output=answers.jsonl]                       (one line each)
  --config.predict.images=pairs.jsonl --config.predict.output=answers.jsonl   (lines {"image": ..., "prompt": ...})
`images` is a file, a folder (its .jpg/.jpeg/.png/.webp/.bmp files, sorted), a comma-separated list, or a JSONL
file of (image, prompt) pairs (a line without "prompt" takes config.predict.prompt; relative image paths are
relative to the JSONL file). A JSONL line may give several images for one prompt, {"images": [a, b], "prompt": ...}:
each goes through the ViT and the Q-Former and their query outputs are concatenated in order before the prompt
(zero-shot use: the released weights were trained on one image); its output line has "images" too.
--config.predict.attention_maps=FOLDER also draws each answer's attention overlay there (the Q-Former's
cross-attention for that instruction and the answer's relevance map; PNGs, named in the output; rows with one image).
Images are split over the processes; the answers are gathered and written once, in
input order. An image that cannot be read is reported (an "error" line in the output) and the others are answered.
With --workdir, the latest training checkpoint there answers, and a workdir without checkpoints is an error (a
mistyped path must not silently answer with the pretrained weights).
"""
import json
import logging
import os

import numpy as np
from etils import epath
from tqdm import tqdm

from iblip_jax import attention_maps as maps_lib
from iblip_jax import checkpoints, distributed, sharding
from iblip_jax.data import images, video_files
from iblip_jax.decoding import Decoding
from iblip_jax.engine import Engine, Item
from iblip_jax.errors import BadInput, UserError
from iblip_jax.run import common, restore
from iblip_jax.run.settings import ConfigError, Settings

log = logging.getLogger(__name__)

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def records_from(spec: str, prompt: str) -> list[dict]:
  """[{"id", "image", "prompt"}] from config.predict.images (see the module docstring)."""
  if spec.endswith(".jsonl"):
    return _pairs(spec, prompt)
  if os.path.isdir(spec):
    paths = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(EXTENSIONS))
  else:
    paths = [p.strip() for p in spec.split(",") if p.strip()]
  if not paths:
    raise ConfigError(f"config.predict.images={spec!r}: no images there")
  return [{"id": i, "image": p, "prompt": prompt} for i, p in enumerate(paths)]


def _pairs(path: str, prompt: str) -> list[dict]:
  if not os.path.isfile(path):
    raise ConfigError(f"config.predict.images={path!r}: no such JSONL file")
  out = []
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        row = json.loads(raw.decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: line {lineno}: not a JSON object in UTF-8 ({e})") from None
      where = f"{path}: line {lineno}"
      if not isinstance(row, dict) or not isinstance(row.get("prompt", prompt), str) or \
          ("image" in row) == ("images" in row):
        raise ConfigError(f"{where}: expected {{\"image\": path, \"prompt\": text}} or {{\"images\": [path, ...], "
                          f"\"prompt\": text}}, got {raw[:200]!r}")
      near = lambda p: p if os.path.isabs(p) else os.path.join(os.path.dirname(path), p)   # noqa: E731
      out.append({"id": len(out), "prompt": row.get("prompt", prompt),
                  **({"image": near(_image(row["image"], where, '"image"'))} if "image" in row else
                     {"images": [near(p) for p in _images(row["images"], where)]})})
  if not out:
    raise ConfigError(f"{path}: no (image, prompt) lines")
  return out


def _image(value, where: str, field: str) -> str:
  if not isinstance(value, str) or not value:
    raise ConfigError(f"{where}: {field} is {json.dumps(value)[:100]}; expected a path")
  return value


def _images(value, where: str) -> list[str]:
  if not isinstance(value, list) or not value:
    raise ConfigError(f'{where}: "images" is {json.dumps(value)[:100]}; expected a non-empty list of image paths')
  paths = [_image(v, where, f'"images"[{i}]') for i, v in enumerate(value)]
  videos = [p for p in paths if video_files.is_video_file(p)]
  if videos:
    raise ConfigError(f'{where}: "images" lists the video file {videos[0]!r}; give a video alone as "image"')
  return paths


def _item(r: dict) -> Item:
  """A record's engine item: several images (their query outputs concatenated, as a video's frames), a video file
  (its sampled frames), or one image."""
  if "images" in r:
    return Item(r["images"], r["prompt"], frames=len(r["images"]))
  return Item(r["image"], r["prompt"], frames=video_files.FRAMES if video_files.is_video_file(r["image"]) else 0)


def _source(r: dict) -> str:
  return r["image"] if "image" in r else " + ".join(r["images"])


def run(s: Settings) -> list[dict]:
  p = s.predict
  records = records_from(p.images, p.prompt)
  if s.workdir and not checkpoints.directory(s.workdir).exists():
    raise ConfigError(f"--workdir={s.workdir!r} has no checkpoints/: nothing trained to answer with. Omit --workdir "
                      f"to answer with the weights of config.model_init={s.model_init!r}")
  model, params, step, mesh, rules = restore.inference_state(s)
  if distributed.is_primary() and not step:
    print(f"using the pretrained weights of {s.model_init}" if s.model_init else
          "using freshly initialised weights (no config.model_init): the answers mean nothing", flush=True)
  model, tok = common.load_tokenizers(s, model)
  engine = Engine(model, params, tok, mesh=mesh, rules=rules, batch_size=p.batch_size)
  try:
    decoding = Decoding(num_beams=p.num_beams, max_new_tokens=p.max_new_tokens, min_new_tokens=p.min_new_tokens,
                        length_penalty=p.length_penalty, repetition_penalty=p.repetition_penalty).checked()
  except BadInput as e:
    raise ConfigError(f"config.predict: {e}") from None
  outputs = engine.generate([_item(r) for r in records], decoding,
                            progress="predict" if len(records) > p.batch_size else None)
  out = []
  for r, o in zip(records, outputs):
    if o.error:
      log.warning("%s: cannot read the image (%s)", _source(r), o.error)
    out.append({k: r[k] for k in ("image", "images", "prompt") if k in r}
               | ({"error": "unreadable image"} if o.error else {"answer": o.answers[0].text}))
  if p.attention_maps:
    _write_attention_maps(p.attention_maps, out, model, params, tok, mesh, rules, p.batch_size)
  if distributed.is_primary():
    _report(out, p.output)
  if all("error" in r for r in out):
    raise UserError(f"none of the {len(out)} images could be read (config.predict.images={p.images!r}); see the "
                    "warnings above")
  return out


def _write_attention_maps(folder: str, rows: list[dict], model, params, tok, mesh, rules, batch_size: int) -> None:
  """Each answered row's attention overlay (iblip_jax.attention_maps: the Q-Former's cross-attention and the answer's
  relevance, drawn on the image) as <folder>/<row>_<image name>.png, named in the row as "attention_map". The model
  is sharded over every process, so all of them compute; process 0 writes."""
  if not model.config.instruction_aware:
    raise ConfigError("config.predict.attention_maps: this model's Q-Former does not see the instruction "
                      "(config.model.instruction_aware=False), so there is no instruction-aware map to draw")
  answered = [(i, r) for i, r in enumerate(rows) if "answer" in r and "image" in r]   # one image: one overlay
  several = sum("images" in r for r in rows)
  if several and distributed.is_primary():
    print(f"no attention overlays for the {several} rows with several images (an overlay is drawn on one image)",
          flush=True)
  root = epath.Path(folder)
  if distributed.is_primary():
    root.mkdir(parents=True, exist_ok=True)
  size = model.config.vision.image_size
  with tqdm(total=len(answered), desc="attention maps", unit="image", disable=not distributed.is_primary()) as bar:
    for start in range(0, len(answered), batch_size):
      chunk = answered[start:start + batch_size]
      prepared = [images.prepare(r["image"], size, max_pixels=None) for _, r in chunk]   # read once already
      with sharding.context(mesh, rules):
        maps = maps_lib.compute(model, params, tok, np.stack([im.pixels for im in prepared]),
                                [r["prompt"] for _, r in chunk], [r["answer"] for _, r in chunk])
      for (i, row), image, m in zip(chunk, prepared, maps):
        path = root / f"{i:05d}_{os.path.splitext(os.path.basename(row['image']))[0]}.png"
        if distributed.is_primary():
          path.write_bytes(maps_lib.render(image.image, [m]))
        row["attention_map"] = str(path)
      bar.update(len(chunk))
  if distributed.is_primary():
    print(f"wrote {len(answered)} attention overlays to {folder}", flush=True)


def _report(rows: list[dict], output: str) -> None:
  bad = [r for r in rows if "error" in r]
  if output:
    epath.Path(output).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} lines to {output}: {len(rows) - len(bad)} answers"
          + (f", {len(bad)} images that could not be read (lines with \"error\")" if bad else ""))
  else:
    for row in rows:
      text = row.get("answer", f"ERROR: {row.get('error')}")
      print(f"{_source(row)}: {text}" if len(rows) > 1 else text)
  if bad:
    print(f"WARNING: {len(bad)} of {len(rows)} images could not be read: "
          + ", ".join(_source(r) for r in bad[:5]) + (" ..." if len(bad) > 5 else ""), flush=True)
