"""Input pipeline throughput against the train step it feeds, on this machine.

  python tools/bench_pipeline.py [--batch 32] [--workers 0,1,2] [--batches 12] [--steps 3] [--images 256]

Generates `--images` JPEGs of 480x640 (a smooth random field plus grain, quality 90: ~75 KiB each) and a
JSONL of VQA-style instruction/answer pairs in a temporary directory, then times the full training pipeline
(iblip_jax.data.pipeline: decode, RandomResizedCrop, bicubic resize to 224, CLIP normalisation, tokenisation,
bucketed batching) at each worker count, from the JSONL records (image files) and from the same records prepared as
a tfds ArrayRecord dataset (image bytes). Then times the CPU train step (frozen ViT and T5, AdamW on the Q-Former
side) of the base-size model of tools/bench.py (ViT-B/16 224 px, BERT-base Q-Former, 32 queries, T5 512-d 8+8
layers) on a batch from the same pipeline, and prints pipeline batches/s against train steps/s.

Tokenisation uses the demo's word-level tokenizers (demo_assets/, Hugging Face `tokenizers`, the same code path as
the released tokenizers; no network here to fetch those).
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark: no accelerator plugin probing (libtpu is installed)
from iblip_jax.data import mixture, pipeline, readers, tfds_builder, tokenize  # noqa: E402

TOKENIZERS = os.path.join(os.path.dirname(__file__), "..", "demo_assets", "instructblip-demo")
QUESTIONS = ("what is the man holding in his left hand", "how many people are sitting on the bench",
             "what color is the umbrella near the door", "is there a dog in the picture")
ANSWERS = ("a red umbrella", "three", "blue", "no")

# tools/bench.py's base-size InstructBLIP (there in transformers' terms), here as an iblip_jax model config
BASE = dict(
    vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                image_size=224, patch_size=16),
    qformer=dict(vocab_size=30523, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, cross_attention_frequency=2),
    text=dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6,
              dense_act_fn="gelu"),
    num_query_tokens=32)


def make_data(directory: str, n: int) -> str:
  """n JPEGs (480x640) and a JSONL naming them; returns the JSONL path."""
  rng = np.random.default_rng(0)
  lines = []
  for i in range(n):
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
    pixels = np.asarray(coarse, np.int16) + rng.normal(0, 6, (480, 640, 3)).astype(np.int16)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(directory, f"{i}.jpg"), quality=90)
    k = i % len(QUESTIONS)
    lines.append({"image": f"{i}.jpg", "text_input": f"Question: {QUESTIONS[k]}? Short answer:",
                  "text_output": ANSWERS[k]})
  path = os.path.join(directory, "data.jsonl")
  with open(path, "w") as f:
    f.writelines(json.dumps(x) + "\n" for x in lines)
  return path


def time_pipeline(source, tok, *, batch: int, workers: int, batches: int) -> dict:
  """Seconds to the first batch (start-up, workers included) and records/s over the next `batches`."""
  mixed = mixture.mix({"data": source}, {"data": 1.0}, seed=0)
  p = pipeline.build(mixed, tok, batch_size=batch, image_size=224, seed=0, train=True, workers=workers)
  t0 = time.perf_counter()
  it = iter(p.dataset)
  first = next(it)
  startup = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - t0
  del it
  return dict(startup=startup, batches_per_s=batches / seconds, records_per_s=batches * batch / seconds,
              batch=first)


def time_train_step(batch: dict, steps: int) -> dict:
  import jax
  import jax.numpy as jnp
  from iblip_jax import config_lib, sharding, train_state
  from iblip_jax.models.instructblip import InstructBlip
  from iblip_jax.run import settings
  s = settings.for_tools(config_lib.base(BASE))
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  setup = train_state.build(InstructBlip(s.model), patterns=s.trainable, optim=s.optim, total_steps=1000, mesh=mesh,
                            rules=s.sharding_rules)
  trainable, frozen = setup.init_random(jax.random.key(s.seed))
  step = setup.train_step(dropout=False)
  x = {k: jnp.asarray(v) for k, v in batch.items()}
  state = {"t": trainable, "o": setup.init_opt_state(trainable)}

  def run():
    state["t"], state["o"], m = step(state["t"], state["o"], frozen, x, jax.random.key(0))
    m["loss"].block_until_ready()

  t0 = time.perf_counter()
  run()
  first = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return dict(first=first, step=statistics.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--batches", type=int, default=12, help="timed batches per pipeline run (after the first)")
  parser.add_argument("--steps", type=int, default=3, help="timed train steps (after the first)")
  parser.add_argument("--images", type=int, default=256)
  parser.add_argument("--skip_train", action="store_true")
  args = parser.parse_args()
  import grain
  import jax
  import tensorflow_datasets as tfds
  print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; jax {jax.__version__}, "
        f"grain {grain.__version__ if hasattr(grain, '__version__') else '?'}, tfds {tfds.__version__}, "
        f"Pillow {Image.__version__}", flush=True)
  tok = tokenize.load_tokenizers(TOKENIZERS)
  results = {}
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    jsonl = make_data(d, args.images)
    sizes = [os.path.getsize(os.path.join(d, f"{i}.jpg")) for i in range(args.images)]
    print(f"{args.images} JPEGs 480x640, mean {np.mean(sizes) / 1024:.0f} KiB, made in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    t0 = time.perf_counter()
    tfds_builder.prepare("jsonl", jsonl, os.path.join(d, "tfds"), name="bench")
    print(f"prepared as tfds ArrayRecord in {time.perf_counter() - t0:.1f}s", flush=True)
    sources = {"jsonl (files)": mixture.source(list(readers.read_jsonl(jsonl))),
               "tfds ArrayRecord": tfds_builder.data_source(os.path.join(d, "tfds"), "bench", "train")}
    print(f"\n{'source':<18} {'workers':>7} {'records/s':>10} {'batches/s':>10} {'first batch s':>14}", flush=True)
    for name, source in sources.items():
      for w in [int(x) for x in args.workers.split(",")]:
        r = time_pipeline(source, tok, batch=args.batch, workers=w, batches=args.batches)
        results[(name, w)] = r
        print(f"{name:<18} {w:>7} {r['records_per_s']:>10.1f} {r['batches_per_s']:>10.3f} {r['startup']:>14.1f}",
              flush=True)
  if args.skip_train:
    return
  batch = next(iter(results.values()))["batch"]
  shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items())
  t = time_train_step(batch, args.steps)
  print(f"\ntrain step, base size, batch {args.batch} ({shapes}): {t['step']:.2f} s median of {args.steps} "
        f"({1 / t['step']:.3f} steps/s); compile + first {t['first']:.1f} s")
  print(f"\n{'source':<18} {'workers':>7}  pipeline batches/s vs train steps/s")
  for (name, w), r in results.items():
    print(f"{name:<18} {w:>7}  {r['batches_per_s']:.3f} vs {1 / t['step']:.3f} = {r['batches_per_s'] * t['step']:.1f}x")


if __name__ == "__main__":
  main()
