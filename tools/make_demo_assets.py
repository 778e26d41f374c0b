"""Builds the embedded demo's "pretrained" InstructBLIP: tiny towers trained here, written in Hugging Face format.

  python tools/make_demo_assets.py [--out demo_assets/instructblip-demo] [--steps 3000]

The real recipe starts from a pretrained EVA ViT and FlanT5. The demo needs the same situation at toy scale:
frozen towers that already see shapes and colours and already know the words. This script trains every parameter
of a tiny InstructBLIP on the procedural shapes data (captions, colour questions and shape questions), then saves
it with `iblip_jax.save_pretrained` together with word-level tokenizers, so that the demo loads it through the same
`from_pretrained` path as the released weights. The demo then trains a fresh Q-Former side only (configs/demo.py).
Its output is committed (a few MB); rerun this script only to change the demo's model.
"""
import argparse
import importlib.util
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from iblip_jax import config_lib, optim, pretrained, sharding  # noqa: E402
from iblip_jax import train_step as ts  # noqa: E402
from iblip_jax.data import mixture, pipeline, shapes, tokenize, word_tokenizers  # noqa: E402
from iblip_jax.data.readers import READERS  # noqa: E402
from iblip_jax.models import configs as model_configs  # noqa: E402
from iblip_jax.models.instructblip import InstructBlip  # noqa: E402


def demo_model_config(qformer_vocab: int, llm_vocab: int) -> dict:
  """The demo's sizes, from configs/demo.py (one place); the vocabularies must be those of the tokenizers."""
  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(ROOT, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  model = module.MODEL
  if (model["qformer"]["vocab_size"], model["text"]["vocab_size"]) != (qformer_vocab, llm_vocab):
    raise SystemExit(f"configs/demo.py says vocabularies {model['qformer']['vocab_size']} / "
                     f"{model['text']['vocab_size']}, the tokenizers have {qformer_vocab} / {llm_vocab}: update it")
  return model


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="demo_assets/instructblip-demo")
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--seed", type=int, default=1)
  args = parser.parse_args()

  os.makedirs(args.out, exist_ok=True)
  word_tokenizers.build(shapes.vocabulary(), args.out)
  tok = tokenize.load_tokenizers(args.out, buckets=(16, 32))
  model = InstructBlip(model_configs.from_dict(demo_model_config(len(tok.qformer), len(tok.llm))))
  print(f"vocabularies: Q-Former {len(tok.qformer)}, LLM {len(tok.llm)}")

  with tempfile.TemporaryDirectory() as data_dir:
    files = shapes.generate(data_dir, train=4000, val=0, seed=1000 + args.seed)  # not the demo's own images
    records = list(READERS["jsonl"](files["pretrain"]))
    for r in records:  # decode each image once, not once per step
      with Image.open(r["image"]) as im:
        r["image"] = np.asarray(im.convert("RGB"))
    examples = mixture.mix({"pretrain": mixture.source(records)}, {"pretrain": 1.0}, seed=args.seed)
    data = iter(pipeline.build(examples, tok, batch_size=args.batch, image_size=shapes.IMAGE_SIZE,
                               seed=args.seed, train=False).dataset)

    everything = [r".*"]
    c = config_lib.optim()
    c.lr, c.warmup_lr, c.warmup_steps, c.weight_decay, c.grad_clip_norm = 2e-3, 1e-5, 200, 0.01, 1.0
    tx = optim.make(c, args.steps)
    mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1), jax.devices()[:1])
    rules = list(config_lib.SHARDING_RULES)
    sh = ts.state_shardings(model, tx, everything, mesh, rules)
    trainable, _ = ts.init_random(model, everything, sh, jax.random.key(args.seed))
    opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(trainable)
    step = ts.jit_train_step(ts.make_train_step(model, tx, vision_frozen=False, dropout=False), sh)
    t0 = time.time()
    with sharding.context(mesh, rules):
      for i in range(args.steps):
        batch = sharding.global_batch(next(data), mesh)
        trainable, opt_state, m = step(trainable, opt_state, {}, batch, jax.random.key(i))
        if (i + 1) % 250 == 0 or i < 30 and os.environ.get("IBLIP_DEBUG"):
          print(f"step {i + 1}/{args.steps}: loss {float(m['loss']):.4f} ({time.time() - t0:.0f} s)", flush=True)
  pretrained.save_pretrained(model, jax.tree.map(np.asarray, trainable), args.out)
  size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out)
             if os.path.isfile(os.path.join(args.out, f)))
  print(f"wrote {args.out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
  main()
