"""The device: zram's slot table and I/O paths over the pool.

This follows drivers/block/zram/zram_drv.c.  The disk is an array of 4 KiB
sectors ("slots").  Each slot is 16 bytes spread over three flat arrays,
each an anonymous private mmap so that an untouched device costs only
address space (the OS commits a page of the table when a slot in it is
first written)::

    _handle[i]  u64  pool handle, or the 8-byte fill value of a SAME slot
    _meta[i]    u32  bits 0..12: object size in bytes (0..4096)
                     bits 13..20: flags (SAME, WB, PP_SLOT, HUGE, IDLE,
                     INCOMPRESSIBLE, two compression-priority bits)
    _atime[i]   u32  last access, seconds since the device was created

A slot is *allocated* when it has a handle or the SAME flag; otherwise it
reads as zeroes (a hole).  SAME slots cost no pool memory; HUGE slots hold
the raw page (4096 bytes) because it did not compress below the pool's
huge_class_size.

Write path (zram_write_page): same-filled check, then compression and
pool allocation outside any lock; under the slot lock only the old contents
are unlinked and the new linked in; the old object is freed afterwards.
Discard and write-zeroes of whole sectors unlink the slot with
``slot_free_extract`` and hand the handle to the pool's deferred free, the
swap-release path the deferred queue exists for.

Locking (order: slot stripe lock, then the pool's class locks):
``_stripe_locks[i % N_STRIPES]`` guards slot ``i`` and that stripe's row
of counters.  Stats sum the rows; no lock is shared by all writers.
"""

import mmap
import threading
import time
from array import array

from . import PAGE_SIZE, PAGE_SHIFT
from . import compress
from .errors import ConfigError, InvalidRequestError, NoSpaceError, ZramdError
from .stats import DebugStat, IoStat, MmStat
from .zsmalloc import Pool

# ---- slot flags (zram_drv.h enum zram_pageflags), above the size bits ----
ZRAM_FLAG_SHIFT = PAGE_SHIFT + 1
SIZE_MASK = (1 << ZRAM_FLAG_SHIFT) - 1
SAME = 1 << (ZRAM_FLAG_SHIFT + 0)           # page is one repeated 8-byte value
WB = 1 << (ZRAM_FLAG_SHIFT + 1)             # page is on the backing device
PP_SLOT = 1 << (ZRAM_FLAG_SHIFT + 2)        # selected for post-processing
HUGE = 1 << (ZRAM_FLAG_SHIFT + 3)           # stored raw: did not compress
IDLE = 1 << (ZRAM_FLAG_SHIFT + 4)           # not accessed since idle marking
INCOMPRESSIBLE = 1 << (ZRAM_FLAG_SHIFT + 5)  # no algorithm could compress it
COMP_PRIORITY_SHIFT = ZRAM_FLAG_SHIFT + 6   # 2 bits: which algorithm
COMP_PRIORITY_MASK = 3 << COMP_PRIORITY_SHIFT

# Stripes of slot locks: enough that two cores rarely meet, few enough to
# keep the per-stripe counter rows small.
N_STRIPES = 64
STRIPE_MASK = N_STRIPES - 1

# Per-stripe counter columns.
C_PAGES_STORED = 0      # allocated slots (orig_data_size / 4096)
C_COMPR_SIZE = 1        # bytes of stored objects (huge count 4096)
C_SAME_PAGES = 2
C_HUGE_PAGES = 3
C_HUGE_SINCE = 4        # pages ever stored huge
C_NOTIFY_FREE = 5       # sectors freed by discard / write-zeroes
C_NUM_READS = 6         # sectors read
C_NUM_WRITES = 7        # sectors written
N_COUNTERS = 8

ZERO_PAGE = bytes(PAGE_SIZE)


def _slot_array(count, itemsize, typecode):
    """A zero-filled flat array of ``count`` items backed by a private
    anonymous mmap: reserved now, committed by the OS page by page."""
    region = mmap.mmap(-1, max(count * itemsize, 1),
                       flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return region, memoryview(region).cast(typecode)


class Device:
    """A zram device of ``size`` bytes.  See the module docstring.

    All offsets and lengths are bytes; any range inside the disk works.
    Errors are ZramdError subclasses carrying the errno for the client.
    """

    def __init__(self, size, algorithm="lz4", level=None, dict_path=None,
                 mem_limit=0, chain_size=8):
        if not isinstance(size, int) or size <= 0 or size % PAGE_SIZE:
            raise ConfigError("size: %r; accepted: a positive multiple of %d"
                              " bytes" % (size, PAGE_SIZE))
        if not isinstance(mem_limit, int) or mem_limit < 0:
            raise ConfigError("mem_limit: %r; accepted: bytes >= 0 (0: no"
                              " limit)" % (mem_limit,))
        self.size = size
        self.nr_pages = size >> PAGE_SHIFT
        self._compressor = compress.create(algorithm, level=level,
                                           dict_path=dict_path)
        self.algorithm = self._compressor.name
        # Indexed by a slot's compression-priority bits; 0 is the primary.
        self._compressors = [self._compressor]
        try:
            self.pool = Pool(chain_size=chain_size)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self._huge_class_size = self.pool.huge_class_size
        self._handle_map, self._handle = _slot_array(self.nr_pages, 8, "Q")
        self._meta_map, self._meta = _slot_array(self.nr_pages, 4, "I")
        self._atime_map, self._atime = _slot_array(self.nr_pages, 4, "I")
        self._t0 = time.monotonic()
        self._stripe_locks = [threading.Lock() for _ in range(N_STRIPES)]
        self._counters = array("q", bytes(8 * N_STRIPES * N_COUNTERS))
        self._fail_lock = threading.Lock()
        self.failed_reads = 0
        self.failed_writes = 0
        self._limit_pages = 0
        self._max_lock = threading.Lock()
        self._max_used_pages = 0
        self._tls = threading.local()
        self.set_mem_limit(mem_limit)

    # ---- small helpers -------------------------------------------------

    def _now(self):
        return int(time.monotonic() - self._t0)

    def _local_copy(self):
        """This thread's 4 KiB buffer for objects that span two frames."""
        buf = getattr(self._tls, "buf", None)
        if buf is None:
            buf = self._tls.buf = bytearray(PAGE_SIZE)
        return buf

    def _check_range(self, op, offset, length):
        if (not isinstance(offset, int) or not isinstance(length, int)
                or offset < 0 or length < 0 or offset + length > self.size):
            raise InvalidRequestError(
                "%s: offset %r length %r outside the disk (%d bytes)"
                % (op, offset, length, self.size))

    def _count(self, stripe, column, n=1):
        """Add to a counter; the caller holds that stripe's lock."""
        self._counters[stripe * N_COUNTERS + column] += n

    def _sum(self, column):
        return sum(self._counters[column::N_COUNTERS])

    def _note_pages_used(self, pages):
        """update_used_max(): keep the peak of pool pages."""
        if pages > self._max_used_pages:
            with self._max_lock:
                if pages > self._max_used_pages:
                    self._max_used_pages = pages

    # ---- slot table ------------------------------------------------------

    def _slot_clear_locked(self, index, stripe):
        """Unlink slot ``index`` (its stripe lock held): update the stats,
        clear size and every flag in one store, zero the handle.  Returns
        the pool handle still to be freed, or 0."""
        meta = self._meta[index]
        handle = self._handle[index]
        if meta & SAME:
            self._count(stripe, C_SAME_PAGES, -1)
            self._count(stripe, C_PAGES_STORED, -1)
            handle = 0
        elif handle:
            if meta & HUGE:
                self._count(stripe, C_HUGE_PAGES, -1)
            self._count(stripe, C_COMPR_SIZE, -(meta & SIZE_MASK))
            self._count(stripe, C_PAGES_STORED, -1)
        self._meta[index] = 0
        self._handle[index] = 0
        return handle

    def slot_free_extract(self, index):
        """Under the slot's lock, clear slot ``index`` and return the pool
        handle that still needs freeing (0 if none)."""
        stripe = index & STRIPE_MASK
        with self._stripe_locks[stripe]:
            return self._slot_clear_locked(index, stripe)

    def slot_free(self, index):
        """Clear slot ``index`` and free its object synchronously."""
        handle = self.slot_free_extract(index)
        if handle:
            self.pool.free(handle)

    def slot_allocated(self, index):
        """True when slot ``index`` holds data (pool object or SAME)."""
        return bool(self._handle[index] or self._meta[index] & SAME)

    def slot_flags(self, index):
        """The flag bits of slot ``index`` (see the module constants)."""
        return self._meta[index] & ~SIZE_MASK

    # ---- per-sector I/O ----------------------------------------------------

    def _read_sector(self, index, lo, hi, out, dst):
        """Copy bytes ``lo..hi`` of sector ``index`` into ``out[dst:]``."""
        stripe = index & STRIPE_MASK
        with self._stripe_locks[stripe]:
            meta = self._meta[index]
            handle = self._handle[index]
            if meta & SAME:
                page = handle.to_bytes(8, "little") * (PAGE_SIZE // 8)
                out[dst:dst + hi - lo] = page[lo:hi]
            elif not handle:
                out[dst:dst + hi - lo] = ZERO_PAGE[lo:hi]
            else:
                view = self.pool.obj_read_begin(handle, self._local_copy())
                try:
                    if meta & HUGE:
                        out[dst:dst + hi - lo] = view[lo:hi]
                    else:
                        comp = self._compressors[
                            (meta & COMP_PRIORITY_MASK) >> COMP_PRIORITY_SHIFT]
                        page = comp.decompress(view, slot=index)
                        out[dst:dst + hi - lo] = page[lo:hi] \
                            if (lo or hi != PAGE_SIZE) else page
                finally:
                    self.pool.obj_read_end(handle, view)
            if meta & IDLE:
                self._meta[index] = meta & ~IDLE
            self._atime[index] = self._now()
            self._count(stripe, C_NUM_READS)

    def _write_sector(self, index, page):
        """Store a full 4 KiB ``page`` (bytes-like) in slot ``index``."""
        page = bytes(page)
        head = page[:8]
        handle = 0
        if page == head * (PAGE_SIZE // 8):
            fill = int.from_bytes(head, "little")
            meta = SAME
            size = 0
        else:
            data = self._compressor.compress(page)
            size = len(data)
            meta = 0
            if size >= self._huge_class_size:
                data, size, meta = page, PAGE_SIZE, HUGE
            handle = self.pool.malloc(size)
            pages = self.pool.total_pages()
            self._note_pages_used(pages)
            if self._limit_pages and pages > self._limit_pages:
                # zram_can_store_page(): over the limit, the old contents
                # of the sector stay as they were.
                self.pool.free(handle)
                raise NoSpaceError(
                    "write: sector %d: mem_limit %d bytes reached"
                    % (index, self._limit_pages << PAGE_SHIFT))
            self.pool.obj_write(handle, data)
            meta |= size
        stripe = index & STRIPE_MASK
        with self._stripe_locks[stripe]:
            old = self._slot_clear_locked(index, stripe)
            self._meta[index] = meta
            self._handle[index] = handle if handle else fill
            self._atime[index] = self._now()
            self._count(stripe, C_PAGES_STORED)
            if meta & SAME:
                self._count(stripe, C_SAME_PAGES)
            else:
                self._count(stripe, C_COMPR_SIZE, size)
                if meta & HUGE:
                    self._count(stripe, C_HUGE_PAGES)
                    self._count(stripe, C_HUGE_SINCE)
            self._count(stripe, C_NUM_WRITES)
        if old:
            self.pool.free(old)

    def _patch_sector(self, index, lo, data):
        """Read-modify-write: replace bytes from ``lo`` of sector ``index``
        with ``data``."""
        page = bytearray(PAGE_SIZE)
        self._read_sector(index, 0, PAGE_SIZE, page, 0)
        page[lo:lo + len(data)] = data
        self._write_sector(index, page)

    def _sectors(self, offset, length):
        """Yield (index, lo, hi, position in the request) for each sector
        the byte range touches."""
        pos = 0
        while pos < length:
            index, lo = divmod(offset + pos, PAGE_SIZE)
            hi = min(PAGE_SIZE, lo + length - pos)
            yield index, lo, hi, pos
            pos += hi - lo

    # ---- public I/O ---------------------------------------------------------

    def read_into(self, offset, buffer):
        """Fill ``buffer`` (writable bytes-like) from ``offset``."""
        out = memoryview(buffer).cast("B")
        self._check_range("read", offset, len(out))
        try:
            for index, lo, hi, pos in self._sectors(offset, len(out)):
                self._read_sector(index, lo, hi, out, pos)
        except ZramdError:
            with self._fail_lock:
                self.failed_reads += 1
            raise

    def read(self, offset, length):
        """Return ``length`` bytes from ``offset``."""
        self._check_range("read", offset, length)
        buf = bytearray(length)
        self.read_into(offset, buf)
        return bytes(buf)

    def write(self, offset, data):
        """Write ``data`` at ``offset``; partial sectors are read, patched
        and written back."""
        data = memoryview(data).cast("B")
        self._check_range("write", offset, len(data))
        try:
            for index, lo, hi, pos in self._sectors(offset, len(data)):
                if hi - lo == PAGE_SIZE:
                    self._write_sector(index, data[pos:pos + PAGE_SIZE])
                else:
                    self._patch_sector(index, lo, data[pos:pos + hi - lo])
        except ZramdError:
            with self._fail_lock:
                self.failed_writes += 1
            raise

    def discard(self, offset, length):
        """Free whole sectors in the range (deferred) and zero the partial
        ones, so no stale data stays readable."""
        self._check_range("discard", offset, length)
        self._free_range(offset, length)

    def write_zeroes(self, offset, length):
        """Make the range read as zeroes: as discard, as zram does for
        REQ_OP_WRITE_ZEROES."""
        self._check_range("write_zeroes", offset, length)
        self._free_range(offset, length)

    def _free_range(self, offset, length):
        try:
            for index, lo, hi, _ in self._sectors(offset, length):
                if hi - lo == PAGE_SIZE:
                    handle = self.slot_free_extract(index)
                    if handle:
                        self.pool.free_deferred(handle)
                    stripe = index & STRIPE_MASK
                    with self._stripe_locks[stripe]:
                        self._count(stripe, C_NOTIFY_FREE)
                elif self.slot_allocated(index):
                    self._patch_sector(index, lo, ZERO_PAGE[:hi - lo])
        except ZramdError:
            with self._fail_lock:
                self.failed_writes += 1
            raise

    def flush(self):
        """Nothing to do: data is in memory and every completed write is
        already visible to every reader.  Exists because NBD asks."""

    def extents(self, offset, length):
        """List (offset, length, kind) covering the range; kind is "hole"
        (never written or discarded), "zero" (same-filled with 0) or
        "data".  Adjacent sectors of one kind are merged."""
        self._check_range("extents", offset, length)
        out = []
        for index, lo, hi, pos in self._sectors(offset, length):
            meta = self._meta[index]
            handle = self._handle[index]
            if meta & SAME:
                kind = "data" if handle else "zero"
            else:
                kind = "data" if handle else "hole"
            if out and out[-1][2] == kind:
                start, n, _ = out[-1]
                out[-1] = (start, n + hi - lo, kind)
            else:
                out.append((offset + pos, hi - lo, kind))
        return out

    # ---- administration --------------------------------------------------

    @property
    def mem_limit(self):
        """The memory limit in bytes (0: none)."""
        return self._limit_pages << PAGE_SHIFT

    def set_mem_limit(self, limit):
        """As mem_limit_store: page-aligned up; 0 removes the limit."""
        if not isinstance(limit, int) or limit < 0:
            raise InvalidRequestError("mem_limit: %r; accepted: bytes >= 0"
                                      % (limit,))
        self._limit_pages = (limit + PAGE_SIZE - 1) >> PAGE_SHIFT

    def reset_mem_used_max(self):
        """As writing 0 to mem_used_max: the peak restarts from now."""
        with self._max_lock:
            self._max_used_pages = self.pool.total_pages()

    def compact(self):
        """Compact the pool; returns frames freed."""
        return self.pool.compact()

    def mark_idle(self, age_seconds=None):
        """Flag allocated slots IDLE: all of them (``echo all > idle``), or
        those not accessed for at least ``age_seconds``.  Returns how many
        were marked."""
        if age_seconds is not None and (not isinstance(age_seconds, int)
                                        or age_seconds < 0):
            raise InvalidRequestError("idle: %r; accepted: all or seconds"
                                      " >= 0" % (age_seconds,))
        cutoff = None if age_seconds is None else self._now() - age_seconds
        marked = 0
        meta_arr, handles, atime = self._meta, self._handle, self._atime
        for stripe in range(N_STRIPES):
            with self._stripe_locks[stripe]:
                for index in range(stripe, self.nr_pages, N_STRIPES):
                    meta = meta_arr[index]
                    if not (handles[index] or meta & SAME) or meta & IDLE:
                        continue
                    if cutoff is None or atime[index] <= cutoff:
                        meta_arr[index] = meta | IDLE
                        marked += 1
        return marked

    # ---- stats -----------------------------------------------------------

    @property
    def num_reads(self):
        return self._sum(C_NUM_READS)

    @property
    def num_writes(self):
        return self._sum(C_NUM_WRITES)

    def comp_algorithm(self):
        """The kernel's comp_algorithm line, the active one bracketed."""
        return compress.available(self.algorithm)

    def mm_stat(self):
        pages = self.pool.total_pages()
        self._note_pages_used(pages)
        return MmStat(
            orig_data_size=self._sum(C_PAGES_STORED) << PAGE_SHIFT,
            compr_data_size=self._sum(C_COMPR_SIZE),
            mem_used_total=pages << PAGE_SHIFT,
            mem_limit=self._limit_pages << PAGE_SHIFT,
            mem_used_max=self._max_used_pages << PAGE_SHIFT,
            same_pages=self._sum(C_SAME_PAGES),
            pages_compacted=self.pool.pages_compacted,
            huge_pages=self._sum(C_HUGE_PAGES),
            huge_pages_since=self._sum(C_HUGE_SINCE))

    def io_stat(self):
        return IoStat(failed_reads=self.failed_reads,
                      failed_writes=self.failed_writes, invalid_io=0,
                      notify_free=self._sum(C_NOTIFY_FREE))

    def debug_stat(self):
        # miss_free counts slot_free_notify calls that found the slot lock
        # busy; zramd frees under a blocking stripe lock, so it stays 0.
        return DebugStat(version=1, miss_free=0)

    def pool_stats(self):
        return self.pool.stats()

    def close(self):
        """Flush deferred frees, return every frame, unmap the table."""
        self.pool.close()
        for view in (self._handle, self._meta, self._atime):
            view.release()
        for region in (self._handle_map, self._meta_map, self._atime_map):
            region.close()
