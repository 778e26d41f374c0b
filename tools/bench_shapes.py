"""The base-size model's own matmul and attention shapes, XLA against torch, forward and backward.

tools/bench.py normalises its ratios by each library's 2048^3 matmul peak. The model's matmuls are much smaller
(tokens x 768 x 3072 and the like), and the two libraries do not lose the same share of their peak on them; this
tool times those shapes alone, so that a phase of tools/bench.py that is slower after normalisation can be told
apart: the library (the same gap on a bare matmul of that shape) or our code (a gap the bare shapes do not have).

  python tools/bench_shapes.py [--repeats 20]

Prints, per shape, milliseconds (medians) for XLA (jit) and torch, and torch's time over XLA's (above 1: XLA faster);
for attention also jax.nn.dot_product_attention, which iblip_jax used before (BENCHMARKS.md).
"""
import argparse
import functools
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from iblip_jax.models import layers  # noqa: E402

B = 8   # tools/bench.py's batch
# (name, tokens M, in K, out N): the ViT-B/16 (197 tokens per image), the Q-Former (32 queries + 24 instruction
# tokens; cross-attention keys from 197 image tokens), the T5 (56 encoder tokens, 512 -> 384 heads, 1024 ff)
MATMULS = [
    ("vit qkv/out 768x768", B * 197, 768, 768),
    ("vit mlp up 768x3072", B * 197, 768, 3072),
    ("vit mlp down 3072x768", B * 197, 3072, 768),
    ("qformer 768x768", B * 56, 768, 768),
    ("qformer mlp up 768x3072", B * 56, 768, 3072),
    ("qformer mlp down 3072x768", B * 56, 3072, 768),
    ("t5 attention 512x384", B * 56, 512, 384),
    ("t5 mlp 512x1024", B * 56, 512, 1024),
]
# (name, query tokens, key tokens): 12 heads of 64 (the ViT and the Q-Former)
ATTENTION = [("vit self-attention", 197, 197), ("qformer self-attention", 56, 56),
             ("qformer cross-attention", 32, 197)]


def median_ms(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def matmul_rows(repeats, rng):
  for name, m, k, n in MATMULS:
    x, w, dy = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n), (m, n)))
    jx, jw, jdy = map(jnp.asarray, (x, w, dy))
    tx, tw, tdy = map(torch.from_numpy, (x, w, dy))
    # forward y = x w; backward dx = dy w^T and dw = x^T dy (the two matmuls a weight's gradient costs)
    fwd, dx, dw = jax.jit(lambda a, b: a @ b), jax.jit(lambda g, b: g @ b.T), jax.jit(lambda a, g: a.T @ g)
    ours = [median_ms(lambda: fwd(jx, jw).block_until_ready(), repeats),
            median_ms(lambda: dx(jdy, jw).block_until_ready(), repeats),
            median_ms(lambda: dw(jx, jdy).block_until_ready(), repeats)]
    theirs = [median_ms(lambda: tx @ tw, repeats), median_ms(lambda: tdy @ tw.T, repeats),
              median_ms(lambda: tx.T @ tdy, repeats)]
    yield name, f"{m}x{k}x{n}", ours, theirs


def attention_rows(repeats, rng):
  for name, lq, lk in ATTENTION:
    q = rng.standard_normal((B, lq, 12, 64)).astype(np.float32)
    k, v = (rng.standard_normal((B, lk, 12, 64)).astype(np.float32) for _ in range(2))
    jq, jk, jv = map(jnp.asarray, (q, k, v))
    times = []
    # ours (iblip_jax.models.layers) and jax.nn.dot_product_attention (what layers used before, XLA's composition)
    for fn in (functools.partial(layers.dot_product_attention, scale=0.125),
               functools.partial(jax.nn.dot_product_attention, scale=0.125)):
      fwd = jax.jit(fn)
      grad = jax.jit(jax.grad(lambda a, b, c, fn=fn: jnp.sum(fn(a, b, c) ** 2), argnums=(0, 1, 2)))
      times.append(median_ms(lambda: fwd(jq, jk, jv).block_until_ready(), repeats))
      times.append(median_ms(lambda: jax.block_until_ready(grad(jq, jk, jv)), repeats))
    tq, tk, tv = (torch.from_numpy(a).transpose(1, 2).contiguous().requires_grad_(True) for a in (q, k, v))

    def torch_fwd():
      with torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, scale=0.125)

    def torch_grad():
      (torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, scale=0.125) ** 2).sum().backward()
    times += [median_ms(torch_fwd, repeats), median_ms(torch_grad, repeats)]
    yield name, f"B{B} {lq}x{lk} 12x64", times


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  rng = np.random.default_rng(0)
  print(f"machine: {os.cpu_count()} CPUs; jax {jax.__version__}, torch {torch.__version__}; ms, medians of "
        f"{args.repeats}")
  print(f"{'matmul':27s} {'MxKxN':15s} {'forward XLA/torch':>22s} {'dx XLA/torch':>22s} {'dw XLA/torch':>22s}")
  for name, shape, ours, theirs in matmul_rows(args.repeats, rng):
    cells = [f"{a:6.2f}/{b:6.2f} ({b / a:4.2f}x)" for a, b in zip(ours, theirs)]
    print(f"{name:27s} {shape:15s} " + " ".join(f"{c:>22s}" for c in cells), flush=True)
  print("attention, f32, no mask: forward | q,k,v gradients; ours = iblip_jax.models.layers.dot_product_attention, "
        "jax.nn = jax.nn.dot_product_attention, torch = SDPA")
  for name, shape, (ours, ours_g, jaxnn, jaxnn_g, th, th_g) in attention_rows(args.repeats, rng):
    print(f"{name:27s} {shape:15s} ours {ours:6.2f} | {ours_g:6.2f}   jax.nn {jaxnn:6.2f} | {jaxnn_g:6.2f}   "
          f"torch {th:6.2f} | {th_g:6.2f}   torch/ours {th / ours:4.2f}x | {th_g / ours_g:4.2f}x", flush=True)


if __name__ == "__main__":
  main()
