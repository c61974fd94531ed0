"""The plugin through python3-libnbd: every NBD command against a model of
the disk, block status, unaligned and sub-sector requests, requests outside
the disk, several connections at once, and clients killed mid-transfer.

One nbdkit (64 MiB) serves most of the module; each test works in its own
band of the disk so that they do not see each other's data.  Tests that
kill clients over and over, or may bring nbdkit down, have their own.
"""

import errno
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import NbdClient, require_module

nbd = require_module("nbd", "python3-libnbd")

MiB = 1 << 20
SECTOR = 4096
SIZE = 64 * MiB
HOLE_ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO


def band(n):
    """The n-th 4 MiB band of the disk: (start, length)."""
    return n * 4 * MiB, 4 * MiB


def page_data(rng, length):
    """Bytes like a disk holds: text, random, zero and repeated runs."""
    out = bytearray()
    while len(out) < length:
        kind = rng.randrange(4)
        n = rng.randrange(1, 9000)
        if kind == 0:
            out += b"".join(rng.choice((b"zram ", b"nbdkit ", b"sector\n"))
                            for _ in range(n // 6 + 1))
        elif kind == 1:
            out += rng.randbytes(n)
        elif kind == 2:
            out += bytes(n)
        else:
            out += bytes([rng.randrange(256)]) * n
    return bytes(out[:length])


def sector_states(h, offset, length):
    """block_status flags for each 4 KiB sector of the range."""
    states = []

    def extent(metacontext, start, entries, err):
        if metacontext != nbd.CONTEXT_BASE_ALLOCATION:
            return 0
        for i in range(0, len(entries), 2):
            assert entries[i] % SECTOR == 0
            states.extend([entries[i + 1]] * (entries[i] // SECTOR))
        return 0

    while len(states) * SECTOR < length:
        done = len(states) * SECTOR
        h.block_status(length - done, offset + done, extent)
    return states[:length // SECTOR]


def test_random_commands_match_a_model(module_server):
    """pwrite, trim, zero (with and without fast/no-hole flags), flush and
    pread at random offsets and lengths, aligned or not, against a
    bytearray; the whole band is compared at the end."""
    rng = random.Random(20261122)
    start, length = band(0)
    model = bytearray(length)
    with NbdClient(module_server.uri) as h:
        for _ in range(1500):
            op = rng.choice(("write", "write", "write", "trim", "zero",
                             "read", "read", "flush"))
            if rng.random() < 0.3:      # whole sectors
                off = rng.randrange(0, length // SECTOR) * SECTOR
                n = rng.randrange(1, 17) * SECTOR
            else:                       # any bytes
                off = rng.randrange(0, length)
                n = rng.randrange(1, 3 * SECTOR)
            n = min(n, length - off)
            if op == "write":
                data = page_data(rng, n)
                flags = nbd.CMD_FLAG_FUA if rng.random() < 0.2 else 0
                h.pwrite(data, start + off, flags)
                model[off:off + n] = data
            elif op in ("trim", "zero"):
                if op == "trim":
                    h.trim(n, start + off)
                else:
                    flags = rng.choice((0, nbd.CMD_FLAG_FAST_ZERO,
                                        nbd.CMD_FLAG_NO_HOLE))
                    h.zero(n, start + off, flags)
                model[off:off + n] = bytes(n)
            elif op == "read":
                assert h.pread(n, start + off) == model[off:off + n], \
                    "read %d+%d" % (off, n)
            else:
                h.flush()
        assert h.pread(length, start) == model


def test_sub_sector_writes_leave_neighbours_alone(module_server):
    start, _ = band(1)
    base = bytes(range(256)) * 48                   # three sectors
    with NbdClient(module_server.uri) as h:
        h.pwrite(base, start)
        expect = bytearray(base)
        for off, data in ((0, b"\xff"), (4095, b"ab"), (4096 * 2 + 17, b"q"),
                          (5000, b"x" * 3000), (1, b"y" * 4094)):
            h.pwrite(data, start + off)
            expect[off:off + len(data)] = data
            assert h.pread(len(base), start) == expect
        # Reads that start and end inside sectors.
        for off, n in ((1, 1), (4095, 2), (4000, 4200), (123, 12000)):
            assert h.pread(n, start + off) == expect[off:off + n]
        # A sub-sector write into a sector never written.
        h.pwrite(b"lonely", start + 3 * SECTOR + 100)
        assert h.pread(SECTOR, start + 3 * SECTOR) == \
            bytes(100) + b"lonely" + bytes(SECTOR - 106)


def test_block_status_reports_holes_zeroes_and_data(module_server):
    start, _ = band(2)
    with NbdClient(module_server.uri) as h:
        assert sector_states(h, start, 8 * SECTOR) == [HOLE_ZERO] * 8
        h.pwrite(b"data" * 1024, start)                     # sector 0
        h.pwrite(bytes(SECTOR), start + SECTOR)             # sector 1
        h.pwrite(b"\x07" * SECTOR, start + 2 * SECTOR)      # sector 2
        h.pwrite(b"both" * 2048, start + 3 * SECTOR)        # sectors 3, 4
        h.trim(SECTOR, start + 3 * SECTOR)                  # sector 3
        h.zero(SECTOR, start + 4 * SECTOR)                  # sector 4
        h.pwrite(b"z", start + 5 * SECTOR + 9)              # sector 5
        h.trim(SECTOR - 100, start + 5 * SECTOR + 100)      # partial trim
        states = sector_states(h, start, 8 * SECTOR)
        assert states[0] == 0                       # data
        assert states[1] == nbd.STATE_ZERO          # written zeroes: zero
        assert states[2] == 0                       # same-filled, not zero
        assert states[3] == HOLE_ZERO               # trimmed
        assert states[4] & nbd.STATE_ZERO           # zeroed
        assert states[5] == 0                       # partial trim keeps data
        assert states[6:] == [HOLE_ZERO] * 2
        # Every sector said to read as zero really does.
        for i, state in enumerate(states):
            if state & nbd.STATE_ZERO:
                assert h.pread(SECTOR, start + i * SECTOR) == bytes(SECTOR)
        # Unaligned queries are answered too, starting where asked.
        seen = []
        h.block_status(5000, start + 100,
                       lambda ctx, off, entries, err: seen.append(
                           (off, list(entries))) or 0)
        assert seen and seen[0][0] == start + 100
        assert seen[0][1][1] == 0                   # in sector 0: data


@pytest.mark.parametrize("command, expected", [
    ("pread", errno.EINVAL), ("pwrite", errno.ENOSPC), ("trim", errno.EINVAL),
    ("zero", errno.ENOSPC), ("block_status", errno.EINVAL),
])
def test_requests_past_the_end_fail_cleanly(module_server, command, expected):
    calls = {
        "pread": lambda h: h.pread(8192, SIZE - 4096),
        "pwrite": lambda h: h.pwrite(b"x" * 100, SIZE - 50),
        "trim": lambda h: h.trim(SECTOR, SIZE),
        "zero": lambda h: h.zero(2 * SECTOR, SIZE - SECTOR),
        "block_status": lambda h: h.block_status(
            SECTOR, SIZE, lambda *a: 0),
    }
    start, _ = band(3)
    with NbdClient(module_server.uri, strict=False) as h:
        h.pwrite(b"before", start)
        with pytest.raises(nbd.Error) as e:
            calls[command](h)
        assert e.value.errnum == expected, e.value
        # The same connection goes on working, and the last byte is fine.
        assert h.pread(6, start) == b"before"
        h.pwrite(b"end", SIZE - 3)
        assert h.pread(3, SIZE - 3) == b"end"
    assert module_server.process.poll() is None


def test_client_side_bounds_check(module_server):
    """libnbd in strict mode refuses before sending; still EINVAL."""
    with NbdClient(module_server.uri) as h:
        with pytest.raises(nbd.Error) as e:
            h.pread(1, SIZE)
        assert e.value.errnum == errno.EINVAL


def test_large_requests(module_server):
    start, length = band(4)
    data = page_data(random.Random(4), length)      # one 4 MiB request
    with NbdClient(module_server.uri) as h:
        h.pwrite(data, start)
        assert h.pread(length, start) == data


def test_parallel_connections_see_each_others_writes(module_server):
    """can_multi_conn: four connections write their own quarter at once;
    after a flush on each, every connection reads every quarter."""
    start, length = band(5)
    quarter = length // 4
    datas = [page_data(random.Random(i), quarter) for i in range(4)]
    clients = [NbdClient(module_server.uri) for _ in range(4)]
    errors = []

    def writer(i):
        try:
            h = clients[i].handle
            for off in range(0, quarter, 64 * 1024):
                h.pwrite(datas[i][off:off + 64 * 1024],
                         start + i * quarter + off)
            h.flush()
        except Exception as err:            # reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for client in clients:
        with client as h:
            for i in range(4):
                assert h.pread(quarter, start + i * quarter) == datas[i]


KILLED_CLIENT = textwrap.dedent("""\
    import nbd, random, sys
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    start = int(sys.argv[2])
    data = random.Random(int(sys.argv[3])).randbytes(1 << 20)
    buf = nbd.Buffer.from_bytearray(bytearray(data))
    print("connected", flush=True)
    n = 0
    while True:                     # keep 8 writes in flight until killed
        while h.aio_in_flight() < 8:
            h.aio_pwrite(buf, start + (n % 2) * (1 << 20),
                         completion=lambda error: 1)     # 1: auto-retire
            n += 1
            if n == 16:
                print("writing", flush=True)
        h.poll(-1)
    """)


def test_client_killed_mid_transfer(module_server, tmp_path):
    """SIGKILL a client with writes in flight; the server goes on serving
    the other connection, whose data is intact, and new ones."""
    start, length = band(6)
    kept = page_data(random.Random(6), length // 2)
    # The dead client's two MiB (the band's second half) start as old
    # contents, each MiB its own and neither like the 1 MiB buffer the
    # client writes to both.
    target = start + length // 2
    old = page_data(random.Random(60), length // 2)
    olds = [old[:MiB], old[MiB:]]
    seed = 61
    written = random.Random(seed).randbytes(MiB)
    assert len({olds[0], olds[1], written}) == 3
    script = tmp_path / "client.py"
    script.write_text(KILLED_CLIENT)
    with NbdClient(module_server.uri) as other:
        other.pwrite(kept, start)
        other.pwrite(old, target)
        child = subprocess.Popen(
            [sys.executable, str(script), module_server.uri, str(target),
             str(seed)], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline() == "connected\n"
            assert child.stdout.readline() == "writing\n"
            time.sleep(0.2)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(30)
        assert child.returncode == -signal.SIGKILL
        # The surviving connection: its data intact, writes still work.
        assert other.pread(len(kept), start) == kept
        other.pwrite(b"still here", start)
        assert other.pread(10, start) == b"still here"
    with NbdClient(module_server.uri) as h:
        assert h.pread(len(kept) - 10, start + 10) == kept[10:]
        # Whatever the dead client got written is whole 1 MiB writes of
        # its buffer, or else the older contents: never a mix, never
        # anything else.  It printed "writing" after its 16th write was
        # sent with at most 8 in flight, so 8 had been answered: at least
        # one MiB holds its buffer.
        got = [h.pread(MiB, target + k * MiB) for k in range(2)]
        for k in range(2):
            assert got[k] in (written, olds[k]), (
                "MiB %d is neither the dead client's write nor what it "
                "held before" % k)
        assert written in got
    assert module_server.process.poll() is None


KILLED_BUSY_CLIENT = textwrap.dedent("""\
    import nbd, random, sys
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    start, rng = int(sys.argv[2]), random.Random(int(sys.argv[3]))
    wbuf = nbd.Buffer.from_bytearray(bytearray(rng.randbytes(1 << 20)))
    rbufs = [nbd.Buffer(1 << 20) for _ in range(8)]
    done = lambda error: 1                       # 1: auto-retire
    print("connected", flush=True)
    n = 0
    while True:                     # keep 8 commands in flight until killed
        while h.aio_in_flight() < 8:
            offset = start + rng.randrange(4) * (1 << 20)
            kind = n % 5
            if kind == 0:
                h.aio_pwrite(wbuf, offset, completion=done)
            elif kind == 1:
                h.aio_pread(rbufs[n % 8], offset, completion=done)
            elif kind == 2:
                h.aio_trim(1 << 20, offset, completion=done)
            elif kind == 3:
                h.aio_zero(1 << 20, offset, completion=done)
            else:
                h.aio_flush(completion=done)
            n += 1
            if n == 16:
                print("busy", flush=True)
        h.poll(-1)
    """)

KILLS = 20


def test_clients_killed_again_and_again(nbdkit_server, tmp_path):
    """Twenty clients in turn, each killed with reads, writes, trims,
    zeroes and flushes in flight: nbdkit stays up and the surviving
    connection's data is intact.  A dying client's connection finds its
    socket dead in one thread while others still answer; nbdkit 1.32 with
    several workers per connection then aborts within a few kills
    (connections.c:402 sock >= 0; docs/operations.md), which is why zramd
    serves nbdkit 1.32 with --threads 1 and later nbdkit with more
    (zramd.attach.server_threads, as this test's server)."""
    server = nbdkit_server(size="16M")
    kept = page_data(random.Random(7), 4 * MiB)
    script = tmp_path / "client.py"
    script.write_text(KILLED_BUSY_CLIENT)
    with NbdClient(server.uri) as other:
        other.pwrite(kept, 0)
        for i in range(KILLS):
            child = subprocess.Popen(
                [sys.executable, str(script), server.uri, str(8 * MiB),
                 str(i)], stdout=subprocess.PIPE, text=True)
            try:
                assert child.stdout.readline() == "connected\n"
                assert child.stdout.readline() == "busy\n"
                time.sleep(0.05 * (i % 4))      # at different moments
            finally:
                child.send_signal(signal.SIGKILL)
                child.wait(30)
            assert other.pread(len(kept), 0) == kept, i
            assert server.process.poll() is None, server.log()
        other.pwrite(b"still here", 0)
        assert other.pread(10, 0) == b"still here"
    assert server.stop() == 0, server.log()


BLOCK_STATUS_CLIENT = textwrap.dedent("""\
    import nbd, sys, time
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(sys.argv[1])
    length = int(sys.argv[2])
    for offset in range(0, length, 8192):       # data, hole, data, hole...
        h.pwrite(b"x" * 4096, offset)
    for _ in range(4):                          # and never read the replies
        h.aio_block_status(length, 0, lambda *args: 0)
    print("asked", flush=True)
    time.sleep(60)
    """)


def test_client_killed_during_a_long_block_status_reply(nbdkit_server,
                                                         tmp_path):
    """A client asks for the block status of 4096 extents and dies without
    reading the replies.  nbdkit sends each extent with a send() of its
    own; the socket buffer fills and the send blocks, the client dies, the
    send fails, and nbdkit 1.32 marks the connection dead (closing its
    socket) but goes on to the next extent: abort (connections.c:402,
    send_structured_reply_block_status).  The server must survive it."""
    server = nbdkit_server(size="16M")
    script = tmp_path / "client.py"
    script.write_text(BLOCK_STATUS_CLIENT)
    child = subprocess.Popen([sys.executable, str(script), server.uri,
                              str(16 * MiB)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline() == "asked\n"
        time.sleep(0.5)                     # the server is blocked in send
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    time.sleep(0.2)
    assert server.process.poll() is None, server.log()
    with NbdClient(server.uri) as h:
        assert h.pread(8192, 0) == b"x" * 4096 + bytes(4096)
    assert server.stop() == 0, server.log()
