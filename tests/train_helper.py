"""A few training steps of the tiny config on a given mesh: shared by the mesh tests and the multi-process worker."""
import importlib.util
import os

import jax
import numpy as np

from iblip_jax import lora as lora_lib
from iblip_jax import sharding, train_state
from iblip_jax.models import configs as model_configs
from iblip_jax.models.instructblip import InstructBlip

ROOT = os.path.join(os.path.dirname(__file__), "..")


def load_config(name: str = "tiny"):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def train_config(name: str = "tiny"):
  config = load_config(name)
  # large enough that params visibly move in 3 steps
  config.optim.lr, config.optim.warmup_lr, config.optim.warmup_steps = 1e-2, 1e-2, 1
  return config


def make_batch(batch: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  def mask(width):
    lengths = rng.integers(1, width + 1, batch)
    return (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
  qmask, pmask, dmask = mask(7), mask(6), mask(5)
  labels = rng.integers(2, 98, (batch, 5)).astype(np.int32)
  return dict(pixel_values=rng.standard_normal((batch, 30, 30, 3)).astype(np.float32),
              qformer_input_ids=rng.integers(1, 99, (batch, 7)).astype(np.int32) * qmask,
              qformer_attention_mask=qmask,
              input_ids=rng.integers(2, 98, (batch, 6)).astype(np.int32) * pmask, attention_mask=pmask,
              labels=np.where(dmask == 1, labels, -100).astype(np.int32), decoder_attention_mask=dmask)


def make_decoder_only_batch(batch: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
  """The same examples laid out for a decoder-only LLM: input_ids = [prompt][target], padding at the end."""
  t5 = make_batch(batch, seed)
  rows = [np.concatenate([p[m == 1], l[l != -100]]) for p, m, l in zip(t5["input_ids"], t5["attention_mask"],
                                                                         t5["labels"])]
  ids = np.zeros((batch, 11), np.int32)
  labels = np.full((batch, 11), -100, np.int32)
  for i, (row, n) in enumerate(zip(rows, t5["attention_mask"].sum(1))):
    ids[i, :len(row)] = row
    labels[i, n:len(row)] = row[n:]
  mask = (np.arange(11)[None] < np.array([len(r) for r in rows])[:, None]).astype(np.int32)
  return dict(pixel_values=t5["pixel_values"], qformer_input_ids=t5["qformer_input_ids"],
              qformer_attention_mask=t5["qformer_attention_mask"], input_ids=ids, attention_mask=mask, labels=labels)


def run_steps(mesh_sizes, num_steps: int = 3, config=None, devices=None, local_rows=None, lora=None):
  """Returns (losses, trainable, frozen_before, frozen_after, shardings) after `num_steps` steps. `lora` (a
  LoraConfig): adapters on its targets, trained with config.trainable's parameters (as config.lora does)."""
  config = config or train_config()
  model = InstructBlip(model_configs.with_lora(model_configs.from_dict(config.model.to_dict()), lora))
  rules = [tuple(r) for r in config.sharding_rules]
  mesh = sharding.make_mesh(dict(zip(sharding.AXES, mesh_sizes)), devices)
  patterns = tuple(config.trainable) + ((lora_lib.ADAPTERS,) if lora else ())
  setup = train_state.build(model, patterns=patterns, optim=config.optim, total_steps=config.total_steps,
                            mesh=mesh, rules=rules, max_replicated_bytes=1 << 20)
  sh = setup.shardings
  trainable, frozen = setup.init_random(jax.random.key(config.seed))
  frozen_before = jax.tree.map(np.asarray, frozen) if jax.process_count() == 1 else None
  opt_state = setup.init_opt_state(trainable)
  step = setup.train_step(dropout=False)
  batch = make_decoder_only_batch() if model.config.decoder_only else make_batch()
  if local_rows is not None:
    batch = {k: v[local_rows] for k, v in batch.items()}
  losses = []
  with sharding.context(mesh, rules):
    global_batch = sharding.global_batch(batch, mesh)
    for i in range(num_steps):
      trainable, opt_state, metrics = step(trainable, opt_state, frozen, global_batch, jax.random.key(i))
      losses.append(float(metrics["loss"]))
  return losses, trainable, frozen_before, frozen, sh, opt_state
