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
  # the step model's inputs, read from the compiled program
  comm = report.communication
  assert comm.by_kind["all-gather"]["bytes"] > 0 and comm.seconds > 0 and not comm.unknown_loops
  assert comm.by_kind["all-gather"]["runs"] > comm.by_kind["all-gather"]["ops"]   # gathers inside layer loops
  assert {"ViT", "LLM", "Q-Former"} <= set(comm.by_part)
  assert report.hbm_bytes > report.hbm_bytes_once > 0
  # counted once per loop body, the operation-by-operation count is close to XLA's own (10% on this program)
  assert report.hbm_bytes_once == pytest.approx(report.xla_bytes_accessed, rel=0.10)
  assert "estimated step:" in aot.format_report(report, topology)


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


# --- the step model: collectives, loops and HBM traffic read from the compiled program -----------------------


def _all_gather_programs(devices):
  """A known all-gather on a 4-chip mesh: bf16[1024, 256] split in 4 row blocks, gathered whole; and the same
  gather of one layer per iteration of a 7-step scan over a stacked bf16[7, 1024, 256]."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(devices).reshape(4), ("x",))
  whole = NamedSharding(mesh, P())
  x = jax.ShapeDtypeStruct((1024, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))
  once = jax.jit(lambda a: a * 2, out_shardings=whole).lower(x)

  def scanned(xs):
    def body(carry, layer):
      full = jax.lax.with_sharding_constraint(layer, whole)
      return carry + jnp.sum(full * full, dtype=jnp.float32), None
    return jax.lax.scan(body, jnp.float32(0), xs)[0]

  xs = jax.ShapeDtypeStruct((7, 1024, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "x")))
  return mesh, once, jax.jit(scanned).lower(xs)


def test_all_gather_bytes_equal_the_hand_count(v5e_2x2):
  topology, devices = v5e_2x2
  mesh, once, scanned = _all_gather_programs(devices)
  shard = 256 * 256 * 2                      # each chip holds a quarter: 256 rows x 256 bf16
  compiled = once.compile()
  program = aot.Program.from_text(compiled.as_text())
  comm = aot.communication(program, topology, list(mesh.devices.flat))
  gather = comm.by_kind["all-gather"]
  assert (gather["ops"], gather["runs"]) == (1, 1)
  assert gather["bytes"] == 3 * shard        # ring all-gather: each chip receives the 3 other quarters
  assert comm.bytes == 3 * shard
  # the 4 chips of a 2x2 slice (no wrap-around) span both dimensions: 2 links of 50 GB/s each way per chip
  assert gather["seconds"] == pytest.approx(3 * shard / (2 * 50e9))
  # HBM traffic counted from the program's operations equals XLA's own count here (no loops)
  assert aot.hbm_bytes(program) == compiled.cost_analysis()["bytes accessed"]

  program = aot.Program.from_text(scanned.compile().as_text())
  assert [trips for _, trips in program.loops] == [7]
  gather = aot.communication(program, topology, list(mesh.devices.flat)).by_kind["all-gather"]
  assert (gather["ops"], gather["runs"], gather["bytes"]) == (1, 7, 7 * 3 * shard)
  assert aot.hbm_bytes(program) > aot.hbm_bytes(program, loops=False)


def test_compiler_options_are_libtpu_flags(v5e_2x2):
  """MaxText's flags are accepted by libtpu's compiler (an unknown one is refused), as the job's libtpu reads them."""
  _, devices = v5e_2x2
  options = aot.compiler_options(aot.MAXTEXT_LIBTPU_FLAGS)
  assert options["xla_tpu_enable_async_collective_fusion"] == "true" and len(options) == 7
  _, once, _ = _all_gather_programs(devices)
  assert once.compile(compiler_options=options).as_text()
  with pytest.raises(Exception, match="xla_tpu_no_such_flag"):
    once.compile(compiler_options=aot.compiler_options("--xla_tpu_no_such_flag=true"))
  with pytest.raises(ValueError, match="expected --name=value"):
    aot.compiler_options("--a=1 b")
  assert aot.compiler_options("") == {}


@pytest.mark.parametrize("text, groups", [
    ("replica_groups={{0,1},{2,3}}, dimensions={0}", [[0, 1], [2, 3]]),
    ("replica_groups={}, to_apply=%add", [[0, 1, 2, 3]]),
    ("replica_groups=[2,2]<=[4], dimensions={0}", [[0, 1], [2, 3]]),
    ("replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, use_global_device_ids=true", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=2] {'axis_1','axis_2'}, to_apply=%a", [[0, 1], [2, 3]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) {'axis_0','axis_1'}, to_apply=%a",
     [[0, 2, 1, 3]]),
])
def test_replica_groups(text, groups):
  assert aot.replica_groups(", " + text, 4).tolist() == groups


def test_collective_bytes_per_kind():
  """Ring algorithms over a group of n with x bytes of input per chip."""
  import numpy as np
  group = np.arange(8).reshape(1, 8)
  sent = lambda kind, groups=group: aot.Collective(kind, "c", 1, 800, groups, "").bytes_per_chip()
  assert sent("all-gather") == 7 * 800
  assert sent("reduce-scatter") == 7 / 8 * 800
  assert sent("all-reduce") == 2 * 7 / 8 * 800
  assert sent("all-to-all") == 7 / 8 * 800
  assert sent("collective-permute", np.array([[0, 1], [1, 0]])) == 800
  assert sent("collective-permute", np.array([[0, 0], [1, 1]])) == 0    # nothing leaves a chip


_LOOP_HLO = """HloModule m, is_scheduled=true

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %one = s32[] constant(2)
  %next = s32[] add(%i, %one)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ag = f32[32]{0} all-gather(%x), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
  %s = f32[8]{0} slice(%ag), slice={[0:8]}
  ROOT %t = (s32[], f32[8]) tuple(%next, %s)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(10)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8]) tuple(%zero, %a)
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body
  ROOT %r = f32[8]{0} get-tuple-element(%w), index=1
}
"""


def test_trip_count_from_the_loop_counter():
  """0, 2, 4, 6, 8 < 10: 5 iterations; the all-gather in the body runs 5 times."""
  program = aot.Program.from_text(_LOOP_HLO)
  assert program.loops == [("w", 5)]
  assert program.runs == {"main": 1, "body": 5}
  (gather,) = aot.collectives(program, 4)
  assert (gather.kind, gather.runs, gather.operand_bytes, gather.group_size) == ("all-gather", 5, 32, 4)
  # HBM per iteration: the all-gather reads 32 and writes 128 bytes, the slice reads 128 and writes 32, the
  # counter's add reads 2 x 4 and writes 4
  assert aot.hbm_bytes(program) == 5 * (32 + 128 + 128 + 32 + 12)
  assert aot.hbm_bytes(program, loops=False) == 32 + 128 + 128 + 32 + 12
  assert aot.shape_bytes("(bf16[4,16]{1,0}, s32[])") == 4 * 16 * 2 + 4
  assert aot.shape_bytes("bf16[4,16]{1,0:T(8,128)(2,1)}", padded=True) == 8 * 128 * 2


def _report_with_traffic(ici_seconds, hbm_bytes):
  comm = aot.Communication({k: dict(ops=1, runs=1, bytes=ici_seconds * 100e9 if k == "all-gather" else 0.0,
                                    seconds=ici_seconds if k == "all-gather" else 0.0) for k in aot.KIND_ORDER},
                           {"LLM": ici_seconds}, [])
  return aot.Report("train step", 1 << 30, 1 << 20, 1 << 20, 2 << 30, 0, 1.0, flops=16 * 197e12 * 0.25,
                    model_flops=16 * 197e12 * 0.2, flops_note="test", batch=64, remat_policy="full",
                    communication=comm, hbm_bytes=hbm_bytes, hbm_bytes_once=hbm_bytes, xla_bytes_accessed=hbm_bytes)


@pytest.mark.parametrize("ici_seconds, hbm_bytes, bound", [(0.1, 100e9, "compute"), (2.0, 100e9, "ICI"),
                                                            (0.1, 819e9, "HBM")])
def test_step_estimate_is_the_largest_term(ici_seconds, hbm_bytes, bound):
  topology = aot.parse_topology("v5e:4x4")
  report = _report_with_traffic(ici_seconds, hbm_bytes)
  est = aot.step_estimate(report, topology, mfu=0.5)
  assert est.compute_seconds == pytest.approx(0.5)   # 0.25 s of FLOPs per chip at peak, at 50% utilisation
  assert est.ici_seconds == ici_seconds and est.hbm_seconds == pytest.approx(hbm_bytes / 819e9)
  assert est.seconds == max(est.compute_seconds, est.ici_seconds, est.hbm_seconds) and est.bound == bound
  assert est.serial == pytest.approx(est.compute_seconds + est.ici_seconds + est.hbm_seconds)
  text = aot.format_report(report, topology, mfu=0.5)
  assert "executed / model FLOPs: 1.250 (remat policy full)" in text
  assert f"estimated step: {aot._time_text(est.seconds)} ({bound}-bound" in text
  assert "Cloud TPU v5e page" in text and "MaxText reports" in text and "50 GB/s per link" in text
  assert f"{64 / est.seconds / 16:.3g} images/s per chip" in text


def test_presets_resolve(v5e_2x2):
  from iblip_jax import sharding
  _, devices = v5e_2x2
  small = aot.parse_topology("v5e:2x2")
  for preset, shape in (("fsdp", (1, 4, 1)), ("data_fsdp", (2, 2, 1)), ("tensor4", (1, 1, 4))):
    mesh = sharding.make_mesh(aot.preset_mesh(preset, small), devices)
    assert tuple(mesh.shape.values()) == shape
  assert aot.preset_mesh("data_fsdp", aot.parse_topology("v5e:4x8")) == dict(data=4, fsdp=8, tensor=1)
  assert aot.preset_mesh("tensor4", aot.parse_topology("v5litepod-32")) == dict(data=1, fsdp=8, tensor=4)
  assert aot.preset_mesh("fsdp", aot.parse_topology("v4-32")) == dict(data=1, fsdp=16, tensor=1)
  with pytest.raises(ValueError, match="unknown --preset"):
    aot.preset_mesh("pipeline", small)


def test_remat_policy_changes_the_executed_flops():
  """save_dots keeps every matmul's output: less recompute than full remat, never less than no remat."""
  config = _tiny_config()
  flops = {policy: aot.train_flops(config, aot.tpu_model_config(config, remat_policy=policy), batch=8,
                                   shapes=SHAPES) for policy in ("full", "save_dots")}
  model = aot.train_flops(config, aot.tpu_model_config(config, remat=False), batch=8, shapes=SHAPES)
  assert model <= flops["save_dots"] < flops["full"]
  assert aot.tpu_model_config(config, remat_policy="save_dots_no_batch").text.remat_policy == "save_dots_no_batch"
