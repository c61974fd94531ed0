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
request (docs/benchmarks.md, "Profile").

``pin()`` makes one unmatched ``PyGILState_Ensure()`` on a thread's first
callback.  The state's counter then never falls to 0, ``Release`` only
drops the GIL, and the next callback on that thread resumes the same state:

    first request:  Ensure (1) -> pin: Ensure (2) -> pread() -> Release (1)
    next requests:  Ensure (2) -> pread() -> Release (1)

A pinned state would outlive its thread: nbdkit ends a connection's
threads when the connection closes.  It must be freed on its own thread
(from CPython 3.12, deleting it from any other thread clears that other
thread's PyGILState slot, and nbdkit's next ``Release`` there aborts), so
the C part, ``zramd._threadstate``, frees it from a pthread key destructor
as the thread exits: the thread's ``threading.local`` values go with it.

With zramd's nbdkit filter in front (zramd/filter/), reads and writes of
whole sectors never reach the plugin; what is said here holds for the
requests that do (the rest, and every other callback).

``pin()`` is for threads Python did not start (nbdkit's); on a thread
Python started it does no harm, and Python frees that state as usual.
"""

import atexit

try:
    from zramd import _threadstate
except ImportError as err:   # a clone built before that extension existed
    raise ImportError("zramd._threadstate is not built: run "
                      "'pip install -e .' in the clone (scripts/test "
                      "does)") from err

pin = _threadstate.pin


def count():
    """Pinned thread states not yet freed: one per live worker thread that
    has run a callback."""
    return _threadstate.count()


# Thread exit must not take the GIL once the interpreter finalises: from
# here on the interpreter clears the states left.
atexit.register(_threadstate.stop)
