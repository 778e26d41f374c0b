"""The compiled TPU program read back: its computations and instructions, loop trip counts, collectives with their
replica groups, and the HBM bytes its operations move.

compiled.as_text() is the partitioned, scheduled TPU program of ONE chip. Its computations are read into
instructions (name, result shape, opcode, operand names, attributes); a computation's runs per call of the
program follow from the call graph: a while body runs (trip count) times per run of its caller, everything else
once. XLA's own cost analysis counts every computation once (a layer scan's body as one layer), hence this."""
import dataclasses
import math
import re

import numpy as np

_DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4,
    "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "token": 0,
    "f4e2m1fn": 0.5, "f8e3m4": 1, "f8e4m3": 1, "f8e4m3fn": 1, "f8e4m3fnuz": 1, "f8e4m3b11fnuz": 1, "f8e5m2": 1,
    "f8e5m2fnuz": 1, "f8e8m0fnu": 1,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")


def shape_bytes(shape: str, *, padded: bool = False) -> int:
  """Bytes of an HLO shape ('bf16[4,16]{1,0:T(8,128)(2,1)}', or a tuple of them). padded: as the TPU stores it,
  the two most-minor dimensions rounded up to the layout's first tile (T(8,128): rows to 8, columns to 128)."""
  total = 0.0
  for dtype, dims_text, layout in _ARRAY.findall(shape):
    if dtype not in _DTYPE_BYTES:
      raise ValueError(f"unknown HLO element type {dtype!r} in {shape!r}")
    dims = [int(d) for d in dims_text.split(",") if d]
    tile = re.search(r"T\(([\d,]+)\)", layout or "")
    if padded and dims and tile and ":" in layout:
      minor_to_major = [int(x) for x in layout[1:layout.index(":")].split(",") if x]
      for axis, t in zip(minor_to_major, reversed([int(x) for x in tile.group(1).split(",")])):
        dims[axis] = -(-dims[axis] // t) * t
    total += _DTYPE_BYTES[dtype] * math.prod(dims)
  return int(total)


def _closing(text: str, start: int) -> int:
  """Index just past the bracket that closes the one at text[start]."""
  pairs, stack = {"(": ")", "{": "}", "[": "]"}, []
  for i in range(start, len(text)):
    if text[i] in pairs:
      stack.append(pairs[text[i]])
    elif stack and text[i] == stack[-1]:
      stack.pop()
      if not stack:
        return i + 1
  raise ValueError(f"unbalanced HLO text: {text[start:start + 200]!r}")


@dataclasses.dataclass
class Instr:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  attrs: str
  literal: str = ""   # a constant's value, a parameter's number


@dataclasses.dataclass
class Computation:
  name: str
  instrs: dict[str, Instr]
  root: str = ""


_HEADER = re.compile(r"^(ENTRY\s+)?%(\S+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%(\S+)\s*=\s*")
_OPCODE = re.compile(r"([a-z][a-z0-9\-]*)\(")
_NAME = re.compile(r"%([^\s,(){}]+)")


def _parse_instr(line: str) -> tuple[bool, Instr] | None:
  m = _INSTR.match(line)
  if not m:
    return None
  pos = m.end()
  end = _closing(line, pos) if line[pos] == "(" else line.index(" ", pos)   # a tuple shape, or one array
  rest = line[end:].lstrip()
  op = _OPCODE.match(rest)
  if not op:
    raise ValueError(f"cannot read HLO instruction %{m.group(2)}: {rest[:120]!r}")
  close = _closing(rest, op.end() - 1)
  inner = rest[op.end():close - 1]
  literal = inner if op.group(1) in ("constant", "parameter") else ""
  return bool(m.group(1)), Instr(m.group(2), line[pos:end], op.group(1), _NAME.findall(inner), rest[close:], literal)


def parse_hlo(text: str) -> tuple[dict[str, Computation], str]:
  """HLO module text -> ({computation name: Computation}, the entry computation's name)."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m and line.startswith(("%", "ENTRY")):
        current = Computation(m.group(2), {})
        entry = current.name if m.group(1) else entry
    elif line.startswith("}"):
      comps[current.name], current = current, None
    elif parsed := _parse_instr(line):
      is_root, instr = parsed
      current.instrs[instr.name] = instr
      current.root = instr.name if is_root else current.root
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


def _head(attrs: str) -> str:
  """An instruction's attributes before the free-text ones (frontend attributes, metadata, backend config)."""
  for key in (", frontend_attributes=", ", metadata={", ", backend_config="):
    attrs = attrs.split(key, 1)[0]
  return attrs


_CALLED = re.compile(r"\b(calls|to_apply|body|true_computation|false_computation)=%([^\s,{}]+)")
_CALLED_LIST = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")


def _called(instr: Instr) -> list[str]:
  head = _head(instr.attrs)
  return [m.group(2) for m in _CALLED.finditer(head)] + [n for m in _CALLED_LIST.finditer(head)
                                                          for n in _NAME.findall(m.group(2))]


def _through_copies(comp: Computation, name: str) -> Instr | None:
  instr = comp.instrs.get(name)
  while instr is not None and instr.opcode in ("copy", "bitcast", "convert", "reshape") and instr.operands:
    instr = comp.instrs.get(instr.operands[0])
  return instr


def _int_constant(instr: Instr | None) -> int | None:
  if instr is None or instr.opcode != "constant" or not re.fullmatch(r"\s*-?\d+\s*", instr.literal):
    return None
  return int(instr.literal)


def _tuple_index(instr: Instr | None) -> int | None:
  m = re.search(r"\bindex=(\d+)", instr.attrs) if instr is not None and instr.opcode == "get-tuple-element" else None
  return int(m.group(1)) if m else None


def trip_count(comps: dict[str, Computation], parent: Computation, loop: Instr) -> int | None:
  """Iterations of a while loop: the known_trip_count XLA recorded, else read from the loop: a counter (element k
  of the loop state) that the condition compares with a constant, that starts from a constant in the initial
  tuple and that the body steps by a constant. None when the loop has no such counter."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
  if known:
    return int(known.group(1))
  head = _head(loop.attrs)
  cond = comps[re.search(r"condition=%([^\s,]+)", head).group(1)]
  body = comps[re.search(r"body=%([^\s,]+)", head).group(1)]
  test = cond.instrs[cond.root]
  if test.opcode != "compare" or len(test.operands) != 2:
    return None
  direction = re.search(r"direction=(\w+)", test.attrs).group(1)
  counter, limit = (_through_copies(cond, o) for o in test.operands)
  if _tuple_index(counter) is None:
    counter, limit = limit, counter
    direction = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE"}.get(direction, direction)
  k, end = _tuple_index(counter), _int_constant(limit)
  init = _through_copies(parent, loop.operands[0]) if loop.operands else None
  if k is None or end is None or init is None or init.opcode != "tuple" or k >= len(init.operands):
    return None
  start = _int_constant(_through_copies(parent, init.operands[k]))
  new = body.instrs[body.root]
  new = _through_copies(body, new.operands[k]) if new.opcode == "tuple" and k < len(new.operands) else None
  if start is None or new is None or new.opcode not in ("add", "subtract") or len(new.operands) != 2:
    return None
  x, y = (_through_copies(body, o) for o in new.operands)
  if _tuple_index(x) != k:
    x, y = y, x
  step = _int_constant(y)
  if _tuple_index(x) != k or not step:
    return None
  step = abs(step)
  span = {"LT": end - start, "LE": end - start + 1, "GT": start - end, "GE": start - end + 1,
          "NE": abs(end - start)}.get(direction)
  return None if span is None else max(0, -(-span // step))


def _async_done_half(comp: Computation) -> bool:
  """The fused computation of an async collective fusion's 'done' half: it repeats the collective its 'start'
  half holds (same channel), so only the start is counted."""
  root = comp.instrs[comp.root]
  return root.opcode == "custom-call" and 'custom_call_target="AsyncCollectiveDone"' in root.attrs


@dataclasses.dataclass
class Program:
  """A compiled program's computations, how often each runs per call, and what kind of computation it is:
  'control' (the entry, loop bodies, called computations: their instructions are the scheduled operations),
  'fused' (inside a fusion) or 'applied' (a reducer)."""
  comps: dict[str, Computation]
  entry: str
  runs: dict[str, int]
  kind: dict[str, str]
  loops: list[tuple[str, int | None]]   # (while instruction, trip count or None when unreadable)

  @classmethod
  def from_text(cls, text: str) -> "Program":
    comps, entry = parse_hlo(text)
    runs, kind, loops = {}, {entry: "control"}, []

    def visit(name: str, times: int) -> None:
      runs[name] = runs.get(name, 0) + times
      comp = comps[name]
      for instr in comp.instrs.values():
        if instr.opcode.endswith("-done"):   # an async pair's work is counted at its start
          continue
        callees = _called(instr)
        n = times
        if instr.opcode == "while":
          trips = trip_count(comps, comp, instr)
          loops.append((instr.name, trips))
          n = times * (1 if trips is None else trips)
          callees = [re.search(r"body=%([^\s,]+)", _head(instr.attrs)).group(1)]
        for callee in callees:
          if instr.opcode == "fusion" and _async_done_half(comps[callee]):
            continue
          kind.setdefault(callee, "fused" if instr.opcode == "fusion" or kind[name] == "fused" else
                          "control" if instr.opcode in ("while", "call", "conditional", "async-start") else
                          "applied")
          visit(callee, n)

    visit(entry, 1)
    return cls(comps, entry, runs, kind, loops)

  def instructions(self, kind: str = "control"):
    """(computation, instruction, runs per call) for every instruction of the computations of `kind`."""
    for name, times in self.runs.items():
      if self.kind.get(name) == kind or kind == "any":
        comp = self.comps[name]
        for instr in comp.instrs.values():
          yield comp, instr, times


# Collective opcodes (sync, async start, and the ops inside TPU async collective fusions) -> the kind reported.
COLLECTIVE_KINDS = {
    "all-gather": "all-gather", "all-gather-start": "all-gather", "reduce-scatter": "reduce-scatter",
    "all-reduce": "all-reduce", "all-reduce-start": "all-reduce", "all-to-all": "all-to-all",
    "ragged-all-to-all": "all-to-all", "collective-permute": "collective-permute",
    "collective-permute-start": "collective-permute", "collective-broadcast": "collective-permute",
}
KIND_ORDER = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def _iota_groups(text: str) -> np.ndarray:
  """XLA's iota replica groups '[G,S]<=[d0,d1,..]T(p0,p1,..)': iota over the dims, transposed, as G groups of S."""
  m = re.fullmatch(r"\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
  if not m:
    raise ValueError(f"unreadable iota replica groups {text!r}")
  ids = np.arange(math.prod(int(d) for d in m.group(3).split(","))).reshape(
      [int(d) for d in m.group(3).split(",")])
  if m.group(4):
    ids = ids.transpose([int(p) for p in m.group(4).split(",")])
  return ids.reshape(int(m.group(1)), int(m.group(2)))


_MESH_GROUPS = re.compile(r"mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?\s*\{([^}]*)\}")


def _mesh_groups(text: str) -> np.ndarray:
  """XLA's mesh-axes replica groups "mesh['a'=2,'b'=4], device_ids=([4,2]T(1,0)) {'a'}": the devices (in mesh
  order, or permuted by device_ids) that differ only along the named axes form a group."""
  m = _MESH_GROUPS.fullmatch(text.strip())
  if not m:
    raise ValueError(f"unreadable mesh replica groups {text!r}")
  axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
  names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
  ids = np.arange(math.prod(sizes))
  if m.group(2):
    d = re.fullmatch(r"\[([\d,]+)\](?:<=\[([\d,]+)\])?(?:T\(([\d,]+)\))?", m.group(2).strip())
    if not d:
      raise ValueError(f"unreadable device_ids in replica groups {text!r}")
    ids = ids.reshape([int(x) for x in (d.group(2) or d.group(1)).split(",")])
    if d.group(3):
      ids = ids.transpose([int(p) for p in d.group(3).split(",")])
  grouped = re.findall(r"'([^']+)'", m.group(3))
  if any(g not in names for g in grouped):
    raise ValueError(f"unreadable mesh replica groups {text!r} (sub-axes are not read)")
  keep = [names.index(g) for g in grouped]
  rest = [i for i in range(len(names)) if i not in keep]
  return ids.reshape(sizes).transpose(rest + keep).reshape(-1, math.prod(sizes[i] for i in keep))


def replica_groups(attrs: str, num_devices: int) -> np.ndarray:
  """A collective's device groups as a (groups, group size) array of logical device ids (positions in the
  program's device assignment: the mesh's devices in order). Absent or empty: one group of every device."""
  head = _head(attrs)
  i = head.find("replica_groups=")
  if i < 0:
    return np.arange(num_devices).reshape(1, -1)
  text = head[i + len("replica_groups="):]
  if text.startswith("{"):
    groups = [[int(x) for x in g.split(",") if x.strip()]
              for g in re.findall(r"\{([\d,\s]*)\}", text[1:_closing(text, 0) - 1])]
    return np.array(groups) if groups and groups[0] else np.arange(num_devices).reshape(1, -1)
  if text.startswith("["):
    return _iota_groups(re.match(r"\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?", text).group(0))
  if text.startswith("mesh["):
    return _mesh_groups(text[:text.index("}") + 1])
  raise ValueError(f"unreadable replica groups: {text[:120]!r}")


def _source_target_pairs(attrs: str) -> np.ndarray:
  m = re.search(r"source_target_pairs=(\{.*?\}\})", attrs)
  pairs = re.findall(r"\{(\d+),(\d+)\}", m.group(1)) if m else []
  return np.array([[int(a), int(b)] for a, b in pairs], dtype=int).reshape(-1, 2)


@dataclasses.dataclass
class Collective:
  """One collective of the program. groups: (groups, size) logical device ids; collective-permute: (pairs, 2)
  source -> target."""
  kind: str
  name: str
  runs: int            # executions per call of the program (its computation's runs)
  operand_bytes: int   # per chip, one execution
  groups: np.ndarray
  op_name: str         # the JAX operation it came from (metadata)

  @property
  def group_size(self) -> int:
    return 2 if self.kind == "collective-permute" else self.groups.shape[1]

  def bytes_per_chip(self) -> float:
    """Bytes each chip sends (and receives) over ICI in one execution, for ring algorithms over a group of n with
    input x per chip: all-gather (n-1) x, reduce-scatter (n-1)/n x, all-reduce 2 (n-1)/n x (a reduce-scatter and
    an all-gather), all-to-all (n-1)/n x; collective-permute x when some chip sends to another."""
    n, x = self.group_size, self.operand_bytes
    if self.kind == "collective-permute":
      return float(x) if any(a != b for a, b in self.groups) else 0.0
    return {"all-gather": x * (n - 1), "reduce-scatter": x * (n - 1) / n, "all-reduce": 2 * x * (n - 1) / n,
            "all-to-all": x * (n - 1) / n}[self.kind]


def collectives(program: Program, num_devices: int) -> list[Collective]:
  out = []
  for comp, instr, runs in program.instructions("any"):
    kind = COLLECTIVE_KINDS.get(instr.opcode)
    if kind is None or program.kind.get(comp.name) == "applied":
      continue
    groups = (_source_target_pairs(instr.attrs) if kind == "collective-permute" else
              replica_groups(instr.attrs, num_devices))
    size = sum(shape_bytes(comp.instrs[o].shape) for o in instr.operands if o in comp.instrs)
    op = re.search(r'op_name="([^"]*)"', instr.attrs)
    out.append(Collective(kind, instr.name, runs, size, groups, op.group(1) if op else ""))
  return out


_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain"}


def _fusion_bytes(program: Program, comp: Computation, fusion: Instr) -> int:
  """HBM bytes of one fusion: its output and its operands, except that an operand the fusion only slices
  counts its slices, and an output a dynamic-update-slice writes into an operand (in place) counts the update."""
  callee = program.comps[_called(fusion)[0]]
  params = {int(f.literal): f.name for f in callee.instrs.values() if f.opcode == "parameter"}
  users: dict[str, list[Instr]] = {}
  for f in callee.instrs.values():
    for o in f.operands:
      users.setdefault(o, []).append(f)
  root = callee.instrs[callee.root]
  outputs = [callee.instrs[o] for o in root.operands] if root.opcode == "tuple" else [root]
  in_place, total = set(), 0
  for out in outputs:
    if out.opcode == "dynamic-update-slice" and callee.instrs[out.operands[0]].opcode == "parameter":
      in_place.add(out.operands[0])
      total += shape_bytes(callee.instrs[out.operands[1]].shape, padded=True)
    else:
      total += shape_bytes(out.shape, padded=True)
  for i, operand in enumerate(fusion.operands):
    full = shape_bytes(comp.instrs[operand].shape, padded=True) if operand in comp.instrs else 0
    param = params.get(i)
    uses = users.get(param, [])
    if param in in_place and all(u.opcode == "dynamic-update-slice" for u in uses):
      continue
    if uses and all(u.opcode in ("dynamic-slice", "slice") and u.operands[0] == param for u in uses):
      full = min(full, sum(shape_bytes(u.shape, padded=True) for u in uses))
    total += full
  return total


def hbm_bytes(program: Program, *, loops: bool = True) -> int:
  """HBM bytes read and written per call: every scheduled operation (a fusion counts as one) reads its operands
  and writes its output, in the TPU's tiled layouts, times the runs of its computation (loops=False: once, as
  XLA's own cost analysis counts, to compare with its 'bytes accessed')."""
  total = 0
  for comp, instr, runs in program.instructions("control"):
    if instr.opcode in _NO_TRAFFIC:
      continue
    if instr.opcode == "fusion":
      moved = _fusion_bytes(program, comp, instr)
    else:
      moved = shape_bytes(instr.shape, padded=True) + sum(
          shape_bytes(comp.instrs[o].shape, padded=True) for o in instr.operands if o in comp.instrs)
    total += moved * (runs if loops else 1)
  return total
