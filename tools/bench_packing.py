"""Training throughput with and without sequence packing, on this machine, side by side in one process.

  python tools/bench_packing.py [--order grouped|stream] [--batch 24] [--steps 6] [--length 512] [--windows 8]

The same `--steps` global batches of the modelled paper mixture (tools/bench_pipeline.py's MIXTURE: texts only;
`--order grouped`: grouped by length with fitted buckets, the best unpacked batching; `stream`: in stream order with
power-of-two buckets, the default), each example with a random 224 px image, train
the base-size model of tools/bench.py (ViT-B/16, BERT-base Q-Former, 32 queries, T5 512-d 8+8 layers; random
weights, f32, frozen towers, AdamW on the Q-Former side) from the same start: once bucket-padded, once packed into
LLM rows of `--length` tokens (config.data.packing; data/packing.py). Every shape is compiled (and its step's loss
compared) before the clock starts; then each way runs the steps in order and is timed. Prints the real (non-padding)
text tokens per second of each, their ratio, and the largest relative difference between the two runs' losses at
each step (the same examples: equal up to float rounding).
"""
import argparse
import os
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark: no accelerator plugin probing (libtpu is installed)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_pipeline import BASE, QUERY_TOKENS, modelled_mixture  # noqa: E402
from iblip_jax import config_lib, sharding, train_state  # noqa: E402
from iblip_jax.data import packing, pipeline, tokenize  # noqa: E402
from iblip_jax.models.instructblip import InstructBlip  # noqa: E402
from iblip_jax.run import settings  # noqa: E402


def batches(batch: int, steps: int, windows: int, length: int, order: str):
  """`steps` (unpacked, packed) batches of the same examples, and each one's real text tokens."""
  tok, _, groups, keys = modelled_mixture(batch, max(steps, 2 * windows) + windows)
  if order == "grouped":
    fitted = pipeline.fit_tokenizer_buckets(tok, groups, keys, windows=2 * windows, max_buckets=8)
    grouped = pipeline.length_grouped(groups, windows, keys, 0, (fitted.buckets, fitted.out_buckets))
  else:
    fitted, grouped = tok, groups
  rng = np.random.default_rng(0)
  out = []
  for k in range(steps):
    members = grouped[k]
    texts = [r["text_input"] for _, r in members], [r["text_output"] for _, r in members]
    plain = dict(pixel_values=rng.standard_normal((batch, 224, 224, 3)).astype(np.float32),
                 **tokenize.encode_training(fitted, *texts))
    packed = {k: v for k, v in plain.items() if k not in packing.LLM_FIELDS}
    packed.update(packing.pack(plain, visual_tokens=QUERY_TOKENS, length=length))
    real = int(plain["attention_mask"].sum() + plain["decoder_attention_mask"].sum())
    assert real == packing.real_tokens(packed)
    out.append((plain, packed, real))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--order", choices=("grouped", "stream"), default="grouped")
  parser.add_argument("--batch", type=int, default=24)
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--length", type=int, default=512, help="packed row length (config.data.packing)")
  parser.add_argument("--windows", type=int, default=8, help="global batches per length-grouping window")
  args = parser.parse_args()
  s = settings.for_tools(config_lib.base(BASE))
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  setup = train_state.build(InstructBlip(s.model), patterns=s.trainable, optim=s.optim, total_steps=1000, mesh=mesh,
                            rules=s.sharding_rules)
  trainable0, frozen = setup.init_random(jax.random.key(s.seed))
  host = jax.tree.map(np.asarray, trainable0)
  step = setup.train_step(dropout=False)
  data = batches(args.batch, args.steps, args.windows, args.length, args.order)
  print(f"jax {jax.__version__}, {os.cpu_count()} CPUs; {args.order} order; batch {args.batch}, {args.steps} steps, "
        f"packed rows of "
        f"{args.length}; rows per packed batch: {[p['packed_segment_ids'].shape[0] for _, p, _ in data]}")

  def run(which: int):
    trainable = jax.tree.map(jnp.asarray, host)
    opt_state = setup.init_opt_state(trainable)
    losses, seconds = [], 0.0
    for k, item in enumerate(data):
      x = {n: jnp.asarray(v) for n, v in item[which].items()}
      t0 = time.perf_counter()
      trainable, opt_state, m = step(trainable, opt_state, frozen, x, jax.random.key(k))
      losses.append(float(m["loss"]))
      seconds += time.perf_counter() - t0
    return np.array(losses), seconds

  t0 = time.perf_counter()
  run(0), run(1)   # compiles every shape of both ways
  print(f"compiled both ways' shapes in {time.perf_counter() - t0:.0f} s")
  (plain_losses, plain_s), (packed_losses, packed_s) = run(0), run(1)
  tokens = sum(real for _, _, real in data)
  print(f"{'':<10} {'seconds':>8} {'real tokens/s':>14}")
  print(f"{'unpacked':<10} {plain_s:>8.2f} {tokens / plain_s:>14.1f}")
  print(f"{'packed':<10} {packed_s:>8.2f} {tokens / packed_s:>14.1f}")
  print(f"packed / unpacked throughput: {plain_s / packed_s:.2f}x; losses per step differ by at most "
        f"{np.max(np.abs(packed_losses - plain_losses) / np.abs(plain_losses)):.1e} (relative)")


if __name__ == "__main__":
  main()
