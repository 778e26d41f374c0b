"""Ahead-of-time TPU compiles of the tiny config (libtpu, no TPU): FLOPs counted over every layer, remat's
recompute, the train step and generation compiled and reported, libtpu's flags accepted."""
import pytest

import train_helper
from iblip_jax.aot import compile as aot_compile, step_model


def _tiny_config(vision_layers: int = 3, text_layers: int = 3):
  config = train_helper.load_config("tiny")
  config.model.vision.num_hidden_layers = vision_layers
  config.model.text.num_layers = config.model.text.num_decoder_layers = text_layers
  return config


SHAPES = aot_compile.Shapes(instruction=7, prompt=6, target=5)
# one worker: the libtpu topology and the tiny train step are compiled once for the module's tests
pytestmark = pytest.mark.xdist_group("aot_compile")


@pytest.mark.slow
def test_flops_count_every_layer():
  """Each extra layer adds the same FLOPs: nothing is counted once per loop (no TPU needed)."""
  def flops(vision_layers, text_layers):
    config = _tiny_config(vision_layers, text_layers)
    cfg = aot_compile.tpu_model_config(config)
    return (aot_compile.train_flops(config, cfg, batch=8, shapes=SHAPES),
            aot_compile.decode_flops(config, cfg, batch=4, new_tokens=3, shapes=SHAPES))
  (t3, d3), (t6, d6), (t9, d9) = flops(3, 3), flops(6, 3), flops(9, 3)
  assert t9 - t6 == pytest.approx(t6 - t3, rel=1e-3) and t6 - t3 > 0
  assert d9 - d6 == pytest.approx(d6 - d3, rel=1e-3) and d6 - d3 > 0
  (t3x, d3x), (t6x, d6x) = flops(3, 6), flops(3, 12)
  assert t6x - t3x == pytest.approx(2 * (t3x - t3), rel=1e-3) and t3x > t3
  assert d6x - d3x == pytest.approx(2 * (d3x - d3), rel=1e-3)


def test_remat_adds_the_recomputed_forward():
  config = _tiny_config()
  with_remat = aot_compile.train_flops(config, aot_compile.tpu_model_config(config, remat=True), batch=8, shapes=SHAPES)
  without = aot_compile.train_flops(config, aot_compile.tpu_model_config(config, remat=False), batch=8, shapes=SHAPES)
  assert with_remat > without


@pytest.fixture(scope="module")
def tiny_train(v5e_2x2):
  """The tiny train step compiled once for the module (the QLoRA test compares against it)."""
  slice_, devices = v5e_2x2
  return aot_compile.compile_train(_tiny_config(), slice_, batch=8, shapes=SHAPES, devices=devices)


@pytest.mark.slow
def test_compile_tiny_train_step(v5e_2x2, tiny_train):
  slice_, _ = v5e_2x2
  report = tiny_train
  assert report.argument_bytes > 0 and report.output_bytes > 0 and report.temp_bytes > 0
  assert report.alias_bytes > 0                  # trainable params and optimizer state are donated
  assert 0 < report.total_bytes < slice_.chip.hbm_bytes and step_model.fits(report, slice_)
  assert report.flops > 0 and "backward" in report.flops_note
  assert "FLOPs per call:" in step_model.format_report(report, slice_)
  assert report.model_flops < report.flops   # remat recomputes part of the T5 forward
  # the step model's inputs, read from the compiled program
  comm = report.communication
  assert comm.by_kind["all-gather"]["bytes"] > 0 and comm.seconds > 0 and not comm.unknown_loops
  assert comm.by_kind["all-gather"]["runs"] > comm.by_kind["all-gather"]["ops"]   # gathers inside layer loops
  assert {"ViT", "LLM", "Q-Former"} <= set(comm.by_part)
  assert report.hbm_bytes > report.hbm_bytes_once > 0
  # counted once per loop body, the operation-by-operation count is close to XLA's own (10% on this program)
  assert report.hbm_bytes_once == pytest.approx(report.xla_bytes_accessed, rel=0.10)
  assert "estimated step:" in step_model.format_report(report, slice_)


def test_compile_tiny_greedy_decode(v5e_2x2):
  slice_, devices = v5e_2x2
  report = aot_compile.compile_decode(_tiny_config(), slice_, batch=4, new_tokens=3, shapes=SHAPES, devices=devices)
  assert report.argument_bytes > 0 and report.output_bytes > 0 and report.temp_bytes > 0
  assert report.flops > 0 and step_model.fits(report, slice_)
  assert "greedy, 3 new tokens" in report.what and "prefill + ONE decoding step" in report.flops_note


def test_tpu_model_config():
  """bf16 frozen towers, f32 trainable side, T5 remat: what the compile measures is what TPU training runs."""
  cfg = aot_compile.tpu_model_config(train_helper.load_config("tiny"))
  assert (cfg.vision.dtype, cfg.vision.param_dtype, cfg.text.dtype, cfg.text.param_dtype) == ("bfloat16",) * 4
  assert cfg.qformer.param_dtype == "float32" and cfg.text.remat
  unrolled = aot_compile.fully_unrolled(cfg)
  assert unrolled.vision.scan_unroll == cfg.vision.num_hidden_layers
  assert unrolled.text.scan_unroll == cfg.text.num_layers


@pytest.mark.slow
def test_compile_tiny_decoder_only_train_step_and_decode(v5e_2x2):
  slice_, devices = v5e_2x2
  config = train_helper.load_config("tiny_vicuna")
  train = aot_compile.compile_train(config, slice_, batch=8, shapes=SHAPES, devices=devices)
  assert 0 < train.total_bytes < slice_.chip.hbm_bytes and train.alias_bytes > 0
  assert train.model_flops < train.flops   # remat recomputes part of the LLaMA forward
  decode = aot_compile.compile_decode(config, slice_, batch=4, new_tokens=3, shapes=SHAPES, devices=devices)
  assert decode.flops > 0 and step_model.fits(decode, slice_)


def test_compiler_options_are_libtpu_flags(v5e_2x2, all_gather_programs):
  """MaxText's flags are accepted by libtpu's compiler (an unknown one is refused), as the job's libtpu reads them."""
  _, devices = v5e_2x2
  options = aot_compile.compiler_options(aot_compile.MAXTEXT_LIBTPU_FLAGS)
  assert options["xla_tpu_enable_async_collective_fusion"] == "true" and len(options) == 7
  _, once, _ = all_gather_programs
  assert once.compile(compiler_options=options).as_text()
  with pytest.raises(Exception, match="xla_tpu_no_such_flag"):
    once.compile(compiler_options=aot_compile.compiler_options("--xla_tpu_no_such_flag=true"))
  with pytest.raises(ValueError, match="expected --name=value"):
    aot_compile.compiler_options("--a=1 b")
  assert aot_compile.compiler_options("") == {}


def test_remat_policy_changes_the_executed_flops():
  """save_dots keeps every matmul's output: less recompute than full remat, never less than no remat."""
  config = _tiny_config()
  flops = {policy: aot_compile.train_flops(config, aot_compile.tpu_model_config(config, remat_policy=policy), batch=8,
                                           shapes=SHAPES) for policy in ("full", "save_dots")}
  model = aot_compile.train_flops(config, aot_compile.tpu_model_config(config, remat=False), batch=8, shapes=SHAPES)
  assert model <= flops["save_dots"] < flops["full"]
  policy = aot_compile.tpu_model_config(config, remat_policy="save_dots_no_batch").text.remat_policy
  assert policy == "save_dots_no_batch"


@pytest.mark.slow
def test_compile_tiny_qlora_train_step(v5e_2x2, tiny_train):
  """config.lora and quantised towers reach the compiled step: only the adapters are trained (arguments, donated
  optimizer state), the frozen ViT and T5 held in int8, against the same model trained on the Q-Former side."""
  slice_, devices = v5e_2x2
  full = tiny_train
  config = _tiny_config()
  config.trainable = []
  config.lora.targets = [r"qformer/.*/(query|value)$", r"language_model/.*/(q|v)$"]
  config.lora.rank = 2
  config.model.vision.quantize = config.model.text.quantize = "int8"
  cfg = aot_compile.tpu_model_config(config)
  assert cfg.lora.rank == 2 and (cfg.vision.quantize, cfg.text.quantize) == ("int8", "int8")
  qlora = aot_compile.compile_train(config, slice_, batch=8, shapes=SHAPES, devices=devices)
  assert "with LoRA adapters of rank 2" in qlora.trainable and "ViT int8, LLM int8" in qlora.trainable
  assert "LoRA" not in full.trainable
  trained = lambda r: int(r.trainable.split(" parameters")[0].replace(",", ""))
  assert 0 < trained(qlora) < 0.2 * trained(full)
  # donated: the trainable tree and its AdamW moments (TPU tiles of 8 x 128 pad the rank-2 adapters: not 1/5)
  assert qlora.alias_bytes < 0.5 * full.alias_bytes
  assert qlora.argument_bytes < full.argument_bytes     # and the frozen towers in int8 rather than bfloat16
  assert "trains " in step_model.format_report(qlora, slice_)
