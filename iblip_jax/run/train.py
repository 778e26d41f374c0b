"""`--config.mode=train`: instruction tuning of the trainable tree, with periodic evaluation and checkpoints.

Sections: set-up (config check, model, tokenizers, mesh) -> state (pretrained frozen tree, trainable tree from
the checkpoint or fresh, or the latest training checkpoint) -> data -> loop (progress, metrics, guards, saves,
evaluations). Re-running the same command on the same workdir resumes from its latest checkpoint.
"""
import concurrent.futures
import math
import signal
import time

import jax
from etils import epath
from tqdm import tqdm

from iblip_jax import checkpoints, chips, distributed, optim, sharding, step_flops
from iblip_jax import trainable as trainable_lib
from iblip_jax.data import mixture, packing, pipeline, sources
from iblip_jax.errors import UserError
from iblip_jax.models.instructblip import InstructBlip
from iblip_jax.run import best as best_lib
from iblip_jax.run import common
from iblip_jax.run import logger as logger_lib
from iblip_jax.run import profiler as profiler_lib
from iblip_jax.run import timeline as timeline_lib
from iblip_jax.run import workdir_lock
from iblip_jax.run.settings import Settings, packing_problems


class NonFiniteLoss(UserError):
  """Training diverged; nothing of the diverged state was saved."""


PREEMPTED_EXIT = 75   # EX_TEMPFAIL: "try again later", distinct from a failure (1) and from a finished run (0)


class Preempted(Exception):
  """Stopped by SIGTERM after saving a checkpoint at `step` (None: during start-up, before anything trained):
  rerun to continue."""

  def __init__(self, step: int | None):
    super().__init__(f"stopped at step {step} after saving a checkpoint" if step is not None else
                     "stopped during start-up, before the first step (nothing to save; the workdir is released)")
    self.step = step


def _start_up_handler(received: list):
  """SIGTERM before the loop runs (loading weights, compiling): stop at once, through the workdir lock's release,
  with the preemption exit status, rather than die by the signal (143) and leave the lock to go stale. The signal
  is also noted in `received`: an exception raised in a handler is lost when Python happens to be running a
  garbage-collection callback (JAX has one), so the loop checks the note before its first step."""
  def handler(signum, frame):
    del frame
    received.append(signum)
    raise Preempted(None)
  return handler


def _intact(mngr) -> str:
  step = mngr.latest_step()
  where = (f"The last good checkpoint in {mngr.directory} (step {step}) is intact." if step is not None else
           f"No checkpoint was saved yet in {mngr.directory}: a rerun starts over from the pretrained weights.")
  return f"{where} Lower config.optim.lr, set config.optim.grad_clip_norm, or check the data."


def _data(s: Settings, datasets: dict, tok, model, mesh):
  problems = packing_problems(s.data.packing, model.config)
  if problems:
    raise UserError("\n".join(problems))
  sizes = {name: len(ds) for name, ds in datasets.items()}
  multipliers = {source.name: source.weight for source in s.data.datasets}
  probs = mixture.weights(sizes, multipliers, balanced=s.data.balanced)
  per_step = s.data.mixing == "step"  # LAVIS: each global batch from one dataset
  mixed = mixture.mix(datasets, probs, seed=s.seed, **(dict(batch_size=s.batch_size, batch_fn=list) if per_step else {}))
  local_batch = s.batch_size // jax.process_count()
  rows = sharding.process_rows(mesh, s.batch_size)
  want = (jax.process_index() * local_batch, (jax.process_index() + 1) * local_batch)
  if rows != want:  # the pipeline feeds process p the rows [p b, (p + 1) b) of every global batch
    raise ValueError(f"this process's devices hold rows {rows} of the global batch, not {want}: the mesh does not "
                     "order devices by process; use config.mesh sizes that make_mesh can lay out by host")
  return pipeline.build(mixed, tok, batch_size=local_batch, image_size=model.config.vision.image_size, seed=s.seed,
                        train=s.data.random_crop, render=sources.renderer(s.data.instruction_format, s.text_processing),
                        workers=s.data.workers,
                        per_step=per_step, process_index=jax.process_index(), process_count=jax.process_count(),
                        probe=datasets, group_by_length=s.data.group_by_length,
                        fitted_buckets=s.data.fitted_buckets), probs


def train_and_evaluate(s: Settings) -> dict:
  """Trains; returns the last evaluation's metrics. Raises Preempted after a signal (a checkpoint was saved)."""
  received = []
  previous = signal.signal(signal.SIGTERM, _start_up_handler(received))
  try:
    if jax.process_index() == 0:
      epath.Path(s.workdir).mkdir(parents=True, exist_ok=True)
    with workdir_lock.WorkdirLock(s.workdir):   # this run owns the workdir until it exits
      return _train(s, received)
  finally:
    signal.signal(signal.SIGTERM, previous)


def _train(s: Settings, start_up_signals: list) -> dict:
  workdir = s.workdir
  # every configured file is read before anything loads or trains: a bad line stops the run in seconds, named
  datasets = {source.name: sources.record_source(source) for source in s.data.datasets}
  eval_records = common.read_evals(s)
  model, tok = common.load_tokenizers(s, InstructBlip(s.model))

  # --- mesh, shardings, state: every parameter read straight into its shard -------------------------------
  setup = common.setup(s, model)
  mesh, rules = setup.mesh, setup.rules
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]   # the devices a batch is split over (packed rows too)
  trainable, frozen = trainable_lib.split(common.load_params(s, model, setup), s.trainable)
  if s.reinit_trainable:  # start the Q-Former side from scratch (fresh init), keep the frozen towers
    trainable = setup.init_random(jax.random.key(s.seed))[0]
  opt_state = setup.init_opt_state(trainable)
  sh = setup.shardings

  pipe, probs = _data(s, datasets, tok, model, mesh)
  data_it = iter(pipe.dataset)
  mngr = checkpoints.manager(workdir, keep=s.keep_checkpoints)
  start, restored = checkpoints.restore_latest(
      mngr, {"trainable": trainable, "opt_state": opt_state}, {"trainable": sh.trainable, "opt_state": sh.opt_state},
      data_it, move_aside=True, fresh_start_if_unreadable=s.fresh_start_if_unreadable,
      meaning=s.checkpoint_meaning)
  if restored is not None:
    trainable, opt_state = restored["trainable"], restored["opt_state"]
    if jax.process_index() == 0:
      print(f"resumed from {mngr.directory} at step {start}", flush=True)
  log = logger_lib.Logger(workdir, s.config_json, resumed_at=start)
  timeline = timeline_lib.Timeline(workdir, start, active=jax.process_index() == 0)
  flops = _FlopCounter(s, model, setup.tx) if s.log_mfu and jax.process_index() == 0 else None
  peak = s.peak_tflops * 1e12 or chips.peak_flops(jax.devices()[0].device_kind)
  log.text("mixture: " + ", ".join(f"{n} {100 * p:.1f}%" for n, p in sorted(probs.items())))

  step_fn = setup.train_step(dropout=s.dropout)
  state_check = setup.state_check()
  schedule = optim.learning_rate(s.optim, s.total_steps)
  stop = {"signal": None}
  previous = signal.signal(signal.SIGTERM, lambda signum, _: stop.update(signal=signum))
  if start_up_signals:   # a start-up signal whose exception was lost (see _start_up_handler)
    raise Preempted(None)

  # validation-based selection (config.best_checkpoint_metrics): the best evaluation's state kept in workdir/best
  keeper = None
  if s.best_checkpoint_metrics and s.evals:
    keeper = best_lib.BestKeeper(workdir, s.best_checkpoint_metrics, s.best_checkpoint_mixing,
                                 s.checkpoint_meaning)

  def evaluate_now(step):
    results = common.run_evals(s, model, trainable_lib.merge(trainable, frozen), tok, common.eval_dir(workdir, step),
                               mesh, rules, eval_records)
    log.metrics(step, {f"eval/{k}": v for k, v in results.items()})
    log.plot()
    if keeper is not None:
      log.text(keeper.consider(step, results, {"trainable": trainable, "opt_state": opt_state}))
    return results

  # --- loop -----------------------------------------------------------------------------------------------
  last, untrained, before = {}, {}, {}
  if start == 0 and s.eval_at_start and s.evals:
    if s.eval_untrained_baseline:  # a randomly initialised trainable side, as a stated baseline
      fresh = setup.init_random(jax.random.key(s.seed + 1))[0]
      with timeline.part("eval"):
        untrained = common.run_evals(s, model, trainable_lib.merge(fresh, frozen), tok,
                                     common.eval_dir(workdir, "untrained"), mesh, rules, eval_records)
      log.text("untrained Q-Former side: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(untrained.items())))
      del fresh
    with timeline.part("eval"):
      before = evaluate_now(0)
    last.update(before)
  profiler = profiler_lib.StepProfiler(workdir, s.profile_steps, s.profile_all_processes)
  bar = tqdm(total=s.total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
             disable=jax.process_index() != 0)
  t0, done_in_window, reported_skips, tokens, window_flops = time.perf_counter(), 0, 0, (0, 0), []
  step, shapes_seen = start, set()
  try:
    with sharding.context(mesh, rules):
      while step < s.total_steps:
        with profiler.step(step + 1):
          with timeline.part("data"):
            host_batch = next(data_it)
            if s.data.packing:   # the same rows on every host (data/packing.py)
              host_batch = packing.global_rows(host_batch, query_tokens=model.config.num_query_tokens,
                                               length=s.data.packing, row_multiple=batch_devices)
            batch = sharding.global_batch(host_batch, mesh)
          with timeline.part("step"):   # compiling a new shape is moved to "compile"
            rng = jax.random.fold_in(jax.random.key(s.seed, impl=s.rng_impl), step)
            trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, batch, rng)
        step += 1
        timeline.step_done()
        with timeline.part("other"):
          tokens = tuple(a + b for a, b in zip(tokens, _llm_tokens(host_batch)))
          shape = _batch_shape(batch)
          if shape not in shapes_seen:   # each new shape compiles the step again: say why this step was slow
            shapes_seen.add(shape)
            log.text(f"step {step}: train step compiled for batch shape "
                     + " ".join(f"{k}[{','.join(map(str, v))}]" for k, v in shape))
          if flops is not None:
            window_flops.append(flops.submit(trainable, opt_state, frozen, batch, shape))
          traced = profiler.step_done(step, metrics)
          if traced:
            log.text(f"step {step}: profiler trace written to {traced}")
        done_in_window += 1
        with timeline.part("step"):   # a collective: it waits for the step on every host
          stopping = distributed.any_process(stop["signal"] is not None)   # all hosts stop at the same step
        is_save = step % s.checkpoint_every == 0 or step == s.total_steps
        if step % s.log_every == 0 or is_save or stopping:
          with timeline.part("step"):   # the host waits for the device here
            loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
          if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise NonFiniteLoss(f"step {step}: loss {loss}, gradient norm {grad_norm}; training stopped. "
                                + _intact(mngr))
        with timeline.part("other"):
          if step % s.log_every == 0 or is_save or stopping:
            rate = done_in_window / (time.perf_counter() - t0)
            t0, done_in_window = time.perf_counter(), 0
            skipped = _skipped(pipe)
            window_tokens, window_slots = (sum(x) for x in zip(*distributed.gather_json(list(tokens))))
            tokens = (0, 0)
            values = {"loss": loss, "grad_norm": grad_norm, "lr": float(schedule(step - 1)),
                      "steps_per_sec": rate, "data/padding": 1 - window_tokens / max(window_slots, 1),
                      **{f"skipped/{k}": v for k, v in skipped.items()},
                      **timeline.window(*(flops.total(window_flops, wait=step == s.total_steps) if flops else
                                          (None, None)), devices=jax.device_count(), peak_flops=peak,
                                        tokens=window_tokens)}
            window_flops = []
            log.metrics(step, values)
            if sum(skipped.values()) != reported_skips:   # bad input is shown as it happens, not only in metrics.jsonl
              reported_skips = sum(skipped.values())
              if jax.process_index() == 0:
                bar.write(f"step {step}: input {_skip_text(skipped)}")
            rate_warning = _skip_rate_warning(pipe, s.data.max_skip_rate)
            if rate_warning and jax.process_index() == 0:
              bar.write(f"step {step}: WARNING: {rate_warning}")
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{values['lr']:.2e}", skipped=reported_skips,
                            goodput=f"{100 * values['goodput']:.0f}%")
          bar.update(1)
        if is_save or stopping:
          with timeline.part("checkpoint"):
            # A finite loss does not make a state good: an update can blow the parameters up (a huge learning rate)
            # and only the next step's loss shows it. The new state's own loss on this batch must be finite too.
            probe, finite = (float(x) for x in state_check(trainable, frozen, batch))
            if not (finite and math.isfinite(probe)):
              raise NonFiniteLoss(f"step {step}: the update gave {'non-finite parameters' if not finite else 'parameters'}"
                                  f" whose loss on this batch is {probe}; this state is not saved. " + _intact(mngr))
            timeline.checkpoint_saving(step)
            checkpoints.save(mngr, step, {"trainable": trainable, "opt_state": opt_state}, data_it, force=True,
                             meaning=s.checkpoint_meaning)
        if stopping:
          checkpoints.wait(mngr)
          log.text(f"stopped by a signal at step {step}; checkpoint saved. Exit status {PREEMPTED_EXIT} means: "
                   "rerun the same command to continue")
          log.close()
          raise Preempted(step)
        if s.evals and step % s.eval_every == 0 and step != s.total_steps:
          with timeline.part("eval"):
            last.update(evaluate_now(step))
          t0 = time.perf_counter()
  finally:
    bar.close()
    timeline.close()
    if flops is not None:
      flops.pool.shutdown(wait=False, cancel_futures=True)
    profiler.close(step)
    checkpoints.wait(mngr)
    signal.signal(signal.SIGTERM, previous)
  if s.evals and s.eval_at_end:
    last.update(evaluate_now(step))
    log.text(results_table(last, before, untrained, s.baselines))
  log.text(f"input over the run: {_skip_text(_skipped(pipe))}")
  log.text(timeline.summary())
  log.plot()
  log.close()
  return last


def _llm_tokens(host_batch) -> tuple[int, int]:
  """(real, all) text positions of the LLM in this host's share of a batch: real = the prompt (with the target,
  decoder-only) and, for T5, the target; all = with the padding (visual tokens counted in neither)."""
  if "packed_segment_ids" in host_batch:
    return packing.real_tokens(host_batch), packing.text_slots(host_batch)
  masks = [host_batch[k] for k in ("attention_mask", "decoder_attention_mask") if k in host_batch]
  return sum(int(m.sum()) for m in masks), sum(m.size for m in masks)


class _FlopCounter:
  """Model FLOPs of the train step per batch shape (iblip_jax.step_flops, without remat's recompute: what MFU
  counts), each shape counted once in a background thread so that training never waits for XLA's cost analysis."""

  def __init__(self, s: Settings, model: InstructBlip, tx):
    self.s, self.cfg, self.tx = s, step_flops.without_remat(model.config), tx
    self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flops")
    self.counted: dict = {}

  def submit(self, trainable, opt_state, frozen, batch, key: tuple) -> concurrent.futures.Future:
    """`key`: the batch's shape (_batch_shape)."""
    if key not in self.counted:   # shapes taken here: the arrays themselves are donated to the next step
      shapes = step_flops.shapes
      self.counted[key] = self.pool.submit(self._count, shapes(trainable), shapes(opt_state), shapes(frozen),
                                           shapes(batch))
    return self.counted[key]

  def _count(self, trainable, opt_state, frozen, batch) -> tuple[float, float]:
    """(the step's model FLOPs, the frozen towers' forward FLOPs within them)."""
    step = step_flops.train_step_flops(self.cfg, self.tx, trainable, opt_state, frozen, batch, dropout=self.s.dropout)
    return step, step_flops.frozen_forward_flops(self.cfg, trainable_lib.merge(trainable, frozen), batch)

  def total(self, futures: list, wait: bool = False) -> tuple[float | None, float | None]:
    """(model FLOPs, frozen forward FLOPs) of a window's steps, or Nones while a shape in it is still being counted
    (or its count failed); `wait`: wait for the counts (the last window of a run)."""
    if wait:
      concurrent.futures.wait(futures, timeout=300)
    if not futures or not all(f.done() and f.exception() is None for f in futures):
      return None, None
    return sum(f.result()[0] for f in futures), sum(f.result()[1] for f in futures)


def _batch_shape(batch) -> tuple:
  """((field, shape), ...) sorted: one train step program per value."""
  return tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))


def _skipped(pipe) -> dict:
  """Skipped examples by reason, summed over all processes (each counts its own share)."""
  total = {}
  for counts in distributed.gather_json(dict(pipe.skipped.counts)):
    for reason, n in counts.items():
      total[reason] = total.get(reason, 0) + n
  return total


def _skip_rate_warning(pipe, threshold: float) -> str | None:
  """A warning when the recent skip rate, over all processes, is above config.data.max_skip_rate."""
  summed = {}
  for counts in distributed.gather_json(pipe.skipped.recent_counts()):
    for dataset, (skipped, loaded) in counts.items():
      have = summed.setdefault(dataset, [0, 0])
      have[0], have[1] = have[0] + skipped, have[1] + loaded
  return pipeline.skip_report(summed, threshold, pipe.skipped.first_reasons)


def _skip_text(skipped: dict) -> str:
  counter = pipeline.SkipCounter()
  counter.counts.update(skipped)
  return counter.summary()


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
