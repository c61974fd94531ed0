"""zramd.threadstate through a real nbdkit: nbdkit's worker threads keep
their Python thread state between requests, and the states of threads
that ended with their connection are deleted, so connections can come and
go for ever without the server growing."""

import os
import random

import pytest

from conftest import NbdClient, require, require_module
from nbdkit_server import NbdkitServer
from zramd import control

THREADS = 4


@pytest.fixture
def server(tmp_path):
    require("nbdkit")
    srv = NbdkitServer(tmp_path / "srv", size="16M",
                       extra_args=("--threads", str(THREADS)))
    srv.wait_control()
    yield srv
    assert srv.stop() == 0, srv.log()
    assert "Traceback" not in srv.log(), srv.log()


def thread_states(server):
    return control.call(server.control, "status")["thread_states"]


def parallel_reads_and_writes(h, rng, model):
    """Keep THREADS * 2 requests in flight, so every worker thread of the
    connection runs callbacks, and check what comes back."""
    nbd = require_module("nbd", "python3-libnbd")
    pending = []
    # Distinct sectors: requests in flight together complete in any order.
    for sector in rng.sample(range(len(model)), THREADS * 2):
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


def test_worker_threads_keep_their_state_and_dead_ones_are_reaped(server):
    require_module("nbd", "python3-libnbd")
    rng = random.Random(7)
    model = [bytes(4096)] * 256
    connections = 40
    seen = []
    for _ in range(connections):
        with NbdClient(server.uri) as h:
            for _ in range(5):
                parallel_reads_and_writes(h, rng, model)
            # While the connection lives its workers' states are kept; the
            # states of earlier connections were deleted when they closed.
            live = thread_states(server)
            seen.append(live)
            assert 1 <= live <= 2 * THREADS, seen
    # Without reaping this would be about one state per worker thread
    # ever started: up to THREADS * connections.
    assert thread_states(server) <= THREADS, seen
    with NbdClient(server.uri) as h:
        for sector, expected in enumerate(model):
            assert h.pread(4096, sector * 4096) == expected
