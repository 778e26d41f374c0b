"""Quantised towers on a trained checkpoint: the answers and scores of int8 and int4 next to the float model's.

  python tools/bench_quantize.py --config configs/demo.py:lora --workdir runs/demo_lora

Evaluates the workdir's latest checkpoint three times through the main job's eval mode (float, then both frozen
towers int8, then int4), each on a copy of the workdir so the original's evaluations stay as they are, and prints,
per evaluation, the score and the share of questions whose answer equals the float model's.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

MODES = ("", "int8", "int4")


def _eval(config: str, workdir: str, mode: str, scratch: str) -> tuple[dict, dict]:
  """({eval name: metric value}, {eval name: {id: prediction}}) of the latest checkpoint with towers in `mode`."""
  copy = os.path.join(scratch, mode or "float")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval", "LOCK", "tensorboard"))
  args = [sys.executable, "-m", "iblip_jax.main", "--config", config, "--workdir", copy, "--config.mode=eval",
          f"--config.model.vision.quantize={mode}", f"--config.model.text.quantize={mode}"]
  out = subprocess.run(args, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True)
  if out.returncode:
    sys.exit(f"eval with quantize={mode!r} failed:\n{out.stderr[-3000:]}")
  (step_dir,) = [os.path.join(copy, "eval", d) for d in os.listdir(os.path.join(copy, "eval"))]
  scores, answers = {}, {}
  for name in sorted(os.listdir(step_dir)):
    path = os.path.join(step_dir, name)
    if name.endswith("_metrics.json"):
      scores[name.removesuffix("_metrics.json")] = json.load(open(path))
    elif name.endswith("_predictions.jsonl"):
      rows = [json.loads(line) for line in open(path)]
      answers[name.removesuffix("_predictions.jsonl")] = {r["id"]: r["prediction"] for r in rows}
  return scores, answers


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True)
  parser.add_argument("--workdir", required=True)
  a = parser.parse_args()
  with tempfile.TemporaryDirectory() as scratch:
    results = {mode: _eval(a.config, a.workdir, mode, scratch) for mode in MODES}
  float_scores, float_answers = results[""]
  print(f"{'evaluation':<16} {'towers':<7} {'metric':<10} {'score':>7} {'vs float':>9} {'same answer':>12}")
  for name in sorted(float_answers):
    for mode in MODES:
      scores, answers = results[mode]
      metric, value = next((k, v) for k, v in scores[name].items()   # the task's own metric, not the counts
                           if isinstance(v, (int, float)) and k not in ("num_examples", "unreadable"))
      same = sum(answers[name][i] == p for i, p in float_answers[name].items()) / len(float_answers[name])
      delta = value - float_scores[name][metric]
      print(f"{name:<16} {mode or 'float':<7} {metric:<10} {value:>7.2f} {delta:>+9.2f} {100 * same:>11.1f}%")


if __name__ == "__main__":
  main()
