"""Reading a checkpoint file around the page cache (O_DIRECT), and whether a file is in the page cache at all.

A buffered read of a file nobody has read lately puts every byte in the page cache first: fresh kernel pages, then
a second copy into the reader's memory. A load keeps none of those pages, and on a VM that hands freed memory back
to its host (free page reporting, as on the benchmark VM) each fresh page costs the host a fault, so a load that
also fills 8 GB of parameters touched 16 GB of fresh memory and ran at half the disk's rate (BENCHMARKS.md). A
direct read moves the disk's bytes straight into a few reused, page-aligned buffers (Ring).

O_DIRECT wants the file offset, the length and the memory address on the device's block boundaries; a tensor
starts anywhere (safetensors aligns its data to 8 bytes), so whole 4 KiB pages around the wanted bytes are read
and the caller copies its bytes out of the ring's buffer. A file already in the page cache is read the buffered
way (a direct read would go back to the disk for it), as is any file the filesystem does not read directly
(tmpfs before Linux 6.6, many FUSE and network filesystems refuse O_DIRECT; a file on tmpfs is resident anyway).
"""
import collections
import concurrent.futures
import ctypes
import errno
import mmap
import os
import queue
import threading

import numpy as np

PAGE = 4096                      # offsets, lengths and addresses are rounded to this (>= any block size here)
SLOT_BYTES = 32 * 2**20          # one direct read moves at most this much
SLOTS = 4                        # reads the reader thread may be ahead by
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


class Ring:
  """Where direct reads land, and the threads around them.

  `slots` page-aligned buffers of `capacity` bytes. Reads scheduled in advance (`schedule`: a load knows its order)
  are done by a reader thread that runs ahead of the loading thread into whichever slots are free, so that the disk
  is never idle while the loader places parameters (one thread's back-to-back direct reads ran at the disk's full
  rate here, 2.1 GB/s; parallel ones did not run faster). `take` hands the loading thread the slot of the read it
  asks for (a read nobody scheduled, or out of the schedule's order, is done there and then, and what was
  scheduled is dropped); `copy` moves bytes out of a slot into their destination on the copy threads; `release`
  gives the slot back to the reader once its copies are done; `wait` waits for every copy. One Ring per checkpoint
  (SafetensorsReader), however many files it has; each slot its own mapping, made on first use, touched once."""

  def __init__(self, capacity: int | None = None, slots: int = SLOTS, copiers: int = 2):
    self.capacity = capacity or SLOT_BYTES   # the most bytes one read may ask for
    self._copiers = copiers
    self._buffers: list[np.ndarray | None] = [None] * (slots + 1)   # the last: reads nobody scheduled
    self._free: queue.Queue = queue.Queue()
    for slot in range(slots):
      self._free.put(slot)
    self._scheduled: collections.deque = collections.deque()   # (request, future of its slot), in order
    self._reader: threading.Thread | None = None
    self._stop = threading.Event()
    self._copies: dict[int, list] = {slot: [] for slot in range(slots + 1)}
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None

  def _buffer(self, slot: int) -> np.ndarray:
    if self._buffers[slot] is None:
      raw = mmap.mmap(-1, self.capacity + 2 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
      self._buffers[slot] = np.frombuffer(raw, np.uint8)
    return self._buffers[slot]

  def schedule(self, requests: list[tuple["DirectFile", int, int]]) -> None:
    """(file, offset, length) reads to do ahead, in the order `take` will ask for them (after anything scheduled
    before)."""
    work = [(request, concurrent.futures.Future()) for request in requests]
    self._scheduled.extend(work)
    if work:
      self._stop.clear()
      previous = self._reader
      self._reader = threading.Thread(target=self._read_ahead, args=(previous, work), name="iblip-read-ahead",
                                      daemon=True)
      self._reader.start()

  def _read_ahead(self, previous: threading.Thread | None, work) -> None:
    if previous is not None:
      previous.join()
    for (direct, offset, length), future in work:
      slot = None if self._stop.is_set() else self._free.get()
      if slot is None or self._stop.is_set():
        if slot is not None:
          self._free.put(slot)
        future.cancel()
        continue
      try:
        direct.read_at(self._buffer(slot), offset, length)
      except OSError as e:
        self._free.put(slot)
        future.set_exception(e)
      else:
        future.set_result(slot)

  def take(self, direct: "DirectFile", offset: int, length: int) -> tuple[np.ndarray, int]:
    """(the bytes [offset, offset + length) of `direct`'s file as a uint8 view, the slot that holds them)."""
    if self._scheduled and self._scheduled[0][0] == (direct, offset, length):
      _, future = self._scheduled.popleft()
      slot = future.result()
    else:
      self.cancel()
      slot = len(self._buffers) - 1
      self._wait(slot)
      direct.read_at(self._buffer(slot), offset, length)
    start = offset % PAGE
    return self._buffer(slot)[start:start + length], slot

  def copy(self, slot: int, dest: np.ndarray, source: np.ndarray) -> None:
    """dest[...] = source, `source` a view of `slot`; on the copy threads, a share of the rows each (on this thread
    for a small copy: a hand-off costs more), done before the slot is filled again or wait() returns."""
    if dest.nbytes < SMALL_COPY or self._copiers < 1:
      np.copyto(dest, source)
      return
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(self._copiers, thread_name_prefix="iblip-copy")
    rows = len(dest)
    for k in range(self._copiers):   # numpy lets go of the GIL while it copies
      a, b = k * rows // self._copiers, (k + 1) * rows // self._copiers
      if a < b:
        self._copies[slot].append(self._pool.submit(np.copyto, dest[a:b], source[a:b]))

  def release(self, slot: int) -> None:
    """The loading thread is done with `slot`: the reader may fill it again once its copies are done."""
    if slot == len(self._buffers) - 1:
      return
    copies = list(self._copies[slot])
    if not copies:
      self._free.put(slot)
      return
    left = [len(copies)]
    lock = threading.Lock()

    def done(_):
      with lock:
        left[0] -= 1
        last = left[0] == 0
      if last:
        self._free.put(slot)
    for future in copies:
      future.add_done_callback(done)

  def wait(self) -> None:
    """Every copy handed out so far is done (and any error in one raised here)."""
    for slot in self._copies:
      self._wait(slot)

  def _wait(self, slot: int) -> None:
    copies, self._copies[slot] = self._copies[slot], []
    for future in copies:
      future.result()

  def cancel(self) -> None:
    """Drops what is scheduled and not yet taken (its slots come back as their reads finish)."""
    if not self._scheduled:
      return
    self._stop.set()
    self._free.put(None)   # wakes the reader if it waits for a slot
    for _, future in self._scheduled:
      future.add_done_callback(lambda f: None if f.cancelled() or f.exception() else self._free.put(f.result()))
    self._scheduled.clear()
    if self._reader is not None:
      self._reader.join()
      self._reader = None
    free = []
    while not self._free.empty():   # the wake-up out, if the reader did not take it
      free.append(self._free.get_nowait())
    for slot in free:
      if slot is not None:
        self._free.put(slot)

  def release_all(self) -> None:
    self.cancel()
    self.wait()
    if self._pool is not None:
      self._pool.shutdown()
      self._pool = None
    self._buffers = [None] * len(self._buffers)


class DirectFile:
  """One file opened with O_DIRECT; `read_at(buffer, offset, length)` reads the pages around the bytes."""

  def __init__(self, path: str, fd: int):
    self.path, self._fd = path, fd

  @classmethod
  def open(cls, path: str, *, force: bool = False) -> "DirectFile | None":
    """A DirectFile, or None where direct reads do not pay (the file is mostly in the page cache, unless `force`)
    or are not possible (no O_DIRECT here, or the filesystem refuses it)."""
    if not hasattr(os, "O_DIRECT"):
      return None
    if not force:
      cached = cached_fraction(path)
      if cached is None or cached >= 0.5:
        return None
    try:
      return cls(path, os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
      return None

  def read_at(self, buffer: np.ndarray, offset: int, length: int) -> None:
    """The pages around bytes [offset, offset + length) of the file into the page-aligned `buffer` (the bytes then
    start at offset % PAGE). OSError(EINVAL) where the filesystem turns out to refuse direct reads."""
    start = offset - offset % PAGE
    stop = -(-(offset + length) // PAGE) * PAGE
    view, done = memoryview(buffer)[:stop - start], 0
    while done < offset + length - start:
      n = os.preadv(self._fd, [view[done:]], start + done)
      if n == 0:
        raise OSError(errno.EIO, f"{self.path}: unexpected end of file at byte {start + done}")
      done += n

  def close(self) -> None:
    os.close(self._fd)
