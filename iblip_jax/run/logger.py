"""Run logging: metrics as JSONL and TensorBoard events, a PNG of the curves, plain text lines.

Only process 0 writes. Every file goes through etils.epath, so a gs:// workdir works like a local one. The PNG is
redrawn from metrics.jsonl, so it also shows steps from before a resume. Reading metrics.jsonl back (read_metrics)
skips whatever cannot be parsed, so one damaged line never stops a run, and drawing the PNG never raises.
"""
import io
import json
import logging
import math
import numbers
import sys

import jax
from etils import epath

from iblip_jax.extras import require
from iblip_jax.run.timeline import PARTS as TIME_PARTS

log = logging.getLogger(__name__)


def _pyplot():
  """matplotlib (the `viz` extra), headless."""
  matplotlib = require("matplotlib", "viz", "drawing curves.png")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _summary_writer(logdir: str):
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch wherever it is installed, only to
  accept torch tensors, which nothing here passes; that cost every job 1.7 s and ~200 MB of host memory."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
  else:
    sys.modules["torch"] = None   # `import torch` raises ImportError while this is set
    try:
      from tensorboardX import SummaryWriter
    finally:
      del sys.modules["torch"]
  return SummaryWriter(logdir)


class Logger:

  def __init__(self, workdir: str, config_json: str | None = None, resumed_at: int = 0):
    """`config_json`: the run's whole config, written to workdir/config.json when the run starts (not on a resume)."""
    self.workdir = epath.Path(workdir)
    self.active = jax.process_index() == 0
    self.path = self.workdir / "metrics.jsonl"
    # tensorboardX writes gs:// itself (through google-cloud-storage, re-uploading the events file on each flush)
    self.writer = _summary_writer(str(self.workdir / "tensorboard")) if self.active else None
    if self.active and config_json is not None and resumed_at == 0:
      (self.workdir / "config.json").write_text(config_json)

  def text(self, line: str) -> None:
    if self.active:
      print(line, flush=True)

  def metrics(self, step: int, values: dict) -> None:
    if not self.active:
      return
    _append(self.path, json.dumps({"step": step, **values}) + "\n")
    for k, v in values.items():
      self.writer.add_scalar(k, v, step)
    self.writer.flush()
    evals = {k: v for k, v in values.items() if k.startswith("eval/")}
    if evals:
      print(f"step {step}: " + ", ".join(f"{k[5:]} {v:.2f}" for k, v in sorted(evals.items())), flush=True)

  def plot(self) -> None:
    """workdir/curves.png: training loss and every evaluation metric against steps. A picture is not worth a run:
    any failure to read, draw or write is a warning and training goes on."""
    if not self.active:
      return
    try:
      self._plot()
    except Exception as e:  # noqa: BLE001 - matplotlib, the file system and object stores raise all sorts
      log.warning("%s not drawn: %s: %s", self.workdir / "curves.png", type(e).__name__, e)

  def _plot(self) -> None:
    steps = read_metrics(self.path)
    keys = sorted({k for values in steps.values() for k in values if k == "loss" or k.startswith("eval/")})
    if not keys:
      return
    timed = [(step, v) for step, v in sorted(steps.items()) if v.get("time/window", 0) > 0]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys) + bool(timed), figsize=(4 * (len(keys) + bool(timed)), 3.2), squeeze=False)
    try:
      if timed:   # where each logging window's time went (run/timeline.py), as shares of the window
        ax = axes[0][-1]
        parts = [p for p in TIME_PARTS if any(v.get(f"time/{p}", 0) > 0 for _, v in timed)]
        ax.stackplot([s for s, _ in timed], *[[v.get(f"time/{p}", 0) / v["time/window"] for _, v in timed]
                                              for p in parts], labels=parts, step="post")
        ax.set_title("time per logging window")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.legend(loc="lower left", fontsize="x-small")
      for ax, key in zip(axes[0], keys):
        points = [(step, values[key]) for step, values in sorted(steps.items()) if key in values]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if key != "loss" else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
      fig.tight_layout()
      png = io.BytesIO()
      fig.savefig(png, format="png", dpi=90)
    finally:  # pyplot keeps every open figure alive; a failed draw must not leak one per evaluation
      plt.close(fig)
    (self.workdir / "curves.png").write_bytes(png.getvalue())

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def read_metrics(path) -> dict[int, dict[str, float]]:
  """metrics.jsonl as {step: {key: value}}. Skipped, not fatal: bytes that are not UTF-8, a line that is not a JSON
  object (a write cut short by a kill or a full disk), a row without an integer step, a value that is not a number
  (NaN and infinities are numbers: a diverged loss is a fact). A step redone after a resume has several rows; per
  metric, the later row wins."""
  path = epath.Path(path)
  if not path.exists():
    return {}
  steps = {}
  for raw in path.read_bytes().splitlines():
    row = _parse_row(raw)
    if row is not None:
      steps.setdefault(row[0], {}).update(row[1])
  return steps


def _parse_row(raw: bytes):
  """(step, numeric values) of one metrics.jsonl line, or None."""
  row = _json_object(raw)
  # A run killed mid-write leaves a line without its newline and the resumed run appends its first row to it; every
  # row starts with '{"step":' (Logger.metrics), so the last such start on the line is a whole row.
  start = raw.rfind(b'{"step":')
  if row is None and start > 0:
    row = _json_object(raw[start:])
  if row is None:
    return None
  step = as_number(row.get("step"))
  if step is None or not math.isfinite(step) or step != int(step):
    return None
  values = {k: as_number(v) for k, v in row.items() if k != "step"}
  return int(step), {k: v for k, v in values.items() if v is not None}


def _json_object(raw: bytes):
  try:
    row = json.loads(raw.decode("utf-8"))
  except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    return None
  return row if isinstance(row, dict) else None


def as_number(v) -> float | None:
  """v as a float if it is a real number (numpy's included, booleans not), else None."""
  if isinstance(v, bool) or not isinstance(v, numbers.Real):
    return None
  try:
    return float(v)
  except OverflowError:  # an integer beyond float range
    return None


def _append(path: epath.Path, text: str) -> None:
  """Appends to a local file; object stores have no append, so a remote file is rewritten (metrics are small)."""
  if "://" not in str(path):
    with open(path, "a") as f:
      f.write(text)
  else:
    path.write_text((path.read_text() if path.exists() else "") + text)
