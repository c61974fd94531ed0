"""The pool: a zsmalloc-style allocator of small objects over 4 KiB frames.

This follows the kernel's mm/zsmalloc.c on 4 KiB pages.

Size classes
    255 classes from 32 to 4096 bytes in steps of 16 (PAGE_SIZE >> 8).  The
    size that picks a class includes an 8-byte handle header, as zs_malloc
    does (``size += ZS_HANDLE_SIZE``).  Each class packs its objects into
    *zspages*: chains of 1..chain_size frames, as many as waste least
    (calculate_zspage_chain_size).  Neighbouring classes whose zspages hold
    the same number of objects on the same number of frames are merged
    (can_merge).  A class of one object per one-frame zspage is *huge*; its
    objects carry no header (the handle is kept on the zspage).

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
    list (tag bit clear).  Object indices at or above ``zspage.unused``
    were never handed out, so a new zspage needs no initialisation.
    Headers start on 16-byte boundaries and never straddle frames.

Handles
    A handle is an index into two flat arrays: ``_loc[h]`` = zspage id << 12
    | object index, and ``_size[h]`` = the size the caller asked for (0 when
    free).  The indirection lets compaction move an object by rewriting
    ``_loc[h]``.  Freed handles and zspage ids are recycled from array
    stacks; no Python object exists per stored object.

Fullness groups
    Each class keeps its zspages in 12 groups by use, as get_fullness_group:
    0 (empty), 10%..90% and 99% (1..10), 100% (11).  malloc takes the fullest
    zspage with room; compaction moves objects from the emptiest zspages into
    the fullest and frees what it empties.

Locking (lock order: class lock, then the arena's lock)
    - ``SizeClass.lock`` guards the class's zspages, fullness groups, free
      lists, counters, and the ``_loc`` entries of its objects.  There is no
      pool-wide lock on malloc, free, read or write.
    - Readers (``obj_read_begin`` .. ``obj_read_end``) register in
      ``SizeClass.readers`` under the class lock and may then use a
      zero-copy view of a frame without the lock; compaction waits on the
      class's condition until there are none before it moves anything.
    - Handle and zspage-id stacks rely on single array operations being
      atomic under the GIL; growing the tables takes ``_table_lock``.
    - The deferred-free queue has its own lock, only ever try-locked by
      ``free_deferred``.
"""

import struct
import threading
from array import array

from . import PAGE_SIZE, PAGE_SHIFT
from .arena import Arena
from .stats import ClassStat, PoolStats

ZS_MIN_ALLOC_SIZE = 32
ZS_MAX_ALLOC_SIZE = PAGE_SIZE
ZS_HANDLE_SIZE = 8
CLASS_BITS = 8
ZS_SIZE_CLASS_DELTA = PAGE_SIZE >> CLASS_BITS            # 16
ZS_SIZE_CLASSES = -(-(ZS_MAX_ALLOC_SIZE - ZS_MIN_ALLOC_SIZE)
                    // ZS_SIZE_CLASS_DELTA) + 1          # 255
CHAIN_SIZE_MIN, CHAIN_SIZE_MAX, CHAIN_SIZE_DEFAULT = 4, 16, 8

# Fullness groups, as enum fullness_group in mm/zsmalloc.c.
ZS_INUSE_RATIO_0 = 0
ZS_INUSE_RATIO_10 = 1
ZS_INUSE_RATIO_99 = 10
ZS_INUSE_RATIO_100 = 11
NR_FULLNESS_GROUPS = 12

OBJ_INDEX_BITS = 12          # objects per zspage < 2048 with 16 frames
OBJ_INDEX_MASK = (1 << OBJ_INDEX_BITS) - 1
OBJ_ALLOCATED_TAG = 1

# Deferred free, as "mm/zsmalloc: reduce zs_free() latency on swap release
# path": 128 MiB worth of 4 KiB pages of handles.
DEFERRED_CAPACITY = (128 << 20) >> PAGE_SHIFT             # 32768
DEFERRED_IDLE_DELAY = 0.05   # seconds a lone handle may wait for company

_header = struct.Struct("<Q")


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


class SizeClass:
    """One size class: its geometry, its zspages by fullness, its counters.
    Every field but the constants is guarded by ``lock``."""

    __slots__ = ("index", "size", "pages_per_zspage", "objs_per_zspage",
                 "huge", "header", "lock", "no_readers", "readers",
                 "groups", "obj_allocated", "obj_used")

    def __init__(self, index, size, pages_per_zspage, objs_per_zspage):
        self.index = index
        self.size = size
        self.pages_per_zspage = pages_per_zspage
        self.objs_per_zspage = objs_per_zspage
        self.huge = pages_per_zspage == 1 and objs_per_zspage == 1
        self.header = 0 if self.huge else ZS_HANDLE_SIZE
        self.lock = threading.Lock()
        self.no_readers = threading.Condition(self.lock)
        self.readers = 0
        # groups[g]: zspage id -> ZsPage; dicts give O(1) removal and a
        # stable "first entry".
        self.groups = [dict() for _ in range(NR_FULLNESS_GROUPS)]
        self.obj_allocated = 0
        self.obj_used = 0

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


class ZsPage:
    """A chain of frames holding objects of one class.  Guarded by the
    class lock.  ``maps[i]`` is (chunk view, offset) of ``frames[i]``."""

    __slots__ = ("id", "cls", "frames", "maps", "inuse", "unused",
                 "freeobj", "group", "huge_handle")

    def __init__(self, zid, cls, frames, maps):
        self.id = zid
        self.cls = cls
        self.frames = frames
        self.maps = maps
        self.inuse = 0
        self.unused = 0          # objects >= this index were never used
        self.freeobj = -1        # head of the free list of used-then-freed
        self.group = ZS_INUSE_RATIO_0
        self.huge_handle = 0     # huge zspages keep their handle here


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
        self._build_classes()
        # Handle table; handle 0 is never handed out.
        self._loc = array("Q", [0])
        self._size = array("H", [0])
        self._free_handles = array("I")
        self._zspages = []
        self._free_zspage_ids = array("I")
        self._table_lock = threading.Lock()
        self._compact_lock = threading.Lock()
        self.pages_compacted = 0
        # Deferred free queue and its worker (started on first use, so a
        # pool made before nbdkit forks still gets a live worker).
        self._dq = array("Q")        # fixed-size items, no int objects
        self._dq_lock = threading.Lock()
        self._drain_lock = threading.Lock()
        self._dq_wake = threading.Event()
        self._dq_half = threading.Event()
        self._worker = None
        self._worker_lock = threading.Lock()
        self._closing = False

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
        self._classes_by_index = by_index
        self.classes = sorted(set(by_index), key=lambda c: c.index)
        self.huge_class_size = huge_class_size
        # Object size (without header) -> class, for 1..4096.
        self._class_for = [None] + [
            by_index[class_index(s + ZS_HANDLE_SIZE)]
            for s in range(1, ZS_MAX_ALLOC_SIZE + 1)]

    # ---- handles and zspages -----------------------------------------

    def _new_handle(self):
        try:
            return self._free_handles.pop()
        except IndexError:
            with self._table_lock:
                self._loc.append(0)
                self._size.append(0)
                return len(self._loc) - 1

    def _new_zspage(self, cls):
        """Allocate a zspage for ``cls`` (class lock held)."""
        frames = self._arena.alloc(cls.pages_per_zspage)
        maps = [self._arena.locate(f) for f in frames]
        try:
            zid = self._free_zspage_ids.pop()
        except IndexError:
            with self._table_lock:
                self._zspages.append(None)
                zid = len(self._zspages) - 1
        zs = ZsPage(zid, cls, frames, maps)
        self._zspages[zid] = zs
        cls.obj_allocated += cls.objs_per_zspage
        return zs

    def _release_zspage(self, zs):
        """Forget an empty zspage (class lock held); returns its frames,
        which the caller hands to the arena after dropping the lock."""
        cls = zs.cls
        self._group_remove(cls, zs)
        cls.obj_allocated -= cls.objs_per_zspage
        self._zspages[zs.id] = None
        self._free_zspage_ids.append(zs.id)
        zs.maps = None
        return zs.frames

    def _regroup(self, cls, zs):
        group = cls.fullness_of(zs.inuse)
        if group != zs.group:
            self._group_remove(cls, zs)
            cls.groups[group][zs.id] = zs
            zs.group = group

    @staticmethod
    def _group_remove(cls, zs):
        """Take ``zs`` out of its fullness group.  A dict keeps its table
        when emptied by deletions; clear() gives it back, so after a big
        free the tables that indexed thousands of zspages are gone too
        (and no new object is made that could pin a heap arena)."""
        group = cls.groups[zs.group]
        del group[zs.id]
        if not group:
            group.clear()

    def _take_obj(self, zs, handle):
        """Hand out a free object of ``zs`` to ``handle`` (class lock held);
        returns its index."""
        cls = zs.cls
        if zs.freeobj >= 0:
            idx = zs.freeobj
            if not cls.huge:
                view, base, off = self._header_at(zs, idx)
                zs.freeobj = (_header.unpack_from(view, base + off)[0] >> 1) - 1
            else:
                zs.freeobj = -1
        else:
            idx = zs.unused
            zs.unused += 1
        if cls.huge:
            zs.huge_handle = handle
        else:
            view, base, off = self._header_at(zs, idx)
            _header.pack_into(view, base + off, handle << 1 | OBJ_ALLOCATED_TAG)
        zs.inuse += 1
        cls.obj_used += 1
        return idx

    def _put_obj(self, zs, idx):
        """Return object ``idx`` to its zspage's free list (lock held)."""
        cls = zs.cls
        if cls.huge:
            zs.huge_handle = 0
        else:
            view, base, off = self._header_at(zs, idx)
            _header.pack_into(view, base + off, (zs.freeobj + 1) << 1)
        zs.freeobj = idx
        zs.inuse -= 1
        cls.obj_used -= 1

    @staticmethod
    def _header_at(zs, idx):
        """(view, frame base, offset in frame) of object ``idx``'s start."""
        start = idx * zs.cls.size
        view, base = zs.maps[start >> PAGE_SHIFT]
        return view, base, start & (PAGE_SIZE - 1)

    # ---- public API ----------------------------------------------------

    def malloc(self, size):
        """Allocate an object of ``size`` bytes (1..4096); return its
        handle.  Raises ValueError for other sizes."""
        if not 0 < size <= ZS_MAX_ALLOC_SIZE:
            raise ValueError("malloc: size %r; accepted: 1..%d"
                             % (size, ZS_MAX_ALLOC_SIZE))
        cls = self._class_for[size]
        handle = self._new_handle()
        with cls.lock:
            groups = cls.groups
            zs = None
            for g in range(ZS_INUSE_RATIO_99, ZS_INUSE_RATIO_0 - 1, -1):
                group = groups[g]
                if group:
                    zs = next(iter(group.values()))
                    break
            if zs is None:
                zs = self._new_zspage(cls)
                groups[ZS_INUSE_RATIO_0][zs.id] = zs
            idx = self._take_obj(zs, handle)
            self._regroup(cls, zs)
            self._loc[handle] = zs.id << OBJ_INDEX_BITS | idx
            self._size[handle] = size
        return handle

    def lookup_class_index(self, size):
        """Index of the (merged) size class an object of ``size`` bytes is
        stored in (zs_lookup_class_index): lets a caller tell whether a
        smaller object would really take less room."""
        return self._class_for[size].index

    def obj_size(self, handle):
        """The size ``handle`` was allocated with."""
        return self._size[handle]

    def _checked_size(self, handle, op):
        if not 0 < handle < len(self._size) or not self._size[handle]:
            raise ValueError("%s: handle %r is not allocated" % (op, handle))
        return self._size[handle]

    def _object_slices(self, handle, cls, nbytes):
        """Up to two (view, start, end) pieces of the first ``nbytes`` of
        the object's data (class lock held or reader registered)."""
        loc = self._loc[handle]
        zs = self._zspages[loc >> OBJ_INDEX_BITS]
        start = (loc & OBJ_INDEX_MASK) * cls.size + cls.header
        view, base = zs.maps[start >> PAGE_SHIFT]
        off = start & (PAGE_SIZE - 1)
        first = PAGE_SIZE - off
        if nbytes <= first:
            return ((view, base + off, base + off + nbytes),)
        view2, base2 = zs.maps[(start >> PAGE_SHIFT) + 1]
        return ((view, base + off, base + PAGE_SIZE),
                (view2, base2, base2 + nbytes - first))

    def obj_write(self, handle, data):
        """Copy ``data`` (at most obj_size bytes) straight into the frames
        holding the object: one slice, or two when it spans frames."""
        size = self._checked_size(handle, "obj_write")
        n = len(data)
        if n > size:
            raise ValueError("obj_write: %d bytes into a %d-byte object"
                             % (n, size))
        cls = self._class_for[size]
        with cls.lock:
            pieces = self._object_slices(handle, cls, n)
            if len(pieces) == 1:
                view, a, b = pieces[0]
                view[a:b] = data
            else:
                (v1, a1, b1), (v2, a2, b2) = pieces
                split = b1 - a1
                mv = memoryview(data)
                v1[a1:b1] = mv[:split]
                v2[a2:b2] = mv[split:]

    def obj_read_begin(self, handle, local_copy):
        """Return a read-only memoryview of the object's ``obj_size`` bytes.

        Zero-copy when the object lies in one frame; when it spans two, the
        bytes are copied into ``local_copy`` (a bytearray of at least 4096)
        and a view of it is returned.  Until ``obj_read_end`` the object
        will not be moved by compaction.
        """
        size = self._checked_size(handle, "obj_read_begin")
        cls = self._class_for[size]
        with cls.lock:
            cls.readers += 1
            pieces = self._object_slices(handle, cls, size)
        if len(pieces) == 1:
            view, a, b = pieces[0]
            return view[a:b].toreadonly()
        (v1, a1, b1), (v2, a2, b2) = pieces
        split = b1 - a1
        local_copy[:split] = v1[a1:b1]
        local_copy[split:size] = v2[a2:b2]
        return memoryview(local_copy)[:size].toreadonly()

    def obj_read_end(self, handle, view):
        """Release a view from ``obj_read_begin``."""
        cls = self._class_for[self._size[handle]]
        view.release()
        with cls.lock:
            cls.readers -= 1
            if cls.readers == 0:
                cls.no_readers.notify_all()

    def free(self, handle):
        """Free the object now; its frames go back to the OS when its
        zspage empties."""
        size = self._checked_size(handle, "free")
        cls = self._class_for[size]
        frames = None
        with cls.lock:
            loc = self._loc[handle]
            zs = self._zspages[loc >> OBJ_INDEX_BITS]
            self._put_obj(zs, loc & OBJ_INDEX_MASK)
            if zs.inuse == 0:
                frames = self._release_zspage(zs)
            else:
                self._regroup(cls, zs)
            self._loc[handle] = 0
            self._size[handle] = 0
        self._free_handles.append(handle)
        if frames:
            self._arena.free(frames)

    def total_pages(self):
        """Frames held by zspages (zs_get_total_pages)."""
        return self._arena.frames_in_use

    # ---- deferred free ---------------------------------------------------

    def free_deferred(self, handle):
        """Queue ``handle`` for the drain worker; free it synchronously when
        the queue's lock is busy or the queue is full.  A queued handle is
        not reused before it is really freed."""
        self._checked_size(handle, "free_deferred")
        if not self._dq_lock.acquire(blocking=False):
            self.free(handle)
            return
        try:
            queued = len(self._dq)
            if queued < DEFERRED_CAPACITY:
                self._dq.append(handle)
                queued += 1
            else:
                queued = 0
        finally:
            self._dq_lock.release()
        if not queued:
            self.free(handle)
            return
        if self._worker is None:
            self.start_worker()
        if queued == 1:
            self._dq_wake.set()
        if queued >= DEFERRED_CAPACITY // 2:
            self._dq_half.set()

    def start_worker(self):
        """Start the drain worker now rather than at the first deferred
        free (a server starts it after forking, before serving)."""
        with self._worker_lock:
            if self._worker is None and not self._closing:
                worker = threading.Thread(target=self._drain_worker,
                                          name="zsmalloc-free", daemon=True)
                worker.start()
                self._worker = worker

    def _drain_worker(self):
        while not self._closing:
            self._dq_wake.wait()
            self._dq_wake.clear()
            # Let handles gather for a moment unless half capacity is
            # already reached; anything queued before the clear above is
            # drained below, so no handle lingers.
            self._dq_half.wait(DEFERRED_IDLE_DELAY)
            self._dq_half.clear()
            self.free_deferred_flush()

    def free_deferred_flush(self):
        """Free every queued handle before returning."""
        with self._drain_lock:
            with self._dq_lock:
                batch, self._dq = self._dq, array("Q")
            for handle in batch:
                self.free(handle)

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
                frames = []
                with cls.lock:
                    if not cls.freeable():
                        continue
                    while cls.readers:
                        cls.no_readers.wait()
                    self._compact_class(cls, frames)
                if frames:
                    self._arena.free(frames)
                    freed += len(frames)
            self.pages_compacted += freed
        return freed

    def _compact_class(self, cls, frames_out):
        """__zs_compact() for one class (class lock held, no readers)."""
        groups = cls.groups
        dst = None
        while cls.freeable():
            if dst is None:
                dst = self._isolate(groups, range(ZS_INUSE_RATIO_99,
                                                  ZS_INUSE_RATIO_0, -1))
                if dst is None:
                    break
            src = self._isolate(groups, range(ZS_INUSE_RATIO_10,
                                              ZS_INUSE_RATIO_100))
            if src is None:
                break
            self._migrate(cls, src, dst)
            self._putback(cls, src)
            if src.inuse == 0:
                frames_out.extend(self._release_zspage(src))
            if dst.inuse == cls.objs_per_zspage:
                self._putback(cls, dst)
                dst = None
        if dst is not None:
            self._putback(cls, dst)

    @staticmethod
    def _isolate(groups, order):
        for g in order:
            group = groups[g]
            if group:
                zid = next(iter(group))
                return group.pop(zid)
        return None

    @staticmethod
    def _putback(cls, zs):
        zs.group = cls.fullness_of(zs.inuse)
        cls.groups[zs.group][zs.id] = zs

    def _migrate(self, cls, src, dst):
        """Move allocated objects of ``src`` into ``dst`` until ``dst`` is
        full or ``src`` empty, rewriting their handles."""
        size = cls.size
        for idx in range(src.unused):
            if src.inuse == 0 or dst.inuse == cls.objs_per_zspage:
                return
            view, base, off = self._header_at(src, idx)
            word = _header.unpack_from(view, base + off)[0]
            if not word & OBJ_ALLOCATED_TAG:
                continue
            handle = word >> 1
            data = self._read_span(src, idx * size, size)
            new_idx = self._take_obj(dst, handle)
            self._write_span(dst, new_idx * size, data)
            self._put_obj(src, idx)
            self._loc[handle] = dst.id << OBJ_INDEX_BITS | new_idx

    @staticmethod
    def _read_span(zs, start, n):
        view, base = zs.maps[start >> PAGE_SHIFT]
        off = start & (PAGE_SIZE - 1)
        if off + n <= PAGE_SIZE:
            return bytes(view[base + off:base + off + n])
        view2, base2 = zs.maps[(start >> PAGE_SHIFT) + 1]
        first = PAGE_SIZE - off
        return (bytes(view[base + off:base + PAGE_SIZE])
                + bytes(view2[base2:base2 + n - first]))

    @staticmethod
    def _write_span(zs, start, data):
        n = len(data)
        view, base = zs.maps[start >> PAGE_SHIFT]
        off = start & (PAGE_SIZE - 1)
        if off + n <= PAGE_SIZE:
            view[base + off:base + off + n] = data
            return
        view2, base2 = zs.maps[(start >> PAGE_SHIFT) + 1]
        first = PAGE_SIZE - off
        view[base + off:base + PAGE_SIZE] = data[:first]
        view2[base2:base2 + n - first] = data[first:]

    # ---- stats and teardown -----------------------------------------------

    def stats(self):
        """PoolStats: pages_compacted, total pages, and one ClassStat per
        unmerged class (the debugfs ``classes`` table)."""
        rows = []
        for cls in self.classes:
            with cls.lock:
                fullness = tuple(len(cls.groups[g]) for g in
                                 range(ZS_INUSE_RATIO_10, NR_FULLNESS_GROUPS))
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

    def close(self):
        """Stop the worker, flush deferred frees and return every frame."""
        with self._worker_lock:
            self._closing = True
            worker = self._worker
        if worker is not None:
            self._dq_wake.set()
            self._dq_half.set()
            worker.join()
        self.free_deferred_flush()
        for cls in self.classes:
            with cls.lock:
                for group in cls.groups:
                    group.clear()
                cls.obj_allocated = cls.obj_used = 0
        self._zspages = []
        self._arena.close()
