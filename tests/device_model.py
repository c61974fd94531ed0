"""The model of the device: zram's semantics in plain Python, the oracle
tests/test_device_model.py checks zramd.device.Device against.

Not in the product.  It is written from drivers/block/zram/zram_drv.c's
rules, not from zramd's code, and is meant to be obviously right:

Sectors
    A dict ``sector -> page`` (4096 bytes) of the sectors that hold
    something; a sector not in it is a hole and reads as zeroes.  A page
    that is one 8-byte word repeated is *same-filled* (page_same_filled):
    it costs no pool memory.  Any other page is compressed with the
    device's backend; if the result reaches the pool's huge_class_size the
    raw page is stored (HUGE), else the compressed bytes.

Pool
    What the stored objects cost is the pool model's business
    (tests/zsmalloc_model.py, itself checked against the C pool): the
    model allocates there what the device allocates, in the same order
    (the new object before the old one is freed, discarded sectors in
    sector order), so mem_used_total and mem_used_max are exact.  Frees
    are immediate: the caller makes the device's deferred frees immediate
    too (see test_device_model.py).

Requests
    - read: every sector touched counts in num_reads.
    - write: a whole sector is stored; part of a sector is read (counted in
      num_reads), patched and stored.  A store that needs a pool object is
      refused when the pool then holds more than mem_limit pages
      (zram_can_store_page): the sector keeps its old contents, the
      request stops there with ENOSPC and failed_writes counts it; the
      sectors before it stay written.  num_writes counts stored sectors.
    - discard, write_zeroes: every whole sector in the range becomes a hole
      (notify_free counts each, hole or not); a partial sector that holds
      something has its part zeroed by a read-modify-write, one that is a
      hole stays one.
    - extents: runs of "hole", "zero" (same-filled with 0) and "data".
    - mark_idle (all): flags IDLE every sector holding a pool object that
      was not yet; an access (a read, a store) clears it (zram_accessed).

Undecided sectors
    The set of sectors a partial discard or write-zeroes left all zero:
    zram leaves a hole a hole and stores a zero page in a sector that held
    something, and so does the model, but test_device.py, written from
    the spec alone, accepts either there and calls ``settle`` to take the
    device's answer (its extents()) for each; a store or a whole-sector
    discard decides a sector too.
"""

from zramd import compress
from zramd.errors import InvalidRequestError, NoSpaceError
from zramd.stats import BdStat, IoStat, MmStat

import zsmalloc_model

PAGE = 4096
ZERO_PAGE = bytes(PAGE)


def same_filled(page):
    """page_same_filled(): one 8-byte word repeated over the page."""
    return page == page[:8] * (PAGE // 8)


class DeviceModel:
    """A zram device of ``size`` bytes, as a dict of sectors."""

    def __init__(self, size, algorithm="lz4", level=None, chain_size=8,
                 mem_limit=0):
        self.size = size
        self.comp = compress.create(algorithm, level=level)
        self.pool = zsmalloc_model.Pool(chain_size=chain_size)
        self.huge_class_size = self.pool.huge_class_size
        self.sectors = {}       # index -> page bytes
        self.handles = {}       # index -> pool handle (absent: same-filled)
        self.sizes = {}         # index -> object size (4096: huge)
        self.idle = set()
        self.undecided = set()  # zeroed in part, now all zero: see settle
        self.limit_pages = 0
        self.max_used_pages = 0
        self.num_reads = self.num_writes = 0
        self.failed_reads = self.failed_writes = 0
        self.notify_free = 0
        self.huge_since = 0
        self.set_mem_limit(mem_limit)

    # ---- helpers -----------------------------------------------------------

    def _check_range(self, op, offset, length):
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidRequestError("%s: out of range" % op)

    def _page(self, index):
        return self.sectors.get(index, ZERO_PAGE)

    def _pages(self):
        pages = self.pool.total_pages()
        self.max_used_pages = max(self.max_used_pages, pages)
        return pages

    def _unlink(self, index):
        self.undecided.discard(index)
        self.sectors.pop(index, None)
        self.sizes.pop(index, None)
        self.idle.discard(index)
        handle = self.handles.pop(index, None)
        if handle:
            self.pool.free(handle)

    def _store(self, index, page):
        """zram_write_page(): store ``page`` in sector ``index`` or raise
        NoSpaceError leaving it as it was."""
        page = bytes(page)
        handle = None
        if not same_filled(page):
            size = len(self.comp.compress(page))
            if size >= self.huge_class_size:
                size = PAGE
            handle = self.pool.malloc(size)
            pages = self._pages()
            if self.limit_pages and pages > self.limit_pages:
                self.pool.free(handle)
                raise NoSpaceError("write: sector %d: mem_limit" % index)
        self._unlink(index)
        self.sectors[index] = page
        if handle:
            self.handles[index] = handle
            self.sizes[index] = size
            self.huge_since += size == PAGE
        self.num_writes += 1

    def _patch(self, index, lo, data):
        """Read-modify-write of part of a sector."""
        self.num_reads += 1
        self.idle.discard(index)
        page = bytearray(self._page(index))
        page[lo:lo + len(data)] = data
        self._store(index, page)

    def _spans(self, offset, length):
        pos = 0
        while pos < length:
            index, lo = divmod(offset + pos, PAGE)
            hi = min(PAGE, lo + length - pos)
            yield index, lo, hi, pos
            pos += hi - lo

    # ---- requests ----------------------------------------------------------

    def read(self, offset, length):
        self._check_range("read", offset, length)
        out = bytearray()
        for index, lo, hi, _ in self._spans(offset, length):
            self.num_reads += 1
            self.idle.discard(index)
            out += self._page(index)[lo:hi]
        return bytes(out)

    def write(self, offset, data):
        data = bytes(data)
        self._check_range("write", offset, len(data))
        try:
            for index, lo, hi, pos in self._spans(offset, len(data)):
                if hi - lo == PAGE:
                    self._store(index, data[pos:pos + PAGE])
                else:
                    self._patch(index, lo, data[pos:pos + hi - lo])
        except NoSpaceError:
            self.failed_writes += 1
            raise

    def discard(self, offset, length):
        self._check_range("discard", offset, length)
        self._zero(offset, length)

    def write_zeroes(self, offset, length):
        self._check_range("write_zeroes", offset, length)
        self._zero(offset, length)

    def _zero(self, offset, length):
        try:
            for index, lo, hi, _ in self._spans(offset, length):
                if hi - lo == PAGE:
                    self._unlink(index)
                    self.notify_free += 1
                else:
                    if index in self.sectors:
                        self._patch(index, lo, ZERO_PAGE[:hi - lo])
                    if self._page(index) == ZERO_PAGE:
                        self.undecided.add(index)
        except NoSpaceError:
            self.failed_writes += 1
            raise

    def extents(self, offset, length, max_runs=None):
        self._check_range("extents", offset, length)
        runs = []
        end = offset + length
        last = (end + PAGE - 1) // PAGE if length else 0
        for index in range(offset // PAGE, last):
            kind = self.kind(index)
            start = max(offset, index * PAGE)
            stop = min(end, (index + 1) * PAGE)
            if runs and runs[-1][2] == kind:
                runs[-1][1] = stop - runs[-1][0]
            elif max_runs is not None and len(runs) == max_runs:
                break
            else:
                runs.append([start, stop - start, kind])
        return [tuple(r) for r in runs]

    def kind(self, index):
        """What extents() says of sector ``index``: "hole", "zero" or
        "data"."""
        page = self.sectors.get(index)
        return ("hole" if page is None else
                "zero" if page == ZERO_PAGE else "data")

    def settle(self, kinds):
        """Take the device's choice for the undecided sectors: ``kinds``
        lists what its extents() says of each sector, and each undecided
        one must be "hole" or "zero"."""
        for index in sorted(self.undecided):
            assert kinds[index] in ("hole", "zero"), (index, kinds[index])
            if kinds[index] == "hole":
                self._unlink(index)
            else:
                self.sectors[index] = ZERO_PAGE
        self.undecided.clear()

    # ---- administration ----------------------------------------------------

    def set_mem_limit(self, limit):
        self.limit_pages = (limit + PAGE - 1) // PAGE

    @property
    def mem_limit(self):
        return self.limit_pages * PAGE

    def reset_mem_used_max(self):
        self.max_used_pages = self.pool.total_pages()

    def compact(self):
        return self.pool.compact()

    def mark_idle(self):
        new = set(self.handles) - self.idle
        self.idle |= new
        return len(new)

    # ---- stats -------------------------------------------------------------

    def mm_stat(self):
        pages = self._pages()
        sizes = self.sizes.values()
        return MmStat(
            orig_data_size=len(self.sectors) * PAGE,
            compr_data_size=sum(sizes),
            mem_used_total=pages * PAGE,
            mem_limit=self.mem_limit,
            mem_used_max=self.max_used_pages * PAGE,
            same_pages=len(self.sectors) - len(self.handles),
            pages_compacted=self.pool.pages_compacted,
            huge_pages=sum(1 for n in sizes if n == PAGE),
            huge_pages_since=self.huge_since)

    def io_stat(self):
        return IoStat(failed_reads=self.failed_reads,
                      failed_writes=self.failed_writes, invalid_io=0,
                      notify_free=self.notify_free)

    def bd_stat(self):
        return BdStat(0, 0, 0)

    def close(self):
        self.pool.close()
