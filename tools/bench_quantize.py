"""Quantised towers on a trained checkpoint: the answers and scores of int8 and int4 next to the float model's.

  python tools/bench_quantize.py --config configs/demo.py:lora --workdir runs/demo_lora [--int4-groups 128 16]
                                 [--config.KEY=VALUE ...]   (e.g. other evaluation files, for every evaluation)

Evaluates the workdir's latest checkpoint through the main job's eval mode (float, then both frozen towers int8,
then int4 once per group size of --int4-groups, default the config's), each on a copy of the workdir so the
original's evaluations stay as they are, and prints, per evaluation, the score and the share of questions whose
answer equals the float model's.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from iblip_jax import config_lib


def _config_group(config: str, overrides: list[str]) -> int:
  """The int4 group the job will use: the text tower's quantize_group in `config` (FILE.py or FILE.py:VARIANT, as
  the main job's --config takes it), or its override."""
  for o in overrides:
    if o.startswith("--config.model.text.quantize_group="):
      return int(o.split("=", 1)[1])
  return config_lib.load_config_file(config).model.text.quantize_group


def _label(mode: str, group: int | None) -> str:
  return (mode or "float") + (f"/{group}" if group else "")


def _eval(config: str, workdir: str, mode: str, group: int | None, scratch: str,
          overrides: list[str]) -> tuple[dict, dict]:
  """({eval name: metric value}, {eval name: {id: prediction}}) of the latest checkpoint with towers in `mode`
  (int4: in groups of `group` inputs; None: the config's model.<tower>.quantize_group)."""
  copy = os.path.join(scratch, _label(mode, group).replace("/", "_"))
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval", "LOCK", "tensorboard"))
  args = [sys.executable, "-m", "iblip_jax.main", "--config", config, "--workdir", copy, "--config.mode=eval",
          f"--config.model.vision.quantize={mode}", f"--config.model.text.quantize={mode}"]
  if group:
    args += [f"--config.model.vision.quantize_group={group}", f"--config.model.text.quantize_group={group}"]
  args += overrides
  out = subprocess.run(args, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True)
  if out.returncode:
    sys.exit(f"eval with quantize={_label(mode, group)!r} failed:\n{out.stderr[-3000:]}")
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
  parser.add_argument("--int4-groups", type=int, nargs="+", default=[None],
                      help="int4 group sizes to evaluate (inputs per scale); default: the config's quantize_group")
  a, overrides = parser.parse_known_args()
  if any(not o.startswith("--config.") for o in overrides):
    parser.error(f"unrecognized arguments: {' '.join(o for o in overrides if not o.startswith('--config.'))}")
  if any(g is not None and g < 1 for g in a.int4_groups):
    parser.error(f"--int4-groups {a.int4_groups}: group sizes must be >= 1")
  default = _config_group(a.config, overrides)
  settings = [("", None), ("int8", None)] + [("int4", g or default) for g in a.int4_groups]
  with tempfile.TemporaryDirectory() as scratch:
    results = {_label(*s): _eval(a.config, a.workdir, *s, scratch, overrides) for s in settings}
  float_scores, float_answers = results["float"]
  print(f"{'evaluation':<16} {'towers':<9} {'metric':<10} {'score':>7} {'vs float':>9} {'same answer':>12}")
  for name in sorted(float_answers):
    for label in results:
      scores, answers = results[label]
      metric, value = next((k, v) for k, v in scores[name].items()   # the task's own metric, not the counts
                           if isinstance(v, (int, float)) and k not in ("num_examples", "unreadable"))
      same = sum(answers[name][i] == p for i, p in float_answers[name].items()) / len(float_answers[name])
      delta = value - float_scores[name][metric]
      print(f"{name:<16} {label:<9} {metric:<10} {value:>7.2f} {delta:>+9.2f} {100 * same:>11.1f}%")


if __name__ == "__main__":
  main()
