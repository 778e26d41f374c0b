"""Input pipeline throughput against the train step it feeds, on this machine; and padding on the paper's mixture.

  python tools/bench_pipeline.py [--batch 32] [--workers 0,1,2] [--batches 12] [--steps 3] [--images 256]
  python tools/bench_pipeline.py --padding [--batch 192] [--windows 16] [--buckets 4]

`--padding`: the share of padded tokens (instruction, prompt and target together) in the batches the pipeline
builds from a length distribution modelled on the paper's 13 held-in datasets (MIXTURE below: sizes, mixed by
sqrt(size), and the word counts of their instructions and answers, each with its source), for today's batching
(stream order, power-of-two buckets), grouped by length, and grouped by length with buckets fitted to the data.
Texts only: the pipeline's own grouping (pipeline.length_grouped) and collation tokenise them; no image is made.

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
from iblip_jax.data import mixture, packing, pipeline, readers, tfds_builder, tokenize  # noqa: E402

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


# (dataset, training examples, instruction words (mean, sd), answer words (mean, sd)). Sizes: LAVIS's X-InstructBLIP
# mixture config (lavis/projects/xinstruct_blip/train/vicuna7b/image_train.yaml, the sqrt-proportional ratios of the
# team's reference notes), TextCaps' 109,765 training captions (Sidorov et al. 2020); the question-generation sets
# are their QA sets turned around. Word counts: COCO captions 10.5 (Chen et al. 2015), web/CapFilt captions ~9
# (BLIP's synthetic captions are shorter), TextCaps 12.4 (Sidorov et al.), VQAv2 questions 6.2 and answers 1.1
# words (Antol et al. 2015; 89% one word), OK-VQA 8.1 / 1.3 (Marino et al. 2019), A-OKVQA 8.8 / 1.3 (Schwenk et al.
# 2022), OCR-VQA answers are titles, authors, genres (~3 words, our estimate); LLaVA-Instruct-150K answers mix
# conversations, detailed descriptions and complex reasoning: ~100 words with a wide spread (our estimate from the
# released file's kinds; the LLaVA paper gives no mean). Instructions: the dataset's templates (~6-12 words) around
# the question. Words become ~1.3 T5 sentencepiece tokens each (CODE below draws whole tokens).
MIXTURE = (
    ("coco_caption", 566_747, (7, 2), (10.5, 2.5)), ("web_capfilt", 13_873_136, (7, 2), (9, 2.5)),
    ("textcaps", 109_765, (7, 2), (12.4, 3.5)), ("vqav2", 658_104, (12, 2.5), (1.1, 0.4)),
    ("okvqa", 9_009, (14, 3), (1.3, 0.6)), ("aokvqa", 17_056, (15, 3), (1.3, 0.6)),
    ("ocrvqa", 1_002_146, (12, 2), (3, 1.5)), ("vqg_vqav2", 658_104, (12, 2), (6.2, 2)),
    ("vqg_okvqa", 9_009, (12, 2), (8.1, 2.5)), ("vqg_aokvqa", 17_056, (12, 2), (8.8, 2.5)),
    ("llava_instruct", 394_276, (16, 6), (100, 50)),
)
TOKENS_PER_WORD = 1.3
QUERY_TOKENS = 32   # the released models' visual tokens per image: packed rows hold them with the example's text


def modelled_mixture(batch: int, batches: int, seed: int = 0):
  """The modelled mixture's texts (MIXTURE) in global batches: (word-level tokenizers, mixing probabilities,
  pipeline.indexed_batches of `batch` records, members -> (N, 3) token lengths)."""
  words = [f"w{i}" for i in range(400)]
  with tempfile.TemporaryDirectory() as d:
    from iblip_jax.demo import word_tokenizers
    word_tokenizers.build(words, d)
    tok = tokenize.load_tokenizers(d)
  rng = np.random.default_rng(seed)
  draw = lambda mean, sd: " ".join(rng.choice(words, max(1, int(round(rng.normal(mean, sd) * TOKENS_PER_WORD)))))
  n_each = batch * batches // 4
  datasets = {name: mixture.source([{"text_input": draw(*ins), "text_output": draw(*out)} for _ in range(n_each)])
              for name, _, ins, out in MIXTURE}
  probs = mixture.weights({name: size for name, size, _, _ in MIXTURE})
  groups = pipeline.indexed_batches(mixture.mix(datasets, probs, seed=seed), batch, per_step=False)
  keys = lambda members: pipeline.length_keys(members, tok, pipeline.record_texts, seed)
  return tok, probs, groups, keys


def padding_report(batch: int, windows: int, buckets: int, packing_lengths=(), batches: int = 128,
                   seed: int = 0) -> None:
  """Padded share of tokens for the modelled mixture under three batchings (see the module docstring)."""
  import grain
  tok, probs, groups, keys = modelled_mixture(batch, batches, seed)
  fitted = pipeline.fit_tokenizer_buckets(tok, groups, keys, windows=2 * windows, max_buckets=buckets)
  grouped = lambda t: pipeline.length_grouped(groups, windows, keys, seed, (t.buckets, t.out_buckets))
  plans = {"stream order, power-of-two buckets": (groups, tok),
           f"grouped by length (windows of {windows} batches)": (grouped(tok), tok),
           f"grouped, {buckets} fitted buckets per field": (grouped(fitted), fitted)}
  print(f"modelled mixture: {', '.join(f'{n} {100 * p:.1f}%' for n, p in sorted(probs.items()))}")
  lengths = keys([x for k in range(batches) for x in groups[k]])
  floor = 1 - lengths.sum() / (-(-lengths // 8) * 8).sum()
  print(f"floor: every example padded alone to a multiple of 8 (the TPU's tile; what any bucketing pays at least): "
        f"{100 * floor:.1f}% of tokens")
  print(f"fitted buckets: instruction/prompt {fitted.buckets}, target {fitted.out_buckets}")
  for length in packing_lengths:
    plans[f"grouped, fitted, packed in rows of {length}"] = (grouped(fitted), fitted, length)
  print(f"\n(global batch {batch}, {batches} batches) share of padding among: text = instruction, prompt and target "
        f"tokens; LLM = the LLM's positions, the {QUERY_TOKENS} visual tokens of each example included as real; all = "
        f"the LLM's and the Q-Former's ({QUERY_TOKENS} queries + instruction) positions")
  print(f"{'batching':<46} {'text':>7} {'target':>7} {'LLM':>7} {'all':>7}")
  for name, (g, t, *length) in plans.items():
    count = dict.fromkeys(("text", "target", "llm", "all"), (0, 0))   # (real, positions)
    add = lambda key, real, size: count.update({key: (count[key][0] + int(real), count[key][1] + int(size))})
    for k in range(batches):
      members = g[k]
      b = tokenize.encode_training(t, [r["text_input"] for _, r in members], [r["text_output"] for _, r in members])
      n, visual = len(members), len(members) * QUERY_TOKENS
      q = b["qformer_attention_mask"]   # the Q-Former's instructions stay per example, bucketed
      if length:   # the LLM side packed as training packs it (data/packing.py)
        p = packing.pack(b, visual_tokens=QUERY_TOKENS, length=length[0])
        text = packing.real_tokens(p), packing.text_slots(p)
        target = int((p["packed_decoder_segment_ids"] > 0).sum()), p["packed_decoder_segment_ids"].size
        llm = text[0] + visual, p["packed_segment_ids"].size + p["packed_decoder_segment_ids"].size
      else:
        masks = (b["attention_mask"], b["decoder_attention_mask"])
        text = sum(int(m.sum()) for m in masks), sum(m.size for m in masks)
        target = int(b["decoder_attention_mask"].sum()), b["decoder_attention_mask"].size
        llm = text[0] + visual, text[1] + visual
      add("text", text[0] + q.sum(), text[1] + q.size)
      add("target", *target)
      add("llm", *llm)
      add("all", llm[0] + q.sum() + visual, llm[1] + q.size + visual)
    print(f"{name:<46} " + " ".join(f"{100 * (1 - r / size):>6.1f}%" for r, size in count.values()))
  del grain


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
  parser.add_argument("--padding", action="store_true", help="report padding on the modelled mixture, then stop")
  parser.add_argument("--windows", type=int, default=64, help="--padding: global batches per length-grouping window")
  parser.add_argument("--buckets", type=int, default=8, help="--padding: fitted bucket lengths per field")
  parser.add_argument("--packing", default="512,1024",
                      help="--padding: packed row lengths to report (config.data.packing), comma-separated")
  args = parser.parse_args()
  if args.padding:
    return padding_report(args.batch, args.windows, args.buckets, [int(x) for x in args.packing.split(",") if x])
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
