"""`--config.mode=train`: instruction tuning of the trainable tree, with periodic evaluation and checkpoints.

Sections: set-up (config check, model, tokenizers, mesh) -> state (pretrained frozen tree, trainable tree from
the checkpoint or fresh, or the latest training checkpoint) -> data -> loop (progress, metrics, guards, saves,
evaluations). Re-running the same command on the same workdir resumes from its latest checkpoint.
"""
import math
import signal
import time

import jax
from etils import epath
from tqdm import tqdm

from iblip_jax import checkpoints, distributed, optim, sharding
from iblip_jax import train_step as ts
from iblip_jax.data import mixture, pipeline
from iblip_jax.models.instructblip import InstructBlip
from iblip_jax.run import common
from iblip_jax.run import logger as logger_lib
from iblip_jax.run import workdir_lock
from iblip_jax import trainable as trainable_lib


class NonFiniteLoss(RuntimeError):
  """Training diverged; nothing of the diverged state was saved."""


PREEMPTED_EXIT = 75   # EX_TEMPFAIL: "try again later", distinct from a failure (1) and from a finished run (0)


class Preempted(Exception):
  """Stopped by SIGTERM after saving a checkpoint at `step`: rerun to continue."""

  def __init__(self, step: int):
    super().__init__(f"stopped at step {step} after saving a checkpoint")
    self.step = step


def _intact(mngr) -> str:
  return (f"The last good checkpoint in {mngr.directory} (step {mngr.latest_step()}) is intact. Lower "
          "config.optim.lr, set config.optim.grad_clip_norm, or check the data.")


def _data(config, tok, model, mesh):
  datasets = {name: common.record_source(spec, f"data.datasets.{name}")
              for name, spec in config.data.datasets.items()}
  sizes = {name: len(ds) for name, ds in datasets.items()}
  multipliers = {name: spec.get("weight", 1.0) for name, spec in config.data.datasets.items()}
  probs = mixture.weights(sizes, multipliers, balanced=config.data.balanced)
  per_step = config.data.get("mixing", "example") == "step"  # LAVIS: each global batch from one dataset
  mixed = mixture.mix(datasets, probs, seed=config.seed,
                      **(dict(batch_size=config.batch_size, batch_fn=list) if per_step else {}))
  local_batch = config.batch_size // jax.process_count()
  rows = sharding.process_rows(mesh, config.batch_size)
  want = (jax.process_index() * local_batch, (jax.process_index() + 1) * local_batch)
  if rows != want:  # the pipeline feeds process p the rows [p b, (p + 1) b) of every global batch
    raise ValueError(f"this process's devices hold rows {rows} of the global batch, not {want}: the mesh does not "
                     "order devices by process; use config.mesh sizes that make_mesh can lay out by host")
  return pipeline.build(mixed, tok, batch_size=local_batch, image_size=model.config.vision.image_size,
                        seed=config.seed, train=config.data.random_crop, render=common.renderer(config),
                        workers=config.data.workers, per_step=per_step,
                        process_index=jax.process_index(), process_count=jax.process_count()), probs


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains; returns the last evaluation's metrics. Raises Preempted after a signal (a checkpoint was saved)."""
  common.validate(config, workdir, mode="train")
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  with workdir_lock.WorkdirLock(workdir):   # this run owns the workdir until it exits
    return _train(config, workdir)


def _train(config, workdir: str) -> dict:
  model = InstructBlip(common.model_config(config))
  model, tok = common.load_tokenizers(config, model)

  # --- mesh, shardings, state: every parameter read straight into its shard -------------------------------
  mesh, rules = common.mesh_and_rules(config)
  tx = optim.make(config.optim, config.total_steps)
  sh = ts.state_shardings(model, tx, config.trainable, mesh, rules,
                          max_replicated_bytes=int(config.max_replicated_mb * 2**20))
  trainable, frozen = trainable_lib.split(common.load_params(config, model, trainable_lib.merge(sh.trainable, sh.frozen)),
                               config.trainable)
  if config.reinit_trainable:  # start the Q-Former side from scratch (fresh init), keep the frozen towers
    trainable = ts.init_random(model, config.trainable, sh, jax.random.key(config.seed))[0]
  opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(trainable)

  pipe, probs = _data(config, tok, model, mesh)
  data_it = iter(pipe.dataset)
  mngr = checkpoints.manager(workdir, keep=config.keep_checkpoints)
  start, restored = checkpoints.restore_latest(
      mngr, {"trainable": trainable, "opt_state": opt_state}, {"trainable": sh.trainable, "opt_state": sh.opt_state},
      data_it, move_aside=True, fresh_start_if_unreadable=config.fresh_start_if_unreadable)
  if restored is not None:
    trainable, opt_state = restored["trainable"], restored["opt_state"]
    if jax.process_index() == 0:
      print(f"resumed from {mngr.directory} at step {start}", flush=True)
  log = logger_lib.Logger(workdir, config, resumed_at=start)
  log.text("mixture: " + ", ".join(f"{n} {100 * p:.1f}%" for n, p in sorted(probs.items())))

  step_fn = ts.jit_train_step(ts.make_train_step(model, tx, vision_frozen="vision" not in trainable,
                                                 dropout=config.dropout), sh)
  state_check = ts.jit_state_check(model, sh)
  schedule = optim.learning_rate(config.optim, config.total_steps)
  stop = {"signal": None}
  previous = signal.signal(signal.SIGTERM, lambda signum, _: stop.update(signal=signum))

  def evaluate_now(step):
    results = common.run_evals(config, model, trainable_lib.merge(trainable, frozen), tok, _eval_dir(workdir, step), mesh,
                               rules)
    log.metrics(step, {f"eval/{k}": v for k, v in results.items()})
    log.plot()
    return results

  # --- loop -----------------------------------------------------------------------------------------------
  last, untrained, before = {}, {}, {}
  if start == 0 and config.eval_at_start and config.evals:
    if config.eval_untrained_baseline:  # a randomly initialised trainable side, as a stated baseline
      fresh = ts.init_random(model, config.trainable, sh, jax.random.key(config.seed + 1))[0]
      untrained = common.run_evals(config, model, trainable_lib.merge(fresh, frozen), tok, _eval_dir(workdir, "untrained"),
                                   mesh, rules)
      log.text("untrained Q-Former side: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(untrained.items())))
      del fresh
    before = evaluate_now(0)
    last.update(before)
  bar = tqdm(total=config.total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
             disable=jax.process_index() != 0)
  t0, done_in_window, reported_skips = time.perf_counter(), 0, 0
  step = start
  try:
    with sharding.context(mesh, rules):
      while step < config.total_steps:
        batch = sharding.global_batch(next(data_it), mesh)
        rng = jax.random.fold_in(jax.random.key(config.seed), step)
        trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, batch, rng)
        step += 1
        done_in_window += 1
        stopping = distributed.any_process(stop["signal"] is not None)   # all hosts stop at the same step
        is_save = step % config.checkpoint_every == 0 or step == config.total_steps
        if step % config.log_every == 0 or is_save or stopping:
          loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
          if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise NonFiniteLoss(f"step {step}: loss {loss}, gradient norm {grad_norm}; training stopped. "
                                + _intact(mngr))
          rate = done_in_window / (time.perf_counter() - t0)
          t0, done_in_window = time.perf_counter(), 0
          skipped = _skipped(pipe)
          values = {"loss": loss, "grad_norm": grad_norm, "lr": float(schedule(step - 1)),
                    "steps_per_sec": rate, **{f"skipped/{k}": v for k, v in skipped.items()}}
          log.metrics(step, values)
          if sum(skipped.values()) != reported_skips:   # bad input is shown as it happens, not only in metrics.jsonl
            reported_skips = sum(skipped.values())
            if jax.process_index() == 0:
              bar.write(f"step {step}: input {_skip_text(skipped)}")
          bar.set_postfix(loss=f"{loss:.4f}", lr=f"{values['lr']:.2e}", skipped=reported_skips)
        bar.update(1)
        if is_save or stopping:
          # A finite loss does not make a state good: an update can blow the parameters up (a huge learning rate)
          # and only the next step's loss shows it. The new state's own loss on this batch must be finite too.
          probe, finite = (float(x) for x in state_check(trainable, frozen, batch))
          if not (finite and math.isfinite(probe)):
            raise NonFiniteLoss(f"step {step}: the update gave {'non-finite parameters' if not finite else 'parameters'}"
                                f" whose loss on this batch is {probe}; this state is not saved. " + _intact(mngr))
          checkpoints.save(mngr, step, {"trainable": trainable, "opt_state": opt_state}, data_it, force=True)
        if stopping:
          mngr.wait_until_finished()
          log.text(f"stopped by a signal at step {step}; checkpoint saved. Exit status {PREEMPTED_EXIT} means: "
                   "rerun the same command to continue")
          log.close()
          raise Preempted(step)
        if config.evals and step % config.eval_every == 0 and step != config.total_steps:
          last.update(evaluate_now(step))
          t0 = time.perf_counter()
  finally:
    bar.close()
    mngr.wait_until_finished()
    signal.signal(signal.SIGTERM, previous)
  if config.evals and config.eval_at_end:
    last.update(evaluate_now(step))
    log.text(results_table(last, before, untrained, config.get("baselines") or {}))
  log.text(f"input over the run: {_skip_text(_skipped(pipe))}")
  log.plot()
  log.close()
  return last


def _skipped(pipe) -> dict:
  """Skipped examples by reason, summed over all processes (each counts its own share)."""
  total = {}
  for counts in distributed.gather_json(dict(pipe.skipped.counts)):
    for reason, n in counts.items():
      total[reason] = total.get(reason, 0) + n
  return total


def _skip_text(skipped: dict) -> str:
  counter = pipeline.SkipCounter()
  counter.counts.update(skipped)
  return counter.summary()


def _eval_dir(workdir: str, step) -> str:
  return str(epath.Path(workdir) / "eval" / (step if isinstance(step, str) else f"step_{step}"))


def results_table(final: dict, before: dict, untrained: dict, chance: dict) -> str:
  """Final metrics next to the baselines: chance (from the config), a randomly initialised trainable side, and
  the model before this training (step 0). A value that is not a number (a metric that is a string, a baseline
  left blank in the config) never costs the table: a baseline shows "-", a metric without a number is left out."""
  def fmt(v) -> str:
    number = logger_lib.as_number(v)
    return "-" if number is None else f"{number:.1f}"

  lines = [f"{'metric':<36} {'chance':>8} {'untrained':>10} {'step 0':>8} {'trained':>8}"]
  for key, value in sorted(final.items()):
    if logger_lib.as_number(value) is not None:
      lines.append(f"{key:<36} {fmt(chance.get(key.split('/')[0])):>8} {fmt(untrained.get(key)):>10} "
                   f"{fmt(before.get(key)):>8} {fmt(value):>8}")
  return "\n".join(lines)
