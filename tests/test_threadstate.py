"""zramd.threadstate: threads Python did not start keep their Python thread
state between callbacks, and each state is freed on its own thread when
that thread exits, so connections can come and go for ever without the
server growing or aborting.

In process, a thread started with pthread_create through ctypes calls
back into Python the way nbdkit's workers do (PyGILState_Ensure, then
Release).  Through a real nbdkit, many connections open and close, one
after another and several at once, with one worker per connection (the
connection's own thread serves) and with several; on whichever Python
nbdkit embeds (3.11 on Debian 12, 3.13 on Debian 13)."""

import ctypes
import ctypes.util
import gc
import os
import random
import signal
import sys
import threading
import time
import weakref

import pytest

from conftest import NbdClient, require, require_module
from nbdkit_server import NbdkitServer
from zramd import control, threadstate

# --- in process -------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6",
                    use_errno=True)
_START = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)
_libc.pthread_create.argtypes = (ctypes.POINTER(ctypes.c_ulong),
                                 ctypes.c_void_p, _START, ctypes.c_void_p)
_libc.pthread_join.argtypes = (ctypes.c_ulong, ctypes.c_void_p)


class Payload:
    """Something to leave in a threading.local and watch die."""


def run_on_foreign_thread(function):
    """Run ``function()`` on a new thread started by C, as nbdkit starts
    its workers, and join it.  Returns what it returned."""
    out = {}

    def start(arg):
        out["value"] = function()
        return None

    callback = _START(start)
    thread = ctypes.c_ulong()
    assert _libc.pthread_create(ctypes.byref(thread), None, callback,
                                None) == 0
    # ctypes drops the GIL during the call: the exiting thread needs it.
    assert _libc.pthread_join(thread, None) == 0
    return out["value"]


def test_foreign_thread_state_is_freed_on_that_thread_at_exit():
    before = threadstate.count()
    local = threading.local()

    def pinned_callback():
        assert threadstate.pin() is True
        assert threadstate.pin() is False      # once per thread
        local.payload = payload = Payload()
        return weakref.ref(payload), threadstate.count()

    for _ in range(50):
        ref, during = run_on_foreign_thread(pinned_callback)
        assert during == before + 1
        # Freed with the thread's state, which went when the thread did.
        gc.collect()
        assert ref() is None
        assert threadstate.count() == before


def test_python_thread_keeps_python_managing_its_state():
    before = threadstate.count()
    local = threading.local()
    refs = []

    def work():
        threadstate.pin()
        local.payload = payload = Payload()
        refs.append(weakref.ref(payload))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    gc.collect()
    assert [ref() for ref in refs] == [None] * 8
    assert threadstate.count() == before


# --- through nbdkit -------------------------------------------------------------


def thread_states(server):
    return control.call(server.control, "status")["thread_states"]


def wait_thread_states(server, expected, timeout=30.0):
    """A connection's threads free their states as they exit, just after
    the client has seen the connection close."""
    deadline = time.monotonic() + timeout
    while True:
        now = thread_states(server)
        if now == expected or time.monotonic() > deadline:
            return now
        time.sleep(0.02)


def parallel_reads_and_writes(h, rng, model, depth):
    """Keep ``depth`` requests in flight, so every worker thread of the
    connection runs callbacks, and check what comes back."""
    nbd = require_module("nbd", "python3-libnbd")
    pending = []
    # Distinct sectors: requests in flight together complete in any order.
    for sector in rng.sample(range(len(model)), depth):
        if rng.random() < 0.5:
            data = bytes([rng.randrange(256)]) * 2048 + os.urandom(2048)
            model[sector] = data
            h.aio_pwrite(data, sector * 4096)
        else:
            buf = nbd.Buffer(4096)
            pending.append((sector, model[sector], buf))
            h.aio_pread(buf, sector * 4096)
    while h.aio_in_flight():
        h.poll(-1)
    for sector, expected, buf in pending:
        assert buf.to_bytearray() == expected, sector


@pytest.fixture(params=[1, 4], ids=["threads1", "threads4"])
def server(request, tmp_path):
    require("nbdkit")
    # The plugin alone: with zramd's filter in front, whole sectors never
    # reach Python, and these tests count the states Python keeps.
    srv = NbdkitServer(tmp_path / "srv", size="16M", threads=request.param,
                       filter=None)
    srv.threads = request.param
    srv.wait_control()
    yield srv
    assert srv.stop() == 0, srv.log()
    assert "Traceback" not in srv.log(), srv.log()
    assert "Fatal Python error" not in srv.log(), srv.log()


def test_connections_come_and_go_and_their_states_are_freed(server):
    require_module("nbd", "python3-libnbd")
    rng = random.Random(7)
    model = [bytes(4096)] * 256
    depth = server.threads * 2
    seen = []
    for _ in range(40):
        with NbdClient(server.uri) as h:
            for _ in range(5):
                parallel_reads_and_writes(h, rng, model, depth)
            # The workers' states are kept while the connection lives.
            live = thread_states(server)
            seen.append(live)
            assert 1 <= live <= server.threads, seen
        # Each connection's states go with its threads.
        assert wait_thread_states(server, 0) == 0, seen

    # Several connections at once, each from its own client thread.
    errors = []

    def client(seed):
        try:
            crng = random.Random(seed)
            # Each client its own sectors: they run concurrently.
            own = list(range(seed * 32, seed * 32 + 32))
            cmodel = {s: model[s] for s in own}
            for _ in range(5):
                with NbdClient(server.uri) as h:
                    for _ in range(3):
                        for sector in crng.sample(own, 4):
                            data = os.urandom(64) * 64
                            h.pwrite(data, sector * 4096)
                            cmodel[sector] = data
                        for sector in own:
                            assert h.pread(4096, sector * 4096) == \
                                cmodel[sector], sector
            model[seed * 32:seed * 32 + 32] = [cmodel[s] for s in own]
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    clients = [threading.Thread(target=client, args=(seed,))
               for seed in range(6)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    assert not errors, errors
    assert wait_thread_states(server, 0) == 0

    with NbdClient(server.uri) as h:
        for sector, expected in enumerate(model):
            assert h.pread(4096, sector * 4096) == expected


def test_server_stops_cleanly_with_pinned_states(server):
    """SIGTERM while a connection's threads hold pinned states: nbdkit
    waits for the client to go, and its threads exit while Python is
    being finalised; it still exits 0 (the fixture checks the log)."""
    require_module("nbd", "python3-libnbd")
    with NbdClient(server.uri) as h:
        parallel_reads_and_writes(h, random.Random(3), [bytes(4096)] * 64,
                                  server.threads * 2)
        assert thread_states(server) >= 1
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
    assert server.process.wait(30) == 0, server.log()


def test_embedded_python_is_this_python(server):
    """The in-process tests above ran on the interpreter nbdkit embeds."""
    assert control.call(server.control, "status")["pid"] > 0
    log = server.log()
    assert "Fatal" not in log, log
    assert sys.version_info[:2] >= (3, 11)
