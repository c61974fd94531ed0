"""The model of the pool: zramd's zsmalloc in Python, the oracle
tests/test_zsmalloc.py checks the C pool (zramd/csrc/zsmalloc.c) against.

It is the pool zramd had before the pool became C, kept here, not in the
product: the same algorithms on the same geometry, so that the same calls
give the same handles, the same stats and the same compactions.  Its
frames are Python mmap chunks (``Arena`` below), its locks threading
locks.  What follows is its data structure, which the C pool shares.

Size classes
    255 classes from 32 to 4096 bytes in steps of 16 (PAGE_SIZE >> 8).  The
    size that picks a class includes an 8-byte handle header, as zs_malloc
    does (``size += ZS_HANDLE_SIZE``).  Each class packs its objects into
    *zspages*: chains of 1..chain_size frames, as many as waste least
    (calculate_zspage_chain_size).  Neighbouring classes whose zspages hold
    the same number of objects on the same number of frames are merged
    (can_merge).  A class of one object per one-frame zspage is *huge*; its
    objects carry no header (the handle is kept in the zspage's metadata).

Zspages and objects
    A zspage is a list of frame numbers that need not be contiguous.  Object
    ``k`` starts at byte ``k * class_size`` of the chain, so it may span two
    frames::

        frame 7 (4096 B)                     frame 3 (4096 B)
        +--------+--------+-----+------------+-----------+--------+---
        | obj 0  | obj 1  | ... | obj 4 ...  |... obj 4  | obj 5  |
        +--------+--------+-----+------------+-----------+--------+---
        ^hdr|data                ^hdr|data -> continues in frame 3

    The 8-byte header of an allocated object holds ``handle << 1 | 1``; a
    freed object holds the link ``(next + 1) << 1`` of the zspage's free
    list (tag bit clear).  Object indices at or above the zspage's
    ``unused`` were never handed out, so a new zspage needs no
    initialisation.  Headers start on 16-byte boundaries and never
    straddle frames.  Frame ``f`` is read through the arena's chunk views:
    ``arena.views[f >> CHUNK_SHIFT]`` at byte ``(f & CHUNK_MASK) << 12``,
    sliced in place, never copied unless an object spans two frames.

Zspage metadata: columns, not objects
    There is no Python object per zspage, as there is none per stored
    object: a Python object per zspage would be made while the pool grows
    and freed when it shrinks, and the few that outlive a big free pin the
    interpreter's heap arenas (1 MiB each) that the rest left empty.
    Instead each size class numbers its zspages 0, 1, 2, ... and keeps
    their metadata in flat ``array`` columns indexed by that id; class 28
    (480 bytes, 17 objects on 2 frames, chain_size 8) might hold::

        zspage id z        0        1        2        3
        inuse              7        -       17        8    objects allocated
        unused             9        -       17       10    never used from here
        freeobj            3        -       -1        2    free list head
        group              5     FREE       11        5    fullness group
        prev, next     -1, 3        -   -1, -1    0, -1    group list links
        frames          7  3     -  -    9 12     1  2     2 per id

        heads[5] = 0 (the list 0 <-> 3), heads[11] = 2, free_ids = [1]

    ``freeobj`` is -1 when the free list is empty.  ``frames`` has a fixed
    stride of pages_per_zspage entries per id; huge classes add a
    ``handle`` column for their headerless objects.  Released ids go on
    the class's ``free_ids`` stack (group FREE) and are reused first.  When a class's last zspage goes, its columns are replaced by
    empty ones, so the memory they grew to goes back to the C allocator
    (and from there to the OS: arrays past 512 bytes live in glibc's heap
    or its own mmaps, not in the interpreter's arenas, and the arena's
    malloc_trim returns the heap's free pages).  A class that keeps a
    single object keeps its columns at their high-water length, about
    15 + 4 * pages_per_zspage bytes per zspage id and 14 per handle row.

Handles
    A handle is ``h << 8 | class index``: its low byte names the size class
    (the unmerged index, as in the classes table), and ``h`` (from 1) is a
    row of that class's handle columns: ``loc[h]`` = zspage id << 12 |
    object index, and ``sizes[h]`` = the size the caller asked for (0 when
    free).  The indirection lets compaction move an object by rewriting
    ``loc[h]``.  Freed rows are recycled from the class's ``free_handles``
    stack, and the handle columns are dropped with the zspage columns when
    the class empties, so the handle table too follows the pool down.

Fullness groups
    Each class keeps its zspages in 12 groups by use, as get_fullness_group:
    0 (empty), 10%..90% and 99% (1..10), 100% (11).  A group is an intrusive
    doubly linked list through the ``prev``/``next`` columns, headed by
    ``heads[group]`` (-1 when empty), as the kernel's fullness_list; a
    zspage joins at the head (list_add), ``counts[group]`` counts the list
    for stats, and bit ``group`` of ``nonempty`` says the list has members.
    malloc takes the head of the fullest group with room (the highest bit
    of ``nonempty`` below 100%); compaction moves objects from the emptiest
    zspages into the fullest and frees what it empties.  A zspage taken
    off its list by compaction is ISOLATED until it is put back.

Locking
    Lock order: ``_compact_lock`` or ``_drain_lock``, then one class lock
    (``audit`` alone takes them all, by class index), then the arena's
    lock or the queue's ``_dq_lock``.
    - ``SizeClass.lock`` guards everything of the class that changes: its
      zspage and handle columns, fullness lists, free lists and counters.
      There is no pool-wide lock on malloc, free, read or write: a handle
      names its class, so they take that class's lock and no other (and
      the arena's when a zspage is made; freed frames go to the arena
      after the class lock is dropped).
    - Readers (``obj_read_begin`` .. ``obj_read_end``) register in
      ``SizeClass.readers`` under the class lock and may then use a
      zero-copy view of a frame without the lock; compaction sets
      ``compacting`` and waits on the class's condition until there are
      none before it moves anything (only then does ``obj_read_end``
      notify).
    - ``_compact_lock`` makes compactions take turns; ``_drain_lock``
      makes drains of the deferred-free queue take turns.
    - The deferred-free queue has its own lock, only ever try-locked by
      ``free_deferred`` and held by nothing else while it frees.

Deferred free
    The queue without the C pool's drain worker: a queued handle waits for
    ``free_deferred_flush`` (tests hold the C pool's worker, so both stay
    in step); past DEFERRED_CAPACITY, or when the queue is busy, a handle
    is freed at once.
"""

import ctypes
import ctypes.util
import errno
import mmap
import os
import struct
import threading
from array import array

from zramd._fastpath import (
    CHUNK_FRAMES, CHUNK_MASK, CHUNK_SHIFT, TRIM_FRAMES,
    CHAIN_SIZE_DEFAULT, CHAIN_SIZE_MAX, CHAIN_SIZE_MIN, DEFERRED_CAPACITY,
    HANDLE_CLASS_BITS, HANDLE_CLASS_MASK, NR_FULLNESS_GROUPS,
    OBJ_ALLOCATED_TAG, OBJ_INDEX_BITS, OBJ_INDEX_MASK, PAGE_MASK, PAGE_SHIFT,
    PAGE_SIZE, ZS_FREE, ZS_HANDLE_SIZE, ZS_INUSE_RATIO_0, ZS_INUSE_RATIO_10,
    ZS_INUSE_RATIO_99, ZS_INUSE_RATIO_100, ZS_ISOLATED, ZS_MAX_ALLOC_SIZE,
    ZS_MIN_ALLOC_SIZE, ZS_SIZE_CLASS_DELTA, ZS_SIZE_CLASSES)
from zramd.stats import ClassStat, PoolStats

CHUNK_BYTES = CHUNK_FRAMES * PAGE_SIZE

_header = struct.Struct("<Q")
_unpack_header = _header.unpack_from


def chain_size_for(class_size, chain_size):
    """Frames per zspage for ``class_size`` (calculate_zspage_chain_size):
    the count in 1..chain_size that wastes least, first minimum wins;
    powers of two use one frame."""
    if class_size & (class_size - 1) == 0:
        return 1
    best, min_waste = 1, None
    for i in range(1, chain_size + 1):
        waste = (i * PAGE_SIZE) % class_size
        if min_waste is None or waste < min_waste:
            best, min_waste = i, waste
    return best


def class_index(size):
    """Class index for an allocation of ``size`` bytes *including* the
    handle header (get_size_class_index)."""
    idx = 0
    if size > ZS_MIN_ALLOC_SIZE:
        idx = -(-(size - ZS_MIN_ALLOC_SIZE) // ZS_SIZE_CLASS_DELTA)
    return min(ZS_SIZE_CLASSES - 1, idx)


def _check(ok, what, *args):
    """Raise AssertionError(what % args) unless ``ok`` (survives -O)."""
    if not ok:
        raise AssertionError(what % args)


class SizeClass:
    """One size class: its geometry, its zspage columns and fullness lists,
    its counters.  Every field but the constants is guarded by ``lock``;
    see the module docstring for the columns."""

    __slots__ = ("index", "size", "pages_per_zspage", "objs_per_zspage",
                 "huge", "header", "fullness", "lock", "no_readers",
                 "readers", "compacting", "obj_allocated", "obj_used",
                 "heads", "counts", "nonempty", "inuse", "unused",
                 "freeobj", "group", "prev", "next", "frames", "handle",
                 "free_ids", "loc", "sizes", "free_handles")

    def __init__(self, index, size, pages_per_zspage, objs_per_zspage):
        self.index = index
        self.size = size
        self.pages_per_zspage = pages_per_zspage
        self.objs_per_zspage = objs_per_zspage
        self.huge = pages_per_zspage == 1 and objs_per_zspage == 1
        self.header = 0 if self.huge else ZS_HANDLE_SIZE
        # fullness[inuse] = get_fullness_group(), one byte per count.
        self.fullness = bytes(self.fullness_of(n)
                              for n in range(objs_per_zspage + 1))
        self.lock = threading.Lock()
        self.no_readers = threading.Condition(self.lock)
        self.readers = 0
        self.compacting = False      # compaction waits on no_readers
        self.clear()

    def clear(self):
        """Forget every zspage and handle: fresh, empty columns and lists
        (lock held, and no handle of the class live).  The old columns'
        memory goes back to the C allocator, however large they grew."""
        self.obj_allocated = 0
        self.obj_used = 0
        self.heads = array("i", [-1]) * NR_FULLNESS_GROUPS
        self.counts = array("I", [0]) * NR_FULLNESS_GROUPS
        self.nonempty = 0            # bit g: group g's list has members
        self.inuse = array("H")
        self.unused = array("H")
        self.freeobj = array("h")
        self.group = array("B")
        self.prev = array("i")
        self.next = array("i")
        self.frames = array("I")     # pages_per_zspage entries per id
        self.handle = array("Q")     # huge classes only: the one handle
        self.free_ids = array("I")
        # Handle columns; row 0 is never handed out.
        self.loc = array("Q", [0])
        self.sizes = array("H", [0])
        self.free_handles = array("I")

    def fullness_of(self, inuse):
        """get_fullness_group()."""
        if inuse == 0:
            return ZS_INUSE_RATIO_0
        if inuse == self.objs_per_zspage:
            return ZS_INUSE_RATIO_100
        return (100 * inuse // self.objs_per_zspage) // 10 + 1

    def freeable(self):
        """zs_can_compact(): frames compaction could give back."""
        wasted = self.obj_allocated - self.obj_used
        if wasted <= 0:
            return 0
        return wasted // self.objs_per_zspage * self.pages_per_zspage

    # ---- fullness lists (lock held) ------------------------------------

    def link(self, z, g):
        """Put zspage ``z`` (on no list) at the head of group ``g``."""
        head = self.heads[g]
        self.prev[z] = -1
        self.next[z] = head
        if head >= 0:
            self.prev[head] = z
        else:
            self.nonempty |= 1 << g
        self.heads[g] = z
        self.group[z] = g
        self.counts[g] += 1

    def unlink(self, z):
        """Take zspage ``z`` off its group's list; it is ISOLATED after."""
        g = self.group[z]
        p, n = self.prev[z], self.next[z]
        if p >= 0:
            self.next[p] = n
        else:
            self.heads[g] = n
            if n < 0:
                self.nonempty &= ~(1 << g)
        if n >= 0:
            self.prev[n] = p
        self.counts[g] -= 1
        self.group[z] = ZS_ISOLATED

    def move(self, z, g):
        """Move zspage ``z`` from its group's list to group ``g``'s."""
        self.unlink(z)
        self.link(z, g)

    def isolate(self, order):
        """Unlink and return the head of the first non-empty group in
        ``order``, or -1."""
        heads = self.heads
        for g in order:
            z = heads[g]
            if z >= 0:
                self.unlink(z)
                return z
        return -1


class Pool:
    """A zsmalloc pool.  See the module docstring for the data structure.

    Contract: handles are non-zero ints, valid from ``malloc`` until
    ``free``/``free_deferred``; the caller serialises use of one handle
    (zram's slot lock does).  Sizes and offsets are bytes.
    """

    def __init__(self, chain_size=CHAIN_SIZE_DEFAULT):
        if not (isinstance(chain_size, int)
                and CHAIN_SIZE_MIN <= chain_size <= CHAIN_SIZE_MAX):
            raise ValueError("chain_size: %r; accepted: %d..%d"
                             % (chain_size, CHAIN_SIZE_MIN, CHAIN_SIZE_MAX))
        self.chain_size = chain_size
        self._arena = Arena()
        # The arena's list of chunk views: it only grows while the arena
        # lives, so one reference serves every frame lookup.
        self._views = self._arena.views
        self._build_classes()
        self._compact_lock = threading.Lock()
        self.pages_compacted = 0
        self._dq = array("Q")        # the deferred-free queue
        self._dq_lock = threading.Lock()
        self._drain_lock = threading.Lock()

    # ---- class table -------------------------------------------------

    def _build_classes(self):
        """zs_create_pool(): classes from the largest down, merging equal
        geometries and finding huge_class_size on the way."""
        by_index = [None] * ZS_SIZE_CLASSES
        prev = None
        huge_class_size = 0
        for i in range(ZS_SIZE_CLASSES - 1, -1, -1):
            size = min(ZS_MIN_ALLOC_SIZE + i * ZS_SIZE_CLASS_DELTA,
                       ZS_MAX_ALLOC_SIZE)
            pages = chain_size_for(size, self.chain_size)
            objs = pages * PAGE_SIZE // size
            if pages != 1 and objs != 1 and not huge_class_size:
                huge_class_size = size - (ZS_HANDLE_SIZE - 1)
            if prev is not None and (prev.pages_per_zspage == pages
                                     and prev.objs_per_zspage == objs):
                by_index[i] = prev
                continue
            prev = by_index[i] = SizeClass(i, size, pages, objs)
        self.classes = sorted(set(by_index), key=lambda c: c.index)
        # Handle's low byte -> class; a merged index names no class, and
        # the stand-in's empty handle columns make such handles invalid.
        no_class = SizeClass(0, ZS_MIN_ALLOC_SIZE, 1, 1)
        self._handle_class = [no_class] * (HANDLE_CLASS_MASK + 1)
        for cls in self.classes:
            self._handle_class[cls.index] = cls
        self.huge_class_size = huge_class_size
        # Object size (without header) -> class, for 1..4096.
        self._class_for = [None] + [
            by_index[class_index(s + ZS_HANDLE_SIZE)]
            for s in range(1, ZS_MAX_ALLOC_SIZE + 1)]

    # ---- handles and zspages -----------------------------------------

    @staticmethod
    def _new_row(cls):
        """A new handle row at the end of ``cls``'s handle columns (class
        lock held; the free stack is empty)."""
        cls.loc.append(0)
        cls.sizes.append(0)
        return len(cls.sizes) - 1

    def _class_row(self, handle, op):
        """(class, row) of ``handle``; raises ValueError unless it is
        allocated.  Unlocked: a live handle's class keeps its columns."""
        cls = self._handle_class[handle & HANDLE_CLASS_MASK]
        row = handle >> HANDLE_CLASS_BITS
        sizes = cls.sizes
        if not 0 < row < len(sizes) or not sizes[row]:
            raise ValueError("%s: handle %r is not allocated" % (op, handle))
        return cls, row

    def _new_zspage(self, cls):
        """Allocate a zspage for ``cls`` (class lock held) and return its
        id; it holds no object and is on no list (ISOLATED)."""
        frames = self._arena.alloc(cls.pages_per_zspage)
        ids = cls.free_ids
        if ids:
            z = ids.pop()
            ppz = cls.pages_per_zspage
            cls.frames[z * ppz:(z + 1) * ppz] = array("I", frames)
            cls.inuse[z] = 0
            cls.unused[z] = 0
            cls.freeobj[z] = -1
            cls.group[z] = ZS_ISOLATED
        else:
            z = len(cls.inuse)
            cls.inuse.append(0)
            cls.unused.append(0)
            cls.freeobj.append(-1)
            cls.group.append(ZS_ISOLATED)
            cls.prev.append(-1)
            cls.next.append(-1)
            cls.frames.extend(frames)
            if cls.huge:
                cls.handle.append(0)
        cls.obj_allocated += cls.objs_per_zspage
        return z

    @staticmethod
    def _release_zspage(cls, z):
        """Forget empty zspage ``z``, already off its list (class lock
        held); returns its frames, which the caller hands to the arena
        after dropping the lock."""
        ppz = cls.pages_per_zspage
        frames = cls.frames[z * ppz:(z + 1) * ppz]
        cls.obj_allocated -= cls.objs_per_zspage
        if cls.obj_allocated:
            cls.group[z] = ZS_FREE
            if cls.huge:
                cls.handle[z] = 0
            cls.free_ids.append(z)
        else:
            # The class's last zspage: drop the columns whole rather than
            # keep them at their high-water size.
            cls.clear()
        return frames

    def _locate(self, cls, z, start):
        """(chunk view, byte offset) of byte ``start`` of zspage ``z``'s
        chain (class lock held)."""
        frame = cls.frames[z * cls.pages_per_zspage + (start >> PAGE_SHIFT)]
        return (self._views[frame >> CHUNK_SHIFT],
                (frame & CHUNK_MASK) << PAGE_SHIFT | (start & PAGE_MASK))

    def _take_obj(self, cls, z, handle):
        """Hand out a free object of zspage ``z`` to ``handle`` (class lock
        held; ``z`` has room): from its free list, else its first
        never-used index; returns the index.  The caller regroups."""
        idx = cls.freeobj[z]
        reuse = idx >= 0
        if not reuse:
            idx = cls.unused[z]
            cls.unused[z] = idx + 1
        if cls.huge:
            cls.freeobj[z] = -1
            cls.handle[z] = handle
        else:
            view, off = self._locate(cls, z, idx * cls.size)
            if reuse:
                cls.freeobj[z] = (_unpack_header(view, off)[0] >> 1) - 1
            _header.pack_into(view, off, handle << 1 | OBJ_ALLOCATED_TAG)
        cls.inuse[z] += 1
        cls.obj_used += 1
        return idx

    def _put_obj(self, cls, z, idx):
        """Return object ``idx`` to zspage ``z``'s free list (lock held;
        not a huge class): its header becomes the link.  The caller
        regroups or releases the zspage."""
        view, off = self._locate(cls, z, idx * cls.size)
        _header.pack_into(view, off, (cls.freeobj[z] + 1) << 1)
        cls.freeobj[z] = idx
        cls.inuse[z] -= 1
        cls.obj_used -= 1

    # ---- public API ----------------------------------------------------

    def malloc(self, size):
        """Allocate an object of ``size`` bytes (1..4096); return its
        handle.  Raises ValueError for other sizes.

        Under the class lock: take the head of the fullest group with room
        (find_get_zspage), else a new zspage; a handle row from
        ``free_handles``, else a new one; the object from the zspage's
        free list, else its first never-used index; then regroup the
        zspage by its new use."""
        if not (isinstance(size, int) and 0 < size <= ZS_MAX_ALLOC_SIZE):
            raise ValueError("malloc: size %r; accepted: 1..%d"
                             % (size, ZS_MAX_ALLOC_SIZE))
        cls = self._class_for[size]
        with cls.lock:
            room = cls.nonempty & ((1 << ZS_INUSE_RATIO_100) - 1)
            if room:
                g = room.bit_length() - 1
                z = cls.heads[g]
            else:
                g = ZS_ISOLATED
                z = self._new_zspage(cls)
            row = (cls.free_handles.pop() if cls.free_handles
                   else self._new_row(cls))
            handle = row << HANDLE_CLASS_BITS | cls.index
            idx = self._take_obj(cls, z, handle)
            new_group = cls.fullness[cls.inuse[z]]
            if new_group != g:
                if g != ZS_ISOLATED:
                    cls.unlink(z)
                cls.link(z, new_group)
            cls.loc[row] = z << OBJ_INDEX_BITS | idx
            cls.sizes[row] = size
        return handle

    def lookup_class_index(self, size):
        """Index of the (merged) size class an object of ``size`` bytes is
        stored in (zs_lookup_class_index): lets a caller tell whether a
        smaller object would really take less room."""
        return self._class_for[size].index

    def obj_size(self, handle):
        """The size ``handle`` was allocated with (0 when not allocated)."""
        sizes = self._handle_class[handle & HANDLE_CLASS_MASK].sizes
        row = handle >> HANDLE_CLASS_BITS
        return sizes[row] if 0 < row < len(sizes) else 0

    def obj_write(self, handle, data):
        """Copy ``data`` (at most obj_size bytes) straight into the frames
        holding the object: one slice, or two when it spans frames."""
        cls = self._handle_class[handle & HANDLE_CLASS_MASK]
        row = handle >> HANDLE_CLASS_BITS
        n = len(data)
        views = self._views
        with cls.lock:
            sizes = cls.sizes
            if not 0 < row < len(sizes) or not sizes[row]:
                raise ValueError("obj_write: handle %r is not allocated"
                                 % (handle,))
            if n > sizes[row]:
                raise ValueError("obj_write: %d bytes into a %d-byte object"
                                 % (n, sizes[row]))
            loc = cls.loc[row]
            start = (loc & OBJ_INDEX_MASK) * cls.size + cls.header
            slot = (loc >> OBJ_INDEX_BITS) * cls.pages_per_zspage \
                + (start >> PAGE_SHIFT)
            frame = cls.frames[slot]
            off = start & PAGE_MASK
            a = (frame & CHUNK_MASK) << PAGE_SHIFT | off
            first = PAGE_SIZE - off
            if n <= first:
                views[frame >> CHUNK_SHIFT][a:a + n] = data
                return
            mv = memoryview(data)
            views[frame >> CHUNK_SHIFT][a:a + first] = mv[:first]
            frame = cls.frames[slot + 1]
            a = (frame & CHUNK_MASK) << PAGE_SHIFT
            views[frame >> CHUNK_SHIFT][a:a + n - first] = mv[first:]

    def obj_read_begin(self, handle, local_copy):
        """Return a read-only memoryview of the object's ``obj_size`` bytes.

        Zero-copy when the object lies in one frame; when it spans two, the
        bytes are copied into ``local_copy`` (a bytearray of at least 4096)
        and a view of it is returned.  Until ``obj_read_end`` the object
        will not be moved by compaction.
        """
        cls = self._handle_class[handle & HANDLE_CLASS_MASK]
        row = handle >> HANDLE_CLASS_BITS
        views = self._views
        with cls.lock:
            sizes = cls.sizes
            if not 0 < row < len(sizes) or not sizes[row]:
                raise ValueError("obj_read_begin: handle %r is not allocated"
                                 % (handle,))
            size = sizes[row]
            loc = cls.loc[row]
            start = (loc & OBJ_INDEX_MASK) * cls.size + cls.header
            slot = (loc >> OBJ_INDEX_BITS) * cls.pages_per_zspage \
                + (start >> PAGE_SHIFT)
            frame = cls.frames[slot]
            off = start & PAGE_MASK
            first = PAGE_SIZE - off
            if size > first:
                frame2 = cls.frames[slot + 1]
            cls.readers += 1
        a = (frame & CHUNK_MASK) << PAGE_SHIFT | off
        if size <= first:
            return views[frame >> CHUNK_SHIFT][a:a + size].toreadonly()
        try:
            local_copy[:first] = views[frame >> CHUNK_SHIFT][a:a + first]
            b = (frame2 & CHUNK_MASK) << PAGE_SHIFT
            local_copy[first:size] = \
                views[frame2 >> CHUNK_SHIFT][b:b + size - first]
            return memoryview(local_copy)[:size].toreadonly()
        except BaseException:
            self._reader_done(cls)
            raise

    def obj_read_end(self, handle, view):
        """Release a view from ``obj_read_begin``."""
        view.release()
        self._reader_done(self._handle_class[handle & HANDLE_CLASS_MASK])

    @staticmethod
    def _reader_done(cls):
        with cls.lock:
            cls.readers -= 1
            if cls.compacting and not cls.readers:
                cls.no_readers.notify_all()

    def free(self, handle):
        """Free the object now; its frames go back to the OS when its
        zspage empties.

        Under the class lock: clear the handle row, put the object on its
        zspage's free list (its header becomes the link) and regroup the
        zspage, or, when it was the last object, unlink it and release
        it; the frames go to the arena after the lock is let go."""
        if not isinstance(handle, int) or handle <= 0 or handle >> 64:
            raise ValueError("free: handle %r is not allocated" % (handle,))
        cls = self._handle_class[handle & HANDLE_CLASS_MASK]
        row = handle >> HANDLE_CLASS_BITS
        frames = None
        with cls.lock:
            sizes = cls.sizes
            if not 0 < row < len(sizes) or not sizes[row]:
                raise ValueError("free: handle %r is not allocated"
                                 % (handle,))
            loc = cls.loc[row]
            z = loc >> OBJ_INDEX_BITS
            cls.loc[row] = 0
            sizes[row] = 0
            cls.free_handles.append(row)
            if cls.inuse[z] > 1:
                self._put_obj(cls, z, loc & OBJ_INDEX_MASK)
                new_group = cls.fullness[cls.inuse[z]]
                if new_group != cls.group[z]:
                    cls.move(z, new_group)
            else:
                cls.inuse[z] = 0
                cls.obj_used -= 1
                cls.unlink(z)
                frames = self._release_zspage(cls, z)
        if frames:
            self._arena.free(frames)

    def total_pages(self):
        """Frames held by zspages (zs_get_total_pages)."""
        return self._arena.frames_in_use

    # ---- deferred free ---------------------------------------------------

    def free_deferred(self, handle):
        """Queue ``handle`` until a flush; free it now when the queue's
        lock is busy or the queue is full.  A queued handle is not reused
        before it is really freed."""
        self._class_row(handle, "free_deferred")
        if not self._dq_lock.acquire(blocking=False):
            self.free(handle)
            return
        try:
            queued = len(self._dq) < DEFERRED_CAPACITY
            if queued:
                self._dq.append(handle)
        finally:
            self._dq_lock.release()
        if not queued:
            self.free(handle)

    def hold_worker(self):
        """As the C pool's: the model has no worker to hold."""

    def free_deferred_flush(self):
        """Free every queued handle before returning."""
        with self._drain_lock:
            with self._dq_lock:
                batch, self._dq = self._dq, array("Q")
            free = self.free
            for i, handle in enumerate(batch):
                try:
                    free(handle)
                except BaseException:
                    # A bad handle (a double free) must not leak the
                    # rest of the batch: it goes back to the queue.
                    with self._dq_lock:
                        self._dq[0:0] = batch[i + 1:]
                    raise

    def deferred_pending(self):
        """Handles waiting in the deferred-free queue."""
        return len(self._dq)

    # ---- compaction --------------------------------------------------------

    def compact(self):
        """zs_compact(): in each class move objects from the emptiest
        zspages into the fullest and free the emptied ones.  Returns the
        frames freed and adds them to ``pages_compacted``."""
        freed = 0
        with self._compact_lock:
            for cls in self.classes:
                if cls.huge:
                    continue
                frames = array("I")
                with cls.lock:
                    if not cls.freeable():
                        continue
                    cls.compacting = True
                    try:
                        while cls.readers:
                            cls.no_readers.wait()
                    finally:
                        cls.compacting = False
                    self._compact_class(cls, frames)
                if frames:
                    self._arena.free(frames)
                    freed += len(frames)
            self.pages_compacted += freed
        return freed

    def _compact_class(self, cls, frames_out):
        """__zs_compact() for one class (class lock held, no readers):
        ``dst`` from the fullest groups with room, ``src`` from the
        emptiest, both off their lists while objects move."""
        dst = -1
        opz = cls.objs_per_zspage
        while cls.freeable():
            if dst < 0:
                dst = cls.isolate(range(ZS_INUSE_RATIO_99,
                                        ZS_INUSE_RATIO_0, -1))
                if dst < 0:
                    break
            src = cls.isolate(range(ZS_INUSE_RATIO_10, ZS_INUSE_RATIO_100))
            if src < 0:
                break
            self._migrate(cls, src, dst)
            if cls.inuse[src]:
                cls.link(src, cls.fullness[cls.inuse[src]])
            else:
                frames_out.extend(self._release_zspage(cls, src))
            if cls.inuse[dst] == opz:
                cls.link(dst, ZS_INUSE_RATIO_100)
                dst = -1
        if dst >= 0:
            cls.link(dst, cls.fullness[cls.inuse[dst]])

    def _migrate(self, cls, src, dst):
        """Move allocated objects of ``src`` into ``dst`` until ``dst`` is
        full or ``src`` empty, rewriting their handles."""
        size = cls.size
        opz = cls.objs_per_zspage
        inuse = cls.inuse
        for idx in range(cls.unused[src]):
            if inuse[src] == 0 or inuse[dst] == opz:
                return
            view, off = self._locate(cls, src, idx * size)
            word = _unpack_header(view, off)[0]
            if not word & OBJ_ALLOCATED_TAG:
                continue
            handle = word >> 1
            data = self._read_span(cls, src, idx * size, size)
            new_idx = self._take_obj(cls, dst, handle)
            self._write_span(cls, dst, new_idx * size, data)
            self._put_obj(cls, src, idx)
            cls.loc[handle >> HANDLE_CLASS_BITS] = \
                dst << OBJ_INDEX_BITS | new_idx

    def _read_span(self, cls, z, start, n):
        """``n`` bytes from byte ``start`` of zspage ``z``, as bytes."""
        view, a = self._locate(cls, z, start)
        first = PAGE_SIZE - (start & PAGE_MASK)
        if n <= first:
            return bytes(view[a:a + n])
        view2, b = self._locate(cls, z, start + first)
        return bytes(view[a:a + first]) + bytes(view2[b:b + n - first])

    def _write_span(self, cls, z, start, data):
        """Write ``data`` from byte ``start`` of zspage ``z``."""
        n = len(data)
        view, a = self._locate(cls, z, start)
        first = PAGE_SIZE - (start & PAGE_MASK)
        if n <= first:
            view[a:a + n] = data
            return
        view2, b = self._locate(cls, z, start + first)
        view[a:a + first] = data[:first]
        view2[b:b + n - first] = data[first:]

    # ---- stats, checks and teardown --------------------------------------

    def stats(self):
        """PoolStats: pages_compacted, total pages, and one ClassStat per
        unmerged class (the debugfs ``classes`` table)."""
        rows = []
        for cls in self.classes:
            with cls.lock:
                fullness = tuple(cls.counts[ZS_INUSE_RATIO_10:])
                allocated, used = cls.obj_allocated, cls.obj_used
                freeable = cls.freeable()
            rows.append(ClassStat(
                index=cls.index, size=cls.size, fullness=fullness,
                obj_allocated=allocated, obj_used=used,
                pages_used=allocated // cls.objs_per_zspage
                * cls.pages_per_zspage,
                pages_per_zspage=cls.pages_per_zspage,
                objs_per_zspage=cls.objs_per_zspage, freeable=freeable))
        return PoolStats(pages_compacted=self.pages_compacted,
                         total_pages=self.total_pages(), classes=tuple(rows))

    def audit(self):
        """Check the metadata's own invariants; raise AssertionError naming
        the first broken one.  For tests and debugging: it walks every
        zspage and object, holding every class lock (in class order, then
        the arena's and the queue's locks), so it stops the pool meanwhile.

        Checked: each fullness list is a well-linked chain whose members
        carry its group, the group their inuse count gives, and number
        ``counts[group]``; ``nonempty`` matches the heads; every id is
        either on a list or on ``free_ids`` (once), never both; a zspage's
        allocated headers, free list and never-used tail add up to its
        objects, and each allocated header names a handle of the class
        whose ``loc`` points back; every handle row is either live (with
        an object) or on ``free_handles`` (once), never both; class
        counters equal the sums; no frame belongs to two zspages or is
        also free in the arena, and the arena's count is the zspages'
        frames; queued handles are live.
        """
        locks = [cls.lock for cls in self.classes]
        for lock in locks:
            lock.acquire()
        try:
            with self._arena._lock, self._dq_lock:
                self._audit_locked()
        finally:
            for lock in reversed(locks):
                lock.release()

    def _audit_locked(self):
        live_handles = set()
        owner = {}                   # frame -> (class index, zspage id)
        for cls in self.classes:
            ci, opz, ppz = cls.index, cls.objs_per_zspage, cls.pages_per_zspage
            n = len(cls.inuse)
            for col in ("unused", "freeobj", "group", "prev", "next"):
                _check(len(getattr(cls, col)) == n,
                       "class %d: column %s has %d ids, inuse %d",
                       ci, col, len(getattr(cls, col)), n)
            _check(len(cls.frames) == n * ppz,
                   "class %d: %d frames for %d ids", ci, len(cls.frames), n)
            _check(len(cls.handle) == (n if cls.huge else 0),
                   "class %d: handle column of %d", ci, len(cls.handle))
            _check(cls.readers >= 0, "class %d: readers %d", ci, cls.readers)
            _check(len(cls.loc) == len(cls.sizes) >= 1 and not cls.sizes[0],
                   "class %d: handle columns of %d and %d rows",
                   ci, len(cls.loc), len(cls.sizes))
            # Fullness lists.
            on_list = set()
            for g in range(NR_FULLNESS_GROUPS):
                z, prev, count = cls.heads[g], -1, 0
                _check(bool(cls.nonempty >> g & 1) == (z >= 0),
                       "class %d: nonempty bit %d vs head %d", ci, g, z)
                while z >= 0:
                    _check(z < n and z not in on_list,
                           "class %d group %d: bad or repeated id %d",
                           ci, g, z)
                    on_list.add(z)
                    _check(cls.prev[z] == prev,
                           "class %d zspage %d: prev %d, expected %d",
                           ci, z, cls.prev[z], prev)
                    _check(cls.group[z] == g,
                           "class %d zspage %d: on list %d, group says %d",
                           ci, z, g, cls.group[z])
                    _check(cls.fullness[cls.inuse[z]] == g,
                           "class %d zspage %d: inuse %d belongs in group"
                           " %d, not %d", ci, z, cls.inuse[z],
                           cls.fullness[cls.inuse[z]], g)
                    _check(cls.inuse[z] > 0,
                           "class %d zspage %d: empty zspage kept", ci, z)
                    prev, z = z, cls.next[z]
                    count += 1
                _check(count == cls.counts[g],
                       "class %d group %d: %d on list, counts says %d",
                       ci, g, count, cls.counts[g])
            free_ids = set(cls.free_ids)
            _check(len(free_ids) == len(cls.free_ids),
                   "class %d: an id is on free_ids twice", ci)
            _check(not free_ids & on_list,
                   "class %d: ids both free and live: %s",
                   ci, sorted(free_ids & on_list))
            _check(len(free_ids) + len(on_list) == n,
                   "class %d: %d ids neither free nor on a list (isolated)",
                   ci, n - len(free_ids) - len(on_list))
            for z in free_ids:
                _check(cls.group[z] == ZS_FREE,
                       "class %d: free id %d has group %d",
                       ci, z, cls.group[z])
            # Objects of each live zspage.
            used = 0
            for z in on_list:
                inuse, unused = cls.inuse[z], cls.unused[z]
                _check(inuse <= unused <= opz,
                       "class %d zspage %d: inuse %d unused %d of %d",
                       ci, z, inuse, unused, opz)
                used += inuse
                for i in range(ppz):
                    f = cls.frames[z * ppz + i]
                    _check(f not in owner, "frame %d in zspages %s and %s",
                           f, owner.get(f), (ci, z))
                    owner[f] = (ci, z)
                if cls.huge:
                    self._audit_handle(cls, z, 0, cls.handle[z],
                                       live_handles)
                    continue
                allocated, free_objs = 0, set()
                for idx in range(unused):
                    view, off = self._locate(cls, z, idx * cls.size)
                    word = _unpack_header(view, off)[0]
                    if word & OBJ_ALLOCATED_TAG:
                        allocated += 1
                        self._audit_handle(cls, z, idx, word >> 1,
                                           live_handles)
                idx = cls.freeobj[z]
                while idx >= 0:
                    _check(idx < unused and idx not in free_objs,
                           "class %d zspage %d: free list hits %d",
                           ci, z, idx)
                    free_objs.add(idx)
                    view, off = self._locate(cls, z, idx * cls.size)
                    word = _unpack_header(view, off)[0]
                    _check(not word & OBJ_ALLOCATED_TAG,
                           "class %d zspage %d: object %d on the free list"
                           " is allocated", ci, z, idx)
                    idx = (word >> 1) - 1
                _check(allocated == inuse and
                       allocated + len(free_objs) == unused,
                       "class %d zspage %d: %d allocated + %d free of %d"
                       " used, inuse %d", ci, z, allocated, len(free_objs),
                       unused, inuse)
            _check(cls.obj_allocated == len(on_list) * opz,
                   "class %d: obj_allocated %d for %d zspages",
                   ci, cls.obj_allocated, len(on_list))
            _check(cls.obj_used == used, "class %d: obj_used %d, counted %d",
                   ci, cls.obj_used, used)
            # Handle rows: live (claimed by an object above) or free.
            sizes = cls.sizes
            live_rows = {r for r in range(1, len(sizes)) if sizes[r]}
            claimed = {h >> HANDLE_CLASS_BITS for h in live_handles
                       if h & HANDLE_CLASS_MASK == ci}
            _check(live_rows == claimed,
                   "class %d: rows with a size but no object: %s; objects"
                   " whose row has no size: %s", ci,
                   sorted(live_rows - claimed)[:10],
                   sorted(claimed - live_rows)[:10])
            free_rows = set(cls.free_handles)
            _check(len(free_rows) == len(cls.free_handles),
                   "class %d: a row is on free_handles twice", ci)
            _check(not free_rows & live_rows,
                   "class %d: rows both free and live: %s",
                   ci, sorted(free_rows & live_rows)[:10])
            _check(len(free_rows) + len(live_rows) == len(sizes) - 1
                   and all(0 < r < len(sizes) for r in free_rows),
                   "class %d: %d rows, %d live, %d free", ci,
                   len(sizes) - 1, len(live_rows), len(free_rows))
        arena = self._arena
        _check(arena.frames_in_use == len(owner),
               "arena counts %d frames, zspages hold %d",
               arena.frames_in_use, len(owner))
        arena_free = set(arena._free)
        _check(not arena_free & owner.keys(),
               "frames both free and held: %s",
               sorted(arena_free & owner.keys())[:10])
        _check(set(self._dq) <= live_handles,
               "queued for deferred free but not live: %s",
               sorted(set(self._dq) - live_handles)[:10])

    def _audit_handle(self, cls, z, idx, handle, seen):
        """The object at (zspage ``z``, ``idx``) of ``cls`` claims
        ``handle``: check the handle columns agree."""
        row = handle >> HANDLE_CLASS_BITS
        _check(handle & HANDLE_CLASS_MASK == cls.index
               and 0 < row < len(cls.loc),
               "class %d zspage %d object %d: handle %#x is not the class's",
               cls.index, z, idx, handle)
        _check(handle not in seen, "handle %#x held by two objects", handle)
        seen.add(handle)
        _check(cls.loc[row] == z << OBJ_INDEX_BITS | idx,
               "handle %#x: loc %#x, object at zspage %d index %d",
               handle, cls.loc[row], z, idx)
        size = cls.sizes[row]
        _check(size and self._class_for[size] is cls,
               "handle %#x: size %d is not for class %d",
               handle, size, cls.index)

    def close(self):
        """Flush deferred frees and return every frame."""
        self.free_deferred_flush()
        for cls in self.classes:
            with cls.lock:
                cls.clear()
        self._arena.close()


# ---- frames ----------------------------------------------------------------
#
# Page frames: 4 KiB pieces of anonymous memory, numbered and recycled.
#
# The arena is the pool's page allocator, as alloc_page()/__free_page() are
# zsmalloc's.  It maps private anonymous memory in chunks of CHUNK_FRAMES
# frames and numbers the frames across chunks::
#
#     chunk 0 (mmap, 32 MiB)              chunk 1 (mmap, 32 MiB)
#     +------+------+-----+------+        +------+------+-----
#     |  f0  |  f1  | ... |f8191 |        |f8192 |f8193 | ...
#     +------+------+-----+------+        +------+------+-----
#
# Frame ``f`` lives in chunk ``f >> CHUNK_SHIFT`` at byte offset
# ``(f & CHUNK_MASK) << 12``; ``locate(f)`` returns that (memoryview, offset)
# pair so the pool can slice frames without copying.
#
# A freed frame is given back to the OS at once with MADV_DONTNEED, so the
# process's RSS follows the pool; the frame number goes on a free stack and
# is handed out again (the OS supplies a zero page on first touch).  Chunks
# are never unmapped while the arena lives: their address space costs
# nothing once their frames are returned.
#
# Locking: one short lock around the free stack and the chunk list.  The
# madvise call happens outside it, before the frame is published as free.

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
