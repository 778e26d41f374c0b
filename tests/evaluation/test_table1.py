"""Table 1 in one command: the paper's eval config on the 13 held-out datasets writes table1.md and table1.png beside
the paper's numbers; the table and chart module on its own."""
import io
import json
import os
import subprocess
import sys

import jax
import pytest
from PIL import Image

import main_job
import oracle
from evaluation import heldout_files   # tests/ is on sys.path (conftest.py)
from iblip_jax import config_lib, hf, sharding, train_state
from iblip_jax import trainable as trainable_lib
from iblip_jax.demo import word_tokenizers
from iblip_jax.evaluation import paper_numbers, report, tasks
from iblip_jax.models import configs as model_configs
from iblip_jax.run import best, settings

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": main_job.xla_flags(1)}


def test_the_table_and_chart_from_results():
  evals = {"nocaps": "nocaps", "gqa_testdev": "gqa", "hm": "hateful_memes_verbalizers", "coco_val": "coco_caption"}
  results = {"nocaps/CIDEr": 101.25, "nocaps/BLEU-4": 20.0, "nocaps/CIDEr_in-domain": 110.0,
             "nocaps/CIDEr_out-domain": 90.0, "gqa_testdev/exact_match": 40.0, "hm/AUC": 60.0,
             "coco_val/CIDEr": 130.0}
  ours, domains = report.table1_values(results, evals)
  assert ours == {"nocaps": 101.25, "gqa": 40.0, "hateful_memes": 60.0}   # held-in sets are not Table 1's
  assert domains == {"in-domain": 110.0, "out-domain": 90.0}
  text = report.table1_markdown(ours, "flant5xl", domains=domains)
  rows = {line.split(" | ")[0].strip("| "): line.strip("|").split(" | ") for line in text.splitlines()
          if line.startswith("| ")}
  assert rows["this run"][1:4] == ["101.2", "-", "40.0"]   # NoCaps, Flickr30K (not run), GQA
  paper = paper_numbers.table1_row("InstructBLIP (FlanT5-XL)")
  assert rows["InstructBLIP (FlanT5-XL), paper"][1] == f"{paper['nocaps']:.1f}" == "119.9"
  assert rows["difference"][1] == f"{101.25 - 119.9:+.1f}" and rows["difference"][3] == f"{40.0 - 48.4:+.1f}"
  assert rows["BLIP-2 (FlanT5-XL), paper"][8] == "53.0"   # HM
  assert "3 of 13 datasets evaluated" in text and "in-domain 110.0, out-domain 90.0" in text
  png = report.table1_chart(ours, "flant5xl")
  assert Image.open(io.BytesIO(png)).size[0] > 1000
  with pytest.raises(KeyError, match="paper_model='opt'"):
    report.table1_markdown(ours, "opt")


def _size_flags(config, ckpt: str) -> list[str]:
  """--config.model.* overrides that restate the tiny checkpoint's sizes wherever the real-size config states a
  size (a contradiction would be refused), so that the real Table 1 config runs on the tiny model."""
  tiny = hf.load_config(ckpt)
  flags = []
  for section, fields in config.model.to_dict().items():
    if isinstance(fields, dict):
      sub = getattr(tiny, section)
      flags += [f"--config.model.{section}.{k}={getattr(sub, k)}" for k in fields
                if k in model_configs.SHAPE_FIELDS[type(sub)]]
    elif section in model_configs.SHAPE_FIELDS[type(tiny)]:
      flags.append(f"--config.model.{section}={getattr(tiny, section)}")
  return flags


def _best_checkpoint(ckpt: str, workdir, step: int, patterns) -> dict:
  """A workdir/best as training's validation-based selection leaves it (run/best.py), with a trainable tree that
  differs from the pretrained one, so that evaluating it is visibly not evaluating model_init."""
  model, params = hf.from_pretrained(ckpt)
  rules = [tuple(r) for r in settings.SHARDING_RULES]
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  setup = train_state.build(model, patterns=patterns, optim=config_lib.optim(), total_steps=10, mesh=mesh,
                            rules=rules, max_replicated_bytes=1 << 30)
  trainable, _ = trainable_lib.split(params, patterns)
  trainable = jax.tree.map(lambda x: x * 0.9, trainable)
  best.BestKeeper(str(workdir), ["held_in/vqa"]).consider(
      step, {"held_in/vqa": 50.0}, {"trainable": trainable, "opt_state": setup.init_opt_state(trainable)})
  return trainable


@pytest.mark.integration
@pytest.mark.slow   # the main job evaluating 13 tasks: every decoding and ranking program compiled once
def test_the_table1_command_on_tiny_data(tmp_path):
  ckpt = str(tmp_path / "ckpt")
  oracle.tiny_hf_model(untie_head=True, tie=False).save_pretrained(ckpt)
  word_tokenizers.build(heldout_files.WORDS, ckpt)
  paths = heldout_files.write(tmp_path / "data")
  config = config_lib.load_config_file(os.path.join(ROOT, "configs", "paper", "table1.py"))
  _best_checkpoint(ckpt, tmp_path / "run", 7, list(config.trainable))
  workdir = tmp_path / "run" / "best"
  flags = [f"--config.model_init={ckpt}", "--config.model.vision.dtype=float32", "--config.model.text.dtype=float32",
           "--config.model.text.remat=False", "--config.eval_batch_size=4", "--config.mesh.fsdp=1",
           *_size_flags(config, ckpt), *[f"--config.evals.{task}.path={path}" for task, path in paths.items()]]
  out = subprocess.run([sys.executable, "-m", "iblip_jax.main", "--config", "configs/paper/table1.py:flant5xl",
                        "--workdir", str(workdir), *flags], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                       env=ENV)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert f"using the trainable weights of {workdir} at step 7" in out.stdout   # the selected checkpoint
  step_dir = workdir / "eval" / "step_7"
  text = (step_dir / "table1.md").read_text()
  assert text in out.stdout and "13 of 13 datasets evaluated." in text
  ours = [line for line in text.splitlines() if line.startswith("| this run (step 7) |")][0].strip("|").split(" | ")
  for column, task in enumerate(paper_numbers.TABLE1_TASKS, start=1):   # each cell: that task's metrics file
    metrics = json.loads((step_dir / f"{task}_metrics.json").read_text())
    assert ours[column].strip() == f"{metrics[tasks.get(task).headline]:.1f}", task
  nocaps = json.loads((step_dir / "nocaps_metrics.json").read_text())
  assert {"CIDEr_in-domain", "CIDEr_near-domain", "CIDEr_out-domain"} <= set(nocaps)
  assert "| InstructBLIP (FlanT5-XL), paper | 119.9 | 84.5 | 48.4 |" in text
  image = Image.open(step_dir / "table1.png")
  assert image.format == "PNG" and image.size[0] > 1000
