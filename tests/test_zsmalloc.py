"""Tests for zramd.zsmalloc.Pool (the C pool, zramd/csrc/zsmalloc.c),
written from its specification, and against its model.

The pool promises the kernel's zsmalloc geometry (mm/zsmalloc.c on 4 KiB
pages), so this file recomputes that geometry on its own -- the size classes,
calculate_zspage_chain_size(), can_merge(), zs_huge_class_size(),
get_fullness_group(), zs_can_compact() -- and checks the pool against it
through the public API only: malloc placement shows up as obj_used in the
right stats() row, a spanning object shows up as a read served from the
caller's local_copy, and overlap between live objects shows up as corrupted
contents, because every object holds content no other object holds.

Besides the public API, ``Pool.audit()`` -- the pool's check of its own
metadata (fullness lists against inuse counts, free zspage ids and handle
rows against live ones, frames against the arena) -- runs as an invariant
of the state machine and after the concurrent and compaction tests.

The model, tests/zsmalloc_model.py, is the pool in Python (the one zramd
had before it was C, not part of the product): the same algorithms on the
same geometry.  The state machine drives the C pool and the model with
the same calls and requires the same result from each (handles, sizes,
bytes read, which reads were copies, frames compacted) and the same stats
after every step, besides the dict model of contents.

Model of the deferred-free queue: a handle given to free_deferred() is
"pending" until free_deferred_flush(); the drain worker may free it at any
moment in between, so counts are checked as ranges while anything is
pending and exactly once nothing is.
"""

import array
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize,
                                 invariant, precondition, rule)

import zsmalloc_model
from conftest import race
from zramd._fastpath import DEFERRED_CAPACITY
from zramd.errors import ZramdError
from zramd.stats import PoolStats
from zramd.zsmalloc import Pool

PAGE_SIZE = 4096
ZS_HANDLE_SIZE = 8
ZS_MIN_ALLOC_SIZE = 32
ZS_MAX_ALLOC_SIZE = PAGE_SIZE
ZS_SIZE_CLASS_DELTA = PAGE_SIZE >> 8                     # 16
ZS_SIZE_CLASSES = -(-(ZS_MAX_ALLOC_SIZE - ZS_MIN_ALLOC_SIZE)
                    // ZS_SIZE_CLASS_DELTA) + 1           # 255
NR_FULLNESS_COLUMNS = 11                                  # 10% .. 99%, 100%
CHAIN_SIZES = (4, 8, 16)


# --------------------------------------------------------------------------
# The kernel's geometry, recomputed here from mm/zsmalloc.c.

def zspage_chain_size(class_size, max_chain):
    """calculate_zspage_chain_size(): least waste, first minimum wins."""
    if class_size & (class_size - 1) == 0:
        return 1
    best, min_waste = 1, None
    for i in range(1, max_chain + 1):
        waste = (i * PAGE_SIZE) % class_size
        if min_waste is None or waste < min_waste:
            min_waste, best = waste, i
    return best


class Geometry:
    """The class table zs_create_pool() builds for one chain size."""

    def __init__(self, max_chain):
        self.max_chain = max_chain
        self.size = {}          # class index -> size
        self.ppz = {}           # class index -> pages_per_zspage
        self.opz = {}           # class index -> objs_per_zspage
        self.owner = {}         # class index -> index of the class it uses
        self.huge_class_size = 0
        prev = None
        for i in range(ZS_SIZE_CLASSES - 1, -1, -1):
            size = min(ZS_MIN_ALLOC_SIZE + i * ZS_SIZE_CLASS_DELTA,
                       ZS_MAX_ALLOC_SIZE)
            ppz = zspage_chain_size(size, max_chain)
            opz = ppz * PAGE_SIZE // size
            if ppz != 1 and opz != 1 and not self.huge_class_size:
                self.huge_class_size = size - (ZS_HANDLE_SIZE - 1)
            self.size[i], self.ppz[i], self.opz[i] = size, ppz, opz
            # can_merge(): same pages_per_zspage and objs_per_zspage as the
            # next larger unmerged class.
            if prev is not None and self.ppz[prev] == ppz \
                    and self.opz[prev] == opz:
                self.owner[i] = prev
                continue
            self.owner[i] = i
            prev = i
        self.unmerged = sorted(i for i in self.owner if self.owner[i] == i)

    @staticmethod
    def class_index(obj_size):
        """size_class index for zs_malloc(obj_size): the header counts."""
        size = obj_size + ZS_HANDLE_SIZE
        if size <= ZS_MIN_ALLOC_SIZE:
            idx = 0
        else:
            idx = -(-(size - ZS_MIN_ALLOC_SIZE) // ZS_SIZE_CLASS_DELTA)
        return min(idx, ZS_SIZE_CLASSES - 1)

    def row_for(self, obj_size):
        """Index of the (unmerged) class an object of obj_size lands in."""
        return self.owner[self.class_index(obj_size)]

    def is_huge(self, row):
        return self.opz[row] == 1

    def sizes_for_row(self, row):
        """(smallest, largest) object size that lands in unmerged class row."""
        sizes = [s for s in range(1, PAGE_SIZE + 1) if self.row_for(s) == row]
        return sizes[0], sizes[-1]


GEOMETRY = {c: Geometry(c) for c in CHAIN_SIZES}


def fullness_column(inuse, opz):
    """get_fullness_group() minus one: the column of the classes file
    (0 = "10%" ... 9 = "99%", 10 = "100%"); an empty zspage has none."""
    assert 0 < inuse <= opz
    if inuse == opz:
        return 10
    return (100 * inuse // opz) // 10


def test_geometry_matches_known_kernel_values():
    # Sanity of the formulas above against numbers quoted from the kernel
    # and the spec, so that a mistake here cannot hide one in the pool.
    assert ZS_SIZE_CLASSES == 255
    assert GEOMETRY[8].huge_class_size == 3625
    assert GEOMETRY[4].huge_class_size == 3257
    g = GEOMETRY[8]
    assert (g.size[0], g.size[254]) == (32, 4096)
    assert (g.ppz[1], g.opz[1]) == (3, 256)          # 48: 12288 / 48
    assert g.ppz[g.class_index(4088)] == 1            # 4096 is a power of 2
    assert g.class_index(1) == 0 and g.class_index(24) == 0
    assert g.class_index(25) == 1                     # 33 bytes -> 48
    assert g.class_index(4096) == 254
    assert fullness_column(1, 127) == 0
    assert fullness_column(126, 127) == 9
    assert fullness_column(127, 127) == 10


# --------------------------------------------------------------------------
# Helpers.

def content(tag, size):
    """Bytes no other tag produces (for size >= 8): tag, then noise."""
    r = random.Random(tag)
    head = tag.to_bytes(8, "little")
    if size <= 8:
        return head[:size]
    return head + r.randbytes(size - 8)


def read_obj(pool, handle, local_copy=None):
    """Read one object through obj_read_begin/end; return (bytes, copied)."""
    if local_copy is None:
        local_copy = bytearray(PAGE_SIZE)
    view = pool.obj_read_begin(handle, local_copy)
    try:
        assert len(view) == pool.obj_size(handle)
        data = bytes(view)
        copied = view.obj is local_copy
    finally:
        pool.obj_read_end(handle, view)
    return data, copied


def rows_by_index(stats):
    return {c.index: c for c in stats.classes}


def check_rows(pool, geom):
    """Per-row identities that hold whatever the pool holds."""
    stats = pool.stats()
    assert isinstance(stats, PoolStats)
    rows = rows_by_index(stats)
    assert sorted(rows) == geom.unmerged
    for i, c in rows.items():
        assert c.size == geom.size[i]
        assert c.pages_per_zspage == geom.ppz[i]
        assert c.objs_per_zspage == geom.opz[i]
        assert len(c.fullness) == NR_FULLNESS_COLUMNS
        zspages = sum(c.fullness)
        assert c.obj_allocated == zspages * geom.opz[i], i
        assert c.pages_used == zspages * geom.ppz[i], i
        assert 0 <= c.obj_used <= c.obj_allocated, i
        assert c.fullness[10] * geom.opz[i] <= c.obj_used, i
        # zs_can_compact()
        assert c.freeable == ((c.obj_allocated - c.obj_used)
                              // geom.opz[i]) * geom.ppz[i], i
    return stats


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.fixture
def pool():
    p = Pool()
    yield p
    p.close()


# --------------------------------------------------------------------------
# (6) Argument checking.

@pytest.mark.parametrize("size", [0, PAGE_SIZE + 1])
def test_malloc_rejects_bad_size(pool, size):
    with pytest.raises(ValueError):
        pool.malloc(size)
    assert pool.total_pages() == 0


@pytest.mark.parametrize("size", [1, PAGE_SIZE])
def test_malloc_accepts_limits(pool, size):
    h = pool.malloc(size)
    assert isinstance(h, int) and h != 0
    assert pool.obj_size(h) == size
    pool.obj_write(h, content(7, size))
    assert read_obj(pool, h)[0] == content(7, size)
    pool.free(h)
    assert pool.total_pages() == 0


@pytest.mark.parametrize("chain", [-1, 0, 1, 3, 17, 32])
def test_chain_size_out_of_range_rejected(chain):
    with pytest.raises((ValueError, ZramdError)):
        Pool(chain_size=chain)


@pytest.mark.parametrize("chain", [4, 5, 8, 16])
def test_chain_size_in_range_accepted(chain):
    p = Pool(chain_size=chain)
    try:
        assert p.huge_class_size == Geometry(chain).huge_class_size
    finally:
        p.close()


def test_default_chain_size_is_8(pool):
    assert pool.huge_class_size == 3625
    assert sorted(rows_by_index(pool.stats())) == GEOMETRY[8].unmerged


# --------------------------------------------------------------------------
# (2) The class table, through stats() and through malloc placement.

@pytest.mark.parametrize("chain", CHAIN_SIZES)
def test_class_table_matches_kernel(chain):
    geom = GEOMETRY[chain]
    p = Pool(chain_size=chain)
    try:
        assert p.huge_class_size == geom.huge_class_size
        stats = check_rows(p, geom)
        for c in stats.classes:
            assert sum(c.fullness) == 0
            assert (c.obj_allocated, c.obj_used, c.pages_used,
                    c.freeable) == (0, 0, 0, 0)
        assert stats.total_pages == 0 and p.total_pages() == 0
        assert stats.pages_compacted == 0
    finally:
        p.close()


@pytest.mark.parametrize("chain", CHAIN_SIZES)
def test_malloc_lands_in_predicted_class(chain):
    geom = GEOMETRY[chain]
    h_size = geom.huge_class_size
    sizes = set()
    for row in geom.unmerged:
        sizes.update(geom.sizes_for_row(row))
    sizes.update([1, 24, 25, h_size - 2, h_size - 1, h_size, h_size + 1,
                  PAGE_SIZE - 1, PAGE_SIZE])
    p = Pool(chain_size=chain)
    try:
        for s in sorted(sizes):
            row = geom.row_for(s)
            h = p.malloc(s)
            assert p.obj_size(h) == s
            rows = rows_by_index(p.stats())
            used = {i: c.obj_used for i, c in rows.items() if c.obj_used}
            assert used == {row: 1}, (s, row, used)
            r = rows[row]
            assert r.obj_allocated == geom.opz[row]
            assert r.pages_used == geom.ppz[row]
            assert p.total_pages() == geom.ppz[row]
            # A lone object: 1/opz is the 10% column, unless it fills it.
            col = fullness_column(1, geom.opz[row])
            assert r.fullness == tuple(int(k == col) for k in range(11))
            # huge_class_size is the first object size that is huge.
            assert geom.is_huge(row) == (s >= h_size), s
            p.free(h)
            assert p.total_pages() == 0
    finally:
        p.close()


# --------------------------------------------------------------------------
# Placement inside a class: the fullest zspage with room, and the fullness
# columns of get_fullness_group().

def test_fullness_groups_and_fullest_first(pool):
    geom = GEOMETRY[8]
    row = geom.row_for(40)              # 48-byte class: 3 frames, 256 objs
    opz = geom.opz[row]
    assert (geom.size[row], geom.ppz[row], opz) == (48, 3, 256)
    # In a fresh pool the fullest zspage with room is the one being filled,
    # so zspage z holds handles[z*opz:(z+1)*opz].
    handles = []
    for n in range(3 * opz):
        h = pool.malloc(40)
        pool.obj_write(h, content(n, 40))
        handles.append(h)
        if n % opz == opz - 1:
            r = rows_by_index(pool.stats())[row]
            assert r.fullness[10] == n // opz + 1
            assert sum(r.fullness) == n // opz + 1
    a, b, c = (handles[z * opz:(z + 1) * opz] for z in range(3))

    def row_now():
        return rows_by_index(check_rows(pool, geom))[row]

    for h in a[:200]:                   # A: 56/256 -> 21% -> "30%"
        pool.free(h)
    pool.free(b[0])                     # B: 255/256 -> 99% -> "99%"
    r = row_now()
    assert r.fullness == (0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 1)
    assert (r.obj_used, r.obj_allocated, r.pages_used) == (
        3 * opz - 201, 3 * opz, 9)
    assert r.freeable == 0              # 201 free < 256
    n1 = pool.malloc(40)                # goes to B, the fullest with room
    pool.obj_write(n1, content(10_000, 40))
    r = row_now()
    assert r.fullness == (0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2)
    for k in range(30):                 # then to A: 86/256 -> 33% -> "40%"
        h = pool.malloc(40)
        pool.obj_write(h, content(20_000 + k, 40))
        a.append(h)
    r = row_now()
    assert r.fullness == (0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 2)
    assert pool.total_pages() == 9
    # Leave one object in A: 1/256 -> "10%".
    for h in a[200:-1]:
        pool.free(h)
    r = row_now()
    assert r.fullness == (1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2)
    pool.free(a[-1])                    # an empty zspage is freed at once
    r = row_now()
    assert r.fullness == (0,) * 10 + (2,)
    assert pool.total_pages() == 6
    for n, h in enumerate(handles):
        if h in b[1:] or h in c:
            assert read_obj(pool, h)[0] == content(n, 40)
    assert read_obj(pool, n1)[0] == content(10_000, 40)


# --------------------------------------------------------------------------
# (3) Objects spanning two frames.

def span_counts(geom, row):
    """For a full zspage of class row holding objects of the largest size
    the class takes (size - 8, so header + data fill the slot): (objects
    whose data crosses a frame boundary, objects whose slot does).  The
    difference would be objects whose header ends at or straddles a
    boundary while the data lies in one frame; the spec would let either
    answer stand.  (With 16-byte class sizes a header never does, so the
    two counts agree and the check is exact.)"""
    size, opz = geom.size[row], geom.opz[row]
    data, slot = 0, 0
    for k in range(opz):
        start = k * size
        end = start + size                  # exclusive
        if start // PAGE_SIZE != (end - 1) // PAGE_SIZE:
            slot += 1
            if (start + ZS_HANDLE_SIZE) // PAGE_SIZE != (end - 1) // PAGE_SIZE:
                data += 1
    return data, slot


@pytest.mark.parametrize("chain", CHAIN_SIZES)
def test_spanning_objects_read_through_local_copy(chain):
    geom = GEOMETRY[chain]
    p = Pool(chain_size=chain)
    local_copy = bytearray(PAGE_SIZE)
    tag = 0
    try:
        for row in geom.unmerged:
            size, opz = geom.size[row], geom.opz[row]
            huge = geom.is_huge(row)
            # Huge objects carry no header: 4096 fits the one huge class.
            obj = PAGE_SIZE if huge else size - ZS_HANDLE_SIZE
            assert geom.row_for(obj) == row
            # Two full zspages of this class, in a fresh class.
            objs = []
            for _ in range(2 * opz):
                h = p.malloc(obj)
                data = content(tag, obj)
                tag += 1
                p.obj_write(h, data)
                objs.append((h, data))
            copied = 0
            for h, data in objs:
                view = p.obj_read_begin(h, local_copy)
                try:
                    assert len(view) == obj == p.obj_size(h)
                    assert bytes(view) == data
                    if view.obj is local_copy:
                        copied += 1
                finally:
                    p.obj_read_end(h, view)
            if huge:
                assert copied == 0, (row, size)
            else:
                lo, hi = span_counts(geom, row)
                assert 2 * lo <= copied <= 2 * hi, (row, size, copied, lo, hi)
            for h, _ in objs:
                p.free(h)
        assert p.total_pages() == 0
    finally:
        p.close()


def test_spanning_geometry_is_exercised():
    # The test above must meet both kinds of object, or it proves nothing.
    g = GEOMETRY[8]
    spans = [span_counts(g, r) for r in g.unmerged if not g.is_huge(r)]
    assert any(lo > 0 for lo, hi in spans)
    assert any(lo == 0 and hi == 0 for lo, hi in spans)
    for chain in CHAIN_SIZES:
        g = GEOMETRY[chain]
        assert all(lo == hi for lo, hi in (
            span_counts(g, r) for r in g.unmerged if not g.is_huge(r)))


@pytest.mark.parametrize("row_size", [48, 80, 208, 1168, 2448, 3632])
def test_spanning_objects_of_every_size_in_class(pool, row_size):
    # Smaller objects in a class that spans: data crossing a boundary must
    # come back through local_copy, data inside one frame by any route,
    # and every byte exact, both in fresh slots and in reused ones.
    geom = GEOMETRY[8]
    row = geom.owner[(row_size - ZS_MIN_ALLOC_SIZE) // ZS_SIZE_CLASS_DELTA]
    assert geom.size[row] == row_size
    lo_size, hi_size = geom.sizes_for_row(row)
    opz = geom.opz[row]
    local_copy = bytearray(PAGE_SIZE + 512)
    rng = random.Random(row_size)
    objs = []
    for n in range(opz):
        s = rng.randint(lo_size, hi_size)
        h = pool.malloc(s)
        pool.obj_write(h, content(n, s))
        objs.append((h, content(n, s)))
    must_copy = may_copy = 0
    for k in range(opz):
        start = k * row_size + ZS_HANDLE_SIZE
        if start // PAGE_SIZE != (start + lo_size - 1) // PAGE_SIZE:
            must_copy += 1
        if start // PAGE_SIZE != (start + hi_size - 1) // PAGE_SIZE:
            may_copy += 1
    copied = 0
    for h, data in objs:
        view = pool.obj_read_begin(h, local_copy)
        try:
            assert bytes(view) == data
            copied += view.obj is local_copy
        finally:
            pool.obj_read_end(h, view)
    assert must_copy <= copied <= may_copy
    # Free every third object and refill with other sizes.
    for h, _ in objs[::3]:
        pool.free(h)
    objs = objs[1::3] + objs[2::3]
    for n in range(opz // 3 + 1):
        s = rng.randint(lo_size, hi_size)
        h = pool.malloc(s)
        pool.obj_write(h, content(50_000 + n, s))
        objs.append((h, content(50_000 + n, s)))
    for h, data in objs:
        assert read_obj(pool, h, local_copy)[0] == data


# --------------------------------------------------------------------------
# (7) Compaction.

@pytest.mark.parametrize("obj_size", [40, 100, 700, 1500, 3000])
def test_compact_frees_fragmented_frames(pool, obj_size):
    geom = GEOMETRY[8]
    row = geom.row_for(obj_size)
    opz, ppz = geom.opz[row], geom.ppz[row]
    zspages = max(6, 600 // opz)
    objs = []
    for n in range(zspages * opz):
        h = pool.malloc(obj_size)
        pool.obj_write(h, content(n, obj_size))
        objs.append((h, content(n, obj_size)))
    assert pool.total_pages() == zspages * ppz
    # Fragment: free two objects of every three, spread over all zspages.
    keep = [o for i, o in enumerate(objs) if i % 3 == 0]
    for i, (h, _) in enumerate(objs):
        if i % 3:
            pool.free(h)
    before = check_rows(pool, geom)
    r = rows_by_index(before)[row]
    assert r.obj_used == len(keep)
    # Zspage z held objects z*opz .. z*opz+opz-1; those left with no
    # survivor were freed at once, the others are all still there.
    nonempty = sum(any(i % 3 == 0 for i in range(z * opz, (z + 1) * opz))
                   for z in range(zspages))
    assert sum(r.fullness) == nonempty
    expected = r.freeable
    assert expected > 0
    assert before.pages_compacted == 0
    pool.audit()
    freed = pool.compact()
    assert freed == expected
    pool.audit()
    after = check_rows(pool, geom)
    r = rows_by_index(after)[row]
    assert after.pages_compacted == before.pages_compacted + freed
    assert pool.total_pages() == before.total_pages - freed
    assert after.total_pages == pool.total_pages()
    assert r.freeable == 0
    assert sum(r.fullness) == -(-len(keep) // opz)
    assert r.obj_used == len(keep)
    for h, data in keep:
        assert read_obj(pool, h)[0] == data
    # Nothing left to do: a second pass frees nothing.
    assert pool.compact() == 0
    assert pool.stats().pages_compacted == freed
    for h, _ in keep:
        pool.free(h)
    assert pool.total_pages() == 0


def test_compact_on_empty_and_tidy_pools(pool):
    assert pool.compact() == 0
    hs = [pool.malloc(500) for _ in range(100)]
    assert pool.compact() == 0          # no class can free a zspage
    for h in hs:
        pool.free(h)
    assert pool.compact() == 0 and pool.total_pages() == 0


def test_compact_waits_for_open_reads(pool):
    # A zero-copy view from obj_read_begin stays valid until obj_read_end:
    # compaction must not move the object (and free its frames) meanwhile.
    geom = GEOMETRY[8]
    objs = []
    for n in range(6 * 256):
        h = pool.malloc(40)
        pool.obj_write(h, content(n, 40))
        objs.append((h, content(n, 40)))
    # Leave one object in the first zspage: the emptiest, so compaction's
    # first source; keep a few in the others.
    target, data = objs[0]
    for i, (h, _) in enumerate(objs):
        if i and (i < 256 or i % 5):
            pool.free(h)
    keep = [o for i, o in enumerate(objs) if i and i >= 256 and i % 5 == 0]
    before = pool.stats()
    r = rows_by_index(before)[geom.row_for(40)]
    assert r.freeable > 0
    # Only this class holds objects, so all there is to free is its.
    assert sum(c.freeable for c in before.classes) == r.freeable
    local_copy = bytearray(PAGE_SIZE)
    view = pool.obj_read_begin(target, local_copy)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("freed",
                                                           pool.compact()))
    try:
        t.start()
        t.join(0.3)
        # Whether compact() is blocked or done, the open view reads true.
        assert bytes(view) == data
    finally:
        pool.obj_read_end(target, view)
    t.join(30)
    assert not t.is_alive(), "compact() still blocked after obj_read_end"
    pool.audit()
    assert read_obj(pool, target)[0] == data
    for h, d in keep:
        assert read_obj(pool, h)[0] == d
    # Whatever the first pass left for want of the reader, a second frees:
    # together exactly what was freeable, no more, no less.
    second = pool.compact()
    after = pool.stats()
    assert result["freed"] + second == r.freeable
    assert after.pages_compacted == r.freeable
    assert after.total_pages == before.total_pages - r.freeable
    assert all(c.freeable == 0 for c in after.classes)


# zs_stats_size_show() in mm/zsmalloc.c, transcribed.
KERNEL_CLASSES_HEADER = (" %5s %5s %9s %9s %9s %9s %9s %9s %9s %9s %9s %9s %9s"
                         " %13s %10s %10s %16s %8s\n")
KERNEL_CLASSES_ROW = (" %5u %5u " + "%9lu " * 11
                      + "%13lu %10lu %10lu %16d %8lu\n")
KERNEL_CLASSES_TOTAL = (" %5s %5s " + "%9lu " * 11
                        + "%13lu %10lu %10lu %16s %8lu\n")


def kernel_fmt(fmt, *args):
    return fmt.replace("%9lu", "%9d").replace("%13lu", "%13d").replace(
        "%10lu", "%10d").replace("%8lu", "%8d").replace("%5u", "%5d") % args


def test_classes_file_text(pool):
    # The debugfs `classes` layout: header, one row per unmerged class,
    # a blank line, the Total row.
    geom = GEOMETRY[8]
    for n in range(3):
        pool.obj_write(pool.malloc(40), content(n, 40))
    pool.obj_write(pool.malloc(4096), content(9, 4096))
    text = str(pool.stats())
    empty = (0,) * 11
    want = [kernel_fmt(KERNEL_CLASSES_HEADER, "class", "size", "10%", "20%",
                       "30%", "40%", "50%", "60%", "70%", "80%", "90%", "99%",
                       "100%", "obj_allocated", "obj_used", "pages_used",
                       "pages_per_zspage", "freeable")]
    for i in geom.unmerged:
        if i == 1:          # 48: 3 of 256 objects in one 3-frame zspage
            row = (i, 48) + (1,) + (0,) * 10 + (256, 3, 3, 3, 0)
        elif i == 254:      # 4096: one huge object, a full zspage
            row = (i, 4096) + (0,) * 10 + (1,) + (1, 1, 1, 1, 0)
        else:
            row = (i, geom.size[i]) + empty + (0, 0, 0, geom.ppz[i], 0)
        want.append(kernel_fmt(KERNEL_CLASSES_ROW, *row))
    want.append("\n")
    want.append(kernel_fmt(KERNEL_CLASSES_TOTAL, *(
        ("Total", "", 1) + (0,) * 9 + (1,) + (257, 4, 4, "", 0))))
    want = "".join(want)
    assert text == want
    # Spot-check the transcription itself against literal kernel text.
    assert want.split("\n")[0].startswith(
        " class  size       10%       20%")
    assert want.split("\n")[0].endswith(
        " obj_allocated   obj_used pages_used pages_per_zspage freeable")
    assert want.split("\n")[2] == (
        "     1    48         1         0         0         0         0"
        "         0         0         0         0         0         0 "
        "          256          3          3                3        0")


# --------------------------------------------------------------------------
# Deferred free.

def test_deferred_handles_not_reused_before_freed(pool):
    geom = GEOMETRY[8]
    old = []
    for n in range(2000):
        h = pool.malloc(200)
        pool.obj_write(h, content(n, 200))
        old.append(h)
    for h in old:
        pool.free_deferred(h)
    new = {}
    for n in range(2000):
        h = pool.malloc(200)
        assert h != 0 and h not in new
        pool.obj_write(h, content(100_000 + n, 200))
        new[h] = content(100_000 + n, 200)
    pool.free_deferred_flush()
    for h, data in new.items():
        assert read_obj(pool, h)[0] == data
    r = rows_by_index(check_rows(pool, geom))[geom.row_for(200)]
    assert r.obj_used == 2000
    for h in new:
        pool.free(h)
    assert pool.total_pages() == 0


def test_deferred_flush_keeps_the_rest_after_a_bad_handle(pool):
    # A handle queued twice (a caller's double free) fails in the flush;
    # the handles after it stay queued instead of leaking.
    pool.hold_worker()              # no drain worker: the flush does it all
    a, b, c = pool.malloc(100), pool.malloc(200), pool.malloc(300)
    for h in (a, a, b, c):
        pool.free_deferred(h)
    with pytest.raises(ValueError, match="is not allocated"):
        pool.free_deferred_flush()
    assert pool.deferred_pending() == 2
    assert sum(cls.obj_used for cls in pool.stats().classes) == 2
    pool.free_deferred_flush()
    assert pool.deferred_pending() == 0
    assert pool.total_pages() == 0


def test_deferred_queue_overflow_falls_back(pool):
    # More than the 32768-handle queue holds: the excess is freed at once.
    hs = array.array("Q")
    for _ in range(40_000):
        hs.append(pool.malloc(16))
    assert pool.total_pages() > 0
    for h in hs:
        pool.free_deferred(h)
    pool.free_deferred_flush()
    assert pool.total_pages() == 0
    assert sum(c.obj_used for c in pool.stats().classes) == 0


def test_deferred_worker_drains_when_idle(pool):
    hs = [pool.malloc(1000) for _ in range(50)]
    for h in hs:
        pool.free_deferred(h)
    # Bounded poll: the worker drains when it finds the queue idle; a
    # worker that never runs fails here, saying so, not by hanging.
    deadline = time.monotonic() + 10
    while pool.total_pages() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.total_pages() == 0, (
        "drain worker never ran: %d frames still held 10 s after 50 "
        "deferred frees" % pool.total_pages())


def test_deferred_capacity_zero_frees_at_once(pool):
    pool.hold_worker()
    pool.set_deferred_capacity(0)
    hs = [pool.malloc(500) for _ in range(20)]
    for h in hs:
        pool.free_deferred(h)
    assert pool.deferred_pending() == 0
    assert pool.total_pages() == 0
    pool.set_deferred_capacity(4)
    hs = [pool.malloc(500) for _ in range(6)]
    for h in hs:
        pool.free_deferred(h)
    assert pool.deferred_pending() == 4     # the other two freed at once
    pool.free_deferred_flush()
    assert pool.total_pages() == 0
    for bad in (-1, DEFERRED_CAPACITY + 1):
        with pytest.raises(ValueError, match="deferred capacity"):
            pool.set_deferred_capacity(bad)


def test_deferred_worker_runs_in_a_forked_child(pool):
    # The parent's worker does not survive a fork; the child's first
    # queued handle starts one of its own, which drains without a flush.
    pool.start_worker()
    keep = [pool.malloc(700) for _ in range(30)]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for h in keep:
                pool.free_deferred(h)
            deadline = time.monotonic() + 10
            while pool.total_pages() and time.monotonic() < deadline:
                time.sleep(0.02)
            code = 0 if pool.total_pages() == 0 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, (
        "the child's deferred frees were not drained (exit %d)"
        % os.waitstatus_to_exitcode(status))
    assert pool.total_pages() > 0            # the parent's are its own
    for h in keep:
        pool.free(h)


def vm_size():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize in /proc/self/status")


def test_close_flushes_and_returns_frames():
    # close() with deferred frees queued and an object still live: the
    # queue is flushed, every frame goes back and the frames' chunks are
    # unmapped (the address space shrinks by at least one 32 MiB chunk).
    p = Pool()
    for _ in range(100):
        p.free_deferred(p.malloc(300))
    keep = p.malloc(300)
    p.obj_write(keep, content(1, 300))
    assert p.total_pages() > 0
    mapped = vm_size()
    p.close()                           # must not hang or raise
    assert p.closed and p.deferred_pending() == 0
    assert mapped - vm_size() >= 32 << 20
    with pytest.raises(ValueError, match="closed"):
        p.total_pages()


# --------------------------------------------------------------------------
# (4) RSS returns to where it started.

RSS_STORE = 256 << 20
# Measured 0.8-1.4 MiB with the layout of flat columns (it was 6-13 MiB with
# a Python object per zspage and one handle table for the pool).
RSS_SLACK = 4 << 20
# kind -> (bytes stored, smallest and largest object size, deferred free).
# "small" stores half a million objects: the handle and zspage tables
# grow large, and must shrink with the pool.
RSS_KINDS = {
    "free": (RSS_STORE, 1024, PAGE_SIZE, False),
    "deferred": (RSS_STORE, 1024, PAGE_SIZE, True),
    "small": (64 << 20, 16, 256, True),
}


def _fill_and_free(p, kind):
    store, lo, hi, deferred = RSS_KINDS[kind]
    rng = random.Random(4)
    sizes = [rng.randint(lo, hi) for _ in range(64)]
    blobs = [content(i, s) for i, s in enumerate(sizes)]
    hs = array.array("Q")
    kinds = array.array("H")
    stored = 0
    i = 0
    while stored < store:
        k = i % len(blobs)
        h = p.malloc(sizes[k])
        p.obj_write(h, blobs[k])
        hs.append(h)
        kinds.append(k)
        stored += sizes[k]
        i += 1
    for j in range(0, len(hs), 997):
        assert read_obj(p, hs[j])[0] == blobs[kinds[j]]
    peak = p.total_pages() * PAGE_SIZE
    assert peak >= store
    grown = rss_bytes()
    for h in hs:
        if deferred:
            p.free_deferred(h)
        else:
            p.free(h)
    if deferred:
        p.free_deferred_flush()
    return peak, grown


RSS_CHILD = """
import json, sys
sys.path[:0] = [%r, %r]
import test_zsmalloc as T
from zramd.zsmalloc import Pool
kind = sys.argv[1]
p = Pool()
# Warm the pool's lazily built parts (the drain worker too) first.
p.free(p.malloc(100))
p.free_deferred(p.malloc(100))
p.free_deferred_flush()
start = T.rss_bytes()
peak, grown = T._fill_and_free(p, kind)
out = dict(start=start, grown=grown, peak=peak, end=T.rss_bytes(),
           pages=p.total_pages(),
           used=sum(c.obj_used for c in p.stats().classes))
p.close()
out["closed"] = T.rss_bytes()
print(json.dumps(out))
"""


@pytest.mark.parametrize("kind", sorted(RSS_KINDS))
def test_rss_returns_after_free(kind):
    # In a fresh interpreter, so that what earlier tests left in the heap
    # cannot move the numbers either way.
    here = os.path.dirname(os.path.abspath(__file__))
    child = RSS_CHILD % (here, os.path.dirname(here))
    proc = subprocess.run(
        [sys.executable, "-c", child, kind],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["grown"] - r["start"] >= RSS_KINDS[kind][0] // 2, (
        "frames never touched")
    assert (r["pages"], r["used"]) == (0, 0)
    assert r["end"] - r["start"] <= RSS_SLACK, (
        "RSS %.1f MiB -> %.1f MiB (pool peak %.1f MiB) -> %.1f MiB after "
        "free (%.1f MiB after close)" % tuple(
            r[k] / 2**20 for k in ("start", "grown", "peak", "end",
                                   "closed")))
    # close() unmaps the arena: RSS stays down (it may only drop further).
    assert r["closed"] - r["start"] <= RSS_SLACK, (
        "RSS %.1f MiB at start, %.1f MiB after close" % (
            r["start"] / 2**20, r["closed"] / 2**20))


# --------------------------------------------------------------------------
# The metadata follows the pool down (flat columns per class, see
# zramd/csrc/zsmalloc.c), which is what lets RSS come back.

EMPTY_SIZES = (20, 40, 700, 2000, 3000, PAGE_SIZE)


def _fill_and_empty(pool):
    hs = [pool.malloc(s) for s in EMPTY_SIZES for _ in range(3000)]
    pool.audit()
    for h in hs[::2]:
        pool.free_deferred(h)
    for h in hs[1::2]:
        pool.free(h)
    pool.free_deferred_flush()
    pool.audit()


def test_empty_class_drops_its_columns():
    # After a big free a class keeps no column at its high-water size:
    # zspage and handle columns are fresh and empty, whatever was stored
    # (the model's columns are Python arrays, to be looked at).
    pool = zsmalloc_model.Pool()
    try:
        _fill_and_empty(pool)
        for cls in pool.classes:
            assert (len(cls.inuse), len(cls.frames), len(cls.free_ids)) == (
                0, 0, 0), cls.index
            assert (len(cls.sizes), len(cls.free_handles)) == (1, 0), \
                cls.index
            assert cls.heads.tolist() == [-1] * 12 and cls.nonempty == 0
    finally:
        pool.close()


def test_empty_class_starts_again(pool):
    # The C pool's handle tables are dropped with the last zspage of a
    # class: every class used starts its rows from 1 again.
    _fill_and_empty(pool)
    assert pool.total_pages() == 0
    for size in EMPTY_SIZES:
        h = pool.malloc(size)
        assert h >> 8 == 1 and pool.obj_size(h) == size
        pool.free(h)


def _live_zspage(cls):
    return next(z for z in range(len(cls.inuse)) if cls.group[z] < 12)


def _live_row(cls):
    return next(r for r in range(1, len(cls.sizes)) if cls.sizes[r])


# One planted fault each in the model: (class of 40-byte objects, huge
# class).  The C pool plants the same ones itself (_plant_fault).
DAMAGE = {
    "counts": lambda c, hc: c.counts.__setitem__(
        c.group[_live_zspage(c)], c.counts[c.group[_live_zspage(c)]] + 1),
    "id both free and live": lambda c, hc: c.free_ids.append(
        _live_zspage(c)),
    "inuse against group": lambda c, hc: c.inuse.__setitem__(
        _live_zspage(c), c.inuse[_live_zspage(c)] + 1),
    "list link": lambda c, hc: c.prev.__setitem__(
        c.heads[c.group[_live_zspage(c)]], _live_zspage(c)),
    "row free twice": lambda c, hc: c.free_handles.append(
        c.free_handles[0]),
    "loc not pointing back": lambda c, hc: c.loc.__setitem__(
        _live_row(c), c.loc[_live_row(c)] ^ 1),
    "free list": lambda c, hc: c.freeobj.__setitem__(
        _live_zspage(c), c.unused[_live_zspage(c)]),
    "frame in two zspages": lambda c, hc: hc.frames.__setitem__(
        1, hc.frames[0]),
}


@pytest.mark.parametrize("impl", ["c", "model"])
@pytest.mark.parametrize("what", sorted(DAMAGE))
def test_audit_catches_damage(what, impl):
    # audit() must not be vacuous: each planted fault is reported.
    p = Pool() if impl == "c" else zsmalloc_model.Pool()
    try:
        hs = [p.malloc(40) for _ in range(600)]
        hs += [p.malloc(PAGE_SIZE) for _ in range(3)]
        for h in hs[:300:3]:
            p.free(h)
        p.audit()                       # sound before the damage
        if impl == "c":
            size = PAGE_SIZE if what == "frame in two zspages" else 40
            p._plant_fault(size, what)
        else:
            by_index = {c.index: c for c in p.classes}
            cls = by_index[GEOMETRY[8].row_for(40)]
            huge = by_index[GEOMETRY[8].row_for(PAGE_SIZE)]
            assert cls.free_handles and len(huge.inuse) == 3
            DAMAGE[what](cls, huge)
        with pytest.raises(AssertionError):
            p.audit()
    finally:
        p.close()


# --------------------------------------------------------------------------
# (5) Threads.

def test_threads_with_compaction():
    p = Pool()
    errors = []
    done = threading.Event()
    live_counts = {}
    n_workers = 4

    def worker(wid):
        try:
            rng = random.Random(wid)
            mine = {}
            local = bytearray(PAGE_SIZE)
            tag = wid << 40
            for step in range(10000):
                op = rng.random()
                if op < 0.45 or not mine:
                    # Mostly a few shared classes, to make threads meet.
                    s = rng.choice((40, 41, 700, 3000, rng.randint(1, 200),
                                    rng.randint(1, 4096)))
                    h = p.malloc(s)
                    if h in mine:
                        raise AssertionError("handle %d handed out twice" % h)
                    tag += 1
                    mine[h] = content(tag, s)
                    p.obj_write(h, mine[h])
                elif op < 0.7:
                    h = rng.choice(list(mine))
                    got, _ = read_obj(p, h, local)
                    if got != mine[h]:
                        raise AssertionError("worker %d: handle %d corrupt"
                                             % (wid, h))
                elif op < 0.85:
                    h = rng.choice(list(mine))
                    del mine[h]
                    p.free(h)
                else:
                    h = rng.choice(list(mine))
                    del mine[h]
                    p.free_deferred(h)
                if step % 500 == 0:
                    for h, data in mine.items():
                        if read_obj(p, h, local)[0] != data:
                            raise AssertionError("worker %d: handle %d corrupt"
                                                 % (wid, h))
            for h, data in mine.items():
                if read_obj(p, h, local)[0] != data:
                    raise AssertionError("worker %d: handle %d corrupt at end"
                                         % (wid, h))
            live_counts[wid] = mine
        except BaseException as e:          # noqa: B902 -- report any
            errors.append((wid, e))

    compacted = []

    def compactor():
        # The only caller of compact(): pages_compacted moves by exactly
        # what each pass returns, however the workers interleave.
        try:
            while not done.is_set():
                before = p.stats().pages_compacted
                freed = p.compact()
                compacted.append(freed)
                assert p.stats().pages_compacted == before + freed
                time.sleep(0.002)
        except BaseException as e:          # noqa: B902
            errors.append(("compactor", e))

    threads = [threading.Thread(target=worker, args=(w,))
               for w in range(n_workers)]
    comp = threading.Thread(target=compactor)
    try:
        race(threads, comp, done)
        assert not errors, errors
        assert len(live_counts) == n_workers
        p.free_deferred_flush()
        p.audit()
        stats = check_rows(p, GEOMETRY[8])
        live = {h: d for m in live_counts.values() for h, d in m.items()}
        assert len(live) == sum(len(m) for m in live_counts.values())
        assert sum(c.obj_used for c in stats.classes) == len(live)
        assert stats.total_pages == p.total_pages() == sum(
            c.pages_used for c in stats.classes)
        assert compacted and stats.pages_compacted == sum(compacted)
        for h, data in live.items():
            assert read_obj(p, h)[0] == data
        for h in live:
            p.free(h)
        assert p.total_pages() == 0
        p.audit()
    finally:
        p.close()


# --------------------------------------------------------------------------
# (1) The state machine against a dict model.

SIZES = st.one_of(
    st.integers(1, PAGE_SIZE),
    st.integers(1, 64),
    st.sampled_from([24, 25, 3624, 3625, 3256, 3257, 3832, 3833,
                     PAGE_SIZE - 8, PAGE_SIZE]),
)


def no_drain_worker(pool):
    """Keep ``pool`` from starting its drain worker: deferred frees then
    wait for a flush, so two pools given the same calls stay in step."""
    pool.hold_worker()


class PoolMachine(RuleBasedStateMachine):
    """Model: live handle -> bytes; pending = handles given to
    free_deferred since the last flush (not freed yet: there is no drain
    worker).  Every call goes to the C pool and to zsmalloc_model.Pool,
    and both must give the same answers and the same stats."""

    def __init__(self):
        super().__init__()
        self.pool = None
        self.model = None
        self.live = {}
        self.pending = set()
        self.tag = 0
        self.local = bytearray(PAGE_SIZE)
        self.model_local = bytearray(PAGE_SIZE)
        self.compacted = 0

    @initialize(chain=st.sampled_from(CHAIN_SIZES))
    def start(self, chain):
        self.geom = GEOMETRY[chain]
        self.pool = Pool(chain_size=chain)
        self.model = zsmalloc_model.Pool(chain_size=chain)
        no_drain_worker(self.pool)
        no_drain_worker(self.model)

    def teardown(self):
        for p in (self.pool, self.model):
            if p is not None:
                p.close()

    def _store(self, h, size):
        self.tag += 1
        data = content(self.tag, size)
        self.pool.obj_write(h, data)
        self.model.obj_write(h, data)
        self.live[h] = data

    @rule(size=SIZES)
    def malloc(self, size):
        h = self.pool.malloc(size)
        assert isinstance(h, int) and h != 0
        assert h == self.model.malloc(size), "handle differs from model's"
        assert h not in self.live, "handle %d is live already" % h
        # A pending handle comes back only once it has really been freed.
        assert h not in self.pending
        assert self.pool.obj_size(h) == size == self.model.obj_size(h)
        self._store(h, size)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def rewrite(self, data):
        h = data.draw(st.sampled_from(sorted(self.live)))
        self._store(h, len(self.live[h]))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def read(self, data):
        h = data.draw(st.sampled_from(sorted(self.live)))
        got = read_obj(self.pool, h, self.local)
        assert got[0] == self.live[h]
        # The same objects span two frames in both.
        assert got == read_obj(self.model, h, self.model_local)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        h = data.draw(st.sampled_from(sorted(self.live)))
        del self.live[h]
        self.pool.free(h)
        self.model.free(h)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free_deferred(self, data):
        h = data.draw(st.sampled_from(sorted(self.live)))
        del self.live[h]
        self.pending.add(h)
        self.pool.free_deferred(h)
        self.model.free_deferred(h)
        assert self.pool.deferred_pending() == self.model.deferred_pending()

    @rule()
    def flush(self):
        self.pool.free_deferred_flush()
        self.model.free_deferred_flush()
        self.pending.clear()
        self._check_counts(exact=True)

    @rule()
    def compact(self):
        exact = not self.pending
        before = self.pool.stats()
        freed = self.pool.compact()
        assert freed == self.model.compact()
        after = self.pool.stats()
        assert after.pages_compacted == before.pages_compacted + freed
        assert 0 <= freed <= before.total_pages - after.total_pages
        self.compacted += freed
        if exact:
            assert freed == sum(c.freeable for c in before.classes)
            assert all(c.freeable == 0 for c in after.classes)
            assert after.total_pages == before.total_pages - freed

    def _check_counts(self, exact):
        stats = check_rows(self.pool, self.geom)
        assert stats.pages_compacted == self.compacted
        used = sum(c.obj_used for c in stats.classes)
        if exact:
            want = Counter(self.geom.row_for(len(d))
                           for d in self.live.values())
            got = Counter({c.index: c.obj_used for c in stats.classes
                           if c.obj_used})
            assert got == want
            assert stats.total_pages == self.pool.total_pages() == sum(
                c.pages_used for c in stats.classes)
        else:
            assert len(self.live) <= used <= len(self.live) + len(
                self.pending)

    @invariant()
    def contents_exact(self):
        if self.pool is None:
            return
        # Distinct content in every object: overlap would corrupt one.
        for h, data in self.live.items():
            assert self.pool.obj_size(h) == len(data)
            got, _ = read_obj(self.pool, h, self.local)
            assert got == data, "handle %d corrupt" % h

    @invariant()
    def counts(self):
        if self.pool is None:
            return
        self._check_counts(exact=not self.pending)

    @invariant()
    def same_stats_as_model(self):
        if self.pool is None:
            return
        # Every column of every class row, pages_compacted, total_pages.
        assert self.pool.stats() == self.model.stats()
        assert self.pool.total_pages() == self.model.total_pages()
        assert self.pool.huge_class_size == self.model.huge_class_size

    @invariant()
    def metadata_consistent(self):
        if self.pool is None:
            return
        self.pool.audit()
        self.model.audit()


PoolMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow,
                           HealthCheck.filter_too_much])
TestPoolMachine = PoolMachine.TestCase
