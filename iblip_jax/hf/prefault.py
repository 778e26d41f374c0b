"""Faulting a load's next host buffers in on a second thread, so that the loading thread copies into memory that
is already there.

Every parameter's bytes land in memory the process has never touched. On the benchmark VM the first touch of a
page is dear (freed memory goes back to the host, so a fresh page costs a host fault too) and it was the larger part
of a real-size load: the loading thread spent 3/4 of it copying into fresh buffers, the disk reads 1/12
(BENCHMARKS.md). MADV_POPULATE_WRITE (Linux >= 5.14) has the kernel fault a range in with one call; on another
core, while the loading thread reads and copies, that time overlaps the reads: 11.5-12.5 s -> 8.5-8.8 s for the same
load. Where the call is missing (older kernels, other systems) nothing is faulted ahead and the loading thread
touches the pages itself, as before.
"""
import concurrent.futures
import ctypes
import mmap
import sys

import numpy as np

MADV_POPULATE_WRITE = 23        # linux/mman.h
STEP = 16 * 2**20               # one call faults in at most this much, so that the queue moves in small steps


def _madvise():
  if not sys.platform.startswith("linux"):
    return None
  try:
    fn = ctypes.CDLL(None, use_errno=True).madvise
  except (OSError, AttributeError):
    return None
  fn.restype = ctypes.c_int
  fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
  return fn


class Prefault:
  """`ahead(arrays, limit)` queues the first `limit` bytes of the arrays (C-contiguous; the pages they touch) to be
  faulted in on the helper thread, in order; `close()` waits for the queue and stops the thread."""

  def __init__(self):
    self._madvise = _madvise()
    self._pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="iblip-prefault")
                  if self._madvise is not None else None)

  def ahead(self, arrays: list[np.ndarray], limit: int | None = None) -> None:
    if self._pool is None:
      return
    left = sum(a.nbytes for a in arrays) if limit is None else limit
    for a in arrays:
      n = min(a.nbytes, left)
      if n > 0:
        self._pool.submit(self._fault, a, n)   # the array rides along: its memory stays mapped until done
      left -= n

  def _fault(self, array: np.ndarray, nbytes: int) -> None:
    first = array.ctypes.data - array.ctypes.data % mmap.PAGESIZE   # madvise wants a page boundary: the array may
    end = array.ctypes.data + nbytes                               # be one layer of a parameter's buffer
    for start in range(first, end, STEP):
      if self._madvise is None:
        return
      if self._madvise(start, min(STEP, end - start), MADV_POPULATE_WRITE) != 0:
        self._madvise = None   # not on this kernel (EINVAL), or no memory to spare: the reader touches the pages

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=True)
