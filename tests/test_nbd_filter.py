"""zramd's nbdkit filter (zramd/filter/) in front of plugin.py, through a
real nbdkit and python3-libnbd: it is built and loads here, serves whole
sectors from the core, passes everything else on, answers exactly as the
plugin alone does, and is left out, with a warning, where nbdkit would
refuse it.

The rest of the end-to-end suite runs with the filter too
(tests/nbdkit_server.py serves as zramd up does); the tests here are the
ones that count what the filter did, or that need both servers.
"""

import errno
import os
import random
import signal
import subprocess
import threading
import time

import pytest

from conftest import REPO, NbdClient, require, require_module
from nbdkit_server import NbdkitServer
from zramd import attach, control

nbd = require_module("nbd", "python3-libnbd")

SECTOR = 4096


@pytest.fixture
def probe_again():
    """server_filter() asks nbdkit afresh in the test and after it."""
    attach.server_filter.cache_clear()
    yield
    attach.server_filter.cache_clear()


def filter_counts(server):
    server.wait_control()
    return control.call(server.control, "status")["filter"]


def test_the_filter_is_built_and_nbdkit_loads_it():
    """The project's set-up builds it against this machine's nbdkit."""
    require("nbdkit")
    path, why = attach.server_filter()
    assert why is None and path == attach.filter_path()
    out = subprocess.run(["nbdkit", "--filter=" + path, "null", "--version"],
                         capture_output=True, text=True, check=True).stdout
    assert "\nzramd " in out


def test_a_filter_built_by_another_python_is_found(monkeypatch):
    """The filter uses no Python: a zramd command run by another
    interpreter than the one that built it still finds it."""
    import importlib.machinery
    built = attach.filter_path()
    assert built, "the filter is not built"
    monkeypatch.setattr(importlib.machinery, "EXTENSION_SUFFIXES",
                        [".cpython-399-x86_64-linux-gnu.so", ".so"])
    assert attach.filter_path() == built


def test_whole_sectors_are_served_by_the_core(nbdkit_server):
    server = nbdkit_server(size="16M")
    assert filter_counts(server) == {"served_reads": 0, "served_writes": 0,
                                     "passed_reads": 0, "passed_writes": 0}
    rng = random.Random(5)
    data = bytes(rng.randrange(4) for _ in range(8 * SECTOR))
    with NbdClient(server.uri) as h:
        h.pwrite(data, 4 * SECTOR)                  # served
        h.pwrite(b"\xaa" * 100, 3 * SECTOR + 50)    # passed: part of one
        h.pwrite(data[:2 * SECTOR], 100)            # passed: not aligned
        assert h.pread(8 * SECTOR, 4 * SECTOR) == data      # served
        assert h.pread(SECTOR, 0) == (bytes(100) + data[:SECTOR - 100])
        h.zero(SECTOR, 0)                           # not the filter's
        h.trim(SECTOR, SECTOR)
        assert h.pread(100, 3 * SECTOR + 50) == b"\xaa" * 100   # passed
    assert filter_counts(server) == {"served_reads": 2, "served_writes": 1,
                                     "passed_reads": 1, "passed_writes": 2}


def test_sectors_the_core_hands_back_go_on_to_the_plugin(nbdkit_server):
    """lzo has no C form: the core hands every such sector back, and the
    plugin's Python path stores and reads them."""
    server = nbdkit_server(size="16M", algorithm="lzo")
    data = (b"zramd" * 1000)[:SECTOR] + os.urandom(SECTOR) + b"\1" * SECTOR
    with NbdClient(server.uri) as h:
        h.pwrite(data, 0)
        assert h.pread(len(data), 0) == data
    status = control.call(server.control, "status")
    assert status["algorithm"] == "lzo"
    assert status["filter"]["served_writes"] == 0
    assert status["filter"]["passed_writes"] == 1
    # the same-filled sector is the core's own, but the first is lzo's
    assert status["filter"]["passed_reads"] == 1
    assert status["same_pages"] == 1 and status["num_writes"] == 3


def test_the_plugin_alone_and_behind_the_filter_answer_alike(tmp_path):
    """The same random requests, aligned or not, to a server with the
    filter and one without: every read answers the same bytes, and the
    devices end with the same mm_stat."""
    require("nbdkit")
    rng = random.Random(20261202)
    size = 8 << 20
    servers = [NbdkitServer(tmp_path / "with", size="8M"),
               NbdkitServer(tmp_path / "without", size="8M", filter=None)]
    try:
        clients = [NbdClient(s.uri) for s in servers]
        handles = [c.__enter__() for c in clients]
        for _ in range(600):
            op = rng.choice(("write", "write", "read", "read", "trim"))
            if rng.random() < 0.6:
                off = rng.randrange(size // SECTOR - 8) * SECTOR
                n = rng.randrange(1, 9) * SECTOR
            else:
                off = rng.randrange(size - 3 * SECTOR)
                n = rng.randrange(1, 3 * SECTOR)
            if op == "write":
                data = bytes(rng.choice((0, rng.randrange(256)))
                             for _ in range(16)) * (n // 16 + 1)
                data = (data if rng.random() < 0.5
                        else rng.randbytes(n))[:n]
                for h in handles:
                    h.pwrite(data, off)
            elif op == "trim":
                for h in handles:
                    h.trim(n, off)
            else:
                got = [h.pread(n, off) for h in handles]
                assert got[0] == got[1], "read %d+%d" % (off, n)
        whole = [h.pread(size, 0) for h in handles]
        assert whole[0] == whole[1]
        for c in clients:
            c.__exit__(None, None, None)
        stats = [control.call(s.control, "status") for s in servers]
        keys = ("orig_data_size", "compr_data_size", "same_pages",
                "huge_pages", "num_reads", "num_writes", "failed_reads",
                "failed_writes", "notify_free")
        assert [stats[0][k] for k in keys] == [stats[1][k] for k in keys]
        assert stats[0]["filter"]["served_writes"] > 0
        assert stats[1]["filter"] is None
    finally:
        for s in servers:
            assert s.stop() == 0, s.log()
            assert "Traceback" not in s.log(), s.log()


def test_a_filter_nbdkit_refuses_is_left_out_with_a_warning(
        monkeypatch, capsys, tmp_path, probe_again):
    """Say a nbdkit upgrade came after the build: nbdkit loads only a
    filter built against its own version.  The server then runs the
    plugin alone, and the warning says why and how to rebuild."""
    require("nbdkit")
    from zramd import config
    not_a_filter = str(tmp_path / "not-a-filter.so")
    monkeypatch.setattr(attach, "filter_path", lambda: not_a_filter)
    monkeypatch.setenv("ZRAMD_RUNTIME_DIR", str(tmp_path))
    conf = tmp_path / "etc/zramd/zramd.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("[zramd0]\nzram-size=64\n")
    dev = config.load(str(tmp_path), ram_mib=1024)["zramd0"]
    path, why = attach.server_filter()
    assert path is None and "not-a-filter.so" in why
    argv = attach.server_command(dev, plugin="/p.py")
    assert not any(a.startswith("--filter") for a in argv)
    err = capsys.readouterr().err
    assert err.startswith("zramd: zramd0: ") and "not-a-filter.so" in err
    assert "python plugin alone" in err and "pip install -e" in err

    monkeypatch.setattr(attach, "filter_path", lambda: None)
    attach.server_filter.cache_clear()
    assert attach.server_filter() == (None,
                                      "zramd's nbdkit filter is not built")


def test_requests_at_and_past_the_end_and_read_only(nbdkit_server):
    """The last sector is the core's; past the end nbdkit refuses before
    the filter, as before; a read-only server refuses writes."""
    server = nbdkit_server(size="1M")
    last = (1 << 20) - SECTOR
    with NbdClient(server.uri, strict=False) as h:
        h.pwrite(b"\x5a" * SECTOR, last)
        assert h.pread(SECTOR, last) == b"\x5a" * SECTOR
        for call in (lambda: h.pread(2 * SECTOR, last),
                     lambda: h.pwrite(bytes(2 * SECTOR), last)):
            with pytest.raises(nbd.Error) as e:
                call()
            assert e.value.errnum in (errno.EINVAL, errno.ENOSPC)
        assert h.pread(SECTOR, last) == b"\x5a" * SECTOR
    assert filter_counts(server)["served_writes"] == 1

    ro = nbdkit_server(size="1M", extra_args=("-r",))
    with NbdClient(ro.uri, strict=False) as h:
        with pytest.raises(nbd.Error) as e:
            h.pwrite(bytes(SECTOR), 0)
        assert e.value.errnum == errno.EPERM
        assert h.pread(SECTOR, 0) == bytes(SECTOR)
    assert filter_counts(ro)["served_writes"] == 0


def test_the_server_stops_cleanly_under_traffic(nbdkit_server):
    """SIGTERM while four clients read and write whole sectors: the core
    is withdrawn from the filter before the device is freed, so nbdkit
    ends without a crash."""
    server = nbdkit_server(size="16M")
    stop = threading.Event()
    errors = []

    def hammer(seed):
        rng = random.Random(seed)
        try:
            with NbdClient(server.uri) as h:
                while not stop.is_set():
                    off = rng.randrange(4096 - 8) * SECTOR
                    if rng.random() < 0.5:
                        h.pwrite(rng.randbytes(8 * SECTOR), off)
                    else:
                        h.pread(8 * SECTOR, off)
        except nbd.Error as e:       # the server went away: expected
            errors.append(e)
    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    served = filter_counts(server)
    assert served["served_reads"] + served["served_writes"] > 0
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(30)
    stop.set()
    for t in threads:
        t.join(30)
    log = server.log()
    assert server.process.returncode == 0, log
    for bad in ("Traceback", "Fatal", "Segmentation", "AddressSanitizer"):
        assert bad not in log, log


def test_a_filter_of_another_abi_serves_nothing(nbdkit_server, tmp_path):
    """A filter built from other sources than the module is refused by
    the module: the server runs, the plugin serves everything, and the
    log says why."""
    require("gcc")
    other = tmp_path / "other-abi.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-DZRAMD_FILTER_ABI=99",
                    "-o", str(other), os.path.join(
                        REPO, "zramd", "filter", "nbdkit_filter.c")],
                   check=True)
    server = nbdkit_server(size="4M", filter=str(other))
    data = os.urandom(4 * SECTOR)
    with NbdClient(server.uri) as h:
        h.pwrite(data, 0)
        assert h.pread(len(data), 0) == data
    assert filter_counts(server) is None
    assert ("nbdkit: warning: zramd: zramd's nbdkit filter speaks ABI 99, "
            "this module 1" in server.log())
