"""Run logging: metrics as JSONL and TensorBoard events, a PNG of the curves, plain text lines.

Only process 0 writes. Every file goes through etils.epath, so a gs:// workdir works like a local one. The PNG is
redrawn from metrics.jsonl, so it also shows steps from before a resume.
"""
import io
import json

import jax
import matplotlib
from etils import epath

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboardX import SummaryWriter  # noqa: E402


class Logger:

  def __init__(self, workdir: str, config=None, resumed_at: int = 0):
    self.workdir = epath.Path(workdir)
    self.active = jax.process_index() == 0
    self.path = self.workdir / "metrics.jsonl"
    # tensorboardX writes gs:// itself (through google-cloud-storage, re-uploading the events file on each flush)
    self.writer = SummaryWriter(str(self.workdir / "tensorboard")) if self.active else None
    if self.active and config is not None and resumed_at == 0:
      (self.workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

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
    """workdir/curves.png: training loss and every evaluation metric against steps."""
    if not self.active or not self.path.exists():
      return
    rows = [json.loads(line) for line in self.path.read_text().splitlines()]
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
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=90)
    plt.close(fig)
    (self.workdir / "curves.png").write_bytes(png.getvalue())

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def _append(path: epath.Path, text: str) -> None:
  """Appends to a local file; object stores have no append, so a remote file is rewritten (metrics are small)."""
  if "://" not in str(path):
    with open(path, "a") as f:
      f.write(text)
  else:
    path.write_text((path.read_text() if path.exists() else "") + text)
