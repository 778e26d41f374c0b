"""Side-by-side benchmark: iblip_jax against transformers' PyTorch InstructBLIP, same weights, same process.

  python tools/bench.py [--repeats 5] [--only train,greedy,beam5,rank] [--gpu]

Base-size config (ViT-B/16 224 px, BERT-base Q-Former, 32 queries, T5 512-d 8+8 layers 6 heads d_ff 1024, vocab
32128), batch 8, instruction 24 tokens, prompt 24, target 8. Prints median step times, the ratio
transformers / iblip_jax, compile times apart, peak RSS, and the train step's model-FLOPs utilisation against this
machine's f32 matmul peak measured in the same run. `--gpu` runs both frameworks on the GPU (JAX's default
device and torch's "cuda"), both in full f32 (no TF32 in either), for the same comparison on an accelerator.
"""
import argparse
import copy
import dataclasses
import os
import resource
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

import iblip_jax
from iblip_jax import config_lib, optim
from iblip_jax import trainable as trainable_lib
from iblip_jax.train_step import make_train_step

BATCH, INSTR, PROMPT, TARGET, NEW_TOKENS, CANDIDATES = 8, 24, 24, 8, 10, 4
TORCH_DEVICE = "cpu"   # "cuda" with --gpu


def sync():
  """Waits for torch's queued GPU work, so that a timing covers it (a no-op on CPU)."""
  if TORCH_DEVICE == "cuda":
    torch.cuda.synchronize()


def hf_model(seed: int = 0) -> InstructBlipForConditionalGeneration:
  vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                image_size=224, patch_size=16, initializer_range=0.02)
  qformer = dict(vocab_size=30523, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, cross_attention_frequency=2)
  text = dict(model_type="t5", vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8,
              num_decoder_layers=8, num_heads=6, feed_forward_proj="gated-gelu", dense_act_fn="gelu",
              tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  cfg = InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=32,
                           image_token_index=32100)
  torch.manual_seed(seed)
  model = InstructBlipForConditionalGeneration(cfg).eval()
  model.set_attn_implementation("eager")
  lm = model.language_model
  lm.lm_head.weight = torch.nn.Parameter(torch.empty_like(lm.shared.weight))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name.lower() and name.endswith("weight"):
        p.fill_(1.0)
      elif name.endswith("qkv.bias"):
        p.normal_(0, 0.02)
        p[p.shape[0] // 3: 2 * p.shape[0] // 3] = 0
      else:
        p.normal_(0, 0.02)
  return model.to(TORCH_DEVICE)


def inputs(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  ones = lambda n: np.ones((BATCH, n), np.int32)
  labels = rng.integers(2, 32000, (BATCH, TARGET)).astype(np.int32)
  return dict(pixel_values=rng.standard_normal((BATCH, 224, 224, 3)).astype(np.float32),
              qformer_input_ids=rng.integers(1, 30000, (BATCH, INSTR)).astype(np.int32),
              qformer_attention_mask=ones(INSTR),
              input_ids=rng.integers(2, 32000, (BATCH, PROMPT)).astype(np.int32), attention_mask=ones(PROMPT),
              labels=labels, decoder_attention_mask=ones(TARGET),
              candidates=rng.integers(2, 32000, (BATCH, CANDIDATES, 4)).astype(np.int32))


def hf_inputs(x: dict) -> dict:
  t = {k: torch.from_numpy(v.astype(np.int64) if v.dtype == np.int32 else v) for k, v in x.items()}
  image_tokens = torch.full((BATCH, 32), 32100)
  out = dict(pixel_values=t["pixel_values"].permute(0, 3, 1, 2).contiguous(),
             qformer_input_ids=t["qformer_input_ids"], qformer_attention_mask=t["qformer_attention_mask"],
             input_ids=torch.cat([image_tokens, t["input_ids"]], 1),
             attention_mask=torch.cat([torch.ones(BATCH, 32, dtype=torch.long), t["attention_mask"]], 1))
  return {k: v.to(TORCH_DEVICE) for k, v in out.items()}


def timed(fn, repeats: int) -> tuple[float, float]:
  """(first call seconds, median of `repeats` further calls)."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
  """Measured f32 matmul FLOP/s of JAX's default device (XLA's dot), the MFU denominator."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(timed(lambda: f(a).block_until_ready(), 1)[1] for _ in range(repeats))
  return 2 * n ** 3 / best


def bench_train(hf, model, params, x, repeats):
  config = config_lib.base({})
  config.optim.warmup_steps = 1
  trainable, frozen = trainable_lib.split(params, config.trainable)
  trainable = jax.tree.map(jnp.copy, trainable)  # the step donates it; `params` stays usable for the others
  tx = optim.make(config.optim, 1000)
  step = jax.jit(make_train_step(model, tx, dropout=False), donate_argnums=(0, 1))
  batch = {k: jnp.asarray(v) for k, v in x.items() if k != "candidates"}
  state = {"t": trainable, "o": tx.init(trainable)}

  def ours():
    state["t"], state["o"], m = step(state["t"], state["o"], frozen, batch, jax.random.key(0))
    m["loss"].block_until_ready()

  # XLA's cost analysis counts a loop body once: count FLOPs on the same step with the layer loops unrolled.
  c = model.config
  unrolled = model.clone(config=c.replace(vision=dataclasses.replace(c.vision, scan_unroll=c.vision.num_hidden_layers),
                                          text=dataclasses.replace(c.text, scan_unroll=c.text.num_layers)))
  flops = jax.jit(make_train_step(unrolled, tx, dropout=False)).lower(
      trainable, tx.init(trainable), frozen, batch, jax.random.key(0)).compile().cost_analysis()["flops"]
  first, median = timed(ours, repeats)

  # transformers: the same step (frozen ViT and T5, AdamW on ln_vision, query tokens, Q-Former, projection), on a
  # copy so that the other workloads still see the weights iblip_jax has
  hf = copy.deepcopy(hf)
  train_names = ("vision_model.post_layernorm", "query_tokens", "qformer.", "language_projection")
  trainables = []
  for name, p in hf.named_parameters():
    p.requires_grad_(name.startswith(train_names))
    if p.requires_grad:
      trainables.append(p)
  opt = torch.optim.AdamW(trainables, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
  t = hf_inputs(x)
  labels = torch.from_numpy(x["labels"].astype(np.int64)).to(TORCH_DEVICE)

  def theirs():
    opt.zero_grad(set_to_none=True)
    loss = hf(**t, labels=labels, decoder_attention_mask=torch.ones_like(labels)).loss
    loss.backward()
    opt.step()
    sync()

  hf_first, hf_median = timed(theirs, repeats)
  return dict(ours=median, ours_first=first, theirs=hf_median, flops=flops)


def bench_generate(hf, model, params, x, repeats, num_beams):
  keys = ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask")
  batch = {k: jnp.asarray(x[k]) for k in keys}
  settings = dict(num_beams=num_beams, max_new_tokens=NEW_TOKENS, min_new_tokens=0)
  out = {}

  def ours():
    out["ours"] = np.asarray(iblip_jax.generate(model, params, **batch, **settings))

  first, median = timed(ours, repeats)
  t = hf_inputs(x)

  def theirs():
    with torch.no_grad():
      out["theirs"] = hf.generate(**t, do_sample=False, **settings).cpu().numpy()[:, 1:]

  _, hf_median = timed(theirs, repeats)
  same = np.mean([_same_tokens(a, b) for a, b in zip(out["ours"], out["theirs"])])
  return dict(ours=median, ours_first=first, theirs=hf_median, same_tokens=same)


def _same_tokens(ours: np.ndarray, theirs: np.ndarray, eos: int = 1) -> bool:
  """Equal up to and including the first EOS (transformers fills the rest with its own padding)."""
  n = int(np.argmax(theirs == eos)) + 1 if (theirs == eos).any() else len(theirs)
  return bool(np.array_equal(ours[:n], theirs[:n]))


def bench_rank(hf, model, params, x, repeats):
  keys = ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask")
  batch = {k: jnp.asarray(x[k]) for k in keys}
  cands = jnp.asarray(x["candidates"])

  def ours():
    iblip_jax.rank(model, params, **batch, candidate_labels=cands)[0].block_until_ready()

  first, median = timed(ours, repeats)
  t = hf_inputs(x)
  labels = torch.from_numpy(x["candidates"].astype(np.int64)).reshape(BATCH * CANDIDATES, -1).to(TORCH_DEVICE)

  def theirs():  # LAVIS's recipe in transformers: encoder once, decoder over the repeated encoder states
    with torch.no_grad():
      feats = hf.get_image_features(t["pixel_values"], t["qformer_input_ids"], t["qformer_attention_mask"],
                                    return_dict=True).pooler_output
      embeds = torch.cat([feats, hf.get_input_embeddings()(t["input_ids"][:, 32:])], 1)
      enc = hf.language_model.encoder(inputs_embeds=embeds, attention_mask=t["attention_mask"]).last_hidden_state
      logits = hf.language_model(encoder_outputs=(enc.repeat_interleave(CANDIDATES, 0),),
                                 attention_mask=t["attention_mask"].repeat_interleave(CANDIDATES, 0),
                                 labels=labels).logits
      torch.log_softmax(logits, -1).gather(-1, labels[..., None]).sum((1, 2))
    sync()

  _, hf_median = timed(theirs, repeats)
  return dict(ours=median, ours_first=first, theirs=hf_median)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--only", default="train,greedy,beam5,rank")
  parser.add_argument("--gpu", action="store_true", help="both frameworks on the GPU, full f32")
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  if args.gpu:
    global TORCH_DEVICE
    TORCH_DEVICE = "cuda"
    if jax.devices()[0].platform != "gpu":
      raise SystemExit(f"--gpu: JAX's default device is {jax.devices()[0].platform}, not a GPU")
    jax.config.update("jax_default_matmul_precision", "highest")          # no TF32 in XLA's f32 dots
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
  print(f"machine: {os.cpu_count()} CPUs; jax {jax.__version__} ({jax.devices()[0].device_kind}), torch "
        f"{torch.__version__} ({TORCH_DEVICE}), transformers {__import__('transformers').__version__}")
  hf = hf_model()
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    model, params = iblip_jax.from_pretrained(d)
  x = inputs()
  peak = matmul_peak(8192 if args.gpu else 2048)
  print(f"measured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
  print(f"{'workload':<10} {'iblip_jax s':>12} {'transformers s':>15} {'ratio':>7} {'compile+1st s':>14}  notes")
  for what in args.only.split(","):
    if what == "train":
      r = bench_train(hf, model, params, x, args.repeats)
      mfu = r["flops"] / r["ours"] / peak
      notes = f"{r['flops'] / 1e9:.1f} GFLOP/step, MFU {100 * mfu:.0f}% of measured peak"
      if args.gpu:  # XLA's GPU cost analysis counted 43.7 GFLOP for this 653 GFLOP step (H200, jax 0.11.2)
        notes = "MFU not computed: XLA's GPU cost analysis undercounts this step's FLOPs"
    elif what in ("greedy", "beam5"):
      r = bench_generate(hf, model, params, x, args.repeats, 1 if what == "greedy" else 5)
      notes = f"{NEW_TOKENS} new tokens; rows equal to transformers' tokens: {100 * r['same_tokens']:.0f}%"
    elif what == "rank":
      r = bench_rank(hf, model, params, x, args.repeats)
      notes = f"{CANDIDATES} candidates x 4 tokens"
    else:
      raise SystemExit(f"unknown workload {what!r}")
    print(f"{what:<10} {r['ours']:>12.3f} {r['theirs']:>15.3f} {r['theirs'] / r['ours']:>6.2f}x "
          f"{r['ours_first']:>14.1f}  {notes}", flush=True)
  print(f"peak RSS (whole process, both frameworks): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
  main()
