"""tools/aot_compile.py: topology parsing, and a real ahead-of-time TPU compile of the tiny config (libtpu, no TPU)."""
import dataclasses
import importlib.util
import os

import pytest

import train_helper

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _load_tool():
  spec = importlib.util.spec_from_file_location("aot_compile", os.path.join(ROOT, "tools", "aot_compile.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


aot = _load_tool()


@pytest.mark.parametrize("text, libtpu_name, chips", [
    ("v5e:4x4", "v5e:4x4", 16),
    ("v5litepod-16", "v5e:4x4", 16),
    ("v5litepod-32", "v5e:4x8", 32),
    ("v4:2x2x4", "v4:2x2x4", 16),
    ("v4-32", "v4:2x2x4", 16),          # v4-N counts TensorCores: 2 per chip
    ("v5p-32", "v5:2x2x4", 16),         # libtpu spells v5p "v5"
    ("v5p:2x4x4", "v5:2x4x4", 32),
])
def test_parse_topology(text, libtpu_name, chips):
  topology = aot.parse_topology(text)
  assert topology.libtpu_name == libtpu_name
  assert topology.num_chips == chips


@pytest.mark.parametrize("text, message", [
    ("v9:2x2", "unknown TPU generation"),
    ("v5e:2x2x2", "v5e grids have 2 dimensions"),
    ("v4-6", "no default grid for 3 chips"),
    ("v5e", "expected <chip>:<grid>"),
])
def test_parse_topology_errors(text, message):
  with pytest.raises(ValueError, match=message):
    aot.parse_topology(text)


def test_parse_mesh():
  assert aot.parse_mesh("data=2,fsdp=-1,tensor=1") == {"data": 2, "fsdp": -1, "tensor": 1}
  with pytest.raises(ValueError, match="unknown axis 'model'"):
    aot.parse_mesh("model=2")


def test_fits_and_report_text():
  report = aot.Report("train step", argument_bytes=3 << 30, output_bytes=1 << 30, alias_bytes=1 << 30,
                      temp_bytes=10 << 30, code_bytes=0, compile_seconds=1.0, flops=4 * 197e12, model_flops=2 * 197e12,
                      flops_note="test")
  topology = aot.parse_topology("v5e:2x2")
  assert report.total_bytes == 13 << 30          # the donated (aliased) output is not counted twice
  assert aot.fits(report, topology)
  text = aot.format_report(report, topology)
  assert "total 13.000 GiB of 16 GiB HBM per v5e chip" in text and "fits" in text
  assert "FLOPs per call: 788 TFLOP executed (197 TFLOP per chip if evenly split), 394 TFLOP without remat" in text
  assert "(197 TFLOP/s per chip): at least 1 s, MFU 50%; at 50% of peak 2 s, MFU 25%" in text
  small = dataclasses.replace(topology, chip=dataclasses.replace(topology.chip, hbm_bytes=12 << 30))
  assert not aot.fits(report, small)
  assert "DOES NOT FIT" in aot.format_report(report, small)


def _tiny_config(vision_layers: int = 3, text_layers: int = 3):
  config = train_helper.load_config("tiny")
  config.model.vision.num_hidden_layers = vision_layers
  config.model.text.num_layers = config.model.text.num_decoder_layers = text_layers
  return config


SHAPES = aot.Shapes(instruction=7, prompt=6, target=5)


@pytest.mark.slow
def test_flops_count_every_layer():
  """Each extra layer adds the same FLOPs: nothing is counted once per loop (no TPU needed)."""
  def flops(vision_layers, text_layers):
    config = _tiny_config(vision_layers, text_layers)
    cfg = aot.tpu_model_config(config)
    return (aot.train_flops(config, cfg, batch=8, shapes=SHAPES),
            aot.decode_flops(config, cfg, batch=4, new_tokens=3, shapes=SHAPES))
  (t3, d3), (t6, d6), (t9, d9) = flops(3, 3), flops(6, 3), flops(9, 3)
  assert t9 - t6 == pytest.approx(t6 - t3, rel=1e-3) and t6 - t3 > 0
  assert d9 - d6 == pytest.approx(d6 - d3, rel=1e-3) and d6 - d3 > 0
  (t3x, d3x), (t6x, d6x) = flops(3, 6), flops(3, 12)
  assert t6x - t3x == pytest.approx(2 * (t3x - t3), rel=1e-3) and t3x > t3
  assert d6x - d3x == pytest.approx(2 * (d3x - d3), rel=1e-3)


def test_remat_adds_the_recomputed_forward():
  config = _tiny_config()
  with_remat = aot.train_flops(config, aot.tpu_model_config(config, remat=True), batch=8, shapes=SHAPES)
  without = aot.train_flops(config, aot.tpu_model_config(config, remat=False), batch=8, shapes=SHAPES)
  assert with_remat > without


@pytest.fixture(scope="module")
def v5e_2x2():
  """Compile-only devices of a v5e 2x2 slice, or a skip that says why libtpu cannot provide them here."""
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install 'libtpu==0.0.42.*', the version jax[tpu]==0.10.2 pins); "
                "it is the TPU compiler, no TPU is needed")
  topology = aot.parse_topology("v5e:2x2")
  try:
    return topology, aot.topology_devices(topology)
  except Exception as e:  # noqa: BLE001 (any failure here means: no AOT TPU compiles on this machine)
    pytest.skip(f"libtpu cannot describe a v5e:2x2 topology here: {type(e).__name__}: {e}")


@pytest.mark.slow
def test_compile_tiny_train_step(v5e_2x2):
  topology, devices = v5e_2x2
  report = aot.compile_train(_tiny_config(), topology, batch=8, shapes=SHAPES, devices=devices)
  assert report.argument_bytes > 0 and report.output_bytes > 0 and report.temp_bytes > 0
  assert report.alias_bytes > 0                  # trainable params and optimizer state are donated
  assert 0 < report.total_bytes < topology.chip.hbm_bytes and aot.fits(report, topology)
  assert report.flops > 0 and "backward" in report.flops_note
  assert "FLOPs per call:" in aot.format_report(report, topology)
  assert report.model_flops < report.flops   # remat recomputes part of the T5 forward


def test_compile_tiny_greedy_decode(v5e_2x2):
  topology, devices = v5e_2x2
  report = aot.compile_decode(_tiny_config(), topology, batch=4, new_tokens=3, shapes=SHAPES, devices=devices)
  assert report.argument_bytes > 0 and report.output_bytes > 0 and report.temp_bytes > 0
  assert report.flops > 0 and aot.fits(report, topology)
  assert "greedy, 3 new tokens" in report.what and "prefill + ONE decoding step" in report.flops_note


def test_tpu_model_config():
  """bf16 frozen towers, f32 trainable side, T5 remat: what the compile measures is what TPU training runs."""
  cfg = aot.tpu_model_config(train_helper.load_config("tiny"))
  assert (cfg.vision.dtype, cfg.vision.param_dtype, cfg.text.dtype, cfg.text.param_dtype) == ("bfloat16",) * 4
  assert cfg.qformer.param_dtype == "float32" and cfg.text.remat
  unrolled = aot.fully_unrolled(cfg)
  assert unrolled.vision.scan_unroll == cfg.vision.num_hidden_layers
  assert unrolled.text.scan_unroll == cfg.text.num_layers


@pytest.mark.slow
def test_compile_tiny_decoder_only_train_step_and_decode(v5e_2x2):
  topology, devices = v5e_2x2
  config = train_helper.load_config("tiny_vicuna")
  train = aot.compile_train(config, topology, batch=8, shapes=SHAPES, devices=devices)
  assert 0 < train.total_bytes < topology.chip.hbm_bytes and train.alias_bytes > 0
  assert train.model_flops < train.flops   # remat recomputes part of the LLaMA forward
  decode = aot.compile_decode(config, topology, batch=4, new_tokens=3, shapes=SHAPES, devices=devices)
  assert decode.flops > 0 and aot.fits(decode, topology)
