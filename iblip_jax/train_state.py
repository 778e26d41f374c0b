"""The training state, built one way for everyone: the main job (training, and the model for evaluation and
prediction), the ahead-of-time compiler, the demo-asset tool and the tests.

    setup = train_state.build(model, patterns=..., optim=..., total_steps=..., mesh=..., rules=...)
    trainable, frozen = trainable_lib.split(load_or_init(setup.param_shardings), patterns)
    opt_state = setup.init_opt_state(trainable)
    step = setup.train_step(dropout=True)        # jitted, in/out shardings, trainable and optimizer state donated

mesh -> optimizer -> shardings of the trainable tree, the frozen tree and the optimizer state (from shapes only:
nothing is allocated) -> the jitted step. `setup.abstract()` is the same state as ShapeDtypeStructs carrying their
shardings, and `batch_spec` the batch: what tools/aot_compile.py compiles is by construction what training runs.
"""
import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from iblip_jax import optim as optim_lib
from iblip_jax import sharding
from iblip_jax import trainable as trainable_lib
from iblip_jax.models.configs import InstructBlipConfig
from iblip_jax.models.instructblip import InstructBlip, init_fn, params_shape
from iblip_jax.train_step import loss_fn, make_train_step


@dataclasses.dataclass(frozen=True)
class Shardings:
  trainable: Any
  frozen: Any
  opt_state: Any
  batch: Any
  replicated: Any


@dataclasses.dataclass(frozen=True)
class Lengths:
  """Sequence lengths of one batch; defaults are the tokenizers' longest buckets (LAVIS's truncation lengths)."""
  instruction: int = 128   # Q-Former instruction tokens
  prompt: int = 128        # LLM prompt tokens (the Q visual tokens go in front of them)
  target: int = 256        # LLM target tokens


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  model: InstructBlip
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  rules: tuple
  patterns: tuple[str, ...]
  shardings: Shardings

  @property
  def param_shardings(self) -> dict:
    """Every parameter's sharding, one tree (where loading and initialisation put the parameters)."""
    return trainable_lib.merge(self.shardings.trainable, self.shardings.frozen)

  def abstract(self) -> tuple[dict, dict, Any]:
    """(trainable, frozen, optimizer state) as ShapeDtypeStructs with their shardings."""
    trainable, frozen = trainable_lib.split(params_shape(self.model), self.patterns)
    opt_state = jax.eval_shape(self.tx.init, trainable)
    put = lambda tree, sh: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
    return (put(trainable, self.shardings.trainable), put(frozen, self.shardings.frozen),
            put(opt_state, self.shardings.opt_state))

  def init_random(self, rng) -> tuple[dict, dict]:
    """Fresh (trainable, frozen) params, created directly in their shardings (nothing full-size on one device)."""
    def init(r):
      return trainable_lib.split(nn.meta.unbox(init_fn(self.model)(r)), self.patterns)
    return jax.jit(init, out_shardings=(self.shardings.trainable, self.shardings.frozen))(rng)

  def init_opt_state(self, trainable: dict):
    return jax.jit(self.tx.init, out_shardings=self.shardings.opt_state)(trainable)

  def train_step(self, *, dropout: bool = True) -> Callable:
    """(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics), jitted with explicit in/out
    shardings; the trainable tree and the optimizer state are donated. A ViT without trainable parameters gets no
    gradient at all."""
    vision_frozen = "vision" not in self.shardings.trainable
    return self.jit_step(make_train_step(self.model, self.tx, vision_frozen=vision_frozen, dropout=dropout))

  def jit_step(self, step: Callable) -> Callable:
    """Any step of the same signature (another objective, say) jitted like the training step."""
    sh = self.shardings
    return jax.jit(step, in_shardings=(sh.trainable, sh.opt_state, sh.frozen, sh.batch, sh.replicated),
                   out_shardings=(sh.trainable, sh.opt_state, sh.replicated), donate_argnums=(0, 1))

  def state_check(self) -> Callable:
    """(trainable, frozen, batch) -> (the state's deterministic loss on the batch, whether every trainable value is
    finite): what training checks before it saves a state."""
    def check(trainable, frozen, batch):
      loss, _ = loss_fn(self.model, trainable_lib.merge(trainable, frozen), batch, None)
      finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trainable)]))
      return loss, finite
    sh = self.shardings
    return jax.jit(check, in_shardings=(sh.trainable, sh.frozen, sh.batch), out_shardings=(sh.replicated,) * 2)

  def batch_spec(self, batch: int, lengths: Lengths = Lengths(), *, labels: bool = True) -> dict:
    return batch_spec(self.model.config, batch, lengths, self.shardings.batch, labels=labels)


def build(model: InstructBlip, *, patterns: Sequence[str], optim, total_steps: int, mesh: jax.sharding.Mesh,
          rules: Sequence[tuple], max_replicated_bytes: int | None = None) -> TrainSetup:
  """Optimizer and shardings of both parameter trees and the optimizer state, from shapes only. `optim`: the
  optimizer settings (config.optim's fields, see iblip_jax.optim)."""
  tx = optim_lib.make(optim, total_steps)
  rules = tuple(tuple(r) for r in rules)
  boxed = params_shape(model, boxed=True)
  unboxed = nn.meta.unbox(boxed)
  trainable_lib.check(unboxed, patterns)
  with nn.logical_axis_rules(rules):
    param_sh = sharding.logical_shardings(boxed, mesh, rules)
  if max_replicated_bytes is not None:
    sharding.check_sharded(unboxed, param_sh, max_replicated_bytes)
  train_sh, frozen_sh = trainable_lib.split(param_sh, patterns)
  opt_shape = jax.eval_shape(tx.init, trainable_lib.split(unboxed, patterns)[0])
  repl = sharding.replicated(mesh)
  # Adam moments take their parameter's sharding; counters and other scalars are replicated.
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_shape, train_sh, transform_non_params=lambda _: repl,
                                 is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  shardings = Shardings(train_sh, frozen_sh, opt_sh, sharding.batch_sharding(mesh), repl)
  return TrainSetup(model, tx, mesh, rules, tuple(patterns), shardings)


def batch_spec(cfg: InstructBlipConfig, batch: int, lengths: Lengths = Lengths(), batch_sharding=None, *,
               labels: bool = True) -> dict:
  """The train (or, without labels, decode) batch as ShapeDtypeStructs, sharded when given a sharding: the layout
  tokenize.encode_training produces. A decoder-only LLM trains on [prompt][target] in one sequence."""
  v = cfg.vision
  ids = lambda n: jax.ShapeDtypeStruct((batch, n), jnp.int32, sharding=batch_sharding)
  text = lengths.prompt + lengths.target if labels and cfg.decoder_only else lengths.prompt
  out = dict(pixel_values=jax.ShapeDtypeStruct((batch, v.image_size, v.image_size, v.num_channels), jnp.float32,
                                               sharding=batch_sharding),
             qformer_input_ids=ids(lengths.instruction), qformer_attention_mask=ids(lengths.instruction),
             input_ids=ids(text), attention_mask=ids(text))
  if labels and cfg.decoder_only:
    out.update(labels=ids(text))
  elif labels:
    out.update(labels=ids(lengths.target), decoder_attention_mask=ids(lengths.target))
  return out


def place(tree: dict, shardings: Any) -> dict:
  """Host arrays -> global arrays; each device receives only its own slices."""
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), tree, shardings)
