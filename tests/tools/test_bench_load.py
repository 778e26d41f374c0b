"""tools/bench_load.py: the checkpoint's tensor layout, and the whole tool at tiny size (write, read, the main job)."""
import pytest
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import torch

from iblip_jax.hf import params as hf_params
from iblip_jax.models import instructblip

pytestmark = pytest.mark.integration   # launches the main job as a user does

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _load(name, path):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


bench = _load("bench_load", "tools/bench_load.py")


class _Names:
  """What check_params asks of a reader: names and shapes, no bytes."""

  def __init__(self, specs):
    self.directory = "<specs>"
    self._shapes = dict(specs)

  def keys(self):
    return list(self._shapes)

  def shape(self, key):
    return self._shapes[key]


def test_tiny_names_are_what_transformers_saves(tmp_path):
  """The meta-device listing equals what save_pretrained writes for the materialised model with its own head."""
  from safetensors import safe_open
  from transformers import InstructBlipForConditionalGeneration
  model = InstructBlipForConditionalGeneration(bench.hf_config("tiny"))
  lm = model.language_model
  lm.lm_head.weight = torch.nn.Parameter(lm.shared.weight.detach().clone())
  model.save_pretrained(tmp_path)
  with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
    saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
  assert dict(bench.tensor_specs(bench.hf_config("tiny"))) == saved


def test_real_layout_is_what_the_loader_expects():
  """Every name and shape of the real-size listing is a parameter of configs/instructblip_flant5xl.py's model, and
  nothing is missing (check_params; nothing allocated): the released layout with its own lm_head."""
  from iblip_jax.models import configs as model_configs
  from iblip_jax.models.instructblip import InstructBlip
  xl = _load("instructblip_flant5xl", "configs/instructblip_flant5xl.py").get_config()
  specs = bench.tensor_specs(bench.hf_config("real"))
  names = dict(specs)
  assert names["language_model.lm_head.weight"] == (32128, 2048)
  assert not any("embed_tokens" in n for n in names)
  assert sum(math.prod(s) for s in names.values()) == 4_022_969_088   # "4.02B parameters" (the config's docstring)
  model = InstructBlip(model_configs.from_dict(xl.model.to_dict()))
  hf_params.check_params(instructblip.params_shape(model), _Names(specs))
  assert len(bench.shard_plan(specs, bench.SIZES["real"]["shard_bytes"])) == 5


def test_vocabulary_fits_both_tables():
  for size, sizes in bench.SIZES.items():
    words = bench.vocabulary(size)
    assert len(set(words)) == len(words)
    assert 6 + len(words) + 47 <= sizes["qformer_config"]["vocab_size"]
    assert 3 + len(words) <= sizes["text_config"]["vocab_size"]


def test_tiny_end_to_end(tmp_path):
  directory = tmp_path / "ckpt"
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_load.py"), "--size", "tiny", "--dir",
                        str(directory)], capture_output=True, text=True, timeout=600)
  assert out.returncode in (0, bench.TARGET_MISSED), out.stdout + out.stderr
  text = out.stdout
  assert re.search(r"^checkpoint: [\d.]+ MB in \d+ safetensors files$", text, re.M), text
  for when in ("before", "after"):
    assert re.search(rf"^plain sequential read {when} the job: .* GB/s\), 0% of the pages cached before$", text,
                     re.M), text
  load = re.search(r"^job load: (\d+) tensors, [\d.]+ GB in [\d.]+ s \([\d.]+ GB/s\), 0% of the pages cached", text,
                   re.M)
  assert load and int(load.group(1)) == len(bench.tensor_specs(bench.hf_config("tiny"))), text
  assert re.search(r"^load rate: \d+% of the faster plain read \([\d.]+ GB/s\); target >= 80%: (met|missed)$", text,
                   re.M), text
  assert re.search(r"^answer: '.*' \(exit status 0\)$", text, re.M), text
  assert re.search(r"^job wall time: [\d.]+ s$", text, re.M), text
  assert re.search(r"^  RSS compile and answer: ", text, re.M), text
  peak = re.search(r"^peak RSS \(ru_maxrss of the job\): ([\d.]+) GB .* = [\d.]+ x checkpoint; target <= 1.25 x "
                   r"checkpoint \+ 1.5 GiB = [\d.]+ GB \([\d.]+ GiB\): (met|MISSED)$", text, re.M)
  assert peak and float(peak.group(1)) > 0.1, text        # a JAX process: hundreds of MB at least
  assert (peak.group(2) == "met") == (out.returncode == 0)
  assert not directory.exists()                           # written by the run, so deleted without --keep


def test_write_only_then_skip_write(tmp_path):
  directory = tmp_path / "ckpt"
  tool = [sys.executable, os.path.join(ROOT, "tools", "bench_load.py"), "--size", "tiny", "--dir", str(directory)]
  subprocess.run(tool + ["--write-only"], check=True, capture_output=True, timeout=300)
  index = json.loads((directory / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  assert (directory / "qformer_tokenizer" / "vocab.txt").exists() and (directory / "image.png").exists()
  missing = subprocess.run(tool[:-1] + [str(tmp_path / "nothing"), "--skip-write"], capture_output=True, text=True)
  assert missing.returncode != 0 and "no checkpoint" in missing.stderr
  taken = subprocess.run(tool, capture_output=True, text=True, timeout=60)   # would delete what it did not write
  assert taken.returncode != 0 and "--skip-write" in taken.stderr and directory.exists()
