"""The command line: `python -m iblip_jax.main --config ...`."""
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration   # launches the main job as a user does

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _run(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "iblip_jax.main", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def test_summary_mode_prints_the_table_and_totals():
  out = _run("--config", "configs/instructblip_flant5xl.py", "--config.mode=summary")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert lines[-1] == "total_params=4022969088 trainable_params=187262464"
  assert any(line.startswith("qformer") and "185,660,160" in line for line in lines)


def test_unknown_mode_is_a_clear_error():
  out = _run("--config", "configs/tiny.py", "--config.mode=dance")
  assert out.returncode != 0
  assert "--config.mode='dance'" in out.stderr and "summary" in out.stderr


def test_invalid_model_config_names_the_field():
  out = _run("--config", "configs/tiny.py", "--config.model.qformer.hidden_size=30", "--config.mode=summary")
  assert out.returncode != 0
  assert "model.qformer.hidden_size=30 is not divisible by num_attention_heads=4" in out.stderr


def _readme_overrides() -> list[str]:
  """Every `--config.key=value` in the README's command lines (launch and AOT examples)."""
  text = open(os.path.join(ROOT, "README.md")).read()
  blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
  flags = sorted({f for b in blocks for f in re.findall(r"--config\.[\w.]+=\S+", b)
                  if not f.startswith(("--config.key=", "--config.x="))})   # placeholders in the usage line
  assert any("model.text.remat" in f for f in flags) and any("model.vision.dtype" in f for f in flags), flags
  return flags


@pytest.mark.parametrize("name", ["instructblip_flant5xl", "instructblip_flant5xxl", "instructblip_vicuna7b",
                                  "instructblip_vicuna13b"])
def test_the_readme_overrides_are_accepted_by_every_real_config(name):
  """The pod launch line's precision and remat flags are settings every config has (ml_collections refuses unknown
  keys before anything runs); summary mode then builds the model with them. model_init is left out: a real-size
  checkpoint is not here, and mode stays summary."""
  flags = [f for f in _readme_overrides() if not f.startswith(("--config.model_init=", "--config.mode="))]
  out = _run("--config", f"configs/{name}.py", *flags, "--config.mode=summary")
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1].startswith("total_params=")


@pytest.mark.parametrize("args, line", [
    (["--config", "configs/tiny.py", "--config.modle.text.dtype=bfloat16"],
     "error: --config.modle.text.dtype: no such config key 'modle' (did you mean mode?)"),
    (["--config", "configs/tiny.py", "--config.model.text.dtyp=bfloat16"],
     "error: --config.model.text.dtyp: no such config key 'dtyp' in model.text (did you mean dtype?)"),
    (["--config", "configs/nope.py"], "error: --config configs/nope.py: no such config file"),  # found on first use
    (["--config=configs/nope.py", "--config.mode=summary"],  # found while applying the override
     "error: --config configs/nope.py: no such config file"),
    (["--config", "configs/tiny.py", "--config.batch_size=abc"],
     "error: --config.batch_size=abc: invalid literal for int() with base 10: 'abc'"),
])
def test_a_config_mistake_is_one_line_and_status_2(args, line):
  """ml_collections raises KeyError/AttributeError/OSError with a traceback; the command line says what is wrong."""
  out = _run(*args)
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr.strip().splitlines() == [line]
  assert "Traceback" not in out.stderr and out.stdout == ""


def test_every_command_line_or_config_mistake_is_one_line_and_exit_2(tmp_path):
  """One rule for "the command line or the config is wrong": one line on stderr, exit status 2, whether it is an
  unknown key, a value out of range, a mistyped mode, or a config file that does not load."""
  (tmp_path / "syntax.py").write_text("def get_config(:\n  pass\n")
  (tmp_path / "raises.py").write_text("def get_config():\n  raise ValueError('no data root configured')\n")
  cases = [(("--config", str(tmp_path / "syntax.py")), f"--config {tmp_path / 'syntax.py'}: cannot load it: line 1: "
                                                       "SyntaxError: invalid syntax"),
           (("--config", str(tmp_path / "raises.py")), f"--config {tmp_path / 'raises.py'}: cannot load it: line 2: "
                                                       "ValueError: no data root configured"),
           (("--config", "configs/tiny.py", "--config.mode=dance"), "--config.mode='dance' is not a mode"),
           (("--config", "configs/tiny.py", "--config.model.qformer.hidden_size=30", "--config.mode=summary"),
            "model.qformer.hidden_size=30 is not divisible by num_attention_heads=4"),
           (("--config", "configs/tiny.py", "--config.optimm.lr=1"), "--config.optimm.lr: no such config key")]
  for args, message in cases:
    out = _run(*args)
    assert out.returncode == 2, (args, out.returncode, out.stderr[-2000:])
    assert message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr[-2000:])
    assert len(out.stderr.strip().splitlines()) <= 3, out.stderr   # the message (an invalid config lists its lines)


def test_a_host_without_tpu_chips_chooses_the_cpu_itself():
  """JAX_PLATFORMS unset and libtpu installed (the test extra brings it), on a host with no TPU device files: the job
  chooses the CPU before JAX starts, so there is no TPU start-up noise and bfloat16 towers get the CPU compiler flag
  that keeps real-size weights in memory (run/cli.py), with no warning asking for JAX_PLATFORMS."""
  from iblip_jax import distributed
  if distributed.tpu_chips_here():
    pytest.skip("this host has TPU chips")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  code = ("import os, sys; from iblip_jax.run import cli; import jax;"
          "cli.before_jax(__import__('ml_collections').ConfigDict({'model': {'vision': {'dtype': 'bfloat16'},"
          "'text': {'dtype': 'bfloat16'}}})); print(jax.default_backend(), os.environ.get('XLA_FLAGS'))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split()[0] == "cpu" and "while-loop-invariant-code-motion" in out.stdout
  assert "TPU_WORKER_HOSTNAMES" not in out.stderr and "E0000" not in out.stderr and "JAX_PLATFORMS" not in out.stderr
