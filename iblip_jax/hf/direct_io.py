"""Reading a checkpoint file around the page cache (O_DIRECT), and whether a file is in the page cache at all.

A buffered read of a file nobody has read lately puts every byte in the page cache first: fresh kernel pages, then
a second copy into the reader's memory. A load keeps none of those pages, and on a VM that hands freed memory back
to its host (free page reporting, as on the benchmark VM) each fresh page costs the host a fault, so a load that
also fills 8 GB of parameters touched 16 GB of fresh memory and ran at half the disk's rate (BENCHMARKS.md). A
direct read moves the disk's bytes straight into one reused, page-aligned bounce buffer.

O_DIRECT wants the file offset, the length and the memory address on the device's block boundaries; a tensor
starts anywhere (safetensors aligns its data to 8 bytes), so whole 4 KiB pages around the wanted bytes are read
and the caller copies its bytes out of the bounce buffer. A file already in the page cache is read the buffered
way (a direct read would go back to the disk for it), as is any file the filesystem does not read directly
(tmpfs, many FUSE and network filesystems refuse O_DIRECT).
"""
import concurrent.futures
import ctypes
import errno
import mmap
import os

import numpy as np

PAGE = 4096                      # offsets, lengths and addresses are rounded to this (>= any block size here)
BOUNCE_BYTES = 64 * 2**20        # one direct read moves at most this much
SMALL_COPY = 2**20               # copies below this are done on the reading thread


def cached_fraction(path: str) -> float | None:
  """The share of the file's pages in the page cache (mincore over a mapping that is never touched); None where
  libc's mmap/mincore are not reachable."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
  except (OSError, AttributeError):
    return None
  size = os.path.getsize(path)
  if size == 0:
    return 1.0
  pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
  fd = os.open(path, os.O_RDONLY)
  try:
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
      return None
    vec = ctypes.create_string_buffer(pages)
    ok = libc.mincore(addr, size, vec) == 0
    libc.munmap(addr, size)
  finally:
    os.close(fd)
  return sum(b & 1 for b in vec.raw) / pages if ok else None


class Bounce:
  """Where direct reads land: two page-aligned halves of `capacity` bytes each, taken in turn, and the threads that
  copy the bytes out of them into their destinations while the next read is under way (the copies were 2/3 of the
  loading thread's time, the reads 1/5: BENCHMARKS.md). A half is handed out again only once the copies out of it
  are done; `wait()` waits for all of them. Each half is its own mapping, made on first use and reused, so touched
  once; one Bounce per checkpoint (SafetensorsReader), however many files it has."""

  def __init__(self, capacity: int = BOUNCE_BYTES, copiers: int = 2):
    self.capacity = capacity   # the most bytes one read may ask for
    self._copiers = copiers
    self._halves: list[np.ndarray | None] = [None, None]
    self._pending: list[list] = [[], []]
    self._turn = 0
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None

  def take(self) -> np.ndarray:
    """The next half, free: the copies out of it are done."""
    turn = self._turn
    self._turn = 1 - turn
    self._wait(turn)
    if self._halves[turn] is None:
      raw = mmap.mmap(-1, self.capacity + 2 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
      self._halves[turn] = np.frombuffer(raw, np.uint8)
    return self._halves[turn]

  def copy(self, dest: np.ndarray, source: np.ndarray) -> None:
    """dest[...] = source, `source` a view of the half taken last; done on the copy threads, a share of the rows
    each (on this thread for a small copy: a thread's hand-off costs more), finished by the time that half is
    taken again or wait() returns."""
    if dest.nbytes < SMALL_COPY or self._copiers < 1:
      np.copyto(dest, source)
      return
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(self._copiers, thread_name_prefix="iblip-copy")
    rows = len(dest)
    for k in range(self._copiers):   # numpy lets go of the GIL while it copies
      a, b = k * rows // self._copiers, (k + 1) * rows // self._copiers
      if a < b:
        self._pending[1 - self._turn].append(self._pool.submit(np.copyto, dest[a:b], source[a:b]))

  def wait(self) -> None:
    """Every copy handed out so far is done (and any error in one raised here)."""
    self._wait(0)
    self._wait(1)

  def _wait(self, turn: int) -> None:
    pending, self._pending[turn] = self._pending[turn], []
    for future in pending:
      future.result()

  def release(self) -> None:
    self.wait()
    if self._pool is not None:
      self._pool.shutdown()
      self._pool = None
    self._halves = [None, None]


class DirectFile:
  """One file opened with O_DIRECT; `read(offset, length)` returns a view of the bytes in the bounce buffer."""

  def __init__(self, path: str, fd: int, bounce: Bounce):
    self.path, self._fd, self.bounce = path, fd, bounce

  @classmethod
  def open(cls, path: str, bounce: Bounce, *, force: bool = False) -> "DirectFile | None":
    """A DirectFile, or None where direct reads do not pay (the file is mostly in the page cache, unless `force`)
    or are not possible (no O_DIRECT here, or the filesystem refuses it)."""
    if not hasattr(os, "O_DIRECT"):
      return None
    if not force:
      cached = cached_fraction(path)
      if cached is None or cached >= 0.5:
        return None
    try:
      return cls(path, os.open(path, os.O_RDONLY | os.O_DIRECT), bounce)
    except OSError:
      return None

  def read(self, offset: int, length: int) -> np.ndarray:
    """bytes [offset, offset + length) of the file (length <= the bounce buffer's capacity), as a uint8 view of the
    bounce buffer's next half (see Bounce). OSError(EINVAL) where the filesystem turns out to refuse them."""
    start = offset - offset % PAGE
    stop = -(-(offset + length) // PAGE) * PAGE
    pages = self.bounce.take()
    view, done = memoryview(pages)[:stop - start], 0
    while done < offset + length - start:
      n = os.preadv(self._fd, [view[done:]], start + done)
      if n == 0:
        raise OSError(errno.EIO, f"{self.path}: unexpected end of file at byte {start + done}")
      done += n
    return pages[offset - start:offset - start + length]

  def close(self) -> None:
    os.close(self._fd)
