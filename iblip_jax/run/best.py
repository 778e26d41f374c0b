"""Keeping the best checkpoint by held-in validation score, as the paper selects its models: it validates during
instruction tuning and keeps one checkpoint per model, the best on the held-in validation sets (paper section 2.6;
lavis_instructblip.md 3.1). Training checkpoints are kept only for the last few steps, so the best one is saved
again, apart, under `workdir/best/` (an orbax checkpoint of the trainable tree and optimizer state, with
fingerprints, exactly as training saves them) with `workdir/best/best.json` saying its step, score and metrics.
`--workdir DIR/best` then evaluates or exports the selected model (run/restore.py reads it like any workdir).

The score is the mean of `config.best_checkpoint_metrics` ("<eval name>/<metric>"; an eval name alone means its
task's headline metric), higher is better. Every process takes part in the save; process 0 decides from the metrics
(which it computed and shared) and every process follows its decision, so all agree.
"""
import json
import logging
import math

from etils import epath

from iblip_jax import checkpoints, distributed
from iblip_jax.evaluation import tasks

log = logging.getLogger(__name__)

BEST_DIR = "best"
RECORD = "best.json"


def selection_keys(names, evals) -> tuple[list[str], list[str]]:
  """(metric keys, problems) for config.best_checkpoint_metrics: "<eval>/<metric>", or "<eval>" for its task's
  headline metric; `evals` are the configured evaluations (Sources)."""
  by_name = {e.name: e for e in evals}
  keys, problems = [], []
  for entry in names:
    name, _, metric = str(entry).partition("/")
    if name not in by_name:
      problems.append(f"config.best_checkpoint_metrics: {entry!r} names no evaluation in config.evals "
                      f"({', '.join(sorted(by_name)) or 'none configured'})")
      continue
    task = by_name[name].task
    keys.append(f"{name}/{metric or (tasks.get(task).headline if task in tasks.TASKS else '?')}")
  return keys, problems


def score(results: dict, keys) -> float | None:
  """The mean of `keys` in `results`; None when one is missing or not a finite number."""
  values = [results.get(k) for k in keys]
  if not keys or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
    return None
  return float(sum(values) / len(values))


class BestKeeper:
  """Saves the training state to workdir/best whenever an evaluation beats the best score so far (kept across
  resumes in best.json)."""

  def __init__(self, workdir: str, keys):
    self.keys = list(keys)
    self.dir = epath.Path(workdir) / BEST_DIR
    self.mngr = checkpoints.manager(str(self.dir), keep=None)   # one kept; the old one goes after the new is safe
    self.record = self._read()

  def _read(self) -> dict | None:
    path = self.dir / RECORD
    record = json.loads(path.read_text()) if path.exists() else None
    if record is None:
      return None
    if record.get("keys") != self.keys or record.get("step") not in self.mngr.all_steps():
      if distributed.is_primary():
        log.warning("%s does not describe a checkpoint of this selection (keys %s, step %s); the next evaluation "
                    "replaces it", path, record.get("keys"), record.get("step"))
      return None
    return record

  def consider(self, step: int, results: dict, state: dict) -> str | None:
    """Saves `state` ({"trainable", "opt_state"}) as the best when its score beats the record; returns a line for
    the log (None when nothing changed)."""
    decision = None
    if distributed.is_primary():
      value = score(results, self.keys)
      best = None if self.record is None else self.record["score"]
      if value is None:
        decision = {"save": False, "line": f"step {step}: no selection score (missing or not finite: "
                                           f"{', '.join(self.keys)}); best checkpoint unchanged"}
      else:
        decision = {"save": best is None or value > best, "value": value,
                    "line": f"step {step}: held-in validation score {value:.2f} (mean of {', '.join(self.keys)})"
                            + ("" if best is None else f"; best so far {best:.2f} at step {self.record['step']}")}
    decision = distributed.broadcast_json(decision)   # every process follows process 0
    if not decision["save"]:
      return decision["line"]
    old = [s for s in self.mngr.all_steps() if s != step]
    if step not in self.mngr.all_steps():
      checkpoints.save(self.mngr, step, state, force=True)
      checkpoints.wait(self.mngr)
    self.record = {"step": step, "score": decision["value"], "keys": self.keys,
                   "metrics": {k: results.get(k) for k in self.keys}}
    if distributed.is_primary():
      (self.dir / RECORD).write_text(json.dumps(self.record, indent=2))
    distributed.sync("iblip_jax_best_checkpoint")
    for s in old:   # only now: a crash in between leaves the previous best, never none
      self.mngr.delete(s)
    return decision["line"] + f" -> new best, saved to {self.dir}"
