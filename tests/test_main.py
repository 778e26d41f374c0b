"""The command line: `python -m iblip_jax.main --config ...`."""
import os
import subprocess
import sys

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
