"""Run logging: metrics as JSONL and TensorBoard events, a PNG of the curves, plain text lines.

Only process 0 writes. The PNG is redrawn from metrics.jsonl, so it also shows steps from before a resume.
"""
import json
import os

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboardX import SummaryWriter  # noqa: E402


class Logger:

  def __init__(self, workdir: str, config=None, resumed_at: int = 0):
    self.workdir = workdir
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if self.active else None
    if self.active and config is not None and resumed_at == 0:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))

  def text(self, line: str) -> None:
    if self.active:
      print(line, flush=True)

  def metrics(self, step: int, values: dict) -> None:
    if not self.active:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **values}) + "\n")
    for k, v in values.items():
      self.writer.add_scalar(k, v, step)
    self.writer.flush()
    evals = {k: v for k, v in values.items() if k.startswith("eval/")}
    if evals:
      print(f"step {step}: " + ", ".join(f"{k[5:]} {v:.2f}" for k, v in sorted(evals.items())), flush=True)

  def plot(self) -> None:
    """workdir/curves.png: training loss and every evaluation metric against steps."""
    if not self.active or not os.path.exists(self.path):
      return
    rows = [json.loads(line) for line in open(self.path)]
    keys = sorted({k for r in rows for k in r if k == "loss" or k.startswith("eval/")})
    if not keys:
      return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
      points = sorted((r["step"], r[key]) for r in rows if key in r)
      ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if key != "loss" else None)
      ax.set_title(key)
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(self.workdir, "curves.png"), dpi=90)
    plt.close(fig)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
