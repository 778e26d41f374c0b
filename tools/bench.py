"""Side-by-side benchmark: iblip_jax against transformers' PyTorch InstructBLIP, same weights, same process.

  python tools/bench.py [--repeats 7] [--only train,train_dropout,greedy,beam5,rank16] [--torch_variants eager,sdpa]
                        [--shape base|xl_ratio] [--gpu]

Protocol (what a sceptical reader asks for):
- transformers runs with eager attention and with SDPA (and, with --torch_variants ...,compile, torch.compile on
  top of SDPA); generation and ranking under torch.inference_mode; each variant on its own copy of the same weights.
- A/B alternated in blocks: two rounds, each running iblip_jax's block, then each transformers variant's (one
  untimed call that settles after the other framework, then half of the timed repeats), so that a slow minute of a
  shared machine hits all of them alike while every timed call is a steady-state one (see `interleaved`); printed
  as median and spread (min-max) of the repeats, compile and first call apart. The load average is printed before
  and after.
- Each framework's own f32 matmul peak on this machine (XLA's dot and torch.matmul, 2048^3), so that model-FLOPs
  utilisation is against what that framework can do here, and a normalised ratio beside each raw one: the raw
  speed-up times torch's peak over XLA's, i.e. the speed-up that is left once the two matmul libraries' difference
  on this host is taken out (above 1: our program does less or wastes less; below 1: the raw speed-up is the
  library's, not ours).
- A per-phase split of the train step (forward | backward | optimizer: the loss alone, then with gradients, then
  the whole step) and of generation and ranking for both frameworks: the vision tower (with ln_vision), the
  Q-Former (with the projection), the LLM prefill (the T5 encoder; iblip_jax also computes the decoder's
  cross-attention keys and values here, transformers in its first step), and the rest (the decode steps, or the
  candidates' decoder pass). Each phase is timed as a prefix of the call (vision; vision + Q-Former; everything up
  to the first decoder step) and the split is the difference of consecutive prefixes, the rest the difference to
  the whole call.
- Workloads: the training step without and with dropout (the path real training takes; `train_dropout_rbg`:
  iblip_jax's dropout bits from the cheaper "rbg" generator, config.rng_impl), greedy and 5-beam generation (10 new
  tokens) and their time ratio, ranking of 16 candidates per sample; `annotate`: a webdataset tar of ANNOTATE_IMAGES
  JPEGs asked 2 prompts each, greedy, 8 rows per batch: iblip_jax's bulk mode (run/annotate.stream with its input
  thread and decode pool, the ViT once per image) against transformers' batched generate fed by a plain PyTorch
  DataLoader (one worker decoding and preprocessing the same tar; each image repeated for its prompts), in images/s;
  and iblip_jax's loop on pre-decoded images (how much the input side costs it).

Shapes: `base` is the base-size config (ViT-B/16 224 px, BERT-base Q-Former, 32 queries, T5 512-d 8+8 layers 6 heads
d_ff 1024, vocab 32128), batch 8, instruction 24 tokens, prompt 24, target 8. `xl_ratio` keeps FlanT5-XL's
proportions in a CPU-sized model (d_ff = 2.5 d_model, 64-wide heads, as many decoder layers as encoder layers), where
beam search's share of cross-attention work is what it is at real size. `--gpu` runs both frameworks on the GPU
(JAX's default device and torch's "cuda"), in full f32 (no TF32 in either).
"""
import argparse
import copy
import dataclasses
import io
import json
import os
import resource
import statistics
import tempfile
import time
from concurrent import futures

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

import iblip_jax
from iblip_jax import config_lib, distributed, optim
from iblip_jax import trainable as trainable_lib
from iblip_jax.decoding import Decoding
from iblip_jax.train_step import loss_fn, make_train_step

WORKLOADS = ("train", "train_dropout", "train_dropout_rbg", "greedy", "beam5", "rank16", "annotate")
BATCH, INSTR, PROMPT, TARGET, NEW_TOKENS, CANDIDATES, CANDIDATE_TOKENS = 8, 24, 24, 8, 10, 16, 4
TORCH_DEVICE = "cpu"   # "cuda" with --gpu
# transformers' names of the trainable side (ln_vision is its vision_model.post_layernorm)
TRAINED = ("vision_model.post_layernorm", "query_tokens", "qformer.", "language_projection")
SHAPES = {
    "base": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6),
    "xl_ratio": dict(d_model=512, d_kv=64, d_ff=1280, num_layers=8, num_heads=8),
}


def sync():
  """Waits for torch's queued GPU work, so that a timing covers it (a no-op on CPU)."""
  if TORCH_DEVICE == "cuda":
    torch.cuda.synchronize()


def hf_model(shape: str, seed: int = 0) -> InstructBlipForConditionalGeneration:
  vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                image_size=224, patch_size=16, initializer_range=0.02)
  qformer = dict(vocab_size=30523, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, cross_attention_frequency=2)
  t = SHAPES[shape]
  text = dict(model_type="t5", vocab_size=32128, d_model=t["d_model"], d_kv=t["d_kv"], d_ff=t["d_ff"],
              num_layers=t["num_layers"], num_decoder_layers=t["num_layers"], num_heads=t["num_heads"],
              feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False,
              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  cfg = InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=32,
                           image_token_index=32100)
  torch.manual_seed(seed)
  model = InstructBlipForConditionalGeneration(cfg).eval()
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


def torch_variants(hf, names: list[str]) -> dict:
  """{name: model}: eager attention, SDPA, and torch.compile of the forward over SDPA."""
  out = {}
  for name in names:
    m = copy.deepcopy(hf)
    m.set_attn_implementation("eager" if name == "eager" else "sdpa")
    if name == "compile":  # the forward compiled (training, ranking and generate all call it)
      m.forward = torch.compile(m.forward)
    out[name] = m
  return out


def _release_compiled(variants: dict) -> None:
  """Frees what a workload compiled for the torch.compile variant (dynamo keeps each compiled graph, and the
  deep copies a train workload compiles, until reset)."""
  if "compile" in variants:
    import gc
    torch._dynamo.reset()  # noqa: SLF001 (the documented way to drop dynamo's caches)
    gc.collect()


def inputs(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  ones = lambda n: np.ones((BATCH, n), np.int32)
  labels = rng.integers(2, 32000, (BATCH, TARGET)).astype(np.int32)
  return dict(pixel_values=rng.standard_normal((BATCH, 224, 224, 3)).astype(np.float32),
              qformer_input_ids=rng.integers(1, 30000, (BATCH, INSTR)).astype(np.int32),
              qformer_attention_mask=ones(INSTR),
              input_ids=rng.integers(2, 32000, (BATCH, PROMPT)).astype(np.int32), attention_mask=ones(PROMPT),
              labels=labels, decoder_attention_mask=ones(TARGET),
              candidates=rng.integers(2, 32000, (BATCH, CANDIDATES, CANDIDATE_TOKENS)).astype(np.int32))


def hf_inputs(x: dict) -> dict:
  t = {k: torch.from_numpy(v.astype(np.int64) if v.dtype == np.int32 else v) for k, v in x.items()}
  image_tokens = torch.full((BATCH, 32), 32100)
  out = dict(pixel_values=t["pixel_values"].permute(0, 3, 1, 2).contiguous(),
             qformer_input_ids=t["qformer_input_ids"], qformer_attention_mask=t["qformer_attention_mask"],
             input_ids=torch.cat([image_tokens, t["input_ids"]], 1),
             attention_mask=torch.cat([torch.ones(BATCH, 32, dtype=torch.long), t["attention_mask"]], 1))
  return {k: v.to(TORCH_DEVICE) for k, v in out.items()}


ROUNDS = 2


def interleaved(fns: dict, repeats: int) -> dict:
  """{name: (first call s, median s, min s, max s)}: one first call each (compile), then ROUNDS rounds that run
  every function in turn, each as a block: one untimed settling call, then its share of the `repeats` timed calls.
  Why blocks and not one call at a time: measured on a 2-core Xeon, iblip_jax's train step right after one of
  transformers' took 4.2-4.8 s, and 3.6-3.7 s from the second call of a block on (transformers' own first call
  after ours: +0.1 s): a one-at-a-time alternation timed every call of ours in that state, which neither a
  training loop nor a server is in."""
  first, times = {}, {name: [] for name in fns}
  for name, fn in fns.items():
    t0 = time.perf_counter()
    fn()
    first[name] = time.perf_counter() - t0
  per_round = -(-repeats // ROUNDS)
  for _ in range(ROUNDS):
    for name, fn in fns.items():
      fn()   # settles after the other framework's block
      for _ in range(per_round):
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)
  return {n: (first[n], statistics.median(t), min(t), max(t)) for n, t in times.items()}


def jax_peak(n: int = 2048, repeats: int = 10) -> float:
  """f32 matmul FLOP/s of JAX's default device (XLA's dot)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(_seconds(lambda: f(a).block_until_ready()) for _ in range(repeats))
  return 2 * n ** 3 / best


def torch_peak(n: int = 2048, repeats: int = 10) -> float:
  """f32 matmul FLOP/s of torch.matmul on the same device."""
  a = torch.randn(n, n, device=TORCH_DEVICE)
  (a @ a).sum().item()
  best = min(_seconds(lambda: (a @ a, sync())) for _ in range(repeats))
  return 2 * n ** 3 / best


def _seconds(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def _train_flops(model, tx, trainable, frozen, batch) -> float:
  """XLA's cost analysis counts a loop body once: count FLOPs on the same step with the layer loops unrolled."""
  c = model.config
  unrolled = model.clone(config=c.replace(vision=dataclasses.replace(c.vision, scan_unroll=c.vision.num_hidden_layers),
                                          text=dataclasses.replace(c.text, scan_unroll=c.text.num_layers)))
  return jax.jit(make_train_step(unrolled, tx, dropout=False)).lower(
      trainable, tx.init(trainable), frozen, batch, jax.random.key(0)).compile().cost_analysis()["flops"]


def bench_train_prefixes(variants, model, params, x, repeats) -> dict:
  """{who: {"forward", "grad": median s}}: the train step's prefixes without dropout: the loss alone (no
  activations kept for a backward pass: jit of the loss, torch.no_grad) and the loss with the trainable tree's
  gradients (before the optimizer), for the split forward | backward | optimizer."""
  config = config_lib.base({})
  trainable, frozen = trainable_lib.split(params, config.trainable)
  batch = {k: jnp.asarray(v) for k, v in x.items() if k != "candidates"}
  frozen_vision = model.clone(stop_vision_gradient=True)
  # frozen weights and the batch as arguments, as the step takes them (closed over, they would be constants)
  objective = lambda t, f, b: loss_fn(frozen_vision, trainable_lib.merge(t, f), b, None)[0]
  forward, grad = jax.jit(objective), jax.jit(jax.grad(objective))
  fns = {("iblip_jax", "forward"): lambda: forward(trainable, frozen, batch).block_until_ready(),
         ("iblip_jax", "grad"): lambda: jax.block_until_ready(grad(trainable, frozen, batch))}
  t = hf_inputs(x)
  labels = torch.from_numpy(x["labels"].astype(np.int64)).to(TORCH_DEVICE)
  for name, hf in variants.items():
    hf = copy.deepcopy(hf).train(False)
    for pname, p in hf.named_parameters():
      p.requires_grad_(pname.startswith(TRAINED))

    def hf_forward(hf=hf):
      with torch.no_grad():
        hf(**t, labels=labels, decoder_attention_mask=torch.ones_like(labels)).loss.item()

    def hf_grad(hf=hf):
      hf.zero_grad(set_to_none=True)
      hf(**t, labels=labels, decoder_attention_mask=torch.ones_like(labels)).loss.backward()
      sync()
    fns.update({(f"transformers {name}", "forward"): hf_forward, (f"transformers {name}", "grad"): hf_grad})
  out = {}
  for (who, phase), (_, median, _, _) in interleaved(fns, repeats).items():
    out.setdefault(who, {})[phase] = median
  return out


def bench_train(variants, model, params, x, repeats, *, dropout: bool, rng_impl: str = "threefry2x32"):
  config = config_lib.base({})
  config.optim.warmup_steps = 1
  trainable, frozen = trainable_lib.split(params, config.trainable)
  tx = optim.make(config.optim, 1000)
  step = jax.jit(make_train_step(model, tx, dropout=dropout), donate_argnums=(0, 1))
  batch = {k: jnp.asarray(v) for k, v in x.items() if k != "candidates"}
  # committed to the device as the step's outputs are: uncommitted first inputs made the second call compile again
  # (the 10-20 s outliers of the first protocol run, BENCHMARKS.md)
  t0, o0 = jax.device_put((jax.tree.map(jnp.copy, trainable), tx.init(trainable)), jax.devices()[0])
  state = {"t": t0, "o": o0, "i": 0}

  def ours():
    state["i"] += 1
    key = jax.random.key(state["i"], impl=rng_impl)   # dropout's bits (config.rng_impl)
    state["t"], state["o"], m = step(state["t"], state["o"], frozen, batch, key)
    m["loss"].block_until_ready()

  fns = {"iblip_jax": ours}
  t = hf_inputs(x)
  labels = torch.from_numpy(x["labels"].astype(np.int64)).to(TORCH_DEVICE)
  for name, hf in variants.items():
    if isinstance(hf, str):
      continue
    hf = copy.deepcopy(hf)  # its own weights to update
    hf.train(dropout)
    trainables = []
    for pname, p in hf.named_parameters():
      p.requires_grad_(pname.startswith(TRAINED))
      if p.requires_grad:
        trainables.append(p)
    opt = torch.optim.AdamW(trainables, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)

    def theirs(hf=hf, opt=opt):
      opt.zero_grad(set_to_none=True)
      loss = hf(**t, labels=labels, decoder_attention_mask=torch.ones_like(labels)).loss
      loss.backward()
      opt.step()
      sync()
    fns[f"transformers {name}"] = theirs
  out = interleaved(fns, repeats)
  out["flops"] = _train_flops(model, tx, trainable, frozen, batch)
  return out


def bench_generate(variants, model, params, x, repeats, num_beams):
  keys = ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask")
  batch = {k: jnp.asarray(x[k]) for k in keys}
  settings = dict(num_beams=num_beams, max_new_tokens=NEW_TOKENS, min_new_tokens=0)
  tokens = {}

  def ours():
    tokens["iblip_jax"] = np.asarray(iblip_jax.generate(model, params, **batch, **settings))

  fns = {"iblip_jax": ours}
  t = hf_inputs(x)
  for name, hf in variants.items():
    if isinstance(hf, str):
      continue

    def theirs(hf=hf, name=name):
      with torch.inference_mode():
        tokens[name] = hf.generate(**t, do_sample=False, **settings).cpu().numpy()[:, 1:]
      sync()
    fns[f"transformers {name}"] = theirs
  out = interleaved(fns, repeats)
  out["same_tokens"] = {n: float(np.mean([_same_tokens(a, b) for a, b in zip(tokens["iblip_jax"], v)]))
                        for n, v in tokens.items() if n != "iblip_jax"}
  return out


ANNOTATE_IMAGES = 32
ANNOTATE_PROMPTS = ("a short image caption", "what is in the picture")


def _annotation_tar(d: str) -> str:
  """ANNOTATE_IMAGES smooth 320 x 256 JPEGs in a webdataset-layout tar (what img2dataset writes)."""
  import io
  import tarfile
  from PIL import Image
  rng = np.random.default_rng(0)
  path = os.path.join(d, "00000.tar")
  with tarfile.open(path, "w") as tar:
    for i in range(ANNOTATE_IMAGES):
      small = rng.integers(0, 256, (8, 10, 3), np.uint8)
      buf = io.BytesIO()
      Image.fromarray(small).resize((320, 256), Image.BILINEAR).save(buf, "JPEG", quality=90)
      info = tarfile.TarInfo(f"{i:09d}.jpg")
      info.size = len(buf.getvalue())
      tar.addfile(info, io.BytesIO(buf.getvalue()))
  return path


def bench_annotate(variants, model, params, repeats):
  """images/s over the tar: iblip_jax's bulk loop, iblip_jax's loop on pre-decoded images, transformers + DataLoader."""
  import functools
  import tarfile
  from etils import epath
  from PIL import Image
  from iblip_jax.data import preprocess, shards, tokenize
  from iblip_jax.demo import word_tokenizers
  from iblip_jax.engine import Engine
  from iblip_jax.run import annotate

  d = tempfile.mkdtemp()
  tar = _annotation_tar(d)
  word_tokenizers.build(" ".join(ANNOTATE_PROMPTS).split() + ["cat", "dog"], os.path.join(d, "tok"))
  tok = tokenize.load_tokenizers(os.path.join(d, "tok"))
  engine = Engine(model, params, tok, batch_size=BATCH)
  dec = Decoding(num_beams=1, max_new_tokens=NEW_TOKENS, min_new_tokens=0, repetition_penalty=1.0)
  k = len(ANNOTATE_PROMPTS)
  answer = functools.partial(annotate._answer, engine, dec, BATCH, k, ANNOTATE_PROMPTS[0], False, 0)
  found = shards.find(tar)
  texts = {}
  calls = [0]

  def ours():
    calls[0] += 1
    root = epath.Path(d) / f"out{calls[0]}"
    (root / "rows").mkdir(parents=True)
    (root / "done").mkdir()
    annotate.stream(root, found, found, {}, ANNOTATE_PROMPTS, rows_per_file=1000, image_size=224, local=BATCH,
                    answer=answer, scores=False, per_image=k, progress=False)
    rows = [json.loads(x) for x in (root / "rows" / "00000.tar.part-00000.jsonl").read_text().splitlines()]
    texts["iblip_jax"] = [r["answer"] for r in rows]

  decoded = [preprocess.preprocess_image(Image.open(io.BytesIO(r.image)).convert("RGB"), 224)
             for r in shards.read(found[0])]

  def ours_predecoded():
    for first in range(0, len(decoded), BATCH // k):
      groups = []
      for pixels in decoded[first:first + BATCH // k]:
        future = futures.Future()
        future.set_result(pixels)
        groups.append([(annotate._Row("s", 0, "k", p), future) for p in ANNOTATE_PROMPTS])
      answer(groups)

  class TarImages(torch.utils.data.IterableDataset):
    """The tar read as a stream and preprocessed in the DataLoader's worker, as a PyTorch user writes it."""
    def __iter__(self):
      with tarfile.open(tar, "r|") as stream:
        for member in stream:
          data = stream.extractfile(member).read()
          image = Image.open(io.BytesIO(data)).convert("RGB")
          yield torch.from_numpy(preprocess.preprocess_image(image, 224)).permute(2, 0, 1)

  prompts = tokenize.encode_prompts(tok, list(ANNOTATE_PROMPTS) * (BATCH // k))
  image_tokens = torch.full((BATCH, 32), 32100)
  fixed = dict(qformer_input_ids=torch.from_numpy(prompts["qformer_input_ids"].astype(np.int64)),
               qformer_attention_mask=torch.from_numpy(prompts["qformer_attention_mask"].astype(np.int64)),
               input_ids=torch.cat([image_tokens, torch.from_numpy(prompts["input_ids"].astype(np.int64))], 1),
               attention_mask=torch.cat([torch.ones(BATCH, 32, dtype=torch.long),
                                         torch.from_numpy(prompts["attention_mask"].astype(np.int64))], 1))
  fns = {"iblip_jax": ours, "iblip_jax pre-decoded": ours_predecoded}
  for name, hf in variants.items():
    if isinstance(hf, str):
      continue

    def theirs(hf=hf, name=name):
      out = []
      loader = torch.utils.data.DataLoader(TarImages(), batch_size=BATCH // k, num_workers=1)
      with torch.inference_mode():
        for pixels in loader:
          n = len(pixels) * k
          tokens = hf.generate(pixel_values=pixels.repeat_interleave(k, 0).to(TORCH_DEVICE),
                               **{key: v[:n].to(TORCH_DEVICE) for key, v in fixed.items()}, do_sample=False,
                               num_beams=1, max_new_tokens=NEW_TOKENS, min_new_tokens=0)
          out += tokenize.decode(tok, tokens.cpu().numpy()[:, 1:])
      texts[f"transformers {name}"] = out
    fns[f"transformers {name}"] = theirs
  out = interleaved(fns, repeats)
  out["same_answers"] = {n: float(np.mean([a == b for a, b in zip(texts["iblip_jax"], v)]))
                         for n, v in texts.items() if n != "iblip_jax"}
  return out


def _same_tokens(ours: np.ndarray, theirs: np.ndarray, eos: int = 1) -> bool:
  """Equal up to and including the first EOS (transformers fills the rest with its own padding)."""
  n = int(np.argmax(theirs == eos)) + 1 if (theirs == eos).any() else len(theirs)
  return bool(np.array_equal(ours[:n], theirs[:n]))


def bench_rank(variants, model, params, x, repeats):
  keys = ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask")
  batch = {k: jnp.asarray(x[k]) for k in keys}
  cands = jnp.asarray(x["candidates"])

  def ours():
    iblip_jax.rank(model, params, **batch, candidate_labels=cands)[0].block_until_ready()

  fns = {"iblip_jax": ours}
  t = hf_inputs(x)
  labels = torch.from_numpy(x["candidates"].astype(np.int64)).reshape(BATCH * CANDIDATES, -1).to(TORCH_DEVICE)
  for name, hf in variants.items():
    if isinstance(hf, str):
      continue
    def theirs(base=hf):  # LAVIS's recipe: encoder once, decoder over the repeated encoder states
      with torch.inference_mode():
        feats = base.get_image_features(t["pixel_values"], t["qformer_input_ids"], t["qformer_attention_mask"],
                                        return_dict=True).pooler_output
        embeds = torch.cat([feats, base.get_input_embeddings()(t["input_ids"][:, 32:])], 1)
        enc = base.language_model.encoder(inputs_embeds=embeds, attention_mask=t["attention_mask"]).last_hidden_state
        logits = base.language_model(encoder_outputs=(enc.repeat_interleave(CANDIDATES, 0),),
                                     attention_mask=t["attention_mask"].repeat_interleave(CANDIDATES, 0),
                                     labels=labels).logits
        torch.log_softmax(logits, -1).gather(-1, labels[..., None]).sum((1, 2))
      sync()
    fns[f"transformers {name}"] = theirs
  return interleaved(fns, repeats)


def bench_prefixes(variants, model, params, x, repeats) -> dict:
  """{who: {"vision", "qformer", "prefill": median s}}: each a prefix of generation (see the module docstring), the
  three of one framework timed in the same interleaved rounds."""
  keys = ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask")
  b = {k: jnp.asarray(x[k]) for k in keys}
  apply = lambda method: jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=method))
  vision = apply(lambda m, px: m.ln_vision(m.vision(px)))
  qformer = apply(lambda m, *a: m.image_features(*a)["language_inputs"])
  prefill = apply(lambda m, *a: jax.tree.leaves(m.prefill(*a, NEW_TOKENS)))
  fns = {("iblip_jax", "vision"): lambda: vision(params, b["pixel_values"]).block_until_ready(),
         ("iblip_jax", "qformer"): lambda: qformer(params, *(b[k] for k in keys[:3])).block_until_ready(),
         ("iblip_jax", "prefill"): lambda: jax.block_until_ready(prefill(params, *b.values()))}
  t = hf_inputs(x)
  for name, hf in variants.items():
    def hf_vision(hf=hf):
      with torch.inference_mode():
        hf.vision_model(pixel_values=t["pixel_values"])
      sync()

    def hf_qformer(hf=hf):
      with torch.inference_mode():
        hf.get_image_features(t["pixel_values"], t["qformer_input_ids"], t["qformer_attention_mask"],
                              return_dict=True)
      sync()

    def hf_prefill(hf=hf):   # what generate runs before its first decoder step: image tokens spliced, T5 encoder
      with torch.inference_mode():
        feats = hf.get_image_features(t["pixel_values"], t["qformer_input_ids"], t["qformer_attention_mask"],
                                      return_dict=True).pooler_output
        embeds = torch.cat([feats, hf.get_input_embeddings()(t["input_ids"][:, 32:])], 1)
        hf.language_model.encoder(inputs_embeds=embeds, attention_mask=t["attention_mask"])
      sync()
    fns.update({(f"transformers {name}", "vision"): hf_vision, (f"transformers {name}", "qformer"): hf_qformer,
                (f"transformers {name}", "prefill"): hf_prefill})
  out = {}
  for (who, phase), (_, median, _, _) in interleaved(fns, repeats).items():
    out.setdefault(who, {})[phase] = median
  return out


def _split(prefix: dict, total: float, rest: str) -> str:
  """"vision a | Q-Former b | prefill c | <rest> d" (generation, ranking) or "forward a | backward b | optimizer c"
  (training) from the prefixes' medians and the whole call's."""
  if rest == "optimizer":
    parts = {"forward": prefix["forward"], "backward": prefix["grad"] - prefix["forward"],
             "optimizer": total - prefix["grad"]}
  else:
    parts = {"vision": prefix["vision"], "Q-Former": prefix["qformer"] - prefix["vision"],
             "prefill": prefix["prefill"] - prefix["qformer"], rest: total - prefix["prefill"]}
  return " | ".join(f"{k} {v:.3f}" for k, v in parts.items())


def _row(what: str, r: dict, peaks: dict, notes: str = "", prefixes: dict | None = None, rest: str = "") -> str:
  """The workload's rows: each framework's median [min-max], first call, the raw and the peak-normalised speed-up
  (raw x torch's peak / XLA's), and with `prefixes` each framework's phase split (seconds)."""
  ours = r["iblip_jax"][1]
  lines = [f"{what:<14} {'iblip_jax':<24} {ours:>8.3f} s [{r['iblip_jax'][2]:.3f}-{r['iblip_jax'][3]:.3f}]"
           f"  first {r['iblip_jax'][0]:.1f} s  {notes}"]
  library = peaks["transformers"] / peaks["iblip_jax"]
  for name, (first, median, lo, hi) in r.items():
    if name.startswith("transformers"):
      lines.append(f"{'':<14} {name:<24} {median:>8.3f} s [{lo:.3f}-{hi:.3f}]  first {first:.1f} s  "
                   f"iblip_jax {median / ours:.2f}x faster, {median / ours * library:.2f}x normalised")
  if prefixes:
    for name in r:
      if name in prefixes:
        lines.append(f"{'':<14} split {name:<18} {_split(prefixes[name], r[name][1], rest)}")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--only", default=",".join(WORKLOADS))
  # compile is opt-in: on this 2-core CPU it ran the train step slower than SDPA (6.8 s vs 3.8 s, 105 s to compile)
  # and the compiled copies made the default run of every workload pass 24 GiB (BENCHMARKS.md)
  parser.add_argument("--torch_variants", default="eager,sdpa", help="eager, sdpa, compile")
  parser.add_argument("--shape", choices=sorted(SHAPES), default="base")
  parser.add_argument("--gpu", action="store_true", help="both frameworks on the GPU, full f32")
  args = parser.parse_args()
  distributed.default_platform()   # on a host without TPU chips, the CPU without libtpu's start-up noise
  unknown = sorted(set(args.only.split(",")) - set(WORKLOADS))
  if unknown:
    parser.error(f"--only: unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)}")
  torch.set_num_threads(os.cpu_count())
  if args.gpu:
    global TORCH_DEVICE
    TORCH_DEVICE = "cuda"
    if jax.devices()[0].platform != "gpu":
      raise SystemExit(f"--gpu: JAX's default device is {jax.devices()[0].platform}, not a GPU")
    jax.config.update("jax_default_matmul_precision", "highest")          # no TF32 in XLA's f32 dots
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
  print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; jax {jax.__version__} "
        f"({jax.devices()[0].device_kind}), torch {torch.__version__} ({TORCH_DEVICE}), transformers "
        f"{__import__('transformers').__version__}; shape {args.shape}; {ROUNDS} alternating rounds of "
        f"{-(-args.repeats // ROUNDS)} timed calls per framework")
  hf = hf_model(args.shape)
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    model, params = iblip_jax.from_pretrained(d)
  variants = torch_variants(hf, args.torch_variants.split(","))
  for name, v in variants.items():
    if isinstance(v, str):
      print(f"transformers {name}: {v}")
  x = inputs()
  n = 8192 if args.gpu else 2048
  peaks = {"iblip_jax": jax_peak(n), "transformers": torch_peak(n)}
  print(f"measured f32 matmul peak ({n}^3): XLA {peaks['iblip_jax'] / 1e9:.1f} GFLOP/s, torch "
        f"{peaks['transformers'] / 1e9:.1f} GFLOP/s")
  print("workload       who                         median [min-max]  (compile + first call apart)")
  medians, prefixes, train_prefixes = {}, None, None
  for what in args.only.split(","):
    if what in ("greedy", "beam5", "rank16") and prefixes is None:
      prefixes = bench_prefixes({n: v for n, v in variants.items() if not isinstance(v, str)}, model, params, x,
                                args.repeats)
      _release_compiled(variants)
    rest = None
    if what in ("train", "train_dropout", "train_dropout_rbg"):
      r = bench_train(variants if what != "train_dropout_rbg" else {}, model, params, x, args.repeats,
                      dropout=what != "train", rng_impl="rbg" if what == "train_dropout_rbg" else "threefry2x32")
      flops = r.pop("flops")
      if what == "train":
        train_prefixes = bench_train_prefixes({n: v for n, v in variants.items() if not isinstance(v, str)}, model,
                                              params, x, args.repeats)
        rest = "optimizer"
      mfu = {n: flops / r[n][1] / peaks["iblip_jax" if n == "iblip_jax" else "transformers"] for n in r}
      notes = (f"{flops / 1e9:.1f} GFLOP/step; MFU of each against its framework's peak: "
               + ", ".join(f"{n.replace('transformers ', '')} {100 * m:.0f}%" for n, m in mfu.items()))
    elif what in ("greedy", "beam5"):
      r = bench_generate(variants, model, params, x, args.repeats, 1 if what == "greedy" else 5)
      same = r.pop("same_tokens")
      notes = f"{NEW_TOKENS} new tokens; rows equal to transformers': " + ", ".join(
          f"{n} {100 * v:.0f}%" for n, v in same.items())
      rest = "decode"
    elif what == "annotate":
      r = bench_annotate(variants, model, params, min(args.repeats, 3))
      same = r.pop("same_answers")
      ips = {n: ANNOTATE_IMAGES / v[1] for n, v in r.items()}
      notes = (f"{ANNOTATE_IMAGES} images x {len(ANNOTATE_PROMPTS)} prompts, greedy {NEW_TOKENS} tokens; images/s: "
               + ", ".join(f"{n} {v:.2f}" for n, v in ips.items())
               + f"; input cost {r['iblip_jax'][1] / r['iblip_jax pre-decoded'][1]:.2f}x of pre-decoded"
               + "; answers equal to transformers': " + ", ".join(f"{n} {100 * v:.0f}%" for n, v in same.items()
                                                                 if n.startswith("transformers")))
    elif what == "rank16":
      r = bench_rank(variants, model, params, x, args.repeats)
      notes = f"{CANDIDATES} candidates x {CANDIDATE_TOKENS} tokens per sample"
      rest = "candidates"
    else:
      raise SystemExit(f"unknown workload {what!r}")
    medians[what] = r
    split = train_prefixes if rest == "optimizer" else prefixes if rest else None
    print(_row(what, r, peaks, notes, split, rest or ""), flush=True)
    _release_compiled(variants)
  if "greedy" in medians and "beam5" in medians:
    ratio = lambda n: medians["beam5"][n][1] / medians["greedy"][n][1]
    print("beam-5 / greedy time: " + ", ".join(f"{n} {ratio(n):.2f}x" for n in medians["greedy"]))
  print(f"load average at the end {os.getloadavg()[0]:.2f}; peak RSS (whole process, every framework): "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
  main()
