"""Run logs are never a single point of failure: a damaged metrics.jsonl is read around, drawing never raises."""
import json
import logging
import math
import os
import subprocess
import sys

import matplotlib.figure
import pytest

from iblip_jax.run import logger as logger_lib
from iblip_jax.run import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _damaged_metrics(path):
  rows = [
      json.dumps({"step": 1, "loss": 4.0, "lr": 1e-4}).encode(),
      b'{"step": 2, "loss": 3.5, "note": "warmup", "eval/vqa/acc": NaN}',
      b'{"step": 3, "loss": 3.\xe9}',                                    # not UTF-8
      b'[1, 2, 3]', b'"step"', b'null',                                  # JSON, not an object
      b'{"loss": 9.0}', b'{"step": "4", "loss": 9.0}', b'{"step": true, "loss": 9.0}', b'{"step": 4.5, "loss": 9.0}',
      json.dumps({"step": 4, "loss": 3.0, "eval/vqa/acc": 10.0}).encode(),
      json.dumps({"step": 4, "loss": 2.5}).encode(),                      # step 4 redone after a resume
      json.dumps({"step": 5, "loss": 2.0, "flag": True, "names": ["a"]}).encode(),
      b'{"step": 6, "loss": 1.',                                           # a kill in the middle of a write ...
  ]
  # ... and the resumed run appends its first row to that unfinished line
  path.write_bytes(b"\n".join(rows) + json.dumps({"step": 6, "loss": 1.5}).encode() + b"\n" + b'{"step": 7, "lo')


EXPECTED = {
    1: {"loss": 4.0, "lr": 1e-4},
    2: {"loss": 3.5, "eval/vqa/acc": math.nan},
    4: {"loss": 2.5, "eval/vqa/acc": 10.0},   # per metric: the later row's loss, the earlier row's accuracy
    5: {"loss": 2.0},
    6: {"loss": 1.5},
}


def _same(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(
      x.keys() == y.keys() and all(x[k] == y[k] or (math.isnan(x[k]) and math.isnan(y[k])) for k in x)
      for x, y in ((a[s], b[s]) for s in a))


def test_read_metrics_skips_what_it_cannot_parse_and_the_later_row_wins(tmp_path):
  _damaged_metrics(tmp_path / "metrics.jsonl")
  steps = logger_lib.read_metrics(tmp_path / "metrics.jsonl")
  assert _same(steps, EXPECTED), steps
  assert logger_lib.read_metrics(str(tmp_path / "absent.jsonl")) == {}


def test_plot_draws_a_damaged_log(tmp_path):
  _damaged_metrics(tmp_path / "metrics.jsonl")
  log = logger_lib.Logger(str(tmp_path))
  log.plot()
  log.close()
  assert (tmp_path / "curves.png").read_bytes().startswith(PNG_MAGIC)


def test_a_failing_draw_is_a_warning_not_an_error(tmp_path, monkeypatch, caplog):
  _damaged_metrics(tmp_path / "metrics.jsonl")

  def broken_savefig(*args, **kwargs):
    raise OSError("No space left on device")

  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
  log = logger_lib.Logger(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    log.plot()   # no exception
  log.close()
  assert "curves.png not drawn: OSError: No space left on device" in caplog.text
  assert not (tmp_path / "curves.png").exists()


def test_appending_after_a_damaged_line_keeps_logging(tmp_path):
  (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 2.0}\n\xff\xfe{"step": 2, "lo\n')
  log = logger_lib.Logger(str(tmp_path))
  log.metrics(3, {"loss": 1.0})
  log.plot()
  log.close()
  assert logger_lib.read_metrics(tmp_path / "metrics.jsonl") == {1: {"loss": 2.0}, 3: {"loss": 1.0}}
  assert (tmp_path / "curves.png").exists()


def test_results_table_leaves_out_what_is_not_a_number():
  table = train.results_table({"vqa/acc": 50.0, "vqa/note": "n/a", "cap/cider": math.nan},
                              before={"vqa/acc": "?"}, untrained={"vqa/acc": 2.0}, chance={"vqa": None, "cap": "x"})
  lines = table.splitlines()
  assert len(lines) == 3 and not any("vqa/note" in line for line in lines)
  assert lines[1].split() == ["cap/cider", "-", "-", "-", "nan"]
  assert lines[2].split() == ["vqa/acc", "-", "2.0", "-", "50.0"]


@pytest.mark.parametrize("value", [True, "3", None, [1], 10 ** 400])
def test_as_number_refuses_what_is_not_a_real_number(value):
  assert logger_lib.as_number(value) is None


def test_plot_adds_the_time_panel_when_rows_carry_a_timeline(tmp_path):
  """Rows with the step timeline (run/timeline.py) add a panel of each window's time by part: a wider picture."""
  import PIL.Image
  plain, timed = tmp_path / "plain", tmp_path / "timed"
  for d, extra in ((plain, {}), (timed, {"time/window": 2.0, "time/step": 1.5, "time/data": 0.5})):
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0 / i, **extra}) + "\n"
                                             for i in range(1, 5)))
    log = logger_lib.Logger(str(d))
    log.plot()
    log.close()
  widths = [PIL.Image.open(d / "curves.png").size[0] for d in (plain, timed)]
  assert widths[1] == 2 * widths[0]


def test_a_job_logs_and_tokenizes_without_importing_torch(tmp_path):
  """tensorboardX and transformers' AutoTokenizer import torch wherever it is installed (here it is: the oracle);
  the job needs neither's torch side, and importing it cost every launch 1.7 s and ~200 MB of host memory."""
  from iblip_jax.demo import word_tokenizers
  word_tokenizers.build(["red", "square"], str(tmp_path / "tok"))
  code = ("import sys; from iblip_jax.data import tokenize; from iblip_jax.run import logger; "
          f"tok = tokenize.load_tokenizers({str(tmp_path / 'tok')!r}); logger.Logger({str(tmp_path / 'w')!r}); "
          "assert tok.llm('red square').input_ids; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == "[]"
  assert list((tmp_path / "w" / "tensorboard").iterdir())   # the writer made its events file
