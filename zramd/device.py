"""The device: zram's slot table and I/O paths over the pool.

This follows drivers/block/zram/zram_drv.c.  The disk is an array of 4 KiB
sectors ("slots").  The slot table itself is C (zramd/csrc/zram.c, read
its opening comment): 16 bytes a slot in flat arrays it maps and owns
(handle, the slot word of zram_defs.h, atime), the stripe locks as C
mutexes, the per-stripe counters, the primary codec by dictionary id,
and the read and write paths (whole sectors, and bytes of one sector:
``read``/``write`` with ``lo``), discard, extents and mark_idle, each a
request run without the GIL; it reads written-back slots from the
backing device's descriptor (``_use_backing``).  ``_fastpath.Zram`` is
its Python face; this module never sees the arrays, only slot
primitives (``get``, ``version``, ``touch``, ``flags``, ``clear``,
``set`` under the slot's stripe lock).

A slot is *allocated* when it has a handle or the SAME flag; otherwise it
reads as zeroes (a hole).  A WB slot's handle is its block number on the
backing device (zramd.writeback).  SAME slots cost no pool memory; HUGE
slots hold the raw page (4096 bytes) because it did not compress below
the pool's huge_class_size.

What stays Python, on the slot primitives (the C request returns how
many sectors it did and the sector it stopped at is done here, raising
what there is to raise):

- a sector written back whose block the backing device does not give
  whole (the error names it), one recompressed by a secondary algorithm,
  one of a codec with no C form (lzo, lzo-rle), one that does not
  decompress (the error names it), a write over mem_limit (after the
  deferred frees are flushed) or over a written-back slot (whose block
  is freed here), each whole or in part: a write of part of a sector
  reads the sector, patches it and stores it only if the slot still
  holds what it read (``_slot_version``), else reads it again: what
  another request did to the sector meanwhile stays (the C patch does
  the same);
- post-processing (recompress, writeback, dictionaries:
  zramd.postprocess, on the primitives below);
- every sector read or written on a ``native=False`` device.  These
  paths are the fallback for what C hands back, so they must be right
  with every codec and in every case, and otherwise they see only the
  rare sectors C declines; ``native=False`` runs them on everything so
  that tests can hold them to the model of the device
  (tests/device_model.py) as they hold the C requests.  Its discards,
  extents and mark_idle are C's like any device's.

Discard and write-zeroes of whole sectors unlink the slots in C and hand
the handles to the pool's deferred free, the swap-release path the
deferred queue exists for.

Locking (order: ``_bd_lock``, ``_pp_lock``, the slot table's codec lock,
a slot stripe lock, then the pool's class locks): ``_stripe_locks[i %
N_STRIPES]`` (the C mutex of the stripe, as a lock object) guards slot
``i`` and its 4 KiB ``_stripe_copies`` buffer (where the pool copies an
object that spans two frames while the slot is read); a thread waiting
for it lets the GIL go.  ``_zram.lock_all()`` takes the codec lock and
every stripe, to change the codecs or the backing device's
descriptor.  ``_pp_lock`` is held for a whole
recompress or writeback pass, so one pass runs at a time; ``_bd_lock``
for a whole writeback pass and across set_backing_dev's check and swap,
so no page goes to a backing device being replaced.
"""

import threading
from collections import namedtuple

from . import _fastpath, compress, postprocess
# Slot flags (zram_drv.h enum zram_pageflags, above the size bits), the
# stripes and the counter columns: zramd/csrc/zram_defs.h, one definition
# for C and Python.
from ._fastpath import (
    PAGE_MASK, PAGE_SHIFT, PAGE_SIZE,
    C_COMPR_SIZE, C_HUGE_PAGES, C_HUGE_SINCE, C_NOTIFY_FREE, C_NUM_READS,
    C_NUM_WRITES, C_PAGES_STORED, C_PRIO_PAGES, C_SAME_PAGES,
    COMP_PRIORITY_MASK, COMP_PRIORITY_SHIFT, DICT_MASK, DICT_SHIFT, HUGE,
    IDLE, INCOMPRESSIBLE, MAX_DICTS, MAX_PRIORITIES, N_STRIPES,
    PP_SLOT, SAME, SAME_PAGE_FLAGS, SIZE_MASK, STRIPE_MASK, WB)
from .errors import ConfigError, InvalidRequestError, NoSpaceError, ZramdError
from .stats import BdStat, DebugStat, IoStat, MmStat
from .writeback import BackingDev
from .zsmalloc import Pool

# Post-processing selections, as zram's recompress and writeback "type="
# (zramd.policy takes them from here).
PP_TYPES = postprocess.PP_TYPES
RECOMPRESS_TYPES = postprocess.RECOMPRESS_TYPES

ZERO_PAGE = bytes(PAGE_SIZE)

# Sectors a discard hands the slot table at a time: its list of handles
# to free is built for them (a whole 1 TiB disk at once would be 2 GiB).
DISCARD_BATCH = 1024

# Zram.extents' kinds, by number.
EXTENT_KINDS = ("hole", "zero", "data")

SlotInfo = namedtuple("SlotInfo", "flags size priority dict_id")


class _StripeLock:
    """A stripe's C mutex as a lock object, for the Python paths: ``with``,
    ``acquire(blocking=True)`` (no timeout: ValueError), ``release()``.  A thread that has to wait
    lets the GIL go meanwhile."""

    __slots__ = ("_zram", "_stripe")

    def __init__(self, zram, stripe):
        self._zram, self._stripe = zram, stripe

    def acquire(self, blocking=True, timeout=-1):
        if timeout != -1:
            # The C mutex has no timed wait; do not pretend to one.
            raise ValueError("a stripe lock takes no timeout")
        if not blocking:
            return self._zram.trylock(self._stripe)
        self._zram.lock(self._stripe)
        return True

    def release(self):
        self._zram.unlock(self._stripe)

    def __enter__(self):
        self._zram.lock(self._stripe)
        return self

    def __exit__(self, *exc):
        self._zram.unlock(self._stripe)


class Device:
    """A zram device of ``size`` bytes.  See the module docstring.

    All offsets and lengths are bytes; any range inside the disk works.
    Errors are ZramdError subclasses carrying the errno for the client.
    """

    def __init__(self, size, algorithm="lz4", level=None, dict_path=None,
                 mem_limit=0, chain_size=8, backing_dev=None, native=True):
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
        self._level = level
        # Indexed by a slot's compression-priority bits; 0 is the primary.
        self._compressors = [self._compressor] + [None] * (MAX_PRIORITIES - 1)
        # The primary compressor by dictionary id; writers use _primary,
        # an (id, compressor) pair replaced whole when a dictionary is
        # trained, and pages keep the id they were compressed with.  The
        # slot table holds the C codecs of the same ids.
        self._dict_comps = {0: self._compressor}
        self._primary = (0, self._compressor)
        self._backing = None
        self.writeback_limit_enable = False
        self._writeback_limit = 0
        self._wb_lock = threading.Lock()
        self._dict_lock = threading.Lock()
        # One post-processing pass (recompress, writeback) at a time: a
        # slot's PP_SLOT then has one owner.
        self._pp_lock = threading.Lock()
        # Writeback passes and set_backing_dev, one at a time.
        self._bd_lock = threading.Lock()
        try:
            self.pool = Pool(chain_size=chain_size)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self._huge_class_size = self.pool.huge_class_size
        self._zram = _fastpath.Zram(self.nr_pages, self.pool)
        # native=False sends every sector read or written through the
        # Python fallback paths (see the module docstring: for tests).
        self._native = bool(native)
        # Partial sectors tried in C first (native); tests that race the
        # Python read-modify-write turn it off.
        self._c_partial = self._native
        self._set_codec(0, self._compressor)
        self._stripe_locks = [_StripeLock(self._zram, s)
                              for s in range(N_STRIPES)]
        self._fail_lock = threading.Lock()
        self.failed_reads = 0
        self.failed_writes = 0
        self._stripe_copies = [bytearray(PAGE_SIZE) for _ in range(N_STRIPES)]
        self.policy = None          # a zramd.policy.Policy, if scheduled
        self.set_mem_limit(mem_limit)
        if backing_dev:
            # Opened last: nothing above may fail with its descriptor open.
            backing = BackingDev(backing_dev)
            try:
                self._use_backing(backing)
            except BaseException:
                backing.close()
                raise

    def _set_codec(self, dict_id, comp):
        """Give the slot table the C codec of ``comp`` (None when it has
        none: its pages are the Python paths') for pages of ``dict_id``,
        and make it the primary's."""
        self._zram.lock_all()
        try:
            self._zram.set_dict_codec(dict_id, comp.native)
            self._zram.set_primary(dict_id)
        finally:
            self._zram.unlock_all()

    def _use_backing(self, backing):
        """Make ``backing`` (a BackingDev, or None) the device's; the slot
        table reads WB slots from its descriptor from now on (its count of
        them, part of bd_stat's bd_reads, restarts as the BackingDev's
        own).  Every stripe held for the swap: no C read is on the old
        one after, and the caller may close it."""
        self._zram.lock_all()
        try:
            self._zram.set_backing_fd(backing.fileno() if backing else -1)
            self._backing = backing
        finally:
            self._zram.unlock_all()

    # ---- small helpers -------------------------------------------------

    @property
    def _t0(self):
        """Zero of the device's clock (time.monotonic() seconds); atimes
        count from it.  Tests move it to age the slots."""
        return self._zram.t0

    @_t0.setter
    def _t0(self, value):
        self._zram.t0 = value

    def _now(self):
        return self._zram.now()

    def _check_range(self, op, offset, length):
        if (not isinstance(offset, int) or not isinstance(length, int)
                or offset < 0 or length < 0 or offset + length > self.size):
            raise InvalidRequestError(
                "%s: offset %r length %r outside the disk (%d bytes)"
                % (op, offset, length, self.size))

    def _sum(self, column):
        return self._zram.counters()[column]

    def _note_pages_used(self, pages):
        """update_used_max(): keep the peak of pool pages."""
        self._zram.note_used(pages)

    @property
    def _limit_pages(self):
        return self._zram.limit_pages

    @property
    def _max_used_pages(self):
        return self._zram.max_used_pages

    # ---- slot table ------------------------------------------------------

    def _slot_clear_locked(self, index, stripe):
        """Unlink slot ``index`` (its stripe lock held): the slot table
        updates the stats and clears the slot; a written-back page's block
        is freed here.  Returns the pool handle still to be freed, or 0."""
        meta, handle = self._zram.clear(index)
        if meta & SAME:
            return 0
        if meta & WB:
            self._backing.free_block(handle)
            return 0
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
        meta, handle = self._zram.get(index)
        return bool(handle or meta & SAME)

    def slot_flags(self, index):
        """The flag bits of slot ``index`` (see the module constants)."""
        return self._zram.get(index)[0] & ~SIZE_MASK

    def slot_get(self, index):
        """(slot word, handle) of slot ``index``: exact under its stripe
        lock, else a snapshot (what a pass chooses candidates by)."""
        return self._zram.get(index)

    def slot_read(self, index):
        """The page of slot ``index`` (bytes), not counted as an access;
        the errors of a read."""
        page = bytearray(PAGE_SIZE)
        self._read_sector(index, 0, PAGE_SIZE, page, 0, touch=False)
        return bytes(page)

    def slot_info(self, index):
        """SlotInfo(flags, size, priority, dict_id) of slot ``index``: what
        the stats are made of, for checks and tools."""
        meta = self._zram.get(index)[0]
        return SlotInfo(
            flags=meta & ~(SIZE_MASK | COMP_PRIORITY_MASK | DICT_MASK),
            size=meta & SIZE_MASK,
            priority=(meta & COMP_PRIORITY_MASK) >> COMP_PRIORITY_SHIFT,
            dict_id=(meta & DICT_MASK) >> DICT_SHIFT)

    # ---- per-sector I/O (the Python paths) ----------------------------------

    def _slot_version(self, index, stripe):
        """What a read-modify-write of slot ``index`` (its lock held)
        checks before it stores: the meta word but for SAME_PAGE_FLAGS,
        the handle, and the stripe's count of writes, which tells a handle
        freed and handed out again (to this slot, by two writes) from the
        one read."""
        return self._zram.version(index)

    def _read_sector(self, index, lo, hi, out, dst, touch=True):
        """Copy bytes ``lo..hi`` of sector ``index`` into ``out[dst:]``;
        ``touch``: count it as an access (atime, IDLE, num_reads).
        Returns the slot's version as read (see _slot_version)."""
        stripe = index & STRIPE_MASK
        zram = self._zram
        with self._stripe_locks[stripe]:
            version = zram.version(index)
            meta, handle = zram.get(index)
            if meta & SAME:
                page = handle.to_bytes(8, "little") * (PAGE_SIZE // 8)
                out[dst:dst + hi - lo] = page[lo:hi]
            elif not handle:
                out[dst:dst + hi - lo] = ZERO_PAGE[lo:hi]
            elif meta & WB:
                page = self._backing.read_page(handle, index)
                out[dst:dst + hi - lo] = page[lo:hi]
            else:
                pool = self.pool
                view = pool.obj_read_begin(handle, self._stripe_copies[stripe])
                try:
                    if meta & HUGE:
                        out[dst:dst + hi - lo] = view[lo:hi]
                    else:
                        page = self._decompressor(meta).decompress(
                            view, slot=index)
                        out[dst:dst + hi - lo] = page[lo:hi] \
                            if (lo or hi != PAGE_SIZE) else page
                finally:
                    pool.obj_read_end(handle, view)
            if touch:
                zram.touch(index)
        return version

    def _decompressor(self, meta):
        """The compressor that made a (non-huge) slot's object."""
        prio = (meta & COMP_PRIORITY_MASK) >> COMP_PRIORITY_SHIFT
        if prio:
            return self._compressors[prio]
        return self._dict_comps[(meta & DICT_MASK) >> DICT_SHIFT]

    def _write_sector(self, index, page):
        """Store a full 4 KiB ``page`` (bytes-like) in slot ``index``."""
        page = bytes(page)
        while not self._try_write_sector(index, page):
            pass    # the dictionary we used was retired meanwhile: again

    def _try_write_sector(self, index, page, expect=None):
        """Store ``page`` in slot ``index``; with ``expect``, only if the
        slot's version (_slot_version) still is that.  False when it did
        not store: ``expect`` did not match, or the dictionary it
        compressed with was retired meanwhile."""
        head = page[:8]
        handle = 0
        if page == head * (PAGE_SIZE // 8):
            fill = int.from_bytes(head, "little")
            meta = SAME
            size = 0
        else:
            dict_id, comp = self._primary
            data = comp.compress(page)
            size = len(data)
            meta = dict_id << DICT_SHIFT
            if size >= self._huge_class_size:
                data, size, meta = page, PAGE_SIZE, HUGE
            handle = self.malloc_written(data)
            pages = self.pool.total_pages()
            self._note_pages_used(pages)
            limit = self._zram.limit_pages
            if limit and pages > limit:
                # Discarded objects waiting in the pool's deferred-free
                # queue (or being drained) do not count: zram frees them
                # at the discard.  (The C path hands this case over.)
                self.pool.free_deferred_flush()
                pages = self.pool.total_pages()
            if limit and pages > limit:
                # zram_can_store_page(): over the limit, the old contents
                # of the sector stay as they were.
                self.pool.free(handle)
                raise NoSpaceError(
                    "write: sector %d: mem_limit %d bytes reached"
                    % (index, limit << PAGE_SHIFT))
            meta |= size
        stripe = index & STRIPE_MASK
        with self._stripe_locks[stripe]:
            if expect is not None and \
                    self._zram.version(index) != expect:
                if handle:
                    self.pool.free(handle)
                return False
            dict_id = (meta & DICT_MASK) >> DICT_SHIFT
            if dict_id:
                # The id must still name the dictionary we compressed
                # with: retired meanwhile, it may name a newer one.
                if self._dict_comps.get(dict_id) is not comp:
                    self.pool.free(handle)
                    return False
            old = self._slot_clear_locked(index, stripe)
            self._zram.set(index, meta, handle if handle else fill, True)
        if old:
            self.pool.free(old)
        return True

    def malloc_written(self, data):
        """A new pool object holding ``data``; freed again if the write
        into it fails, so a failed store leaks nothing."""
        handle = self.pool.malloc(len(data))
        try:
            self.pool.obj_write(handle, data)
        except BaseException:
            self.pool.free(handle)
            raise
        return handle

    def _patch_sector(self, index, lo, data):
        """Read-modify-write: replace bytes from ``lo`` of sector ``index``
        with ``data``.  Nothing is held between the read and the store, so
        the patched page is stored only if the slot still holds what was
        read; if another write, discard or post-processing pass changed it
        meanwhile, the sector is read and patched again (a write to any
        other bytes of the sector would be lost otherwise)."""
        page = bytearray(PAGE_SIZE)
        while True:
            seen = self._read_sector(index, 0, PAGE_SIZE, page, 0)
            page[lo:lo + len(data)] = data
            if self._try_write_sector(index, bytes(page), seen):
                return

    def _read_part(self, index, lo, hi, out, dst):
        """Bytes ``lo..hi`` of sector ``index`` into ``out[dst:]``: in C
        (native), else, or when C hands it back, by _read_sector."""
        if not (self._c_partial and self._zram.read(
                out[dst:dst + hi - lo], index, lo)):
            self._read_sector(index, lo, hi, out, dst)

    def _write_part(self, index, lo, data):
        """Replace bytes from ``lo`` of sector ``index`` with ``data``: a
        whole sector, or a read-modify-write; in C (native), else, or when
        C hands it back, by _write_sector or _patch_sector."""
        whole = len(data) == PAGE_SIZE
        # lo given: a read-modify-write (a whole sector needs no read)
        args = (data, index) if whole else (data, index, lo)
        if self._c_partial and self._zram.write(*args):
            return
        if whole:
            self._write_sector(index, data)
        else:
            self._patch_sector(index, lo, data)

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
        length = len(out)
        self._check_range("read", offset, length)
        read_sector = self._read_sector
        try:
            if not (offset | length) & PAGE_MASK:
                # Whole sectors, what block devices and nbdcopy send: the
                # slot table's C path, and here only the sectors it hands
                # back.
                first = offset >> PAGE_SHIFT
                count = length >> PAGE_SHIFT
                zram = self._zram if self._native else None
                i = 0
                while i < count:
                    if zram is not None:
                        i += zram.read(out[i << PAGE_SHIFT:], first + i)
                        if i == count:
                            break
                    read_sector(first + i, 0, PAGE_SIZE, out, i << PAGE_SHIFT)
                    i += 1
            else:
                for index, lo, hi, pos in self._sectors(offset, length):
                    self._read_part(index, lo, hi, out, pos)
        except ZramdError:
            with self._fail_lock:
                self.failed_reads += 1
            raise

    def nbd_callbacks(self, pin, pread_rest, pwrite_rest):
        """nbdkit's pread and pwrite callbacks for this device, as C
        callables ``(h, buf, offset, flags)``: whole sectors inside the
        disk go to the slot table with no Python frame; what it does not
        finish goes on in ``pread_rest``/``pwrite_rest(h, buf, offset,
        flags, done)``, ``done`` being the bytes served, and ``pin()`` is
        called first.  None for a device on the Python paths
        (``native=False``)."""
        if not self._native:
            return None
        self._zram.nbd_fallbacks(pin, pread_rest, pwrite_rest)
        return self._zram.nbd_pread, self._zram.nbd_pwrite

    def offer_to_filter(self):
        """In an nbdkit that loaded zramd's filter (zramd/filter/), let it
        serve whole sectors from this device's core, with no Python call
        and no GIL; the rest still reaches the plugin.  Returns whether
        the filter took it (False on the Python paths, ``native=False``,
        and in any other process); RuntimeError when the filter was built
        from other sources (another ABI), which then serves nothing."""
        return self._native and self._zram.offer_to_filter()

    def filter_counts(self):
        """The filter's requests, as a dict: ``served_reads``,
        ``served_writes`` (whole, by the core) and ``passed_reads``,
        ``passed_writes`` (on to the plugin, whole or from a sector the
        core handed back); None when no filter serves this device."""
        counts = self._zram.filter_counts()   # None unless it was offered
        if counts is None:
            return None
        return dict(zip(("served_reads", "served_writes", "passed_reads",
                         "passed_writes"), counts))

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
        length = len(data)
        self._check_range("write", offset, length)
        write_sector = self._write_sector
        try:
            if not (offset | length) & PAGE_MASK:
                first = offset >> PAGE_SHIFT
                count = length >> PAGE_SHIFT
                zram = self._zram if self._native else None
                i = 0
                while i < count:
                    pos = i << PAGE_SHIFT
                    if zram is not None:
                        i += zram.write(data[pos:], first + i)
                        if i == count:
                            break
                        pos = i << PAGE_SHIFT
                    write_sector(first + i, data[pos:pos + PAGE_SIZE])
                    i += 1
                return
            for index, lo, hi, pos in self._sectors(offset, length):
                self._write_part(index, lo, data[pos:pos + hi - lo])
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
        if not length:
            return
        end = offset + length
        first = (offset + PAGE_MASK) >> PAGE_SHIFT     # first whole sector
        last = end >> PAGE_SHIFT                       # past the last
        try:
            if first > last:                # inside one sector
                self._zero_part(offset >> PAGE_SHIFT, offset & PAGE_MASK,
                                length)
                return
            if offset & PAGE_MASK:
                self._zero_part(first - 1, offset & PAGE_MASK,
                                PAGE_SIZE - (offset & PAGE_MASK))
            i = first
            while i < last:
                # The slot table unlinks and counts them and hands their
                # objects to the pool's deferred free, DISCARD_BATCH at a
                # time; it stops at a written-back slot, whose block is
                # freed here, and goes on from that slot, empty now.
                n = min(last - i, DISCARD_BATCH)
                done = self._zram.discard(i, n)
                i += done
                if done < n:
                    self.slot_free_extract(i)
            if end & PAGE_MASK:
                self._zero_part(last, 0, end & PAGE_MASK)
        except ZramdError:
            with self._fail_lock:
                self.failed_writes += 1
            raise

    def _zero_part(self, index, lo, n):
        """Zero ``n`` bytes from ``lo`` of sector ``index`` (not all of it)
        if it holds data."""
        if self.slot_allocated(index):
            self._write_part(index, lo, ZERO_PAGE[:n])

    def flush(self):
        """Nothing to do: data is in memory and every completed write is
        already visible to every reader.  Exists because NBD asks."""

    def extents(self, offset, length, max_runs=None):
        """List (offset, length, kind) covering the range; kind is "hole"
        (never written or discarded), "zero" (same-filled with 0) or
        "data".  Adjacent sectors of one kind are merged.  With
        ``max_runs`` the list ends after that many runs and covers only
        the start of the range; the scan stops there too."""
        self._check_range("extents", offset, length)
        end = offset + length
        first = offset >> PAGE_SHIFT
        count = ((end + PAGE_MASK) >> PAGE_SHIFT) - first if length else 0
        runs = self._zram.extents(first, count,
                                  -1 if max_runs is None else max_runs)
        out = []
        sector = first
        for n, kind in runs:
            start = max(offset, sector << PAGE_SHIFT)
            sector += n
            out.append((start, min(end, sector << PAGE_SHIFT) - start,
                        EXTENT_KINDS[kind]))
        return out

    # ---- administration --------------------------------------------------

    @property
    def mem_limit(self):
        """The memory limit in bytes (0: none)."""
        return self._zram.limit_pages << PAGE_SHIFT

    def set_mem_limit(self, limit):
        """As mem_limit_store: page-aligned up; 0 removes the limit."""
        if not isinstance(limit, int) or limit < 0:
            raise InvalidRequestError("mem_limit: %r; accepted: bytes >= 0"
                                      % (limit,))
        self._zram.limit_pages = (limit + PAGE_SIZE - 1) >> PAGE_SHIFT

    def reset_mem_used_max(self):
        """As writing 0 to mem_used_max: the peak restarts from now."""
        self._zram.max_used_pages = self.pool.total_pages()

    def compact(self):
        """Compact the pool; returns frames freed."""
        return self.pool.compact()

    def mark_idle(self, age_seconds=None):
        """Flag slots holding a pool object IDLE: all of them (``echo all
        > idle``), or those not accessed for at least ``age_seconds``, and
        clear IDLE on those accessed since (so a pass after a shorter age
        takes only what that age selects).  As the kernel's mark_idle(),
        same-filled and written-back slots are left alone: no
        post-processing applies to them.  Returns how many were newly
        marked."""
        if age_seconds is not None and (not isinstance(age_seconds, int)
                                        or age_seconds < 0):
            raise InvalidRequestError("idle: %r; accepted: all or seconds"
                                      " >= 0" % (age_seconds,))
        cutoff = None if age_seconds is None else self._now() - age_seconds
        return self._zram.mark_idle(cutoff)

    # ---- post-processing: slot primitives and configuration ---------------
    #
    # The passes are zramd.postprocess, on these (read its docstring for
    # the take / put protocol): slot_take, slot_put, slot_release under
    # the slot's stripe lock; ``_pp_lock`` held for a whole pass.

    def slot_take(self, index, need, skip):
        """Under slot ``index``'s lock: if it holds a pool object, has every
        flag in ``need`` and none in ``skip``, mark it PP_SLOT and return
        (meta, handle, page bytes); else None."""
        stripe = index & STRIPE_MASK
        with self._stripe_locks[stripe]:
            meta, handle = self._zram.get(index)
            if (not handle or meta & (SAME | WB | PP_SLOT | skip)
                    or meta & need != need):
                return None
            page = bytearray(PAGE_SIZE)
            view = self.pool.obj_read_begin(handle,
                                            self._stripe_copies[stripe])
            try:
                if meta & HUGE:
                    page[:] = view
                else:
                    page[:] = self._decompressor(meta).decompress(view,
                                                                 slot=index)
            finally:
                self.pool.obj_read_end(handle, view)
            self._zram.flags(index, PP_SLOT, 0)
            return meta | PP_SLOT, handle, bytes(page)

    def _pp_owned(self, index, taken):
        """Whether slot ``index`` (its lock held) still holds what this
        pass took as ``taken``: PP_SLOT still set, the same handle, the
        same meta word but for IDLE."""
        meta, handle, _ = taken
        now, now_handle = self._zram.get(index)
        return bool(now & PP_SLOT and now_handle == handle
                    and (now | IDLE) == (meta | IDLE))

    def slot_put(self, index, taken, new_meta=None, new_handle=0, size=0,
                comp=None):
        """Finish post-processing slot ``index`` taken as ``taken``: with
        no ``new_meta`` only drop PP_SLOT (the page stays as it was);
        otherwise, if the slot is still the pass's, replace its contents
        and free the old object.  ``comp``: the compressor that made a
        recompressed object, which must still be the one of its priority
        (else the slot is left as it was).  Returns True when the
        replacement happened."""
        if new_meta is None:
            self.slot_release(index, taken)
            return False
        stripe = index & STRIPE_MASK
        prio = (new_meta & COMP_PRIORITY_MASK) >> COMP_PRIORITY_SHIFT
        with self._stripe_locks[stripe]:
            if not self._pp_owned(index, taken):
                return False    # rewritten or freed: PP_SLOT went with it
            if prio and self._compressors[prio] is not comp:
                # recomp_algorithm changed meanwhile: the slot's priority
                # would name another algorithm than the one used.
                self._zram.flags(index, 0, PP_SLOT)
                return False
            old = self._slot_clear_locked(index, stripe)
            # counted as zram_slot_clear undoes it: pages stored, and
            # the size and priority of a recompressed object
            self._zram.set(index, new_meta | size, new_handle, False)
        if old:
            self.pool.free(old)
        return True

    def set_recomp_algorithm(self, algorithm, priority=1, level=None):
        """Set the secondary algorithm of ``priority`` (1..3), as writing
        ``algo=NAME priority=N`` to recomp_algorithm.  A slot records only
        the priority its page was recompressed with, so another algorithm
        is refused (InvalidRequestError) while any stored page uses that
        priority; another level of the same one is not (no backend's
        decompression depends on the level)."""
        if not isinstance(priority, int) or not 0 < priority < MAX_PRIORITIES:
            raise InvalidRequestError("priority: %r; accepted: 1..%d"
                                      % (priority, MAX_PRIORITIES - 1))
        comp = compress.create(algorithm, level=level)
        # Every stripe lock held: no recompressed page is stored or freed
        # between the count and the swap, and a recompress that used the
        # old compressor sees the swap when it stores (slot_put).
        self._zram.lock_all()
        try:
            old = self._compressors[priority]
            if old is not None and old.name != comp.name:
                used = self._prio_pages(priority)
                if used:
                    raise InvalidRequestError(
                        "recomp_algorithm: algo=%s priority=%d: %d stored"
                        " pages use %s; accepted: another algorithm only"
                        " while no page uses the priority"
                        % (comp.name, priority, used, old.name))
            self._compressors[priority] = comp
        finally:
            self._zram.unlock_all()

    def _prio_pages(self, priority):
        """Stored pages recompressed with the algorithm of ``priority``."""
        return self._sum(C_PRIO_PAGES - 1 + priority)

    def recomp_algorithm(self):
        """The kernel's recomp_algorithm text: ``#N: `` and the algorithm
        list for each configured secondary priority."""
        return "".join("#%d: %s" % (prio, compress.available(comp.name))
                       for prio, comp in enumerate(self._compressors)
                       if prio and comp is not None)

    def slot_release(self, index, taken, set_flags=0, clear_flags=0):
        """Leave the contents of a slot the pass still owns as they are:
        drop PP_SLOT and ``clear_flags``, set ``set_flags``.  (A slot
        rewritten or freed meanwhile has no PP_SLOT left to drop.)"""
        stripe = index & STRIPE_MASK
        with self._stripe_locks[stripe]:
            if self._pp_owned(index, taken):
                self._zram.flags(index, set_flags, PP_SLOT | clear_flags)

    def secondary(self, priority):
        """The secondary compressor of ``priority`` (1..3), or None."""
        return self._compressors[priority]

    def recompress(self, pp_type=None, threshold=0, max_pages=0,
                   algorithm=None, priority=None, pages=None):
        """Re-compress stored pages with the secondary algorithms, as
        zram's recompress (zramd.postprocess.recompress): keep a result
        only if it lands in a smaller pool size class (and under
        ``threshold`` when given), remember the priority in the slot, flag
        INCOMPRESSIBLE when even the last algorithm failed.  Returns the
        number of pages recompressed."""
        with self._pp_lock:
            return postprocess.recompress(self, pp_type, threshold,
                                          max_pages, algorithm, priority,
                                          pages)

    @property
    def backing_dev(self):
        """The backing device's path, or None."""
        return self._backing.path if self._backing else None

    def set_backing_dev(self, path):
        """Use ``path`` for writeback, or none after ``"none"``; allowed
        while no page is on the current backing device (as zram allows it
        only before init).  A writeback pass in progress finishes first,
        and none starts until the new device is in place."""
        with self._bd_lock:
            old = self._backing
            if old is not None and old.bd_count:
                raise InvalidRequestError("backing_dev: %s holds %d pages;"
                                          " accepted: only while it holds"
                                          " none" % (old.path, old.bd_count))
            self._use_backing(None if path == "none" else BackingDev(path))
            if old is not None:
                old.close()

    @property
    def writeback_limit(self):
        """Pages writeback may still write while the limit is enabled."""
        return self._writeback_limit

    def set_writeback_limit(self, pages):
        if not isinstance(pages, int) or pages < 0:
            raise InvalidRequestError("writeback_limit: %r; accepted: pages"
                                      " >= 0" % (pages,))
        with self._wb_lock:
            self._writeback_limit = pages

    def writeback_budget_left(self):
        """Whether writeback_limit lets the pass write another page."""
        with self._wb_lock:
            return not self.writeback_limit_enable \
                or self._writeback_limit > 0

    def charge_writeback(self):
        """Count a page written to the backing device against
        writeback_limit: as zram, only pages really written are charged
        (not those skipped or whose write failed)."""
        with self._wb_lock:
            if self.writeback_limit_enable and self._writeback_limit > 0:
                self._writeback_limit -= 1

    def writeback(self, pp_type="idle", pages=None, max_pages=0):
        """Move selected pages to the backing device (flag WB, pool memory
        freed), as zram's writeback; ``pages`` limits it to those slot
        indices, ``max_pages`` (0: no bound) to that many pages.  Returns
        the number of pages written back.  As zram, a page whose write
        fails stays in memory and the pass goes on to the others, then
        raises the last error; no free block on the device ends it."""
        with self._bd_lock, self._pp_lock:
            return postprocess.writeback(self, self._backing, pp_type, pages,
                                         max_pages)

    def bd_stat(self):
        """The kernel's bd_stat; zeroes without a backing device."""
        backing = self._backing
        if backing is None:
            return BdStat(0, 0, 0)
        own = backing.stat()
        # and the pages the slot table's C reads took from it
        return BdStat(bd_count=own.bd_count,
                      bd_reads=own.bd_reads + self._zram.bd_reads,
                      bd_writes=own.bd_writes)

    def train_dictionary(self, dict_size=16384, max_samples=4096):
        """Train a zstd dictionary on up to ``max_samples`` stored pages and
        make it the primary compressor's from now on, without stopping
        I/O (zramd.postprocess.train_dictionary).  Returns the new
        dictionary's id."""
        return postprocess.train_dictionary(self, dict_size, max_samples)

    def add_dictionary(self, dictionary):
        """Make a zstd compressor with ``dictionary`` (bytes) the primary's
        from now on, after retiring dictionaries no page uses any more.
        Stored pages keep the dictionary they were compressed with.
        Returns the new dictionary's id; InvalidRequestError when all
        MAX_DICTS - 1 ids are in use."""
        comp = compress.create("zstd", level=self._level,
                               dictionary=dictionary)
        with self._dict_lock:
            self._retire_dictionaries()
            free_ids = [i for i in range(1, MAX_DICTS)
                        if i not in self._dict_comps]
            if not free_ids:
                raise InvalidRequestError("train_dictionary: %d dictionaries"
                                          " in use" % (MAX_DICTS - 1))
            dict_id = free_ids[0]
            zram = self._zram
            zram.lock_all()
            try:
                zram.set_dict_codec(dict_id, comp.native)
                zram.set_primary(dict_id)
                self._dict_comps[dict_id] = comp
                self._primary = (dict_id, comp)
            finally:
                zram.unlock_all()
        return dict_id

    def _retire_dictionaries(self):
        """Forget dictionaries that are not current and no page uses.  All
        stripe locks are held while deciding, so a writer that compressed
        with a retired one sees that under its slot lock and starts over."""
        zram = self._zram
        zram.lock_all()
        try:
            current = self._primary[0]
            for dict_id in list(self._dict_comps):
                if dict_id in (0, current):
                    continue
                if not zram.dict_refs(dict_id):
                    del self._dict_comps[dict_id]
                    zram.set_dict_codec(dict_id, None)
        finally:
            zram.unlock_all()

    def dictionary_ids(self):
        """Ids of the dictionaries kept: the current one and those stored
        pages still use (0: no dictionary)."""
        return sorted(self._dict_comps)

    def dictionary_id(self):
        """The id of the dictionary new pages are compressed with (0:
        none)."""
        return self._primary[0]

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
        zram = self._zram
        counters = zram.counters()
        pages = self.pool.total_pages()
        zram.note_used(pages)
        return MmStat(
            orig_data_size=counters[C_PAGES_STORED] << PAGE_SHIFT,
            compr_data_size=counters[C_COMPR_SIZE],
            mem_used_total=pages << PAGE_SHIFT,
            mem_limit=zram.limit_pages << PAGE_SHIFT,
            mem_used_max=zram.max_used_pages << PAGE_SHIFT,
            same_pages=counters[C_SAME_PAGES],
            pages_compacted=self.pool.pages_compacted,
            huge_pages=counters[C_HUGE_PAGES],
            huge_pages_since=counters[C_HUGE_SINCE])

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
        """Stop the policy, flush deferred frees, return every frame,
        unmap the table."""
        if self.policy is not None:
            self.policy.stop()
        self._zram.close()          # before the pool it uses
        self.pool.close()
        if self._backing is not None:
            self._backing.close()
