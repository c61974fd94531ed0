"""Keep one Python thread state per nbdkit worker thread.

nbdkit's python plugin wraps every callback in ``PyGILState_Ensure()`` /
``PyGILState_Release()``.  An nbdkit worker thread holds no Python thread
state between two callbacks, so each ``Release`` deletes the state the
``Ensure`` before it created:

    request 1: Ensure -> new PyThreadState -> pread() -> Release -> deleted
    request 2: Ensure -> new PyThreadState -> pread() -> Release -> deleted

Every request then pays for a new thread state (CPython 3.11 also maps and
unmaps a 16 KiB frame stack for it), and ``threading.local`` starts empty
each time, so per-thread compression contexts and buffers are rebuilt per
request.  Measured on this project's machine: a do-nothing python plugin
answered a 4 KiB read at queue depth 1 in 69-102 us, and in 16-41 us with
the thread state kept (docs/benchmarks.md, "Profile").

``pin()`` makes one unmatched ``PyGILState_Ensure()`` on a thread's first
callback.  The state's counter then never falls to 0, ``Release`` only
drops the GIL, and the next callback on that thread resumes the same state:

    first request:  Ensure (1) -> pin: Ensure (2) -> pread() -> Release (1)
    next requests:  Ensure (2) -> pread() -> Release (1)

A pinned state outlives its thread: nbdkit ends a connection's worker
threads when the connection closes.  ``pinned`` records each pinned state
with the thread's kernel id, and ``reap()`` (from the plugin's ``close``
callback, after nbdkit has joined that connection's workers) clears and
deletes the states whose thread is gone from /proc/self/task, which also
frees their ``threading.local`` values.  Everything here runs with the GIL
held (ctypes.pythonapi does not release it), which serialises ``pinned``.
"""

import ctypes
import os
import threading

_api = ctypes.pythonapi
_api.PyGILState_Ensure.restype = ctypes.c_int
_api.PyGILState_Ensure.argtypes = ()
_api.PyThreadState_Get.restype = ctypes.c_void_p
_api.PyThreadState_Get.argtypes = ()
_api.PyThreadState_Clear.restype = None
_api.PyThreadState_Clear.argtypes = (ctypes.c_void_p,)
_api.PyThreadState_Delete.restype = None
_api.PyThreadState_Delete.argtypes = (ctypes.c_void_p,)

_local = threading.local()
# kernel thread id -> address of the PyThreadState pinned on that thread
pinned = {}


def pin():
    """Keep the calling thread's Python thread state after this callback.
    Cheap after the first call on a thread: one attribute lookup."""
    if getattr(_local, "pinned", False):
        return
    _api.PyGILState_Ensure()
    _local.pinned = True
    tid = threading.get_native_id()
    stale = pinned.get(tid)
    pinned[tid] = _api.PyThreadState_Get()
    if stale is not None:
        # The kernel gave a dead pinned thread's id to this new thread.
        _delete(stale)


def _delete(state):
    _api.PyThreadState_Clear(state)
    _api.PyThreadState_Delete(state)


def reap():
    """Delete the pinned thread states of threads that have exited.
    Returns how many were deleted."""
    # A copy: os.path.exists drops the GIL, and other threads pin meanwhile.
    gone = [(tid, state) for tid, state in list(pinned.items())
            if not os.path.exists("/proc/self/task/%d" % tid)]
    for tid, state in gone:
        if pinned.get(tid) == state:
            del pinned[tid]
            _delete(state)
    return len(gone)
