"""The pool: a zsmalloc-style allocator of small objects over 4 KiB frames.

The allocator itself is C, zramd/csrc/zsmalloc.c (read its opening comment
for the data structure: size classes, zspages chained from page frames it
maps itself, objects that may span two frames, handles with the
indirection compaction needs, a mutex per class), exported as
``zramd._fastpath.ZsPool``.  ``Pool`` is that type with what the kernel's
zsmalloc has around it on the Python side:

Deferred free
    As "mm/zsmalloc: reduce zs_free() latency on swap release path": a
    bounded queue of handles (DEFERRED_CAPACITY, 128 MiB worth of pages),
    drained by a worker thread that lets a lone handle wait a moment
    (DEFERRED_IDLE_DELAY) for company.  ``free_deferred`` only try-locks
    the queue: when it is busy or full, the handle is freed at once.  A
    queued handle stays allocated, so it is never handed out again before
    it is really freed.  ``free_deferred_flush`` frees everything queued
    before it returns.

Stats
    ``stats()`` turns the pool's per-class rows into zramd.stats'
    dataclasses (the debugfs ``classes`` table, exactly the kernel's).

Locking
    The C pool's locks are its own (a mutex per class, the arena's, and
    one that makes compactions take turns); a thread waiting for one lets
    the GIL go.  Here: ``_dq_lock`` guards the queue, only try-locked by
    ``free_deferred`` and held by nothing else while it frees;
    ``_drain_lock`` makes drains take turns; ``audit`` holds ``_dq_lock``
    while the C audit holds every class lock.
"""

import threading
from array import array

from . import _fastpath
from ._fastpath import DEFERRED_CAPACITY
from .stats import ClassStat, PoolStats

DEFERRED_IDLE_DELAY = 0.05   # seconds a lone handle may wait for company


class Pool(_fastpath.ZsPool):
    """A zsmalloc pool: ``Pool(chain_size=8)``.

    Contract: handles are non-zero ints, valid from ``malloc`` until
    ``free``/``free_deferred``; the caller serialises use of one handle
    (zram's slot lock does).  Sizes are bytes.  From the C type:
    ``malloc(size)``, ``free(handle)``, ``obj_size(handle)``,
    ``obj_write(handle, data)``, ``obj_read_begin(handle, local_copy)``,
    ``obj_read_end(handle, view)``, ``compact()``, ``total_pages()``,
    ``lookup_class_index(size)``, ``huge_class_size``, ``pages_compacted``
    (their docstrings hold the details).
    """

    def __init__(self, chain_size=_fastpath.CHAIN_SIZE_DEFAULT):
        super().__init__(chain_size)
        self.chain_size = chain_size
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

    # ---- deferred free ---------------------------------------------------

    def free_deferred(self, handle):
        """Queue ``handle`` for the drain worker; free it synchronously when
        the queue's lock is busy or the queue is full.  A queued handle is
        not reused before it is really freed.  ValueError if it is not
        allocated."""
        if not self.obj_size(handle):
            raise ValueError("free_deferred: handle %r is not allocated"
                             % (handle,))
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

    # ---- stats, checks and teardown --------------------------------------

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
        also free, and the arena's count is the zspages' frames.  Here:
        queued handles are live."""
        with self._dq_lock:
            self._audit()
            dead = [h for h in self._dq if not self.obj_size(h)]
        if dead:
            raise AssertionError("queued for deferred free but not live: %s"
                                 % sorted(dead)[:10])

    def close(self):
        """Stop the worker, flush deferred frees and return every frame.
        BufferError while a read is open."""
        with self._worker_lock:
            self._closing = True
            worker = self._worker
        if worker is not None:
            self._dq_wake.set()
            self._dq_half.set()
            worker.join()
        if not self.closed:
            self.free_deferred_flush()
        super().close()
