"""The safetensors file format, read by region and written as a stream, local or remote (etils.epath), and a
checkpoint directory's tensors by name (SafetensorsReader: one file or a sharded set with its index).

A file is an 8-byte little-endian header length N, N bytes of JSON ({name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {...}}) and the tensors' bytes, row-major, offsets relative to the end of the header.

Why not `safe_open`: loading a real-size checkpoint into a device mesh must read each process's part of each tensor
once, into one buffer, without mapping the files into memory (mapped pages count as resident memory while they are
mapped, so an 8 GB checkpoint read through mmap shows as 8 GB more), and must count what it read (the tests and
tools/bench_load.py check that every byte is read once). Reads are plain positioned reads into numpy buffers, or,
for a file that is not in the page cache, direct reads around it (hf/direct_io.py).

Only tensors are ever read: nothing in the format can run code (unlike pickle).

`read_into` puts regions of a tensor straight into their destination arrays with scattered positioned reads
(preadv: one system call fills up to 1024 destinations from one contiguous stretch of the file), so that a device's
block of a weight split by columns lands in its own buffer with no copy in user space and the file is read in
ascending order, each byte once.
"""
import ctypes
import errno
import json
import math
import os
import struct
import sys
from typing import Iterable, Sequence

import ml_dtypes
import numpy as np
from etils import epath

from iblip_jax.errors import CheckpointError
from iblip_jax.hf import direct_io
from iblip_jax.hf.names import INDEX_NAME, PICKLE_NAMES, WEIGHTS_NAME

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64,
          "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
CHUNK_BYTES = 64 * 2**20   # column slices of row-major tensors are read in whole rows, this many bytes at a time
MAX_HEADER = 100 * 2**20   # the format's own limit on the JSON header
IOV_MAX = 1024             # destinations per preadv call (Linux's limit)


def _libc_preadv():
  """libc's preadv through ctypes (one call per up to IOV_MAX destinations, built as one numpy array), or None where
  it is not reachable; os.preadv is the slower fallback (it needs a Python buffer object per destination)."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    fn = ctypes.CDLL(None, use_errno=True).preadv
  except (OSError, AttributeError):
    return None
  fn.restype = ctypes.c_ssize_t
  fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
  return fn


_PREADV = _libc_preadv()


class FormatError(ValueError):
  """A file that is not valid safetensors; the message names the file."""


class TensorInfo:
  __slots__ = ("dtype", "shape", "begin", "end")

  def __init__(self, dtype, shape, begin, end):
    self.dtype, self.shape, self.begin, self.end = dtype, shape, begin, end


class File:
  """One safetensors file: its header parsed on open, tensors read on demand with positioned reads.

  `direct`: read_into's reads go around the page cache (hf/direct_io.py) where the file is not cached already and
  the filesystem allows it (None), always where the filesystem allows it (True: the tests), or never (False)."""

  def __init__(self, path: str, direct: bool | None = None, ring: direct_io.Ring | None = None):
    self.path = str(path)
    self._f = open(self.path, "rb", buffering=0)  # noqa: SIM115 - kept open for the reader's lifetime
    size = os.fstat(self._f.fileno()).st_size
    head = os.pread(self._f.fileno(), 8, 0)
    if len(head) < 8:
      raise FormatError(f"{self.path}: {size} bytes, too short for a safetensors header; is it truncated?")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > size:
      raise FormatError(f"{self.path}: header length {n} does not fit a {size}-byte file; is it truncated or not "
                        "a safetensors file?")
    try:
      header = json.loads(os.pread(self._f.fileno(), n, 8))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise FormatError(f"{self.path}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
      raise FormatError(f"{self.path}: the header is not a JSON object")
    self.metadata = header.pop("__metadata__", None) or {}
    self.data_start = 8 + n
    self.tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
      self.tensors[name] = self._info(name, entry, size - self.data_start)
    self._own_ring = ring is None
    self._ring = ring or direct_io.Ring()
    self._direct = None if direct is False else direct_io.DirectFile.open(self.path, force=bool(direct))

  def _info(self, name: str, entry, data_size: int) -> TensorInfo:
    try:
      dtype = np.dtype(DTYPES[entry["dtype"]])
      shape = tuple(int(d) for d in entry["shape"])
      begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      raise FormatError(f"{self.path}: tensor {name!r} has a malformed header entry {entry!r} ({e!r})") from None
    if any(d < 0 for d in shape) or end - begin != math.prod(shape) * dtype.itemsize:
      raise FormatError(f"{self.path}: tensor {name!r}: shape {shape} of {entry['dtype']} does not match its "
                        f"{end - begin} bytes")
    if not 0 <= begin <= end <= data_size:
      raise FormatError(f"{self.path}: tensor {name!r} lies beyond the end of the file ({end} > {data_size} bytes "
                        "of data); is it truncated?")
    return TensorInfo(dtype, shape, begin, end)

  def _read_into(self, buffer: np.ndarray, offset: int) -> int:
    view = memoryview(buffer.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
      n = os.preadv(self._f.fileno(), [view[done:]], self.data_start + offset + done)
      if n <= 0:
        raise FormatError(f"{self.path}: unexpected end of file at byte {self.data_start + offset + done}")
      done += n
    return done

  def read(self, name: str, region: Sequence[slice] | None = None) -> tuple[np.ndarray, int]:
    """The tensor, or its `region` (one slice with explicit start/stop per dimension), and the bytes read.

    A region that spans whole rows is one read; otherwise whole rows are read in chunks and the columns kept (a
    column slice of a row-major tensor is not contiguous on disk)."""
    info = self.tensors[name]
    if region is None or not info.shape:
      out = np.empty(info.shape, info.dtype)
      return out, self._read_into(out, info.begin)
    region = tuple(region)
    rows = region[0]
    row_shape = info.shape[1:]
    row_bytes = math.prod(row_shape) * info.dtype.itemsize
    out_shape = tuple(s.stop - s.start for s in region)
    out = np.empty(out_shape, info.dtype)
    if all(s.start == 0 and s.stop == d for s, d in zip(region[1:], row_shape)):
      return out, self._read_into(out, info.begin + rows.start * row_bytes)
    per_chunk = max(1, CHUNK_BYTES // max(row_bytes, 1))
    chunk = np.empty((min(per_chunk, out_shape[0]),) + row_shape, info.dtype)
    read = 0
    for r in range(rows.start, rows.stop, per_chunk):
      n = min(per_chunk, rows.stop - r)
      read += self._read_into(chunk[:n], info.begin + r * row_bytes)
      out[r - rows.start:r - rows.start + n] = chunk[:n][(slice(None),) + region[1:]]
    return out, read

  def read_into(self, name: str, blocks: Sequence[tuple[Sequence[slice] | None, np.ndarray]], *,
                wait: bool = True) -> int:
    """Reads regions of tensor `name` into their destinations: `blocks` is [(region, dest)], a region one slice
    with explicit start/stop per dimension (None: the whole tensor), dest a C-contiguous array of the region's
    shape and the tensor's dtype. The regions must not overlap. Returns the bytes read (each once).
    `wait=False`: a direct read may return while its bytes are still being copied into the destinations, so that
    the next read overlaps the copies; they are all there once `flush()` returns."""
    info = self.tensors[name]
    runs = [_runs(info, region, dest) for region, dest in blocks]
    if not runs:
      return 0
    if self._direct is not None:
      try:
        done = self._read_direct(info, blocks)
      except OSError as e:
        if e.errno != errno.EINVAL:
          raise
        done = None   # the filesystem opened the file for direct reads but refuses them: buffered from now on
        self.flush()
        self._direct.close()
        self._direct = None
      if done is not None:
        if wait:
          self.flush()
        return done
    offsets, lengths, pointers = (np.concatenate(parts) for parts in zip(*runs))
    if not len(offsets):   # empty regions only
      return 0
    order = np.argsort(offsets, kind="stable")
    offsets, lengths, pointers = offsets[order], lengths[order], pointers[order]
    ends = offsets + lengths
    if np.any(ends[:-1] > offsets[1:]):
      raise ValueError(f"{self.path}: {name}: overlapping regions requested")
    # One call per stretch of adjacent runs (at most IOV_MAX of them), in file order.
    breaks = np.flatnonzero(ends[:-1] != offsets[1:]) + 1
    iov = np.stack([pointers, lengths], axis=1).astype(np.uint64)
    done = 0
    for begin, end in zip(np.r_[0, breaks], np.r_[breaks, len(offsets)]):
      for b in range(begin, end, IOV_MAX):
        done += self._preadv(iov[b:min(b + IOV_MAX, end)], info.begin + int(offsets[b]))
    return done

  def flush(self) -> None:
    """Every destination of an earlier read_into(..., wait=False) is filled."""
    self._ring.wait()

  def _direct_plan(self, info: TensorInfo, regions) -> tuple[list, list] | None:
    """How a direct read takes these regions of a tensor: ([(file offset, length, first row, end row)] reads of
    whole rows (the tensor's first axis), at most a ring slot each; [(first row, end row, first byte in a row, end
    byte)] per region), or None where it does not pay: the regions take under half of the rows they span (another
    process holds the rest: a direct read cannot skip them), a row is larger than a slot, or a region cuts a
    tensor of 3+ dimensions below its second axis."""
    shape, item = info.shape or (1,), info.dtype.itemsize
    inner = math.prod(shape[2:]) * item
    row = shape[1] * inner if len(shape) > 1 else item
    spans = []
    for region in regions:
      region = tuple(slice(0, d) for d in shape) if region is None or not info.shape else tuple(region)
      if any((s.start, s.stop) != (0, d) for s, d in zip(region[2:], shape[2:])):
        return None
      c0, c1 = (region[1].start * inner, region[1].stop * inner) if len(shape) > 1 else (0, item)
      spans.append((region[0].start, region[0].stop, c0, c1))
    used = [s for s in spans if s[1] > s[0] and s[3] > s[2]]
    if not used:
      return [], spans
    first, end = min(s[0] for s in used), max(s[1] for s in used)
    wanted = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in used)
    if 2 * wanted < (end - first) * row or row > self._ring.capacity:
      return None
    per_read = self._ring.capacity // row
    reads = [(self.data_start + info.begin + q0 * row, (min(end, q0 + per_read) - q0) * row, q0,
              min(end, q0 + per_read)) for q0 in range(first, end, per_read)]
    return reads, spans

  def direct_reads(self, name: str, regions) -> list[tuple[direct_io.DirectFile, int, int]]:
    """The direct reads read_into will do for these regions of `name` (none where it reads the buffered way), to
    schedule on the ring ahead of it."""
    if self._direct is None:
      return []
    plan = self._direct_plan(self.tensors[name], regions)
    return [] if plan is None else [(self._direct, offset, length) for offset, length, _, _ in plan[0]]

  def _read_direct(self, info: TensorInfo, blocks) -> int | None:
    """read_into through the ring (see _direct_plan), each block's part copied out of the read's slot."""
    plan = self._direct_plan(info, [region for region, _ in blocks])
    if plan is None:
      return None
    reads, spans = plan
    dests = [dest.reshape(-1).view(np.uint8).reshape(r1 - r0, c1 - c0) if r1 > r0 and c1 > c0 else None
             for (r0, r1, c0, c1), (_, dest) in zip(spans, blocks)]
    row = reads[0][1] // (reads[0][3] - reads[0][2]) if reads else 0
    for offset, length, q0, q1 in reads:
      view, slot = self._ring.take(self._direct, offset, length)
      rows = view.reshape(q1 - q0, row)
      for (r0, r1, c0, c1), dest in zip(spans, dests):
        a, b = max(r0, q0), min(r1, q1)
        if dest is not None and a < b:
          self._ring.copy(slot, dest[a - r0:b - r0], rows[a - q0:b - q0, c0:c1])
      self._ring.release(slot)
    return sum(d.nbytes for d in dests if d is not None)

  def _preadv(self, iov: np.ndarray, offset: int) -> int:
    """Fills the (pointer, length) rows of `iov` from the file's bytes at data offset `offset`, however many calls
    it takes (a read may stop short: Linux moves at most 0x7ffff000 bytes per call)."""
    iov = np.array(iov)   # adjusted in place after a short read
    want = int(iov[:, 1].sum())
    done = 0
    while done < want:
      position = self.data_start + offset + done
      if _PREADV is not None:
        n = _PREADV(self._f.fileno(), iov.ctypes.data, len(iov), position)
        if n < 0:
          e = ctypes.get_errno()
          raise OSError(e, f"{self.path}: {os.strerror(e)}")
      else:
        n = os.preadv(self._f.fileno(), [(ctypes.c_char * int(ln)).from_address(int(p)) for p, ln in iov], position)
      if n == 0:
        raise FormatError(f"{self.path}: unexpected end of file at byte {position}")
      done += n
      # drop the filled destinations, shorten the one filled in part
      filled = np.cumsum(iov[:, 1].astype(np.int64))
      k = int(np.searchsorted(filled, n, side="right"))
      if k < len(iov):
        part = n - (int(filled[k - 1]) if k else 0)
        iov[k, 0] += np.uint64(part)
        iov[k, 1] -= np.uint64(part)
      iov = iov[k:]
    return done

  def close(self) -> None:
    if self._own_ring:
      self._ring.release_all()
    self._f.close()
    if self._direct is not None:
      self._direct.close()
      self._direct = None


def _runs(info: TensorInfo, region: Sequence[slice] | None, dest: np.ndarray):
  """(file offsets, lengths, destination addresses) of the contiguous stretches of a region of a row-major tensor,
  in the region's row-major order (which is dest's): the region's innermost partial dimension and everything inside
  it make one stretch, repeated over the outer dimensions' indices."""
  shape, item = info.shape, info.dtype.itemsize
  if region is None:
    region = tuple(slice(0, d) for d in shape)
  region = tuple(region)
  out_shape = tuple(s.stop - s.start for s in region)
  if (dest.shape != out_shape or dest.dtype != info.dtype or not dest.flags.c_contiguous
      or not dest.flags.writeable):
    raise ValueError(f"destination {dest.dtype}{list(dest.shape)} (contiguous: {dest.flags.c_contiguous}) for a "
                     f"{info.dtype}{list(out_shape)} region")
  if dest.size == 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
  partial = [k for k, (s, d) in enumerate(zip(region, shape)) if (s.start, s.stop) != (0, d)]
  k = partial[-1] if partial else 0
  strides = [math.prod(shape[d + 1:]) for d in range(len(shape))] or [1]
  length = (math.prod(out_shape[k:]) if shape else 1) * item
  offsets = np.zeros(1, np.int64)
  for d in range(k):   # every index of the outer dimensions, row-major
    offsets = np.add.outer(offsets, np.arange(region[d].start, region[d].stop, dtype=np.int64) * strides[d]).ravel()
  offsets = (offsets + (region[k].start * strides[k] if shape else 0)) * item
  pointers = dest.ctypes.data + np.arange(len(offsets), dtype=np.int64) * length
  return offsets, np.full(len(offsets), length, np.int64), pointers


def write(path, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None) -> int:
  """Streams (name, array) pairs into one safetensors file at `path` (local or gs://, via etils.epath); the arrays
  are iterated twice (header, then data), so pass a list. Returns the bytes written."""
  tensors = list(tensors)
  header, offset = {}, 0
  for name, array in tensors:
    dtype = np.dtype(array.dtype)
    if dtype not in NAMES:
      raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
    header[name] = {"dtype": NAMES[dtype], "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)   # the format aligns the data to 8 bytes with trailing spaces
  with epath.Path(path).open("wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for _, array in tensors:
      f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
  return 8 + len(blob) + offset


def open_checked(path: str, direct: bool | None = None, ring: direct_io.Ring | None = None) -> File:
  """File(path, ...), or a CheckpointError saying the file cannot be read as safetensors."""
  try:
    return File(path, direct, ring)
  except (FormatError, OSError) as e:
    raise CheckpointError(f"not a readable safetensors file: {e}; is it truncated or corrupt?") from None


class SafetensorsReader:
  """Name-addressed, region-addressed reads over one safetensors file or a sharded set (index.json).

  `bytes_read` counts the tensor bytes read so far (tools/bench_load.py and the tests check it). `direct`: see
  File; the files share one Ring (hf/direct_io.py)."""

  def __init__(self, directory: str, direct: bool | None = None):
    self.directory = directory
    self._ring = direct_io.Ring()
    index_path = os.path.join(directory, INDEX_NAME)
    single = os.path.join(directory, WEIGHTS_NAME)
    if os.path.exists(index_path):
      files = _index_files(index_path)
    elif os.path.exists(single):
      files = [WEIGHTS_NAME]
    else:
      pickles = [n for n in PICKLE_NAMES if os.path.exists(os.path.join(directory, n))]
      if pickles:
        raise CheckpointError(
            f"{directory}: only pickle weights found ({', '.join(pickles)}); iblip_jax reads safetensors only, "
            "because unpickling can run arbitrary code. Convert once with transformers: "
            "InstructBlipForConditionalGeneration.from_pretrained(dir).save_pretrained(dir)")
      raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME}")
    self._files: dict[str, File] = {}
    self._where: dict[str, str] = {}
    self.bytes_read = 0
    for name in files:
      path = os.path.join(directory, name)
      if not os.path.exists(path):
        raise CheckpointError(f"{path}: listed in {INDEX_NAME} but missing")
      handle = open_checked(path, direct, self._ring)
      for key in handle.tensors:
        if key in self._where:
          raise CheckpointError(f"{path}: tensor {key!r} is also in {self._where[key]}")
        self._where[key] = name
      self._files[name] = handle

  def keys(self) -> list[str]:
    return list(self._where)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._files[self._where[key]].tensors[key].shape

  def dtype(self, key: str) -> np.dtype:
    return self._files[self._where[key]].tensors[key].dtype

  def nbytes(self, key: str) -> int:
    info = self._files[self._where[key]].tensors[key]
    return info.end - info.begin

  def read_into(self, key: str, blocks, *, wait: bool = True) -> None:
    """Regions of tensor `key` straight into their destination arrays (File.read_into; with wait=False they are
    filled once flush() returns)."""
    try:
      n = self._files[self._where[key]].read_into(key, blocks, wait=wait)
    except (FormatError, OSError) as e:
      raise CheckpointError(f"{os.path.join(self.directory, self._where[key])}: cannot read {key!r} ({e})") from None
    self.bytes_read += n

  def flush(self) -> None:
    """The destinations of every read_into(..., wait=False) so far are filled (the files share one Ring)."""
    self._ring.wait()

  def read_ahead(self, reads) -> None:
    """[(key, [region, ...])] that read_into will be asked for in this order: their direct reads start now on the
    ring's reader thread (hf/direct_io.py). A read_into out of this order is still right, only not read ahead."""
    requests = []
    for key, regions in reads:
      requests += self._files[self._where[key]].direct_reads(key, regions)
    self._ring.schedule(requests)

  def get(self, key: str, region: tuple[slice, ...] | None = None) -> np.ndarray:
    """The tensor `key` (or its region: one slice with explicit bounds per dimension), in its stored dtype."""
    try:
      array, n = self._files[self._where[key]].read(key, region)
    except (FormatError, OSError) as e:
      raise CheckpointError(f"{os.path.join(self.directory, self._where[key])}: cannot read {key!r} ({e})") from None
    self.bytes_read += n
    return array

  def close(self) -> None:
    self._ring.release_all()
    for handle in self._files.values():
      handle.close()


def _index_files(index_path: str) -> list[str]:
  try:
    with open(index_path) as f:
      index = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{index_path}: not valid JSON ({e})") from None
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict):
    got = f"'weight_map' is {type(weight_map).__name__}" if isinstance(index, dict) else type(index).__name__
    raise CheckpointError(f"{index_path}: expected an object with a 'weight_map' object of tensor name -> file "
                          f"name, got {got}")
  bad = [(k, v) for k, v in weight_map.items() if not isinstance(v, str)]
  if bad:
    k, v = bad[0]
    raise CheckpointError(f"{index_path}: weight_map[{k!r}] is {type(v).__name__} ({json.dumps(v)[:80]}); expected "
                          f"the name of the safetensors file that holds the tensor ({len(bad)} such entries)")
  bad = sorted({v for v in weight_map.values() if os.path.basename(v) != v})
  if bad:
    raise CheckpointError(f"{index_path}: weight_map names files outside the directory: {bad[:3]}")
  return sorted(set(weight_map.values()))
