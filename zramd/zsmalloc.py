"""The pool: a zsmalloc-style allocator of small objects over 4 KiB frames.

The allocator itself is C, zramd/csrc/zsmalloc.c (read its opening comment
for the data structure: size classes, zspages chained from page frames it
maps itself, objects that may span two frames, handles with the
indirection compaction needs, a mutex per class, and the deferred-free
queue with its drain worker), exported as ``zramd._fastpath.ZsPool``.
``Pool`` is that type with the kernel's stats shapes on top:

Stats
    ``stats()`` turns the pool's per-class rows into zramd.stats'
    dataclasses (the debugfs ``classes`` table, exactly the kernel's).

Locking
    Every lock is the C pool's own (a mutex per class, the arena's, the
    deferred queue's, and those that make compactions and drains take
    turns); a Python thread waiting for one lets the GIL go.
"""

from . import _fastpath
from .stats import ClassStat, PoolStats


class Pool(_fastpath.ZsPool):
    """A zsmalloc pool: ``Pool(chain_size=8)``.

    Contract: handles are non-zero ints, valid from ``malloc`` until
    ``free``/``free_deferred``; the caller serialises use of one handle
    (zram's slot lock does).  Sizes are bytes.  From the C type:
    ``malloc(size)``, ``free(handle)``, ``free_deferred(handle)``,
    ``free_deferred_flush()``, ``deferred_pending()``, ``start_worker()``,
    ``hold_worker()``, ``obj_size(handle)``, ``obj_write(handle, data)``,
    ``obj_read_begin(handle, local_copy)``, ``obj_read_end(handle, view)``,
    ``compact()``, ``total_pages()``, ``lookup_class_index(size)``,
    ``huge_class_size``, ``pages_compacted`` (their docstrings hold the
    details).
    """

    def __init__(self, chain_size=_fastpath.CHAIN_SIZE_DEFAULT):
        super().__init__(chain_size)
        self.chain_size = chain_size

    def stats(self):
        """PoolStats: pages_compacted, total pages, and one ClassStat per
        unmerged class (the debugfs ``classes`` table); each row is taken
        under its class's lock."""
        rows = tuple(ClassStat(*row) for row in self.class_stats())
        return PoolStats(pages_compacted=self.pages_compacted,
                         total_pages=self.total_pages(), classes=rows)

    def audit(self):
        """Check the pool's invariants; raise AssertionError naming the
        first broken one.  For tests and debugging: it stops the pool
        meanwhile (every class lock, then the arena's).

        Checked in C (zs_audit): each fullness list is a well-linked chain
        whose members carry its group and the group their use gives, and
        as many as its count; every zspage id is on a list or free, once;
        a zspage's allocated headers, free list and never-used tail add up
        to its objects, and each allocated header names a handle of the
        class whose row points back; every handle row is live or free,
        once; class counters equal the sums; no frame is in two zspages or
        also free, and the arena's count is the zspages' frames; every
        handle queued for deferred free is live."""
        self._audit()
