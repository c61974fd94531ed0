"""Tests for zramd.device.Device, written from its specification.

The model is device_model.DeviceModel: the disk's pages and, per sector,
whether it is *stored* (written since the last whole-sector discard or
write-zeroes) or a hole.  What a stored sector costs follows from its
contents alone, as in zram_write_page(): one 8-byte value repeated is a
same-filled page (no pool memory, counted in same_pages); otherwise its
compressed length, computed with the same backend, or 4096 if that length
reaches the pool's huge_class_size (a HUGE page, stored raw).  So after
every operation:

    orig_data_size  = 4096 x stored sectors (same-filled included)
    compr_data_size = sum of stored object sizes (huge count 4096)
    same_pages, huge_pages = counts of such sectors
    mem_used_total  = 4096 x pool pages;  mem_used_max >= it, the peak
    notify_free     = whole sectors discarded or write-zeroed

Two corners the spec leaves open are accepted either way and settled by
extents(): zeroing part of a hole, and zeroing part of a stored sector so
that all of it becomes zero, may leave a hole or a stored zero page.
Of the model's stats only these are compared (test_device_model.py
compares all): here the device's frees stay deferred and requests may
run concurrently, so mem_used_total is checked against the device's own
pool instead.
"""

import errno
import os
import random
import threading
import time

import lz4.block
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize,
                                 invariant, rule)

from conftest import HookedLock, race
from device_model import DeviceModel
from zramd import compress
from zramd.device import IDLE, N_STRIPES, Device
from zramd.errors import InvalidRequestError, NoSpaceError, ZramdError

PAGE = 4096
# zs_huge_class_size() for chain sizes 4, 8 and 16 (see test_zsmalloc.py,
# which derives them from the kernel's formulas).
HUGE_CLASS_SIZE = {4: 3257, 8: 3625, 16: 3833}


# --------------------------------------------------------------------------
# Page contents.

def random_bytes(seed, n):
    return random.Random(seed).randbytes(n)


def text_bytes(seed, n):
    r = random.Random(seed)
    words = [b"zram", b"sector", b"pool", b"class", b"frame", b"handle",
             b"compress", b"%d" % seed, b"\n"]
    out = bytearray()
    while len(out) < n:
        out += r.choice(words) + b" "
    return bytes(out[:n])


def pattern_at(offset, n, word):
    """Bytes for disk range [offset, offset+n) that make every whole sector
    inside it the 8-byte word repeated."""
    start = offset % 8
    reps = (start + n) // 8 + 2
    return (word * reps)[start:start + n]


def partly_random(seed, n, noise):
    """Compresses to about `noise` bytes per sector: near the huge line."""
    r = random.Random(seed)
    out = bytearray(n)
    for base in range(0, n, PAGE):
        k = min(noise, n - base)
        out[base:base + k] = r.randbytes(k)
    return bytes(out)


def sector_kinds(dev, size):
    kinds = [None] * (size // PAGE)
    pos = 0
    for off, length, kind in dev.extents(0, size):
        assert off == pos and length > 0 and off % PAGE == 0 \
            and length % PAGE == 0, (off, length, kind)
        assert kind in ("hole", "zero", "data")
        for i in range(off // PAGE, (off + length) // PAGE):
            kinds[i] = kind
        pos = off + length
    assert pos == size
    return kinds


def pool_pages(dev):
    return dev.pool_stats().total_pages


def check_mem(dev, m):
    """mem_used_total = 4096 x pool pages, read while the drain worker may
    be freeing: exact whenever the pool held still around the reading."""
    for _ in range(50):
        a = pool_pages(dev)
        m = dev.mm_stat()
        b = pool_pages(dev)
        if a == b:
            assert m.mem_used_total == PAGE * a
            break
        time.sleep(0.001)
    else:
        pytest.fail("pool pages never held still")
    assert m.mem_used_max >= m.mem_used_total
    return m


def check_stats(dev, model, prev_max=0):
    if model.undecided:
        model.settle(sector_kinds(dev, model.size))
    m = dev.mm_stat()
    want = {k: getattr(model.mm_stat(), k) for k in (
        "orig_data_size", "compr_data_size", "same_pages", "huge_pages",
        "huge_pages_since")}
    got = {k: getattr(m, k) for k in want}
    assert got == want
    m = check_mem(dev, m)
    assert m.mem_used_max >= prev_max
    assert m.pages_compacted == dev.pool_stats().pages_compacted
    assert m.mem_limit == dev.mem_limit
    io, want_io = dev.io_stat(), model.io_stat()
    assert (io.failed_reads, io.failed_writes, io.notify_free) == (
        0, want_io.failed_writes, want_io.notify_free)
    kinds = sector_kinds(dev, model.size)
    for i, kind in enumerate(kinds):
        assert kind == model.kind(i), i
    return m


def wait_pages(dev, at_most, timeout=10.0):
    """Wait for deferred frees: until the pool holds at most `at_most`
    frames; returns what it holds."""
    deadline = time.monotonic() + timeout
    while pool_pages(dev) > at_most and time.monotonic() < deadline:
        time.sleep(0.02)
    return pool_pages(dev)


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def dev():
    d = Device(64 * PAGE)
    yield d
    d.close()


# --------------------------------------------------------------------------
# Out-of-range requests: EINVAL, nothing changed.

SIZE_SMALL = 16 * PAGE
BAD_RANGES = [(-1, 1), (SIZE_SMALL, 1), (SIZE_SMALL - 1, 2),
              (0, SIZE_SMALL + 1), (SIZE_SMALL + PAGE, PAGE), (-PAGE, PAGE),
              (1 << 62, 1)]


@pytest.mark.parametrize("offset,length", BAD_RANGES)
@pytest.mark.parametrize("op", ["read", "read_into", "write", "discard",
                                "write_zeroes"])
def test_out_of_range(op, offset, length):
    d = Device(SIZE_SMALL)
    try:
        d.write(0, random_bytes(1, SIZE_SMALL))
        before = (d.read(0, SIZE_SMALL), str(d.mm_stat()), str(d.io_stat()))
        with pytest.raises(InvalidRequestError) as e:
            if op == "read":
                d.read(offset, length)
            elif op == "read_into":
                d.read_into(offset, bytearray(length))
            elif op == "write":
                d.write(offset, b"\x55" * length)
            else:
                getattr(d, op)(offset, length)
        assert e.value.errno == errno.EINVAL
        assert isinstance(e.value, ZramdError)
        after = (d.read(0, SIZE_SMALL), str(d.mm_stat()), str(d.io_stat()))
        assert after == before
    finally:
        d.close()


def test_whole_disk_and_last_byte(dev):
    size = dev.size
    dev.write(size - 1, b"\x01")
    assert dev.read(size - 1, 1) == b"\x01"
    data = random_bytes(2, size)
    dev.write(0, data)
    assert dev.read(0, size) == data
    buf = bytearray(size)
    dev.read_into(0, buf)
    assert buf == data
    view = memoryview(bytearray(PAGE + 3))
    dev.read_into(PAGE - 1, view)
    assert bytes(view) == data[PAGE - 1:2 * PAGE + 2]
    dev.discard(0, size)
    assert dev.read(0, size) == bytes(size)
    dev.flush()


def test_config_errors():
    for bad in (0, -PAGE, PAGE + 1):
        with pytest.raises(ZramdError):
            Device(bad)
    with pytest.raises(ZramdError):
        Device(PAGE, algorithm="no-such-algorithm")


# --------------------------------------------------------------------------
# Golden text.

def golden_page(i):
    s = b"".join(b"zramd golden page %d line %04d\n" % (i, j)
                 for j in range(200))
    return s[:PAGE]


def test_golden_stat_lines():
    # lz4 (LZ4_compress_default) sizes, as the kernel would store them:
    # golden_page(4), (5): 723 bytes -> class 736 (2 frames, 11 objects);
    # half-random page: 2034 -> class 2048 (1 frame, 2 objects);
    # random page: huge, one frame.
    rnd = random.Random(1234).randbytes(PAGE)
    half = random.Random(99).randbytes(2000) + bytes(PAGE - 2000)
    for page, n in ((golden_page(4), 723), (golden_page(5), 723),
                    (half, 2034)):
        assert len(lz4.block.compress(page, mode="default",
                                      store_size=False)) == n
    d = Device(2 << 20)
    try:
        d.write(0 * PAGE, bytes(PAGE))                 # same (zero)
        d.write(1 * PAGE, b"\xab" * PAGE)              # same
        d.write(2 * PAGE, b"01234567" * (PAGE // 8))   # same
        d.write(3 * PAGE, rnd)                         # huge
        d.write(4 * PAGE, golden_page(4))
        d.write(5 * PAGE, golden_page(5))
        d.write(6 * PAGE, half)
        assert str(d.mm_stat()) == (
            "   28672     7576    16384        0    16384        3"
            "        0        1        1\n")
        assert str(d.io_stat()) == "       0        0 0        0\n"
        assert str(d.debug_stat()) == "version: 1\n0        0\n"
        # Sector 5 shares its zspage with sector 4, so freeing it (deferred)
        # frees no frame; sectors 9 and 10 were never written.
        d.discard(5 * PAGE, PAGE)
        d.write_zeroes(9 * PAGE, 2 * PAGE)
        assert str(d.mm_stat()) == (
            "   24576     6853    16384        0    16384        3"
            "        0        1        1\n")
        assert str(d.io_stat()) == "       0        0 0        3\n"
        assert str(d.debug_stat()) == "version: 1\n0        0\n"
        # The huge page replaced by a same-filled one: huge_pages drops,
        # huge_pages_since keeps the history; its frame goes back.
        d.write(3 * PAGE, b"\xff" * PAGE)
        assert wait_pages(d, 3) == 3
        assert str(d.mm_stat()) == (
            "   24576     2757    12288        0    16384        4"
            "        0        0        1\n")
        d.reset_mem_used_max()
        assert d.mm_stat().mem_used_max == 12288
        assert d.read(0, 7 * PAGE) == (
            bytes(PAGE) + b"\xab" * PAGE + b"01234567" * (PAGE // 8)
            + b"\xff" * PAGE + golden_page(4) + bytes(PAGE) + half)
    finally:
        d.close()


def test_golden_enospc():
    d = Device(1 << 20, mem_limit=2 * PAGE)
    try:
        assert d.mem_limit == 2 * PAGE
        d.write(0, random_bytes(1, PAGE))
        d.write(PAGE, random_bytes(2, PAGE))
        with pytest.raises(NoSpaceError) as e:
            d.write(2 * PAGE, random_bytes(3, PAGE))
        assert e.value.errno == errno.ENOSPC
        assert str(d.io_stat()) == "       0        1 0        0\n"
        m = d.mm_stat()
        assert (m.orig_data_size, m.compr_data_size, m.mem_used_total,
                m.mem_limit, m.huge_pages) == (8192, 8192, 8192, 8192, 2)
        # The kernel counts the failed allocation in the peak; a pool that
        # refuses before allocating would not.
        assert m.mem_used_max in (8192, 12288)
        line = str(m)
        assert line.startswith("    8192     8192     8192     8192 ")
        assert line.endswith("        0        0        2        2\n")
    finally:
        d.close()


# --------------------------------------------------------------------------
# ENOSPC with mem_limit.

def test_mem_limit_enospc_keeps_old_content():
    limit = 16
    d = Device(1 << 20, mem_limit=limit * PAGE)
    try:
        huge = [random_bytes(100 + i, PAGE) for i in range(limit)]
        for i, page in enumerate(huge):
            d.write(i * PAGE, page)
        assert pool_pages(d) == limit
        # Same-filled pages cost nothing: still accepted at the limit.
        d.write(20 * PAGE, b"\x5a" * PAGE)
        before = str(d.mm_stat())
        failed = 0
        # A new page, a page over a same-filled one, a partial write into a
        # hole: each needs a frame the limit does not allow.
        for off, data in ((30 * PAGE, random_bytes(7, PAGE)),
                          (20 * PAGE, random_bytes(8, PAGE)),
                          (40 * PAGE + 10, random_bytes(9, 3000)),
                          (50 * PAGE - 100, random_bytes(10, PAGE + 200))):
            with pytest.raises(NoSpaceError) as e:
                d.write(off, data)
            failed += 1
            assert e.value.errno == errno.ENOSPC
            assert d.io_stat().failed_writes == failed
        assert d.read(30 * PAGE, PAGE) == bytes(PAGE)
        assert d.read(20 * PAGE, PAGE) == b"\x5a" * PAGE
        assert d.read(40 * PAGE, PAGE) == bytes(PAGE)
        assert d.read(49 * PAGE, 2 * PAGE) == bytes(2 * PAGE)
        m = d.mm_stat()
        assert str(m).split()[:4] == before.split()[:4]
        assert m.same_pages == 1 and m.huge_pages == limit
        for i, page in enumerate(huge):
            assert d.read(i * PAGE, PAGE) == page
        # Overwriting a stored page at the limit either fails leaving the
        # old page (zram allocates before it frees) or succeeds.
        try:
            d.write(0, random_bytes(11, PAGE))
        except NoSpaceError:
            failed += 1
            assert d.read(0, PAGE) == huge[0]
        else:
            assert d.read(0, PAGE) == random_bytes(11, PAGE)
        assert d.io_stat().failed_writes == failed
        # Room again after a discard (once the deferred free has run), and
        # after raising the limit.
        d.discard(PAGE, PAGE)
        assert wait_pages(d, limit - 1) == limit - 1
        d.write(30 * PAGE, random_bytes(7, PAGE))
        assert d.read(30 * PAGE, PAGE) == random_bytes(7, PAGE)
        with pytest.raises(NoSpaceError):
            d.write(31 * PAGE, random_bytes(12, PAGE))
        d.set_mem_limit((limit + 4) * PAGE)
        assert d.mem_limit == (limit + 4) * PAGE
        assert d.mm_stat().mem_limit == (limit + 4) * PAGE
        d.write(31 * PAGE, random_bytes(12, PAGE))
        assert d.read(31 * PAGE, PAGE) == random_bytes(12, PAGE)
        assert pool_pages(d) <= limit + 4
        assert d.io_stat().failed_reads == 0
    finally:
        d.close()


# --------------------------------------------------------------------------
# mem_used_max is the peak.

@pytest.mark.parametrize("native", [True, False])
def test_mem_limit_does_not_count_deferred_frees(native):
    """Discarded pages wait in the pool's deferred-free queue; a write
    over mem_limit right after the discard failed with ENOSPC although the
    pool would hold it once they are freed (zram frees them at the
    discard).  Now the write flushes the queue and checks again."""
    d = Device(64 * PAGE, native=native)
    try:
        # No drain worker: the queue keeps its handles until a flush.
        d.pool.hold_worker()
        d.write(0, random_bytes(1, 32 * PAGE))
        used = d.pool.total_pages()
        d.set_mem_limit((used + 4) * PAGE)
        d.discard(0, 32 * PAGE)
        assert d.pool.deferred_pending() == 32
        assert d.mm_stat().orig_data_size == 0
        data = random_bytes(2, 32 * PAGE)
        d.write(32 * PAGE, data)
        assert d.read(0, 64 * PAGE) == bytes(32 * PAGE) + data
        assert d.io_stat().failed_writes == 0
        assert d.pool.deferred_pending() == 0
        # A write that does not fit still fails, the old contents kept.
        with pytest.raises(NoSpaceError):
            d.write(0, random_bytes(3, 32 * PAGE))
        assert d.read(32 * PAGE, 32 * PAGE) == data
        assert d.pool.total_pages() <= used + 4
        d.pool.audit()
    finally:
        d.close()


def test_mem_used_max_is_peak():
    d = Device(1 << 20)
    try:
        for i in range(40):
            d.write(i * PAGE, random_bytes(i, PAGE) if i % 3 else
                    text_bytes(i, PAGE))
            m = d.mm_stat()
            assert m.mem_used_max == m.mem_used_total == PAGE * pool_pages(d)
        peak = d.mm_stat().mem_used_max
        d.discard(0, 40 * PAGE)
        assert wait_pages(d, 0) == 0
        m = d.mm_stat()
        assert (m.mem_used_total, m.mem_used_max) == (0, peak)
        assert (m.orig_data_size, m.compr_data_size) == (0, 0)
        assert d.io_stat().notify_free == 40
        d.reset_mem_used_max()
        assert d.mm_stat().mem_used_max == 0
    finally:
        d.close()


# --------------------------------------------------------------------------
# Every backend round-trips through the device.

@pytest.mark.parametrize("algorithm", compress.names())
def test_backend_round_trip(algorithm):
    size = 48 * PAGE
    d = Device(size, algorithm=algorithm)
    model = DeviceModel(size, algorithm=algorithm)
    try:
        assert d.algorithm == algorithm
        assert "[%s]" % algorithm in d.comp_algorithm()
        writes = [
            (0, bytes(PAGE)),
            (PAGE, b"\x11" * PAGE),
            (2 * PAGE, text_bytes(1, 5 * PAGE)),
            (7 * PAGE, random_bytes(2, 3 * PAGE)),
            (10 * PAGE + 123, text_bytes(3, 7000)),
            (15 * PAGE - 5, random_bytes(4, 10)),
            (16 * PAGE, partly_random(5, 4 * PAGE, 3500)),
            (20 * PAGE, partly_random(6, 4 * PAGE, 3700)),
            (24 * PAGE, pattern_at(24 * PAGE, 3 * PAGE, b"ABCDEFGH")),
            (2 * PAGE + 1000, random_bytes(7, 2000)),
        ]
        for off, data in writes:
            d.write(off, data)
            model.write(off, data)
            assert d.read(off, len(data)) == data
            check_stats(d, model)
        assert d.read(0, size) == model.read(0, size)
        d.discard(PAGE, 3 * PAGE)
        model.discard(PAGE, 3 * PAGE)
        d.write_zeroes(7 * PAGE + 100, 2 * PAGE)
        model.write_zeroes(7 * PAGE + 100, 2 * PAGE)
        assert d.read(0, size) == model.read(0, size)
        check_stats(d, model)
        assert d.io_stat().failed_reads == 0
    finally:
        d.close()
        model.close()


def page_compressing_to(comp, target):
    """A page whose compressed length is exactly target, or None."""
    for noise in range(target - 150, target + 40):
        for seed in range(6):
            page = partly_random(seed, PAGE, noise)
            if len(comp.compress(page)) == target:
                return page
    return None


@pytest.mark.parametrize("chain", [4, 8, 16])
@pytest.mark.parametrize("algorithm", ["lz4", "deflate"])
def test_huge_threshold_is_inclusive(algorithm, chain):
    # huge iff compressed length >= huge_class_size, as zram_write_page.
    limit = HUGE_CLASS_SIZE[chain]
    comp = compress.create(algorithm)
    below = page_compressing_to(comp, limit - 1)
    at = page_compressing_to(comp, limit)
    assert below is not None and at is not None
    d = Device(8 * PAGE, algorithm=algorithm, chain_size=chain)
    try:
        d.write(0, below)
        m = d.mm_stat()
        assert (m.compr_data_size, m.huge_pages, m.huge_pages_since) == (
            limit - 1, 0, 0)
        d.write(PAGE, at)
        m = d.mm_stat()
        assert (m.compr_data_size, m.huge_pages, m.huge_pages_since) == (
            limit - 1 + PAGE, 1, 1)
        assert d.read(0, 2 * PAGE) == below + at
    finally:
        d.close()


# --------------------------------------------------------------------------
# Idle marking by age.

@pytest.mark.parametrize("native", [True, False])
def test_mark_idle_by_age(native):
    """mark_idle(age) flags the sectors holding a pool object that were
    not read or written for at least ``age`` seconds and clears IDLE on
    those accessed since; mark_idle() flags every one; same-filled
    sectors and holes never (the kernel's mark_idle()); a read or write is
    an access (C loop or Python path alike)."""
    d = Device(4 * PAGE, native=native)

    def idle():
        return [bool(d.slot_flags(i) & IDLE) for i in range(4)]

    try:
        d.write(0, text_bytes(1, PAGE))
        d.write(2 * PAGE, bytes(PAGE))          # same-filled: no object
        d._t0 -= 100                            # the device's clock: +100 s
        d.write(PAGE, text_bytes(2, PAGE))
        assert d.mark_idle(50) == 1
        assert idle() == [True, False, False, False]
        assert d.mark_idle(50) == 0             # marked ones not counted
        assert d.mark_idle(0) == 1              # sector 1 is 0 s old
        assert idle() == [True, True, False, False]
        d._t0 -= 100
        assert d.read(0, PAGE) == text_bytes(1, PAGE)
        d.write(2 * PAGE, bytes(PAGE))
        assert idle() == [False, True, False, False]
        assert d.mark_idle(50) == 0             # just accessed; still idle
        assert idle() == [False, True, False, False]
        # A longer age than sector 1's 100 s: its IDLE of the last pass
        # goes, so a writeback idle now takes only what this age selects.
        assert d.mark_idle(150) == 0
        assert idle() == [False, False, False, False]
        assert d.mark_idle() == 2
        assert idle() == [True, True, False, False]  # never a hole or same
        with pytest.raises(InvalidRequestError, match="idle: -1"):
            d.mark_idle(-1)
    finally:
        d.close()


# --------------------------------------------------------------------------
# The state machine.

DEV_SECTORS = 24
DEV_SIZE = DEV_SECTORS * PAGE


@st.composite
def ranges(draw, max_len=3 * PAGE + 300):
    if draw(st.booleans()):
        first = draw(st.integers(0, DEV_SECTORS - 1))
        n = draw(st.integers(1, min(3, DEV_SECTORS - first)))
        return first * PAGE, n * PAGE
    offset = draw(st.integers(0, DEV_SIZE - 1))
    length = draw(st.integers(1, min(max_len, DEV_SIZE - offset)))
    return offset, length


def make_data(kind, seed, offset, length):
    if kind == "random":
        return random_bytes(seed, length)
    if kind == "zero":
        return bytes(length)
    if kind == "same":
        return pattern_at(offset, length, random_bytes(seed, 8))
    if kind == "text":
        return text_bytes(seed, length)
    if kind == "near_huge":
        return partly_random(seed, length, 3400 + seed % 400)
    raise AssertionError(kind)


class DeviceMachine(RuleBasedStateMachine):

    def __init__(self):
        super().__init__()
        self.dev = None

    @initialize(algorithm=st.sampled_from(["lz4", "lz4", "zstd", "deflate"]),
                chain=st.sampled_from([8, 8, 4, 16]))
    def start(self, algorithm, chain):
        self.dev = Device(DEV_SIZE, algorithm=algorithm, chain_size=chain)
        self.model = DeviceModel(DEV_SIZE, algorithm=algorithm,
                                 chain_size=chain)
        self.peak = 0

    def teardown(self):
        if self.dev is not None:
            self.dev.close()
            self.model.close()

    @rule(r=ranges(), kind=st.sampled_from(
        ["random", "zero", "same", "text", "near_huge"]),
        seed=st.integers(0, 1 << 16))
    def write(self, r, kind, seed):
        offset, length = r
        data = make_data(kind, seed, offset, length)
        self.dev.write(offset, data)
        self.model.write(offset, data)

    @rule(r=ranges(max_len=DEV_SIZE))
    def read(self, r):
        offset, length = r
        assert self.dev.read(offset, length) == \
            self.model.read(offset, length)

    @rule(r=ranges())
    def read_into(self, r):
        offset, length = r
        buf = bytearray(b"\xee" * length)
        self.dev.read_into(offset, buf)
        assert buf == self.model.read(offset, length)

    @rule(r=ranges())
    def discard(self, r):
        self.dev.discard(*r)
        self.model.discard(*r)

    @rule(r=ranges())
    def write_zeroes(self, r):
        self.dev.write_zeroes(*r)
        self.model.write_zeroes(*r)

    @rule()
    def flush(self):
        self.dev.flush()

    @rule()
    def compact(self):
        before = self.dev.mm_stat().pages_compacted
        self.dev.compact()
        assert self.dev.mm_stat().pages_compacted >= before

    @invariant()
    def stats_and_contents(self):
        if self.dev is None:
            return
        m = check_stats(self.dev, self.model, self.peak)
        self.peak = max(self.peak, m.mem_used_total, m.mem_used_max)
        assert self.dev.read(0, DEV_SIZE) == self.model.read(0, DEV_SIZE)
        assert str(self.dev.debug_stat()).startswith("version: 1\n0 ")


DeviceMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestDeviceMachine = DeviceMachine.TestCase


# --------------------------------------------------------------------------
# A partial-sector write racing other requests to the same sector.
#
# A write of part of a sector (or a discard or write-zeroes of part of
# one) reads the sector, patches it and stores it, holding nothing in
# between; NBD clients may send other requests for the same sector at the
# same time (multi-conn, minimum block size 1).  Whatever completes in that
# window must not be lost: the partial write is then the later of the two.
# The window is opened deterministically: the other request runs inside
# the partial write, right after its read.

def run_inside_next_rmw(d, action):
    """Run ``action`` once, in the next read-modify-write between its read
    of the sector and its store: that of the Python paths, which are the
    fallback of the C one (C's races: test_fastpath), so partial sectors
    go there until ``d._c_partial = d._native`` (and ``del
    d._read_sector``).  Returns a list
    that holds True once it ran."""
    read_sector = d._read_sector
    fired = []
    d._c_partial = False

    def hooked(*args, **kw):
        seen = read_sector(*args, **kw)
        if not fired:
            fired.append(True)
            action()
        return seen

    d._read_sector = hooked
    return fired


# What the other request does (on sector 1), as (operation, offset,
# length, data kind): byte ranges before, inside and after the partial
# write's, whole-sector writes (through the C loop when native), and two
# whole-sector writes in a row, which hand the slot back its first pool
# handle: only the stripe's write count tells that slot from the one read.
OTHER_REQUESTS = {
    "write_other_bytes": [("write", PAGE + 2048, 512, "random")],
    "write_overlapping": [("write", PAGE + 400, 300, "random")],
    "write_sector": [("write", PAGE, PAGE, "text")],
    "write_same_filled": [("write", PAGE, PAGE, "same")],
    "write_sector_twice": [("write", PAGE, PAGE, "random"),
                           ("write", PAGE, PAGE, "random")],
    "write_spanning": [("write", PAGE - 100, 2 * PAGE, "text")],
    "discard_sector": [("discard", PAGE, PAGE, None)],
    "write_zeroes_bytes": [("write_zeroes", PAGE + 3000, 700, None)],
    "read": [("read", PAGE, PAGE, None)],
}


def apply_request(d, model, op, offset, length, kind, seed):
    if op == "write":
        data = make_data(kind, seed, offset, length)
        d.write(offset, data)
        model.write(offset, data)
    elif op == "read":
        assert d.read(offset, length) == model.read(offset, length)
    else:
        getattr(d, op)(offset, length)
        getattr(model, op)(offset, length)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("mine", ["write", "discard", "write_zeroes"])
@pytest.mark.parametrize("other", sorted(OTHER_REQUESTS))
def test_partial_write_keeps_a_write_completed_meanwhile(native, mine, other):
    d = Device(4 * PAGE, native=native)
    model = DeviceModel(4 * PAGE)
    try:
        # Sector 1 starts huge: the pool hands its handle out again at the
        # second of two whole-sector writes.
        apply_request(d, model, "write", 0, 4 * PAGE, "random", 1)
        requests = OTHER_REQUESTS[other]

        def other_request():
            for seed, request in enumerate(requests, 100):
                apply_request(d, model, *request, seed)

        fired = run_inside_next_rmw(d, other_request)
        apply_request(d, model, mine, PAGE + 100, 400, "random", 7)
        assert fired
        assert d.read(0, 4 * PAGE) == model.read(0, 4 * PAGE)
        check_stats(d, model)
        d.pool.audit()
    finally:
        d.close()
        model.close()


class PartialWriteRace(RuleBasedStateMachine):
    """Partial-sector writes, discards and write-zeroes with any other
    request run inside them, against the model: the other request first,
    then the partial one."""

    def __init__(self):
        super().__init__()
        self.dev = None

    @initialize(native=st.booleans(),
                algorithm=st.sampled_from(["lz4", "zstd", "deflate"]))
    def start(self, native, algorithm):
        self.dev = Device(DEV_SIZE, algorithm=algorithm, native=native)
        self.model = DeviceModel(DEV_SIZE, algorithm=algorithm)

    def teardown(self):
        if self.dev is not None:
            self.dev.close()
            self.model.close()

    @rule(r=ranges(), kind=st.sampled_from(["random", "zero", "same",
                                            "text", "near_huge"]),
          seed=st.integers(0, 1 << 16))
    def write(self, r, kind, seed):
        apply_request(self.dev, self.model, "write", *r, kind, seed)

    @rule(sector=st.integers(0, DEV_SECTORS - 1),
          lo=st.integers(0, PAGE - 1), length=st.integers(1, PAGE - 1),
          op=st.sampled_from(["write", "discard", "write_zeroes"]),
          kind=st.sampled_from(["random", "text", "zero"]),
          others=st.lists(st.tuples(
              st.sampled_from(["write", "discard", "write_zeroes", "read"]),
              ranges(), st.sampled_from(["random", "same", "text",
                                         "near_huge"])), min_size=1,
              max_size=3),
          seed=st.integers(0, 1 << 16))
    def partial_with_others(self, sector, lo, length, op, kind, others,
                            seed):
        offset = sector * PAGE + lo
        length = min(length, PAGE - lo)
        d, model = self.dev, self.model

        def other_requests():
            for i, (other, (o, n), k) in enumerate(others):
                apply_request(d, model, other, o, n, k, seed + 1 + i)

        fired = run_inside_next_rmw(d, other_requests)
        if op == "write":
            data = make_data(kind, seed, offset, length)
            d.write(offset, data)
        else:
            getattr(d, op)(offset, length)
        del d._read_sector
        d._c_partial = d._native
        if fired:
            if op == "write":
                model.write(offset, data)
            else:
                getattr(model, op)(offset, length)
        else:
            # Part of a hole zeroed: nothing to read, nothing done.  The
            # others come after.
            assert op != "write"
            other_requests()

    @invariant()
    def contents(self):
        if self.dev is not None:
            assert self.dev.read(0, DEV_SIZE) == self.model.read(0, DEV_SIZE)
            check_stats(self.dev, self.model)


PartialWriteRace.TestCase.settings = settings(
    max_examples=60, stateful_step_count=15, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestPartialWriteRace = PartialWriteRace.TestCase


# --------------------------------------------------------------------------
# Threads on distinct regions.

def test_threads_distinct_regions():
    n_threads, sectors = 4, 32
    size = n_threads * sectors * PAGE
    d = Device(size)
    # One model for the whole disk; each thread keeps to its region, so
    # the order of its calls between threads does not matter.
    model = DeviceModel(size)
    model_lock = threading.Lock()
    errors = []

    def worker(t):
        try:
            rng = random.Random(t)
            base = t * sectors * PAGE
            for step in range(1000):
                off = rng.randrange(sectors * PAGE)
                length = rng.randint(1, min(3 * PAGE, sectors * PAGE - off))
                if rng.random() < 0.3:
                    off -= off % PAGE
                    length = min(PAGE * rng.randint(1, 3),
                                 sectors * PAGE - off)
                op = rng.random()
                if op < 0.5:
                    kind = rng.choice(["random", "zero", "same", "text",
                                       "near_huge"])
                    data = make_data(kind, rng.randrange(1 << 16), off, length)
                    d.write(base + off, data)
                    with model_lock:
                        model.write(base + off, data)
                elif op < 0.75:
                    got = d.read(base + off, length)
                    with model_lock:
                        want = model.read(base + off, length)
                    if got != want:
                        raise AssertionError("thread %d: read %d+%d differs"
                                             % (t, off, length))
                else:
                    name = "discard" if op < 0.9 else "write_zeroes"
                    getattr(d, name)(base + off, length)
                    with model_lock:
                        getattr(model, name)(base + off, length)
            got = d.read(base, sectors * PAGE)
            with model_lock:
                want = model.read(base, sectors * PAGE)
            if got != want:
                raise AssertionError("thread %d: region differs" % t)
        except BaseException as e:          # noqa: B902 -- report any
            errors.append((t, e))

    done = threading.Event()

    def compactor():
        try:
            while not done.is_set():
                d.compact()
                time.sleep(0.005)
        except BaseException as e:          # noqa: B902
            errors.append(("compactor", e))

    threads = [threading.Thread(target=worker, args=(t,))
               for t in range(n_threads)]
    comp = threading.Thread(target=compactor)
    try:
        race(threads, comp, done)
        assert not errors, errors
        assert d.read(0, size) == model.read(0, size)
        check_stats(d, model)
    finally:
        d.close()
        model.close()


# --------------------------------------------------------------------------
# Reads racing rewrites and compaction on the same sectors.

def sector_versions(sector):
    """Pages written to ``sector``, none equal to another sector's: of
    several size classes (some spanning two frames), huge, same-filled,
    and zero (also what a discarded sector reads)."""
    seed = sector * 100
    return [text_bytes(seed, PAGE), partly_random(seed + 1, PAGE, 900),
            partly_random(seed + 2, PAGE, 1700),
            partly_random(seed + 3, PAGE, 2600), random_bytes(seed + 4, PAGE),
            pattern_at(0, PAGE, b"%08d" % sector), bytes(PAGE)]


@pytest.mark.parametrize("native", [False, True])
def test_reads_racing_rewrites_and_compaction_on_the_same_sectors(native):
    """Readers, writers and a compactor on the same few sectors, switching
    threads as often as the interpreter can: every sector read is one of
    the pages written to it, whole.  A read that looked the slot up
    without its stripe lock could decompress an object freed, reused or
    moved meanwhile, or a copy another reader of the stripe overwrote."""
    sectors = 8
    d = Device(sectors * PAGE, native=native)
    versions = [sector_versions(s) for s in range(sectors)]
    allowed = [set(v) for v in versions]
    d.write(0, b"".join(v[0] for v in versions))
    errors = []
    reads = [0]

    def reader(seed):
        rng = random.Random(seed)
        try:
            for _ in range(1500):
                first = rng.randrange(sectors)
                count = rng.randint(1, min(3, sectors - first))
                got = d.read(first * PAGE, count * PAGE)
                for i in range(count):
                    page = got[i * PAGE:(i + 1) * PAGE]
                    if page not in allowed[first + i]:
                        raise AssertionError("sector %d: read a page never"
                                             " written to it" % (first + i))
                reads[0] += count
        except BaseException as e:          # noqa: B902 -- report any
            errors.append(("reader", seed, e))

    def writer(seed):
        rng = random.Random(seed)
        try:
            for _ in range(1500):
                s = rng.randrange(sectors)
                if rng.random() < 0.1:
                    d.discard(s * PAGE, PAGE)
                else:
                    d.write(s * PAGE, rng.choice(versions[s]))
        except BaseException as e:          # noqa: B902
            errors.append(("writer", seed, e))

    done = threading.Event()

    def compactor():
        try:
            while not done.is_set():
                d.compact()
                d.pool.free_deferred_flush()
        except BaseException as e:          # noqa: B902
            errors.append(("compactor", e))

    threads = [threading.Thread(target=reader, args=(t,)) for t in range(3)]
    threads += [threading.Thread(target=writer, args=(10 + t,))
                for t in range(2)]
    try:
        race(threads, threading.Thread(target=compactor), done)
        assert not errors, errors
        assert reads[0] >= 3 * 1500
        assert d.io_stat().failed_reads == 0
        for s in range(sectors):
            assert d.read(s * PAGE, PAGE) in allowed[s]
        d.pool.audit()
    finally:
        d.close()


def test_python_read_keeps_the_slot_while_it_reads_the_object():
    """The window forced open: while a read (Python path) is between
    finding the slot's object and reading it, another thread rewrites the
    sector, compacts and flushes the deferred frees.  The read holds the
    slot's stripe lock, so the rewrite waits for it and the read returns
    the page it found; without the lock it read a freed handle."""
    d = Device(4 * PAGE, native=False)
    old, new = text_bytes(1, PAGE), text_bytes(2, PAGE)
    d.write(0, old)
    d.write(PAGE, partly_random(3, 3 * PAGE, 1500))
    waited = threading.Event()      # the rewrite waits, or is over
    d._stripe_locks[0] = HookedLock(d._stripe_locks[0], waited)
    errors = []

    def rewrite():
        try:
            d.write(0, new)
            d.compact()
            d.pool.free_deferred_flush()
        except BaseException as e:          # noqa: B902
            errors.append(e)
        finally:
            waited.set()

    other = threading.Thread(target=rewrite)
    real_begin = d.pool.obj_read_begin

    def begin(handle, local_copy):
        if not other.is_alive() and not waited.is_set():
            other.start()
            waited.wait()
        return real_begin(handle, local_copy)

    d.pool.obj_read_begin = begin
    try:
        assert d.read(0, PAGE) == old
        other.join()
        assert not errors, errors
        assert d.read(0, PAGE) == new
        assert d.io_stat().failed_reads == 0
        d.pool.audit()
    finally:
        del d.pool.obj_read_begin
        d.close()


# --------------------------------------------------------------------------
# An untouched big device costs almost nothing.

def test_untouched_64g_device_is_cheap():
    start = rss_bytes()
    d = Device(64 << 30)
    try:
        assert d.size == 64 << 30
        assert rss_bytes() - start < 8 << 20
        # A few sectors far apart, and reads of holes.
        for off in (0, 17 << 30, (64 << 30) - PAGE):
            d.write(off, random_bytes(off & 0xFFFF, PAGE))
            assert d.read(off, PAGE) == random_bytes(off & 0xFFFF, PAGE)
        assert d.read(32 << 30, 1 << 20) == bytes(1 << 20)
        d.discard(1 << 30, 64 << 20)
        m = d.mm_stat()
        assert m.orig_data_size == 3 * PAGE and m.huge_pages == 3
        assert d.io_stat().notify_free == (64 << 20) // PAGE
        assert rss_bytes() - start < 16 << 20
    finally:
        d.close()


def test_extents_with_max_runs_is_a_prefix_of_the_full_list():
    # plugin.py asks for one run per reply (nbdkit 1.32, dying clients):
    # the short answer must be the start of the full one, whatever the
    # range's alignment.
    rng = random.Random(5)
    dev = Device(64 * PAGE)
    try:
        for sector in range(64):
            kind = rng.choice(["hole", "zero", "data", "data", "fill"])
            if kind == "zero":
                dev.write(sector * PAGE, bytes(PAGE))
            elif kind == "data":
                dev.write(sector * PAGE, rng.randbytes(PAGE))
            elif kind == "fill":
                dev.write(sector * PAGE, b"\x07" * PAGE)
        for _ in range(200):
            offset = rng.randrange(64 * PAGE)
            length = rng.randrange(1, 64 * PAGE - offset + 1)
            full = dev.extents(offset, length)
            assert sum(n for _, n, _ in full) == length
            for k in (1, 2, 5):
                assert dev.extents(offset, length, k) == full[:k]
    finally:
        dev.close()


def crew_switches():
    """Context switches of the process's threads that are not Python
    threads, and whether all of them are asleep: the helpers of
    zramd/csrc/crew.c's crew, which counts nothing of its own (its
    Batch.joined is not exported)."""
    python = {t.native_id for t in threading.enumerate()}
    switches, asleep = 0, True
    for tid in os.listdir("/proc/self/task"):
        if int(tid) in python:
            continue
        try:
            with open("/proc/self/task/%s/stat" % tid) as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open("/proc/self/task/%s/status" % tid) as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches",
                                        "nonvoluntary_ctxt_switches")):
                        switches += int(line.split()[1])
        except FileNotFoundError:
            continue                # a thread that just ended
        asleep = asleep and state == "S"
    return switches, asleep


def settled_crew_switches():
    """crew_switches() once every helper sleeps (a helper woken for a
    batch counts its switch when it goes back to waiting)."""
    for _ in range(2000):
        switches, asleep = crew_switches()
        if asleep:
            return switches
        time.sleep(0.005)
    pytest.fail("the crew's helpers never all went back to sleep")


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_crew_limit_changes_nothing_but_who_does_the_work(algorithm):
    """A request's pages compressed and decompressed by the calling thread
    alone (crew_limit 0) or shared with helper threads: the same objects,
    the same stats, the same bytes back.  That the helpers were woken only
    with a limit shows in their context switches (/proc), the crew
    keeping no count of its own."""
    from zramd import _fastpath
    rnd = random.Random(7)
    pages = [bytes(4096), b"\x07" * 4096, rnd.randbytes(4096),
             (b"zram %d " % 3) * 512, rnd.randbytes(2048) * 2]
    data = b"".join(rnd.choice(pages) for _ in range(96))
    results = []
    woken = []
    old = _fastpath.crew_limit()
    assert old > 0
    try:
        for limit in (old, 0):
            _fastpath.crew_limit(limit)
            dev = Device(1 << 20, algorithm=algorithm)
            try:
                before = settled_crew_switches()
                dev.write(0, data)
                dev.write(8192, data[:64 << 10])        # overwrite part
                back = dev.read(0, len(data))
                woken.append(settled_crew_switches() - before)
                results.append((back, dev.mm_stat(), dev.io_stat()))
                dev.pool.audit()
            finally:
                dev.close()
    finally:
        _fastpath.crew_limit(old)
    assert woken[0] > 0 and woken[1] == 0, woken
    assert results[0] == results[1]
    assert results[0][0] == data[:8192] + data[:64 << 10] + data[8192 + (64 << 10):]
    with pytest.raises(ValueError, match="crew_limit: 99; accepted: 0..8"):
        _fastpath.crew_limit(99)


def objects_in(pool):
    return sum(c.obj_used for c in pool.stats().classes)


def test_failed_object_write_leaks_nothing():
    """A store whose write into its new pool object fails (a write, or a
    recompression) frees that object again and leaves the slot as it
    was."""
    d = Device(4 * PAGE, native=False)
    d.set_recomp_algorithm("zstd")
    try:
        old = text_bytes(1, PAGE)
        d.write(0, old)
        before = objects_in(d.pool)
        real = d.pool.obj_write

        def failing(handle, data):
            raise ZramdError("obj_write: injected")

        d.pool.obj_write = failing
        with pytest.raises(ZramdError, match="injected"):
            d.write(0, text_bytes(2, PAGE))
        assert objects_in(d.pool) == before
        d.mark_idle()
        with pytest.raises(ZramdError, match="injected"):
            d.recompress("idle")
        assert objects_in(d.pool) == before
        d.pool.obj_write = real
        assert d.read(0, PAGE) == old
        assert d.slot_info(0).priority == 0
        d.pool.audit()
    finally:
        d.close()


def test_stripe_lock_refuses_a_timeout():
    # The C mutex behind a stripe lock has no timed wait: asking for one
    # is an error, not a wait that ignores it.
    d = Device(N_STRIPES * PAGE)
    try:
        lock = d._stripe_locks[0]
        with pytest.raises(ValueError, match="no timeout"):
            lock.acquire(True, 0.5)
        assert lock.acquire(False) is True
        assert lock.acquire(False) is False
        lock.release()
        assert lock.acquire() is True
        lock.release()
    finally:
        d.close()
