"""A run's zero-shot results beside the paper's Table 1, as a Markdown table and a PNG chart.

`write_table1(results, evals, model, out_dir)` takes the evaluation results of the main job (`{"<eval name>/<metric>":
value}`), which evaluation ran which task (`{eval name: task name}`) and the paper's model to compare with
(`paper_numbers.MODELS`), and writes `table1.md` and `table1.png` in `out_dir` (local or gs://). Each Table 1
column takes the task's headline metric (tasks.Task.headline); a column no evaluation ran shows "-". The rows: this
run, the paper's InstructBLIP with the same LLM, the difference, and the paper's BLIP-2 with the same LLM (the
starting point of instruction tuning).
"""
import io
import logging

from etils import epath

from iblip_jax.evaluation import paper_numbers, tasks
from iblip_jax.extras import require

log = logging.getLogger(__name__)

METRIC_TITLES = {"CIDEr": "CIDEr", "vqa": "VQA acc", "exact_match": "acc", "ivqa": "iVQA acc", "accuracy": "acc",
                 "AUC": "AUC", "MRR": "MRR"}


def table1_values(results: dict, evals: dict[str, str]) -> tuple[dict[str, float], dict[str, float]]:
  """({Table 1 task: this run's headline value}, {"<domain>": NoCaps CIDEr per domain}) from the main job's
  results. A task evaluated twice (say under two names) takes the first."""
  ours, domains = {}, {}
  for name, task_name in evals.items():
    column = paper_numbers.VARIANT_OF.get(task_name, task_name)
    if column not in paper_numbers.TABLE1_TASKS or column in ours:
      continue
    value = results.get(f"{name}/{tasks.get(task_name).headline}")
    if isinstance(value, (int, float)):
      ours[column] = float(value)
    if column == "nocaps":
      prefix = f"{name}/CIDEr_"
      domains.update({k[len(prefix):]: float(v) for k, v in results.items() if k.startswith(prefix)})
  return ours, domains


def _fmt(value) -> str:
  return "-" if value is None else f"{value:.1f}"


def table1_markdown(ours: dict[str, float], model: str, *, run: str = "this run",
                    domains: dict[str, float] | None = None) -> str:
  instruct, blip2 = paper_numbers.model_rows(model)
  paper, base = paper_numbers.table1_row(instruct), paper_numbers.table1_row(blip2)
  columns = paper_numbers.TABLE1_TASKS
  metric = {c: METRIC_TITLES[tasks.get(c).headline] for c in columns}

  def row(title, values):
    return "| " + " | ".join([title] + [_fmt(values.get(c)) for c in columns]) + " |"
  diff = {c: ours[c] - paper[c] for c in columns if c in ours and paper.get(c) is not None}
  title = f"## Zero-shot results on the held-out datasets: {run} vs the paper's Table 1 ({paper_numbers.MODELS[model]})"
  lines = [title, "",
           "| | " + " | ".join(paper_numbers.TITLES[c] for c in columns) + " |",
           "|---" * (len(columns) + 1) + "|",
           "| metric | " + " | ".join(metric[c] for c in columns) + " |",
           row(run, ours), row(f"{instruct}, paper", paper),
           "| difference | " + " | ".join(("-" if c not in diff else f"{diff[c]:+.1f}") for c in columns) + " |",
           row(f"{blip2}, paper", base), ""]
  evaluated = [c for c in columns if c in ours]
  lines.append(f"{len(evaluated)} of {len(columns)} datasets evaluated"
               + (f"; missing: {', '.join(paper_numbers.TITLES[c] for c in columns if c not in ours)}."
                  if len(evaluated) < len(columns) else "."))
  if domains:
    lines.append("NoCaps CIDEr per domain (this run): "
                 + ", ".join(f"{d} {v:.1f}" for d, v in sorted(domains.items())) + ".")
  lines.append("Paper: Dai et al., InstructBLIP (NeurIPS 2023, arXiv 2305.06500), Table 1.")
  return "\n".join(lines) + "\n"


def table1_chart(ours: dict[str, float], model: str, *, run: str = "this run") -> bytes:
  """A grouped bar chart (PNG bytes): per dataset, this run, the paper's InstructBLIP and BLIP-2 (same LLM)."""
  matplotlib = require("matplotlib", "viz", "the Table 1 chart")
  matplotlib.use("Agg")
  plt = require("matplotlib.pyplot", "viz", "the Table 1 chart")
  import numpy as np
  instruct, blip2 = paper_numbers.model_rows(model)
  columns = paper_numbers.TABLE1_TASKS
  series = [(run, ours), (f"{instruct}, paper", paper_numbers.table1_row(instruct)),
            (f"{blip2}, paper", paper_numbers.table1_row(blip2))]
  x, width = np.arange(len(columns)), 0.27
  fig, ax = plt.subplots(figsize=(14, 4.5))
  for k, (label, values) in enumerate(series):
    heights = [values.get(c) if values.get(c) is not None else np.nan for c in columns]
    bars = ax.bar(x + (k - 1) * width, heights, width, label=label)
    if k == 0:
      ax.bar_label(bars, labels=[_fmt(values.get(c)) for c in columns], fontsize=7, padding=2)
  ax.set_xticks(x, [paper_numbers.TITLES[c] for c in columns], rotation=30, ha="right")
  ax.set_ylabel("score (CIDEr / MRR / AUC / accuracy, %)")
  ax.set_title(f"Zero-shot held-out results: {run} vs InstructBLIP ({paper_numbers.MODELS[model]}), paper Table 1")
  ax.legend(fontsize=8)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  plt.close(fig)
  return buffer.getvalue()


def write_table1(results: dict, evals: dict[str, str], model: str, out_dir: str, *,
                 run: str = "this run") -> str:
  """Writes out_dir/table1.md and out_dir/table1.png; returns the Markdown. A missing plotting package costs the
  chart only (a warning), never the table of an evaluation that may have taken hours."""
  ours, domains = table1_values(results, evals)
  text = table1_markdown(ours, model, run=run, domains=domains)
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "table1.md").write_text(text)
  try:
    (out / "table1.png").write_bytes(table1_chart(ours, model, run=run))
  except Exception as e:  # noqa: BLE001 - the chart is a view of the table; never lose the table for it
    log.warning("table1.png not written: %s", e)
  return text
