"""Page frames: 4 KiB pieces of anonymous memory, numbered and recycled.

The arena is the pool's page allocator, as alloc_page()/__free_page() are
zsmalloc's.  It maps private anonymous memory in chunks of CHUNK_FRAMES
frames and numbers the frames across chunks::

    chunk 0 (mmap, 32 MiB)              chunk 1 (mmap, 32 MiB)
    +------+------+-----+------+        +------+------+-----
    |  f0  |  f1  | ... |f8191 |        |f8192 |f8193 | ...
    +------+------+-----+------+        +------+------+-----

Frame ``f`` lives in chunk ``f >> CHUNK_SHIFT`` at byte offset
``(f & CHUNK_MASK) << 12``; ``locate(f)`` returns that (memoryview, offset)
pair so the pool can slice frames without copying.

A freed frame is given back to the OS at once with MADV_DONTNEED, so the
process's RSS follows the pool; the frame number goes on a free stack and
is handed out again (the OS supplies a zero page on first touch).  Chunks
are never unmapped while the arena lives: their address space costs
nothing once their frames are returned.

Locking: one short lock around the free stack and the chunk list.  The
madvise call happens outside it, before the frame is published as free.
"""

import ctypes
import ctypes.util
import errno
import mmap
import os
import threading
from array import array

# Chunk geometry and the trim threshold: zramd/csrc/zram_defs.h.
from ._fastpath import (CHUNK_FRAMES, CHUNK_MASK, CHUNK_SHIFT, PAGE_SHIFT,
                        PAGE_SIZE, TRIM_FRAMES)

CHUNK_BYTES = CHUNK_FRAMES * PAGE_SIZE

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6",
                    use_errno=True)
# glibc's malloc_trim; other C libraries have nothing to trim.
_malloc_trim = getattr(_libc, "malloc_trim", None)
MLOCK_ONFAULT = 1


def _unlocked_dontneed(address, length):
    """MADV_DONTNEED a range of a process locked with mlockall (nbdkit
    --swap, so swap never waits on a swapped-out server): the kernel
    refuses it on locked pages, so unlock, drop, and lock again on fault
    only, which keeps future pages of the range locked without touching
    them now."""
    for call, args in ((_libc.munlock, ()),
                       (_libc.madvise, (mmap.MADV_DONTNEED,)),
                       (_libc.mlock2, (MLOCK_ONFAULT,))):
        if call(ctypes.c_void_p(address), ctypes.c_size_t(length), *args):
            err = ctypes.get_errno()
            raise OSError(err, "%s: %s" % (call.__name__, os.strerror(err)))


class Arena:
    """Numbered 4 KiB frames from anonymous mmap chunks.

    ``alloc(n)`` returns ``n`` frame numbers (not necessarily contiguous);
    ``free(frames)`` returns them to the OS and to the free stack;
    ``frames_in_use`` counts frames handed out and not yet freed.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._chunks = []             # mmap objects
        self.views = []               # one memoryview per chunk, same index
        self._free = array("I")       # free frame numbers, used as a stack
        self.frames_in_use = 0
        self._high_mark = 0           # frames in use at the last peak/trim

    def _grow(self):
        # Private, not the default shared mapping: MADV_DONTNEED only gives
        # anonymous memory back to the OS when it is private.
        chunk = mmap.mmap(-1, CHUNK_BYTES,
                          flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        first = len(self._chunks) * CHUNK_FRAMES
        self._chunks.append(chunk)
        self.views.append(memoryview(chunk))
        # Highest first, so the stack hands out low frame numbers first.
        self._free.extend(range(first + CHUNK_FRAMES - 1, first - 1, -1))

    def alloc(self, n):
        """Return a list of ``n`` frame numbers, zero-filled or recycled."""
        with self._lock:
            while len(self._free) < n:
                self._grow()
            frames = [self._free.pop() for _ in range(n)]
            self.frames_in_use += n
            if self.frames_in_use > self._high_mark:
                self._high_mark = self.frames_in_use
        return frames

    def free(self, frames):
        """Give ``frames`` back to the OS and make them available again."""
        for start, count in _runs(sorted(frames)):
            index = start >> CHUNK_SHIFT
            offset = (start & CHUNK_MASK) << PAGE_SHIFT
            try:
                self._chunks[index].madvise(mmap.MADV_DONTNEED, offset,
                                            count << PAGE_SHIFT)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                _unlocked_dontneed(self._address(index) + offset,
                                   count << PAGE_SHIFT)
        with self._lock:
            self._free.extend(frames)
            self.frames_in_use -= len(frames)
            trim = (self.frames_in_use + TRIM_FRAMES <= self._high_mark
                    or (self.frames_in_use == 0 and self._high_mark))
            if trim:
                self._high_mark = self.frames_in_use
        if trim:
            # glibc gives back free heap pages anywhere in the heap, not
            # only at its top (malloc_trim(3)); a few ms per 32 MiB freed.
            if _malloc_trim is not None:
                _malloc_trim(0)

    def _address(self, index):
        """Where chunk ``index`` is mapped (for the libc calls)."""
        anchor = ctypes.c_char.from_buffer(self._chunks[index])
        try:
            return ctypes.addressof(anchor)
        finally:
            del anchor            # an export would keep the chunk open

    def locate(self, frame):
        """(chunk memoryview, byte offset) of ``frame``."""
        return self.views[frame >> CHUNK_SHIFT], (frame & CHUNK_MASK) << PAGE_SHIFT

    def close(self):
        """Unmap every chunk.  Views handed out must have been released."""
        with self._lock:
            for view in self.views:
                view.release()
            for chunk in self._chunks:
                chunk.close()
            self.views.clear()        # in place: the pool and C hold it
            self._chunks = []
            self._free = array("I")
            self.frames_in_use = 0


def _runs(sorted_frames):
    """Yield (first, count) for each run of consecutive frames that lies in
    one chunk, so one madvise covers a whole run."""
    start = prev = None
    for f in sorted_frames:
        if prev is not None and f == prev + 1 and (f & CHUNK_MASK):
            prev = f
            continue
        if start is not None:
            yield start, prev - start + 1
        start = prev = f
    if start is not None:
        yield start, prev - start + 1
