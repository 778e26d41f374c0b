"""Keeping the best checkpoint by held-in validation score, as the paper selects its models: it validates during
instruction tuning and keeps one checkpoint per model, the best on the held-in validation sets (paper section 2.6;
lavis_instructblip.md 3.1). Training checkpoints are kept only for the last few steps, so the best one is saved
again, apart, under `workdir/best/` (an orbax checkpoint of the trainable tree and optimizer state, with
fingerprints, exactly as training saves them) with `workdir/best/best.json` saying its step, score and metrics.
`--workdir DIR/best` then evaluates or exports the selected model (run/restore.py reads it like any workdir).

Each evaluation contributes its LAVIS `agg_metrics` (lavis/tasks/captioning.py and vqa.py): CIDEr + BLEU-4 for a
captioning task, the headline metric (accuracy) for the others; or the one metric named ("<eval name>/<metric>").
How several evaluations combine is config.best_checkpoint_mixing:
- "mean": the plain mean. With one evaluation this is LAVIS's choice exactly; with several, a captioning score
  (CIDEr + BLEU-4, ~150) outweighs an accuracy (~50) threefold.
- "relative": each evaluation's score in percent of its value at the first evaluation scored (kept in best.json;
  a value below 1 counts as 1), then the mean: every evaluation weighs the same whatever its scale. The paper
  recipes select so (the paper says only "the best on held-in validation"; LAVIS selects on one dataset at a time).
Higher is better; ties keep the earlier checkpoint. Every process takes part in the save; process 0 decides from
the metrics (which it computed and shared) and every process follows its decision, so all agree.
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


MIXINGS = ("mean", "relative")


def selection_keys(names, evals) -> tuple[list[str], list[str]]:
  """(metric keys, problems) for config.best_checkpoint_metrics: "<eval>/<metric>", or "<eval>" for its task's
  LAVIS agg_metrics written as a sum ("coco_val/CIDEr+BLEU-4"); `evals` are the configured evaluations (Sources)."""
  by_name = {e.name: e for e in evals}
  keys, problems = [], []
  for entry in names:
    name, _, metric = str(entry).partition("/")
    if name not in by_name:
      problems.append(f"config.best_checkpoint_metrics: {entry!r} names no evaluation in config.evals "
                      f"({', '.join(sorted(by_name)) or 'none configured'})")
      continue
    task = by_name[name].task
    keys.append(f"{name}/{metric or ('+'.join(tasks.get(task).selection) if task in tasks.TASKS else '?')}")
  return keys, problems


def _value(results: dict, key: str) -> float | None:
  """One key's value: "<eval>/<m1>+<m2>" sums the eval's metrics m1, m2; None when one is missing or not finite."""
  name, _, metrics = key.partition("/")
  values = [results.get(f"{name}/{m}") for m in metrics.split("+")]
  if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
    return None
  return float(sum(values))


def values(results: dict, keys) -> dict | None:
  """{key: value} of every key, or None when one cannot be computed."""
  out = {k: _value(results, k) for k in keys}
  return out if keys and None not in out.values() else None


def score(results: dict, keys, mixing: str = "mean", reference: dict | None = None) -> float | None:
  """The selection score (see the module docstring); `reference`: the first scored evaluation's values, for
  "relative" (default: these results themselves, which then score 100). None when a value is missing."""
  v = values(results, keys)
  if v is None:
    return None
  if mixing == "relative":
    reference = reference or v
    v = {k: 100.0 * x / max(reference[k], 1.0) for k, x in v.items()}
  return float(sum(v.values()) / len(v))


class BestKeeper:
  """Saves the training state to workdir/best whenever an evaluation beats the best score so far (kept across
  resumes in best.json)."""

  def __init__(self, workdir: str, keys, mixing: str = "mean", meaning: dict | None = None):
    self.keys = list(keys)
    self.mixing = mixing
    self.meaning = meaning   # checkpoints.save's
    self.dir = epath.Path(workdir) / BEST_DIR
    self.mngr = checkpoints.manager(str(self.dir), keep=None)   # one kept; the old one goes after the new is safe
    self.record = self._read()

  def _read(self) -> dict | None:
    path = self.dir / RECORD
    record = json.loads(path.read_text()) if path.exists() else None
    if record is None:
      return None
    if (record.get("keys") != self.keys or record.get("mixing", "mean") != self.mixing
        or record.get("step") not in self.mngr.all_steps()):
      if distributed.is_primary():
        log.warning("%s does not describe a checkpoint of this selection (keys %s, mixing %s, step %s); the next "
                    "evaluation replaces it", path, record.get("keys"), record.get("mixing", "mean"),
                    record.get("step"))
      return None
    return record

  def consider(self, step: int, results: dict, state: dict) -> str | None:
    """Saves `state` ({"trainable", "opt_state"}) as the best when its score beats the record; returns a line for
    the log (None when nothing changed)."""
    decision = None
    if distributed.is_primary():
      reference = None if self.record is None else self.record.get("reference")
      value = score(results, self.keys, self.mixing, reference)
      best = None if self.record is None else self.record["score"]
      how = f"mean of {', '.join(self.keys)}" + (" in % of the first evaluation" if self.mixing == "relative" else "")
      if value is None:
        decision = {"save": False, "line": f"step {step}: no selection score (missing or not finite: "
                                           f"{', '.join(self.keys)}); best checkpoint unchanged"}
      else:
        decision = {"save": best is None or value > best, "value": value,
                    "reference": reference or values(results, self.keys),
                    "line": f"step {step}: held-in validation score {value:.2f} ({how})"
                            + ("" if best is None else f"; best so far {best:.2f} at step {self.record['step']}")}
    decision = distributed.broadcast_json(decision)   # every process follows process 0
    if not decision["save"]:
      return decision["line"]
    old = [s for s in self.mngr.all_steps() if s != step]
    if step not in self.mngr.all_steps():
      checkpoints.save(self.mngr, step, state, force=True, meaning=self.meaning)
      checkpoints.wait(self.mngr)
    self.record = {"step": step, "score": decision["value"], "keys": self.keys, "mixing": self.mixing,
                   "values": values(results, self.keys), "reference": decision["reference"]}
    if distributed.is_primary():
      (self.dir / RECORD).write_text(json.dumps(self.record, indent=2))
    distributed.sync("iblip_jax_best_checkpoint")
    for s in old:   # only now: a crash in between leaves the previous best, never none
      self.mngr.delete(s)
    return decision["line"] + f" -> new best, saved to {self.dir}"
