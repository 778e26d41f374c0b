"""The compiled program read back: a hand-counted all-gather (once and in a 7-step scan), replica group syntaxes,
ring bytes per collective kind, loop trip counts from the loop counter."""
import pytest

from iblip_jax.aot import hlo, step_model


def test_all_gather_bytes_equal_the_hand_count(v5e_2x2, all_gather_programs):
  slice_, devices = v5e_2x2
  mesh, once, scanned = all_gather_programs
  shard = 256 * 256 * 2                      # each chip holds a quarter: 256 rows x 256 bf16
  compiled = once.compile()
  program = hlo.Program.from_text(compiled.as_text())
  comm = step_model.communication(program, slice_, list(mesh.devices.flat))
  gather = comm.by_kind["all-gather"]
  assert (gather["ops"], gather["runs"]) == (1, 1)
  assert gather["bytes"] == 3 * shard        # ring all-gather: each chip receives the 3 other quarters
  assert comm.bytes == 3 * shard
  # the 4 chips of a 2x2 slice (no wrap-around) span both dimensions: 2 links of 50 GB/s each way per chip
  assert gather["seconds"] == pytest.approx(3 * shard / (2 * 50e9))
  # HBM traffic counted from the program's operations equals XLA's own count here (no loops)
  assert hlo.hbm_bytes(program) == compiled.cost_analysis()["bytes accessed"]

  program = hlo.Program.from_text(scanned.compile().as_text())
  assert [trips for _, trips in program.loops] == [7]
  gather = step_model.communication(program, slice_, list(mesh.devices.flat)).by_kind["all-gather"]
  assert (gather["ops"], gather["runs"], gather["bytes"]) == (1, 7, 7 * 3 * shard)
  assert hlo.hbm_bytes(program) > hlo.hbm_bytes(program, loops=False)


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
  assert hlo.replica_groups(", " + text, 4).tolist() == groups


def test_collective_bytes_per_kind():
  """Ring algorithms over a group of n with x bytes of input per chip."""
  import numpy as np
  group = np.arange(8).reshape(1, 8)
  sent = lambda kind, groups=group: hlo.Collective(kind, "c", 1, 800, groups, "").bytes_per_chip()
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
  program = hlo.Program.from_text(_LOOP_HLO)
  assert program.loops == [("w", 5)]
  assert program.runs == {"main": 1, "body": 5}
  (gather,) = hlo.collectives(program, 4)
  assert (gather.kind, gather.runs, gather.operand_bytes, gather.group_size) == ("all-gather", 5, 32, 4)
  # HBM per iteration: the all-gather reads 32 and writes 128 bytes, the slice reads 128 and writes 32, the
  # counter's add reads 2 x 4 and writes 4
  assert hlo.hbm_bytes(program) == 5 * (32 + 128 + 128 + 32 + 12)
  assert hlo.hbm_bytes(program, loops=False) == 32 + 128 + 128 + 32 + 12
  assert hlo.shape_bytes("(bf16[4,16]{1,0}, s32[])") == 4 * 16 * 2 + 4
  assert hlo.shape_bytes("bf16[4,16]{1,0:T(8,128)(2,1)}", padded=True) == 8 * 128 * 2
