"""The control channel: attribute formats, the line protocol, its robustness
and the client's errors, against an in-process device (fast) and, in
test_cli.py, a real nbdkit."""

import errno
import json
import os
import socket
import stat
import sys
import threading
import time

import pytest

from conftest import fill_socket
from zramd import control
from zramd.stats import ClassStat, DebugStat, IoStat, MmStat, PoolStats


class FakeDevice:
    """The zramd.device.Device contract with fixed numbers, recording what
    the control channel asked of it."""

    def __init__(self):
        self.size = 64 << 20
        self.algorithm = "lz4"
        self.mem_limit = 0
        self.num_reads = 12
        self.num_writes = 34
        self.calls = []
        self.gate = None        # an Event the stats methods wait on

    def comp_algorithm(self):
        return "[lz4] lz4hc zstd deflate \n"

    def mm_stat(self):
        if self.gate is not None:
            self.gate.wait(10)
        return MmStat(orig_data_size=3 << 20, compr_data_size=1 << 20,
                      mem_used_total=1536 << 10, mem_limit=self.mem_limit,
                      mem_used_max=2 << 20, same_pages=5, pages_compacted=7,
                      huge_pages=2, huge_pages_since=3)

    def io_stat(self):
        return IoStat(failed_reads=1, failed_writes=2, invalid_io=0,
                      notify_free=9)

    def debug_stat(self):
        return DebugStat(version=1, miss_free=0)

    def pool_stats(self):
        fullness = (0,) * 10 + (1,)
        return PoolStats(pages_compacted=7, total_pages=1, classes=(
            ClassStat(index=0, size=32, fullness=fullness, obj_allocated=128,
                      obj_used=3, pages_used=1, pages_per_zspage=1,
                      objs_per_zspage=128, freeable=0),))

    def compact(self):
        self.calls.append(("compact",))
        return 0

    def reset_mem_used_max(self):
        self.calls.append(("reset_mem_used_max",))

    def set_mem_limit(self, limit):
        self.calls.append(("set_mem_limit", limit))
        self.mem_limit = (limit + 4095) // 4096 * 4096

    def mark_idle(self, age_seconds=None):
        self.calls.append(("mark_idle", age_seconds))
        return 0

    def filter_counts(self):
        return {"served_reads": 10, "served_writes": 30, "passed_reads": 2,
                "passed_writes": 4}


@pytest.fixture
def served(tmp_path):
    device = FakeDevice()
    server = control.ControlServer(device, tmp_path / "zramd0.sock", "zramd0")
    server.start()
    yield device, server
    if device.gate is not None:
        device.gate.set()
    server.stop()


def ask(server, line):
    return control.request(server.path, line)


# -- attribute formats -------------------------------------------------------

GOLDEN = {
    "disksize": "67108864\n",
    "initstate": "1\n",
    "comp_algorithm": "[lz4] lz4hc zstd deflate \n",
    "mm_stat": " 3145728  1048576  1572864        0  2097152"
               "        5        7        2        3\n",
    "io_stat": "       1        2 0        9\n",
    "debug_stat": "version: 1\n0        0\n",
    "mem_limit": "0\n",
}


@pytest.mark.parametrize("attr", sorted(GOLDEN))
def test_attribute_formats(served, attr):
    device, server = served
    reply = ask(server, "get " + attr)
    assert reply == {"version": 1, "ok": True, "attr": attr,
                     "value": GOLDEN[attr]}


def test_classes_is_the_debugfs_table(served):
    device, server = served
    value = ask(server, "get classes")["value"]
    lines = value.split("\n")
    assert lines[0].split() == ["class", "size", "10%", "20%", "30%", "40%",
                                "50%", "60%", "70%", "80%", "90%", "99%",
                                "100%", "obj_allocated", "obj_used",
                                "pages_used", "pages_per_zspage", "freeable"]
    assert lines[1] == ("     0    32 " + "        0 " * 10 + "        1 "
                        + "          128          3          1"
                        + "                1        0")
    assert value == str(device.pool_stats())


# -- writes ------------------------------------------------------------------

@pytest.mark.parametrize("value, limit", [
    ("1G", 1 << 30), ("512m", 512 << 20), ("4096", 4096), ("0", 0),
    ("0x1000", 4096), ("8K\n", 8192), ("3k", 3072), ("1T", 1 << 40),
    ("010", 8), ("0X10m", 16 << 20),
    ("0xfffffffffffff000", (1 << 64) - 4096), ("15E", 15 << 60),
])
def test_mem_limit_memparse(served, value, limit):
    device, server = served
    assert ask(server, "set mem_limit " + value.strip())["ok"]
    assert device.calls == [("set_mem_limit", limit)]
    assert control.memparse(value) == limit


def test_mem_limit_roundtrip(served):
    device, server = served
    ask(server, "set mem_limit 1G")
    assert ask(server, "get mem_limit")["value"] == "1073741824\n"
    assert ask(server, "get mm_stat")["value"].split()[3] == "1073741824"


@pytest.mark.parametrize("value", ["abc", "1Q", "-5", "1.5G", "G", "1 G",
                                   "16E", "18446744073709551616",
                                   "0xffffffffffffffffffff"])
def test_mem_limit_bad_value(served, value):
    device, server = served
    reply = ask(server, "set mem_limit " + value)
    assert reply["ok"] is False and reply["errno"] == errno.EINVAL
    assert reply["error"].startswith("mem_limit: invalid value")
    assert "K, M, G" in reply["error"]
    assert device.calls == []


@pytest.mark.parametrize("value", ["18446744073709551616", "0x10000000000000000"])
def test_u64_attributes_refuse_what_does_not_fit(served, value):
    # The kernel's kstrtoull answers -ERANGE; a value taken here would
    # overflow the C side's page counts later, failing every write.
    device, server = served
    for attr in ("writeback_limit", "idle"):
        reply = ask(server, "set %s %s" % (attr, value))
        assert reply["ok"] is False and reply["errno"] == errno.EINVAL, reply
        assert reply["error"].startswith(attr + ": invalid value")
    assert device.calls == []


def test_mem_limit_that_wraps_when_page_aligned_is_refused(served):
    # 2^64 - 1 rounds up to 2^64 pages' worth: the kernel's PAGE_ALIGN
    # wraps it to 0 (no limit); it read back as 18446744073709551616 here.
    device, server = served
    reply = ask(server, "set mem_limit 18446744073709551615")
    assert reply["ok"] is False and reply["errno"] == errno.EINVAL, reply
    assert "up to 2^64 - 4096" in reply["error"]
    assert device.calls == []
    assert ask(server, "set mem_limit 18446744073709547520")["ok"]
    assert device.calls == [("set_mem_limit", (1 << 64) - 4096)]


@pytest.mark.parametrize("value, message", [
    ("samples=18446744073709551615", "samples=18446744073709551615; "
     "accepted: 1..16384"),
    ("size=18446744073709551615", "size=18446744073709551615; accepted: "
     "1024..1048576"),
    ("size=1099511627776", "size=1099511627776; accepted: 1024..1048576"),
    ("samples=0", "samples=0; accepted: 1..16384"),
])
def test_train_dict_is_bounded(served, value, message):
    # samples=2^64-1 held every stored page at once; size=2^64-1 was an
    # internal OverflowError, size=1T a MemoryError.
    device, server = served
    reply = ask(server, "set train_dict " + value)
    assert reply == {"version": 1, "ok": False, "errno": errno.EINVAL,
                     "error": "train_dict: " + message}, reply
    assert device.calls == []


def test_mem_used_max_reset(served):
    device, server = served
    assert ask(server, "set mem_used_max 0") == {"version": 1, "ok": True,
                                                  "attr": "mem_used_max"}
    assert device.calls == [("reset_mem_used_max",)]
    reply = ask(server, "set mem_used_max 5")
    assert not reply["ok"]
    assert reply["error"] == ("mem_used_max: invalid value '5': accepted: 0 "
                              "(resets the peak to the current usage)")
    assert device.calls == [("reset_mem_used_max",)]


def test_set_with_an_empty_value(served):
    # "echo > compact" writes only a newline; zramd attr NAME compact ""
    # sends "set compact " and is taken, and an empty value where one is
    # needed is refused by the attribute, naming it.
    device, server = served
    assert ask(server, "set compact ")["ok"]
    assert device.calls == [("compact",)]
    reply = ask(server, "set mem_limit ")
    assert reply["ok"] is False and reply["errno"] == errno.EINVAL
    assert reply["error"].startswith("mem_limit: invalid value ''")
    assert device.calls == [("compact",)]


def test_compact_and_idle(served):
    device, server = served
    assert ask(server, "set compact 1")["ok"]
    assert ask(server, "set idle all")["ok"]
    assert ask(server, "set idle 30")["ok"]
    assert ask(server, "set idle 0x10")["ok"]
    reply = ask(server, "set idle soon")
    assert not reply["ok"] and reply["error"].startswith(
        "idle: invalid value 'soon': accepted: all, or an age in seconds")
    assert device.calls == [("compact",), ("mark_idle", None),
                            ("mark_idle", 30), ("mark_idle", 16)]


def test_read_only_and_write_only(served):
    device, server = served
    reply = ask(server, "set disksize 1G")
    assert reply["errno"] == errno.EINVAL
    assert reply["error"] == (
        "disksize: read-only attribute; writable: mem_limit, mem_used_max, "
        "compact, idle, recomp_algorithm, recompress, backing_dev, "
        "writeback, writeback_limit, writeback_limit_enable, train_dict")
    reply = ask(server, "get compact")
    assert reply["error"].startswith("compact: write-only attribute")
    reply = ask(server, "get nosuch")
    assert reply["error"].startswith("nosuch: no such attribute; "
                                     "attributes: disksize, initstate")
    assert device.calls == []


# -- status ------------------------------------------------------------------

def test_status_has_everything_the_table_needs(served):
    device, server = served
    reply = ask(server, "status")
    assert reply["version"] == 1 and reply["ok"] is True
    expect = {"name": "zramd0", "algorithm": "lz4", "disksize": 64 << 20,
              "comp_algorithm": "[lz4] lz4hc zstd deflate \n",
              "initstate": 1, "orig_data_size": 3 << 20,
              "compr_data_size": 1 << 20, "mem_used_total": 1536 << 10,
              "mem_limit": 0, "mem_used_max": 2 << 20, "same_pages": 5,
              "pages_compacted": 7, "huge_pages": 2, "huge_pages_since": 3,
              "failed_reads": 1, "failed_writes": 2, "invalid_io": 0,
              "notify_free": 9, "miss_free": 0, "num_reads": 12,
              "num_writes": 34, "pid": os.getpid(),
              "filter": {"served_reads": 10, "served_writes": 30,
                         "passed_reads": 2, "passed_writes": 4}}
    for key, value in expect.items():
        assert reply[key] == value, key
    assert reply["streams"] == len(os.sched_getaffinity(0))


def test_attrs_lists_modes(served):
    device, server = served
    attrs = ask(server, "attrs")["attrs"]
    assert list(attrs) == list(control.ATTRIBUTES)
    assert attrs["mem_limit"]["mode"] == "rw"
    assert attrs["mm_stat"]["mode"] == "r"
    assert attrs["idle"]["mode"] == "w"


# -- the socket --------------------------------------------------------------

def test_socket_mode_and_stop_removes_it(tmp_path):
    path = tmp_path / "d.sock"
    server = control.ControlServer(FakeDevice(), path, "d")
    old = os.umask(0)
    try:
        server.start()
    finally:
        os.umask(old)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    server.stop()
    assert not path.exists()


def test_start_removes_a_stale_socket(tmp_path):
    path = tmp_path / "d.sock"
    make_stale_socket(path)
    with pytest.raises(control.StaleSocketError):
        control.request(path, "ping")
    server = control.ControlServer(FakeDevice(), path, "d")
    server.start()
    try:
        assert control.request(path, "ping") == {"version": 1, "ok": True,
                                                  "name": "d"}
    finally:
        server.stop()


def test_start_refuses_a_live_socket_and_a_file(served, tmp_path):
    device, server = served
    other = control.ControlServer(FakeDevice(), server.path, "x")
    with pytest.raises(control.ControlError, match="another server"):
        other.start()
    assert ask(server, "ping")["ok"]
    plain = tmp_path / "plain.sock"
    plain.write_text("keep me")
    with pytest.raises(control.ControlError, match="not a socket"):
        control.ControlServer(FakeDevice(), plain, "p").start()
    assert plain.read_text() == "keep me"


def test_start_keeps_a_socket_it_cannot_judge(tmp_path):
    # A server whose backlog is full (or that is stopped) makes connect()
    # time out: that is no proof the socket is stale, so it stays.
    path = tmp_path / "busy.sock"
    busy = socket.socket(socket.AF_UNIX)
    busy.bind(str(path))
    busy.listen(0)
    queued = []
    try:
        for _ in range(4):          # fill the backlog; never accepted
            c = socket.socket(socket.AF_UNIX)
            c.setblocking(False)
            try:
                c.connect(str(path))
            except BlockingIOError:
                c.close()
                break
            queued.append(c)
        with pytest.raises(control.ControlError,
                           match="cannot tell whether a server listens"):
            control.ControlServer(FakeDevice(), path, "b").start()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        for c in queued:
            c.close()
        busy.close()


def test_start_refuses_a_directory_others_can_write(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(control.ControlError,
                       match="writable by group or others"):
        control.ControlServer(FakeDevice(), shared / "d.sock", "d").start()
    assert list(shared.iterdir()) == []


def test_client_believes_no_other_users_server(tmp_path):
    # Another user's server where ours should be is refused before a byte
    # of its reply is read (SO_PEERCRED), so it cannot feed the table.
    path = tmp_path / "d.sock"
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            srv = socket.socket(socket.AF_UNIX)
            srv.bind(str(path))
            # The peer credentials of a listening socket are those of the
            # process that calls listen(): another user's, from here on.
            os.setgid(65534)
            os.setuid(65534)
            srv.listen(1)
            os.write(ready_w, b"1")
            conn, _ = srv.accept()
            conn.sendall(b'{"version": 1, "ok": true, "disksize": 1}\n')
            conn.recv(1)
        finally:
            os._exit(0)
    try:
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"1"
        with pytest.raises(control.ControlPermissionError,
                           match="served by uid 65534, neither us"):
            control.call(path, "status")
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(ready_r)


def make_stale_socket(path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


def test_client_errors(tmp_path):
    with pytest.raises(control.NoSuchDeviceError) as e:
        control.request(tmp_path / "none.sock", "ping")
    assert str(e.value) == "no such device" and e.value.errno == errno.ENOENT
    make_stale_socket(tmp_path / "stale.sock")
    with pytest.raises(control.StaleSocketError) as e:
        control.request(tmp_path / "stale.sock", "ping")
    assert e.value.errno == errno.ECONNREFUSED
    assert "stale" in str(e.value)


def test_call_raises_remote_error(served):
    device, server = served
    with pytest.raises(control.RemoteError) as e:
        control.call(server.path, "set disksize 1")
    assert e.value.errno == errno.EINVAL
    assert str(e.value).startswith("disksize: read-only")


# -- malformed, oversized, silent and flooding clients ----------------------

def raw_connection(server):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(server.path)
    return s, s.makefile("rb")


def read_reply(reader):
    return json.loads(reader.readline())


@pytest.mark.parametrize("line, message", [
    (b"", "malformed request: empty line"),
    (b"\xff\xfe", "malformed request: not UTF-8"),
    (b"frobnicate", "frobnicate: unknown request"),
    (b"get", "malformed request: usage: get ATTR"),
    (b"set mem_limit", "malformed request: usage: set ATTR VALUE"),
    (b"status now", "malformed request: usage: status"),
])
def test_malformed_request_keeps_connection(served, line, message):
    device, server = served
    s, reader = raw_connection(server)
    with s:
        s.sendall(line + b"\n")
        reply = read_reply(reader)
        assert reply["version"] == 1 and reply["ok"] is False
        assert reply["errno"] == errno.EINVAL
        assert reply["error"].startswith(message)
        s.sendall(b"get initstate\n")
        assert read_reply(reader)["value"] == "1\n"


def test_oversized_request_is_discarded(served):
    device, server = served
    s, reader = raw_connection(server)
    with s:
        s.sendall(b"get " + b"x" * 10000)
        reply = read_reply(reader)
        assert not reply["ok"] and "request too long" in reply["error"]
        s.sendall(b"y" * 5000 + b"\nget disksize\n")
        assert read_reply(reader) == {"version": 1, "ok": True,
                                      "attr": "disksize",
                                      "value": "67108864\n"}
        # Oversized but complete in one go: one error, then on we go.
        s.sendall(b"get " + b"z" * 5000 + b"\nget initstate\n")
        assert "request too long" in read_reply(reader)["error"]
        assert read_reply(reader)["value"] == "1\n"


def test_pipelined_requests_answer_in_order(served):
    device, server = served
    s, reader = raw_connection(server)
    with s:
        s.sendall(b"get initstate\nget disksize\r\nping\n")
        assert read_reply(reader)["value"] == "1\n"
        assert read_reply(reader)["value"] == "67108864\n"
        assert read_reply(reader)["name"] == "zramd0"


def wait_for(predicate, what, timeout=30):
    """Poll ``predicate`` until true; fail naming ``what`` if it stays
    false for ``timeout`` seconds (a bound against hanging, generous so
    that a slow machine never trips it)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("still waiting after %d s for %s" % (timeout, what))
        time.sleep(0.02)


def connections(server):
    """Connections the server holds (without its lock: a test must not
    hang on it where the server might hold it)."""
    return len(server._conns)


FLOOD = 4000


def flood(sock, server, stuck=True):
    """Make the server's thread for ``sock`` stuck: FLOOD ``attrs``
    requests in one go (a single read for the server; 9 MB of replies,
    far more than a socket holds, so that thread blocks in ``_send``
    before it finishes them and reads no more).  With ``stuck``, wait
    for that, then send more requests until ``sock`` takes none, so a
    later send that goes through means the server read again."""
    sock.sendall(b"attrs\n" * FLOOD)
    if not stuck:
        return
    wait_for(lambda: sending(server),
             "the flooder's thread to block sending replies")
    try:
        fill_socket(sock)
    finally:
        sock.settimeout(5)


def sending(server):
    """True while one of the server's threads waits in ``_send`` (a client
    has stopped reading its replies)."""
    code = control.ControlServer._send.__code__
    return any(frame.f_code is code
               for frame in sys._current_frames().values())


def drain(sock):
    """Read until the server closes ``sock``: the bytes it sent."""
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:    # it closed with our requests unread
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk


def test_silent_and_flooding_clients_do_not_block_others(served,
                                                         monkeypatch):
    # A client that says nothing and one that floods requests without
    # reading the replies each park only their own thread: others are
    # answered while both are still connected and stuck.  The timeouts
    # are made long, so they stay stuck for the whole test.
    device, server = served
    monkeypatch.setattr(control, "IDLE_TIMEOUT", 600.0)
    monkeypatch.setattr(control, "SEND_TIMEOUT", 600.0)
    silent = [raw_connection(server)[0] for _ in range(5)]
    flooder, flooder_reader = raw_connection(server)
    try:
        flood(flooder, server)
        wait_for(lambda: connections(server) == 6,
                 "the six stuck clients to be served")
        for _ in range(20):
            assert ask(server, "get initstate")["value"] == "1\n"
        assert ask(server, "status")["name"] == "zramd0"
        # All the while, the flooder's server thread sat in its send and
        # the silent ones in their reads: still connected, still stuck
        # (the asks' own connections go as their threads see them close).
        assert sending(server)
        wait_for(lambda: connections(server) == 6,
                 "the asks' connections to be forgotten")
        with pytest.raises(BlockingIOError):
            flooder.setblocking(False)
            flooder.send(b"ping\n" * 4096)
        flooder.settimeout(5)
        # Unstuck, the flooder gets whole replies.
        first = json.loads(flooder_reader.readline())
        assert first["ok"] and list(first["attrs"]) == list(
            control.ATTRIBUTES)
        for s in silent:
            s.sendall(b"ping\n")
            assert json.loads(s.recv(4096)) == {"version": 1, "ok": True,
                                                 "name": "zramd0"}
    finally:
        flooder_reader.close()
        flooder.close()
        for s in silent:
            s.close()


def test_idle_connection_is_closed(served, monkeypatch):
    # A connection silent for IDLE_TIMEOUT seconds is closed by the server:
    # one that never sent anything, and one that went quiet after a request.
    device, server = served
    monkeypatch.setattr(control, "IDLE_TIMEOUT", 0.2)
    monkeypatch.setattr(control, "SEND_TIMEOUT", 600.0)
    never, _ = raw_connection(server)
    quiet, quiet_reader = raw_connection(server)
    with never, quiet:
        quiet.sendall(b"ping\n")
        assert read_reply(quiet_reader)["ok"]
        never.settimeout(30)          # a bound on the wait, not a speed
        quiet.settimeout(30)
        try:
            assert never.recv(10) == b""
            assert quiet.recv(10) == b""
        except socket.timeout:
            pytest.fail("the server kept an idle connection open")
        quiet_reader.close()
    wait_for(lambda: connections(server) == 0,
             "the server to forget the idle connections")
    assert ask(server, "ping")["ok"]


def test_client_that_stops_reading_is_dropped(served, monkeypatch):
    # Replies a client does not read fill its socket; after SEND_TIMEOUT
    # seconds in one send the server drops the client (and only it).
    device, server = served
    monkeypatch.setattr(control, "IDLE_TIMEOUT", 600.0)
    monkeypatch.setattr(control, "SEND_TIMEOUT", 0.2)
    bystander, bystander_reader = raw_connection(server)
    stuck, stuck_reader = raw_connection(server)
    with bystander, stuck:
        # connect() returns once the kernel has queued the connection,
        # maybe before the server has accepted it: count from a client
        # known to be served, or the count below may be 1 before the
        # stuck one is even taken (drain() then reads all its replies,
        # and the server, never blocked, never closes it).
        for s, reader in ((bystander, bystander_reader),
                          (stuck, stuck_reader)):
            s.sendall(b"ping\n")
            assert read_reply(reader)["ok"]
        stuck_reader.close()
        assert connections(server) == 2
        flood(stuck, server, stuck=False)
        wait_for(lambda: connections(server) == 1,
                 "the server to drop a client that does not read")
        # It was dropped in the middle of its replies, not served to the
        # end: what it gets is whole replies, then the close.
        stuck.settimeout(30)
        lines = drain(stuck).split(b"\n")
        assert 2 <= len(lines) <= FLOOD, "%d lines" % len(lines)
        for line in lines[:-1]:         # the last may be cut short
            reply = json.loads(line)
            assert reply["ok"] and "mem_limit" in reply["attrs"]
        # The quiet bystander is still served, and so are newcomers.
        bystander.sendall(b"ping\n")
        assert read_reply(bystander_reader)["ok"]
        assert ask(server, "ping")["ok"]
        bystander_reader.close()


def test_too_many_connections(served, monkeypatch):
    # With every place taken, the connection idle the longest makes way for
    # a newcomer (32 silent clients used to lock the CLI out); only when
    # none is idle is a newcomer refused.
    device, server = served
    monkeypatch.setattr(control, "MAX_CONNECTIONS", 2)
    held = [raw_connection(server) for _ in range(2)]
    for s, reader in held:
        # Served, then idle, one after the other: held[0] is idle the
        # longest.  The server marks a connection idle just after its
        # reply is sent (busy, None, from its first byte until then), so
        # wait for that before the next.
        s.sendall(b"ping\n")
        assert read_reply(reader)["ok"]
        wait_for(lambda: None not in list(server._conns.values()),
                 "the connection to be idle again")
    newcomer, newcomer_reader = raw_connection(server)
    with newcomer:
        newcomer.sendall(b"ping\n")
        assert read_reply(newcomer_reader)["ok"]
        held[0][0].settimeout(30)           # a bound on the wait only
        assert held[0][0].recv(10) == b""   # it made way
        # Both places now hold a request under way (half a line): neither
        # makes way, and the next newcomer is refused.
        held[1][0].sendall(b"pi")
        newcomer.sendall(b"pi")
        wait_for(lambda: list(server._conns.values()) == [None, None],
                 "both connections to be inside a request")
        refused, refused_reader = raw_connection(server)
        with refused:
            reply = read_reply(refused_reader)
            assert reply["errno"] == errno.EBUSY
            assert "too many connections" in reply["error"]
        refused_reader.close()
        for s, reader in ((held[1][0], held[1][1]),
                          (newcomer, newcomer_reader)):
            s.sendall(b"ng\n")
            assert read_reply(reader)["ok"]
    newcomer_reader.close()
    for s, reader in held:
        reader.close()
        s.close()


def test_a_byte_now_and_then_does_not_keep_a_connection(served, monkeypatch):
    # The idle timeout ran anew at every byte: one byte every 2 s held a
    # place for ever.  A request line must now be complete within
    # IDLE_TIMEOUT of the last reply.
    device, server = served
    monkeypatch.setattr(control, "IDLE_TIMEOUT", 0.5)
    s, reader = raw_connection(server)
    with s:
        closed = False
        for _ in range(200):                # 20 s at most, a bound only
            try:
                s.sendall(b"p")
            except OSError:
                closed = True
                break
            s.settimeout(0.1)
            try:
                if s.recv(10) == b"":
                    closed = True
                    break
            except socket.timeout:
                pass
        assert closed, "a trickle of bytes kept the connection open"
    reader.close()


def test_stop_with_open_connections(tmp_path):
    server = control.ControlServer(FakeDevice(), tmp_path / "s.sock", "s")
    server.start()
    s, reader = raw_connection(server)
    s.sendall(b"ping\n")
    assert read_reply(reader)["ok"]
    # stop() returns (its thread ends), having shut down the connection
    # whose thread was waiting in recv, and removed the socket.
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    stopper.join(60)                # a bound against hanging
    assert not stopper.is_alive(), "stop() hangs with a connection open"
    s.settimeout(30)                # a bound on the wait, not a speed
    try:
        assert s.recv(10) == b""    # the server closed our connection
    except socket.timeout:
        pytest.fail("stop() left a connection open")
    wait_for(lambda: connections(server) == 0,
             "the connection's thread to end")
    reader.close()
    s.close()
    assert not os.path.exists(server.path)


def test_internal_error_is_an_error_reply(served):
    device, server = served

    def broken():
        raise RuntimeError("boom")

    device.io_stat = broken
    reply = ask(server, "get io_stat")
    assert reply == {"version": 1, "ok": False, "errno": errno.EIO,
                     "error": "get: internal error: RuntimeError: boom"}
    assert ask(server, "get initstate")["ok"]


# -- the real Device, in process ----------------------------------------------

def test_with_a_real_device(tmp_path):
    from zramd.device import Device
    device = Device(16 << 20, algorithm="lz4")
    server = control.ControlServer(device, tmp_path / "r.sock", "r")
    server.start()
    try:
        # Text, not an 8-byte pattern (that would be a same-filled page).
        device.write(0, (b"zramd control channel " * 3000)[:16 * 4096])
        device.write(1 << 20, bytes(4096))
        for attr in ("mm_stat", "io_stat", "debug_stat"):
            assert ask(server, "get " + attr)["value"] == \
                str(getattr(device, attr)())
        assert ask(server, "get comp_algorithm")["value"] == \
            device.comp_algorithm()
        assert ask(server, "get classes")["value"] == str(device.pool_stats())
        status = ask(server, "status")
        assert status["orig_data_size"] == 17 * 4096
        assert status["same_pages"] == 1
        assert status["num_writes"] == device.num_writes > 0
        assert ask(server, "set mem_limit 100k")["ok"]
        assert device.mem_limit == 100 << 10
        assert ask(server, "set mem_limit 1")["ok"]
        assert device.mem_limit == 4096          # rounded up to a page
        for line in ("set mem_used_max 0", "set compact 1", "set idle all",
                     "set idle 0"):
            assert ask(server, line)["ok"], line
    finally:
        server.stop()
        device.close()


def test_writeback_page_indexes_are_bounded_before_they_are_expanded(tmp_path):
    # One request naming two billion pages must be refused at once, not
    # turned into a list of two billion indexes by the server.
    from zramd.device import Device
    from zramd.errors import InvalidRequestError
    backing = tmp_path / "backing.img"
    backing.write_bytes(bytes(16 * 4096))
    backing.chmod(0o600)
    device = Device(16 * 4096, backing_dev=str(backing))
    try:
        for value in ("page_indexes=0-2000000000", "page_indexes=3-16",
                      "page_indexes=9-3"):
            with pytest.raises(InvalidRequestError) as info:
                control.store_attribute(device, "writeback", value)
            assert info.value.message == (
                "writeback: page_indexes=%r: accepted: FIRST-LAST, "
                "0 <= FIRST <= LAST <= 15" % value.split("=")[1])
            assert info.value.errno == errno.EINVAL
        control.store_attribute(device, "writeback", "page_indexes=0-15")
    finally:
        device.close()


def test_errors_from_the_device_name_the_attribute():
    from zramd.device import Device
    from zramd.errors import InvalidRequestError
    device = Device(16 * 4096)
    device.set_recomp_algorithm("zstd")
    try:
        for name, value, message in (
                ("recompress", "type=cold",
                 "recompress: type: 'cold'; accepted: "),
                ("writeback", "huge", "writeback: no backing_dev set"),
                ("mem_limit", "1Q", "mem_limit: invalid value '1Q'")):
            with pytest.raises(InvalidRequestError) as info:
                control.store_attribute(device, name, value)
            assert info.value.message.startswith(message), info.value.message
            assert info.value.errno == errno.EINVAL
    finally:
        device.close()


def test_writeback_pages_are_merged_not_expanded():
    # A request line can repeat a range until it is MAX_REQUEST long: the
    # pages are visited once each, and never built into a list.
    class Recorder:
        nr_pages = 1 << 40            # a list of these would never fit

        def writeback(self, pp_type, pages=None):
            self.pp_type, self.pages = pp_type, pages

    device = Recorder()
    line = " ".join(["page_indexes=0-1099511627775"] * 180)
    control.store_attribute(device, "writeback", "type=huge " + line)
    assert device.pp_type == "huge"
    assert device.pages.ranges == [range(0, 1 << 40)]
    assert len(device.pages) == 1 << 40
    control.store_attribute(device, "writeback",
                            "page_index=9 page_indexes=3-5 page_index=4 "
                            "page_indexes=6-7 page_index=20")
    assert list(device.pages) == list(device.pages) == [3, 4, 5, 6, 7, 9, 20]
