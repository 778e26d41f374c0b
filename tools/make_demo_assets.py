"""Builds the embedded demo's "pretrained" InstructBLIP: tiny towers trained here, written in Hugging Face format.

  python tools/make_demo_assets.py [--out demo_assets/instructblip-demo] [--steps 2000] [--steps_text 1500]

The real recipe starts from a pretrained EVA ViT and FlanT5 and a BLIP-2 Q-Former. The demo needs the same
situation at toy scale, built in two stages on procedural shapes data (not the demo's own images):
  A. "LLM pretraining": the T5 alone learns captioning, question answering and multiple choice from text, each
     record written as [caption tokens][prompt], the caption where the visual tokens will sit;
  B. "BLIP-2": the ViT and Q-Former side learn to caption images with that T5 frozen, plus a term pulling the visual
     tokens towards the caption's token embeddings, so that what the T5 learned from text carries over to images.
It saves the result with `iblip_jax.save_pretrained` together with word-level tokenizers, so that the demo loads it
through the same `from_pretrained` path as the released weights, then instruction-tunes the Q-Former side only
(configs/demo.py). Its output is committed (about 2 MB); rerun this script only to change the demo's model (it took
about 10 minutes on 2 CPU cores).
"""
import argparse
import importlib.util
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn
from PIL import Image

from iblip_jax import config_lib, hf, losses, optim, sharding, train_state
from iblip_jax.run import settings
from iblip_jax import trainable as trainable_lib
from iblip_jax.data import mixture, pipeline, tokenize
from iblip_jax.demo import shapes, word_tokenizers
from iblip_jax.data.readers import READERS
from iblip_jax.models import configs as model_configs, instructblip
from iblip_jax.models.instructblip import InstructBlip
from iblip_jax.models.t5 import T5

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


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


def _optim():
  c = config_lib.optim()
  c.lr, c.warmup_lr, c.warmup_steps, c.weight_decay, c.grad_clip_norm = 2e-3, 1e-5, 200, 0.01, 1.0
  return c


def _with_caption(tok, captions, prompts, slots: int) -> dict:
  """[caption tokens][prompt tokens] as one encoder input: the caption sits exactly where the Q visual tokens will
  (every demo caption is 7 words and EOS, i.e. `slots`; no padding between, because T5's positions are relative)."""
  cap = np.asarray(tok.llm(list(captions))["input_ids"], np.int32)
  if cap.shape[1] != slots:
    raise ValueError(f"captions tokenize to {cap.shape[1]} tokens, the model has {slots} query tokens")
  prompt = tokenize.encode_prompts(tok, prompts)
  return dict(input_ids=np.concatenate([cap, prompt["input_ids"]], 1),
              attention_mask=np.concatenate([np.ones_like(cap), prompt["attention_mask"]], 1))


def train_text(model, lm_params, tok, path: str, steps: int, batch: int, seed: int):
  """Stage A: trains the T5 alone on text records, each written as [caption][prompt]; returns its parameters."""
  rows = [json.loads(line) for line in open(path)]  # text only: no image field for the JSONL reader
  tx = optim.make(_optim(), steps)
  opt_state = tx.init(lm_params)

  def loss(p, batch):
    lm = T5(model.config.text)
    text = model.config.text
    logits = lm.apply({"params": p}, lm.apply({"params": p}, batch["input_ids"], method="embed"),
                      batch["attention_mask"], losses.shift_right(batch["labels"], text.decoder_start_token_id,
                                                              text.pad_token_id),
                      batch["decoder_attention_mask"])
    return losses.cross_entropy(logits, batch["labels"])[0]

  @jax.jit
  def step(p, o, batch):
    value, grads = jax.value_and_grad(loss)(p, batch)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, value

  rng = np.random.default_rng(seed)
  t0 = time.time()
  for i in range(steps):
    picked = [rows[j] for j in rng.integers(0, len(rows), batch)]
    b = {**_with_caption(tok, [r["caption"] for r in picked], [r["text_input"] for r in picked],
                         model.config.num_query_tokens),
         **tokenize.encode_targets(tok, [r["text_output"] for r in picked])}
    lm_params, opt_state, value = step(lm_params, opt_state, {k: jnp.asarray(v) for k, v in b.items()})
    if (i + 1) % 250 == 0:
      print(f"stage A step {i + 1}/{steps}: loss {float(value):.4f} ({time.time() - t0:.0f} s)", flush=True)
  return jax.tree.map(np.asarray, lm_params)


def caption_step(setup, match_weight: float):
  """Stage B's step: the captioning loss (BLIP-2's generative objective) plus the squared distance between the
  visual tokens and the caption's token embeddings, slot by slot (the caption and its EOS fill the Q slots).
  The second term puts the image where stage A put the caption, so that what the LLM learned from text carries
  over to images; that is what lets the demo show zero-shot transfer to a format never trained with images."""
  model, tx = setup.model, setup.tx
  is_projection = lambda module, method: module.name == "language_projection" and method == "__call__"

  def step(trainable, opt_state, frozen, batch, rng):
    def objective(t):
      params = trainable_lib.merge(t, frozen)
      text = model.config.text
      # one forward pass; the visual tokens (the projection's output) are captured on the way
      logits, state = model.apply(
          {"params": params}, batch["pixel_values"], batch["qformer_input_ids"], batch["qformer_attention_mask"],
          batch["input_ids"], batch["attention_mask"],
          decoder_input_ids=losses.shift_right(batch["labels"], text.decoder_start_token_id, text.pad_token_id),
          decoder_attention_mask=batch["decoder_attention_mask"], capture_intermediates=is_projection,
          mutable=["intermediates"])
      lm_loss = losses.cross_entropy(logits, batch["labels"])[0]
      visual = state["intermediates"]["language_projection"]["__call__"][0]
      target = model.apply({"params": params}, jnp.where(batch["labels"] < 0, 0, batch["labels"]),
                           method=lambda m, ids: m.language_model.embed(ids))[:, :visual.shape[1]]
      return lm_loss + match_weight * jnp.mean(jnp.square(visual - target)), lm_loss
    (_, lm_loss), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, {"loss": lm_loss}
  return setup.jit_step(step)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="demo_assets/instructblip-demo")
  parser.add_argument("--steps", type=int, default=2000, help="stage B (image side) steps")
  parser.add_argument("--steps_text", type=int, default=1500, help="stage A (text-only LLM) steps")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--match_weight", type=float, default=1.0,
                      help="stage B: weight of the visual-token-to-caption-embedding distance")
  parser.add_argument("--seed", type=int, default=1)
  args = parser.parse_args()

  os.makedirs(args.out, exist_ok=True)
  word_tokenizers.build(shapes.vocabulary(), args.out)
  tok = tokenize.load_tokenizers(args.out, buckets=(16, 32))
  model = InstructBlip(model_configs.from_dict(demo_model_config(len(tok.qformer), len(tok.llm))))
  print(f"vocabularies: Q-Former {len(tok.qformer)}, LLM {len(tok.llm)}")

  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1), jax.devices()[:1])
  rules = list(settings.SHARDING_RULES)
  with tempfile.TemporaryDirectory() as data_dir:
    files = shapes.generate(data_dir, train=4000, val=0, seed=1000 + args.seed)  # not the demo's own images
    params = jax.tree.map(np.asarray, nn.meta.unbox(jax.jit(instructblip.init_fn(model))(jax.random.key(args.seed))))
    # Stage A, the "LLM pretraining": T5 alone, on text (question answering and captions over written captions).
    params["language_model"] = train_text(model, params["language_model"], tok, files["pretrain_text"],
                                          args.steps_text, args.batch, args.seed)
    # Stage B, "BLIP-2": ViT + Q-Former side learn to caption images (and to sit where stage A's captions sat),
    # the language model frozen.
    records = list(READERS["jsonl"](files["pretrain_caption"]))
    for r in records:  # decode each image once, not once per step
      with Image.open(r["image"]) as im:
        r["image"] = np.asarray(im.convert("RGB"))
    examples = mixture.mix({"caption": mixture.source(records)}, {"caption": 1.0}, seed=args.seed)
    data = iter(pipeline.build(examples, tok, batch_size=args.batch, image_size=shapes.IMAGE_SIZE,
                               seed=args.seed, train=False).dataset)
    image_side = [r"^vision/", r"^ln_vision/", r"^query_tokens$", r"^qformer/", r"^language_projection/"]
    setup = train_state.build(model, patterns=image_side, optim=_optim(), total_steps=args.steps, mesh=mesh,
                              rules=rules)
    trainable, frozen = trainable_lib.split(train_state.place(params, setup.param_shardings), image_side)
    opt_state = setup.init_opt_state(trainable)
    step = caption_step(setup, args.match_weight)
    t0 = time.time()
    with sharding.context(mesh, rules):
      for i in range(args.steps):
        batch = sharding.global_batch(next(data), mesh)
        trainable, opt_state, m = step(trainable, opt_state, frozen, batch, jax.random.key(i))
        if (i + 1) % 250 == 0:
          print(f"stage B step {i + 1}/{args.steps}: loss {float(m['loss']):.4f} ({time.time() - t0:.0f} s)",
                flush=True)
    trainable = trainable_lib.merge(jax.tree.map(np.asarray, trainable), jax.tree.map(np.asarray, frozen))
  hf.save_pretrained(model, trainable, args.out)
  size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out)
             if os.path.isfile(os.path.join(args.out, f)))
  print(f"wrote {args.out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
  main()
