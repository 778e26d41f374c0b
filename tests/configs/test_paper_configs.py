"""The paper's experiments as configs (configs/paper/): every one resolves in summary mode without weights or data
(summary checks neither), its parameter counts are the paper's models', and each says what the paper does."""
import glob
import os
import subprocess
import sys

import pytest

from iblip_jax import config_lib
from iblip_jax.data import templates
from iblip_jax.evaluation import paper_numbers, tasks
from iblip_jax.run import settings, summary

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
PAPER = os.path.join(ROOT, "configs", "paper")

# Total (separate LM head) and trainable parameters of the four models: the team's paper-results notes
# (shared/reference/paper_results.md, "Parameter counts"), computed there from transformers' model definitions.
COUNTS = {"flant5xl": (4_022_969_088, 187_262_464), "flant5xxl": (12_310_119_168, 188_837_376),
          "vicuna7b": (7_913_210_624, 188_837_376), "vicuna13b": (14_191_448_832, 189_624_832)}
BATCH = {"flant5xl": 192, "flant5xxl": 64, "vicuna7b": 128, "vicuna13b": 64}   # paper section 2.6


def _config(name: str, arg: str | None = None):
  import importlib.util
  path = os.path.join(PAPER, f"{name}.py")
  loader = importlib.util.spec_from_file_location(f"paper_{name}", path)
  module = importlib.util.module_from_spec(loader)
  loader.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _all() -> list[tuple[str, str | None]]:
  names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(PAPER, "*.py")))
  out = [(n, None) for n in names]
  out += [(n, m) for n in names if n in ("instructblip", "table1") for m in COUNTS]
  out += [(n, "vicuna7b") for n in names if n.startswith("finetune_")]
  return out


def test_every_paper_config_is_listed_here():
  names = {n for n, _ in _all()}
  assert names == {"instructblip", "table1"} | {f"finetune_{d}" for d in ("scienceqa", "ocrvqa", "okvqa", "aokvqa")}


@pytest.mark.parametrize("name, arg", _all())
def test_resolves_in_summary_mode_without_weights_or_data(name, arg):
  config = _config(name, arg)
  s = settings.resolve(config, None, "summary")
  model = arg or ("flant5xl" if name in ("instructblip", "table1") else "flant5xxl")
  if name == "instructblip":   # the paper's models, counted from shapes as summary mode prints them
    rows = summary.count_params(s)
    assert (sum(r[1] for r in rows), sum(r[2] for r in rows)) == COUNTS[model]
  else:   # the others build one of those four models
    assert s.model == settings.resolve(_config("instructblip", model), None, "summary").model
  assert s.model_init_required and s.model.vision.dtype == "bfloat16" and s.model.text.remat


@pytest.mark.parametrize("model", sorted(COUNTS))
def test_the_recipe(model):
  s = settings.resolve(_config("instructblip", model), None, "summary")
  assert (s.total_steps, s.batch_size, s.eval_every) == (60_000, BATCH[model], 3_000)
  assert (s.optim.lr, s.optim.warmup_lr, s.optim.warmup_steps, s.optim.min_lr, s.optim.weight_decay) == (
      1e-5, 1e-8, 1000, 0.0, 0.05)
  names = {d.name: d for d in s.data.datasets}
  assert set(names) == set(templates.HELD_IN)   # the 13 held-in datasets, by their templates' names
  assert all(d.format == d.name for d in s.data.datasets)
  assert {n: d.weight for n, d in names.items() if d.weight != 1} == {"okvqa": 2.0, "aokvqa": 0.5}
  assert s.data.balanced and s.data.instruction_format == "templates" and s.model.instruction_aware
  assert s.best_checkpoint_metrics == ("coco_val/CIDEr+BLEU-4", "okvqa_val/vqa", "aokvqa_val/vqa",
                                       "textcaps_val/CIDEr+BLEU-4")
  assert s.best_checkpoint_mixing == "relative" and s.text_processing == "lavis"
  assert (s.optim.schedule, s.optim.inner_epoch_steps) == ("lavis", 3_000)
  assert all(dict(e.reader_args)["split"] == "val" for e in s.evals)
  assert s.trainable == tuple(config_lib.base({}).trainable)   # the Q-Former side only


@pytest.mark.parametrize("model", sorted(COUNTS))
def test_table1_runs_the_13_held_out_tasks_at_their_splits(model):
  config = _config("table1", model)
  s = settings.resolve(config, None, "summary")
  assert config.mode == "eval" and s.paper_model == model
  assert sorted(e.task for e in s.evals) == sorted(paper_numbers.TABLE1_TASKS)
  assert {t.name for t in tasks.TASKS.values() if t.held_out} == set(paper_numbers.TABLE1_TASKS)
  for e in s.evals:
    assert e.format == e.task and dict(e.reader_args) == {"split": tasks.get(e.task).split}


def test_without_weights_or_data_a_run_is_refused_naming_everything(tmp_path):
  config = _config("instructblip", "flant5xl")
  with pytest.raises(settings.ConfigError) as e:
    settings.resolve(config, str(tmp_path), "train")
  text = str(e.value)
  assert "model_init is empty, and this config needs pretrained weights" in text
  assert "config.data.datasets.web_capfilt.path='data/capfilt' does not exist" in text
  assert "config.evals.coco_val.path='data/coco' does not exist" in text
  config.evals.coco_val.reader_args = {"splt": "val"}   # a reader's own arguments are checked against it
  with pytest.raises(settings.ConfigError, match=r"coco_val.reader_args=\{'splt': 'val'\}: got an unexpected keyword"):
    settings.resolve(config, str(tmp_path), "train")
  config.data.instruction_format = "none"
  with pytest.raises(settings.ConfigError, match="instruction_format='none' must be one of templates, raw"):
    settings.resolve(config, str(tmp_path), "train")
  config = _config("finetune_okvqa")
  config.paper_model = "gpt4"
  with pytest.raises(settings.ConfigError, match="paper_model='gpt4' is not one of the paper's models"):
    settings.resolve(config, None, "summary")
  with pytest.raises(ValueError, match="model 'gpt4': expected one of"):
    _config("finetune_okvqa", "gpt4")


@pytest.mark.integration   # the command line, as the configs' docstrings give it
def test_the_summary_command():
  out = subprocess.run([sys.executable, "-m", "iblip_jax.main", "--config", "configs/paper/instructblip.py:vicuna7b",
                        "--config.mode=summary"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "total_params=7913210624 trainable_params=188837376"
