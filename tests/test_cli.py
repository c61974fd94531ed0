"""The ``zramd`` command: zramctl's table, attributes, classes, top and the
error lines, first against in-process control servers (fast, exact
numbers), then against a real nbdkit serving plugin.py."""

import errno
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time

import pytest

from conftest import NbdClient, fill_socket, require
from nbdkit_server import NbdkitServer
from test_control import FakeDevice
from zramd import cli, control

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = "/usr/bin/python3"


def run(capsys, *argv):
    """main() in-process: (exit status, stdout, stderr)."""
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def run_process(runtime, *argv, **kwargs):
    env = dict(os.environ, ZRAMD_RUNTIME_DIR=str(runtime), PYTHONPATH=REPO)
    return subprocess.run([PYTHON, "-m", "zramd.cli", *argv], env=env,
                          capture_output=True, text=True, timeout=30,
                          **kwargs)


def make_stale_socket(path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


# -- sizes, as util-linux prints them ---------------------------------------

# Checked against mkswap (util-linux 2.38.1), whose "size = " uses the same
# size_to_human_string rounding: e.g. 2088960 bytes -> "2 MiB".
@pytest.mark.parametrize("nbytes, text", [
    (0, "0B"), (512, "512B"), (1023, "1023B"), (1024, "1K"), (4096, "4K"),
    (40960, "40K"), (1040384, "1016K"), (1044480, "1020K"), (1 << 20, "1M"),
    (1224704, "1.2M"), (2043904, "1.9M"), (2088960, "2M"),
    (2306867, "2.2M"), (4173824, "4M"), (8187904, "7.8M"),
    (20475904, "19.5M"), (1023995904, "976.6M"), (1073557504, "1023.8M"),
    (1073737728, "1024M"), (1 << 30, "1G"), (64 << 20, "64M"),
    (3 << 40, "3T"), (1 << 60, "1E"),
])
def test_size_to_human(nbytes, text):
    assert cli.size_to_human(nbytes) == text


def test_parse_columns():
    names = lambda spec: [c.name for c in cli.parse_columns(spec)]
    assert names("name,Data,comp-ratio") == ["NAME", "DATA", "COMP-RATIO"]
    assert names("LIMIT") == ["MEM-LIMIT"]
    assert names("+migrated") == cli.DEFAULT_COLUMNS + ["MIGRATED"]
    with pytest.raises(ValueError, match="unknown column: FOO"):
        cli.parse_columns("name,FOO")


# -- the table against in-process servers ----------------------------------

@pytest.fixture
def runtime(tmp_path, monkeypatch):
    monkeypatch.setenv("ZRAMD_RUNTIME_DIR", str(tmp_path))
    servers = []

    def serve(name, device=None):
        device = device or FakeDevice()
        server = control.ControlServer(device, tmp_path / (name + ".sock"),
                                       name)
        server.start()
        servers.append(server)
        return device

    serve.path = tmp_path
    yield serve
    for server in servers:
        server.stop()


@pytest.fixture
def two(runtime):
    runtime("zramd0")
    big = runtime("zramd10")
    big.size = 1 << 30
    big.mem_limit = 256 << 20
    return runtime


NCPU = len(os.sched_getaffinity(0))

TABLE = """\
NAME    ALGORITHM DISKSIZE  DATA COMPR TOTAL STREAMS MOUNTPOINT
zramd0  lz4            64M    3M    1M  1.5M {n:>7} 
zramd10 lz4             1G    3M    1M  1.5M {n:>7} 
""".format(n=NCPU)


def test_table_default(two, capsys):
    assert run(capsys) == (0, TABLE, "")
    assert run(capsys, "list") == (0, TABLE, "")


def test_table_bytes(two, capsys):
    assert run(capsys, "-b") == (0, """\
NAME    ALGORITHM   DISKSIZE    DATA   COMPR   TOTAL STREAMS MOUNTPOINT
zramd0  lz4         67108864 3145728 1048576 1572864 {n:>7} 
zramd10 lz4       1073741824 3145728 1048576 1572864 {n:>7} 
""".format(n=NCPU), "")


def test_table_raw_and_noheadings(two, capsys):
    assert run(capsys, "--raw") == (0, """\
NAME ALGORITHM DISKSIZE DATA COMPR TOTAL STREAMS MOUNTPOINT
zramd0 lz4 64M 3M 1M 1.5M {n} 
zramd10 lz4 1G 3M 1M 1.5M {n} 
""".format(n=NCPU), "")
    assert run(capsys, "-n") == (0, "".join(TABLE.splitlines(True)[1:]), "")
    assert run(capsys, "--raw", "-n", "-b", "-o", "name,disksize") == (
        0, "zramd0 67108864\nzramd10 1073741824\n", "")


def test_table_output_list(two, capsys):
    assert run(capsys, "-o", "NAME,LIMIT,mem-used,COMP-RATIO") == (0, """\
NAME    MEM-LIMIT MEM-USED COMP-RATIO
zramd0         0B       2M     2.0000
zramd10      256M       2M     2.0000
""", "")
    assert run(capsys, "zramd10", "-o", "+MIGRATED") == (0, """\
NAME    ALGORITHM DISKSIZE  DATA COMPR TOTAL STREAMS MOUNTPOINT MIGRATED
zramd10 lz4             1G    3M    1M  1.5M {n:>7}                   7
""".format(n=NCPU), "")


def test_table_output_all(two, capsys):
    rc, out, err = run(capsys, "--output-all")
    assert (rc, err) == (0, "")
    assert out == """\
NAME    DISKSIZE  DATA COMPR ALGORITHM STREAMS ZERO-PAGES TOTAL MEM-LIMIT \
MEM-USED MIGRATED COMP-RATIO HUGE-PAGES NOTIFY-FREE MOUNTPOINT
zramd0       64M    3M    1M lz4       {n:>7}          5  1.5M        0B \
      2M        7     2.0000          2           9 
zramd10       1G    3M    1M lz4       {n:>7}          5  1.5M      256M \
      2M        7     2.0000          2           9 
""".format(n=NCPU)


def test_table_json(two, capsys):
    rc, out, err = run(capsys, "--json", "-o", "name,data,zero-pages,"
                       "comp-ratio,mountpoint")
    assert (rc, err) == (0, "")
    assert out == """\
{
   "zramdevices": [
      {
         "name": "zramd0",
         "data": "3M",
         "zero-pages": 5,
         "comp-ratio": 2.0,
         "mountpoint": null
      },{
         "name": "zramd10",
         "data": "3M",
         "zero-pages": 5,
         "comp-ratio": 2.0,
         "mountpoint": null
      }
   ]
}
"""
    rc, out, err = run(capsys, "--json", "-b", "zramd10")
    assert json.loads(out) == {"zramdevices": [{
        "name": "zramd10", "algorithm": "lz4", "disksize": 1 << 30,
        "data": 3 << 20, "compr": 1 << 20, "total": 1536 << 10,
        "streams": NCPU, "mountpoint": None}]}


def test_no_devices(runtime, capsys):
    assert run(capsys) == (0, "", "")
    assert run(capsys, "--json") == (0, '{\n   "zramdevices": [\n   ]\n}\n',
                                     "")


def test_unknown_column_and_usage_errors(two, capsys):
    assert run(capsys, "-o", "NAME,BOGUS") == (
        1, "", "zramd: unknown column: BOGUS\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["attr"])
    assert e.value.code == 1
    assert capsys.readouterr().err.startswith("zramd: the following "
                                              "arguments are required")


# -- MOUNTPOINT --------------------------------------------------------------

def test_mountpoint(runtime, tmp_path):
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "swaps").write_text(
        "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
        "/dev/loop7                              partition\t1048572\t\t0"
        "\t\t100\n")
    (proc / "self" / "mounts").write_text(
        "/dev/vda / ext4 rw 0 0\n"
        "/dev/loop3 /mnt/zram\\040data ext4 rw 0 0\n")
    assert cli.mountpoint("zramd0", proc=str(proc)) == ""     # no state file
    state = tmp_path / "zramd0.state.json"
    state.write_text(json.dumps({"block_device": "/dev/loop7"}))
    assert cli.mountpoint("zramd0", proc=str(proc)) == "[SWAP]"
    state.write_text(json.dumps({"block_device": "/dev/loop3"}))
    assert cli.mountpoint("zramd0", proc=str(proc)) == "/mnt/zram data"
    state.write_text(json.dumps({"block_device": "/dev/loop4"}))
    assert cli.mountpoint("zramd0", proc=str(proc)) == ""
    state.write_text("{not json")
    assert cli.mountpoint("zramd0", proc=str(proc)) == ""


def test_mountpoint_in_table(runtime, capsys):
    runtime("zramd0")
    swaps = open("/proc/swaps").read().splitlines()[1:]
    mounts = [line.split() for line in open("/proc/self/mounts")]
    device = next((m[0] for m in mounts if m[1] == "/"
                   and m[0].startswith("/dev/")), None)
    if device is None:
        pytest.skip("no block device mounted on /")
    with open(runtime.path / "zramd0.state.json", "w") as f:
        json.dump({"block_device": device}, f)
    rc, out, err = run(capsys, "-o", "NAME,MOUNTPOINT", "--raw", "-n")
    expect = "[SWAP]" if any(s.split()[0] == device for s in swaps) else "/"
    assert out == "zramd0 %s\n" % cli._raw_escape(expect)


def test_raw_escapes_blanks_backslashes_and_controls(runtime, tmp_path,
                                                      capsys, monkeypatch):
    # --raw writes a cell as libsmartcols' fputs_nonblank does: blanks
    # (space, tab), the backslash and every non-printable byte as \xHH,
    # so a value never holds the column separator and can be decoded.
    # The mount point comes from a fake /proc/self/mounts, with the
    # kernel's octal escapes for space, tab, newline and backslash, and an
    # ESC and a DEL the kernel leaves as they are.
    runtime("zramd0")
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "swaps").write_text("Filename Type Size Used Priority\n")
    (proc / "self" / "mounts").write_text(
        "/dev/loop5 /mnt/a\\040b\\011c\\134d\\012e\x1bf\x7fg ext4 rw 0 0\n")
    (runtime.path / "zramd0.state.json").write_text(
        json.dumps({"block_device": "/dev/loop5"}))
    real_mountpoint = cli.mountpoint
    monkeypatch.setattr(cli, "mountpoint",
                        lambda name: real_mountpoint(name, proc=str(proc)))
    assert cli.mountpoint("zramd0") == "/mnt/a b\tc\\d\ne\x1bf\x7fg"
    escaped = r"/mnt/a\x20b\x09c\x5cd\x0ae\x1bf\x7fg"
    assert run(capsys, "--raw", "-o", "NAME,MOUNTPOINT") == (
        0, "NAME MOUNTPOINT\nzramd0 %s\n" % escaped, "")
    assert run(capsys, "--raw", "-n", "-b", "-o", "MOUNTPOINT,DISKSIZE") == (
        0, "%s 67108864\n" % escaped, "")
    # Only those: the other printable ASCII goes through as it is.
    printable = "".join(chr(c) for c in range(0x21, 0x7f) if c != 0x5c)
    assert cli._raw_escape(printable) == printable


def test_escapes_work_on_bytes_as_util_linux_does():
    # fputs_nonblank and mbs_safe_encode look at bytes: a character
    # outside ASCII is one \xHH per UTF-8 byte in --raw, and a
    # non-printable one is in the table too; the table keeps printable
    # characters, and writes a backslash before an x as \x5c.
    assert cli._raw_escape("/mnt/caf\u00e9") == r"/mnt/caf\xc3\xa9"
    assert cli._raw_escape("a\u2028b") == r"a\xe2\x80\xa8b"
    assert cli._safe("/mnt/caf\u00e9 x") == "/mnt/caf\u00e9 x"
    assert cli._safe("a\u2028b\x1b") == r"a\xe2\x80\xa8b\x1b"
    assert cli._safe("c:\\x\\y") == r"c:\x5cx\y"


# -- attr and classes --------------------------------------------------------

def test_attr_reads(runtime, capsys):
    runtime("zramd0")
    assert run(capsys, "attr", "zramd0", "mm_stat") == (
        0, " 3145728  1048576  1572864        0  2097152        5        7"
           "        2        3\n", "")
    assert run(capsys, "attr", "zramd0", "io_stat") == (
        0, "       1        2 0        9\n", "")
    assert run(capsys, "attr", "zramd0", "debug_stat") == (
        0, "version: 1\n0        0\n", "")


def test_attr_name_with_a_newline_is_refused(runtime, capsys):
    runtime("zramd0")
    assert run(capsys, "attr", "zramd0", "mm\nstat") == (
        1, "", "zramd: zramd0: 'mm\\nstat': not an attribute name\n")


def test_attr_writes(runtime, capsys):
    device = runtime("zramd0")
    assert run(capsys, "attr", "zramd0", "mem_limit", "1G") == (0, "", "")
    assert run(capsys, "attr", "zramd0", "mem_limit") == (0, "1073741824\n",
                                                          "")
    assert run(capsys, "attr", "zramd0", "mem_used_max", "0") == (0, "", "")
    assert run(capsys, "attr", "zramd0", "compact", "1") == (0, "", "")
    assert run(capsys, "attr", "zramd0", "idle", "all") == (0, "", "")
    assert device.calls == [("set_mem_limit", 1 << 30),
                            ("reset_mem_used_max",), ("compact",),
                            ("mark_idle", None)]
    assert run(capsys, "attr", "zramd0", "mem_used_max", "7") == (
        1, "", "zramd: zramd0: mem_used_max: invalid value '7': accepted: 0 "
               "(resets the peak to the current usage)\n")
    assert run(capsys, "attr", "zramd0", "initstate", "0") == (
        1, "", "zramd: zramd0: initstate: read-only attribute; writable: "
               "mem_limit, mem_used_max, compact, idle, "
               "recomp_algorithm, recompress, backing_dev, writeback, "
               "writeback_limit, writeback_limit_enable, train_dict\n")


def test_classes(runtime, capsys):
    device = runtime("zramd0")
    assert run(capsys, "classes", "zramd0") == (0, str(device.pool_stats()),
                                                "")


# -- errors: one line, `zramd: NAME: reason`, status 1 ----------------------

def test_missing_device(runtime, capsys):
    assert run(capsys, "attr", "zramd9", "mm_stat") == (
        1, "", "zramd: zramd9: no such device\n")
    assert run(capsys, "classes", "zramd9") == (
        1, "", "zramd: zramd9: no such device\n")
    assert run(capsys, "zramd9") == (1, "", "zramd: zramd9: no such device\n")


def test_stale_socket(runtime, capsys):
    runtime("zramd0")
    make_stale_socket(runtime.path / "zramd1.sock")
    stale = "zramd: zramd1: stale control socket (no server listening)\n"
    assert run(capsys, "attr", "zramd1", "disksize") == (1, "", stale)
    rc, out, err = run(capsys, "-o", "NAME,DISKSIZE")
    assert (rc, out, err) == (1, "NAME   DISKSIZE\nzramd0      64M\n", stale)


def test_permission_denied(runtime):
    runtime_dir = tempfile.mkdtemp(prefix="zramd-perm-")
    try:
        os.chmod(runtime_dir, 0o755)
        server = control.ControlServer(
            FakeDevice(), os.path.join(runtime_dir, "zramd0.sock"), "zramd0")
        server.start()
        try:
            result = run_process(runtime_dir, "attr", "zramd0", "mm_stat",
                                 cwd="/", user=65534, group=65534)
            assert (result.returncode, result.stdout, result.stderr) == (
                1, "", "zramd: zramd0: permission denied\n")
        finally:
            server.stop()
    finally:
        shutil.rmtree(runtime_dir)


# -- top ---------------------------------------------------------------------

class Clock:
    """The ``time`` the CLI sees in test_top: ``monotonic()`` reads a
    counter that only ``sleep()`` and the device move, so every rate is
    known exactly, whatever the machine's load."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds

    @staticmethod
    def strftime(fmt):
        return time.strftime(fmt, time.gmtime(12 * 3600 + 34 * 60 + 56))


class Scripted(FakeDevice):
    """Each status request takes 0.25 s of the fake clock and finds the
    counters at the next of the scripted (reads, writes) values."""

    COUNTERS = [(1000, 500), (1300, 575), (1750, 725)]

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.requests = 0

    @property
    def num_reads(self):
        # device_status reads num_reads once, then num_writes.
        self.clock.sleep(0.25)
        self.requests += 1
        return self.COUNTERS[self.requests - 1][0]

    @num_reads.setter
    def num_reads(self, value):
        pass

    @property
    def num_writes(self):
        return self.COUNTERS[self.requests - 1][1]

    @num_writes.setter
    def num_writes(self, value):
        pass


TOP_FRAME = """\
zramd top - 12:34:56  devices: 1
NAME   ALGORITHM DISKSIZE  DATA COMPR TOTAL RATIO READS/s WRITES/s \
MEM-USED MEM-LIMIT ZERO-PAGES HUGE-PAGES
zramd0 lz4            64M    3M    1M  1.5M  2.00 {reads:>7} {writes:>8} \
      2M        0B          5          2
"""


def test_top(runtime, capsys, monkeypatch):
    # -d 0.5 and 0.25 s per status request: 0.75 s between the counters'
    # readings, so (1300-1000)/0.75 = 400 reads/s and (575-500)/0.75 =
    # 100 writes/s, then 600 and 200.  The rates use the time measured,
    # not the delay asked for, and each frame its own interval.
    clock = Clock()
    device = runtime("zramd0", Scripted(clock))
    monkeypatch.setattr(cli, "time", clock)
    rc, out, err = run(capsys, "top", "-n", "3", "-d", "0.5")
    assert (rc, err) == (0, "")
    assert device.requests == 3 and clock.now == 1000.0 + 3 * 0.25 + 2 * 0.5
    assert out == "\n".join(
        TOP_FRAME.format(reads=reads, writes=writes)
        for reads, writes in [("-", "-"), ("400", "100"), ("600", "200")])


@pytest.mark.parametrize("argv, message", [
    (("-n", "0"), "iterations must be positive"),
    (("-n", "-1"), "iterations must be positive"),
    (("-d", "0"), "delay must be positive"),
])
def test_top_bad_arguments(runtime, capsys, argv, message):
    runtime("zramd0")
    assert run(capsys, "top", *argv) == (1, "", "zramd: top: %s\n" % message)


def test_top_missing_device(runtime, capsys):
    assert run(capsys, "top", "-n", "1", "nosuch") == (
        1, "", "zramd: nosuch: no such device\n")


# -- a real nbdkit -----------------------------------------------------------

# The tests that write through NBD get python3-libnbd from NbdClient, which
# skips them alone, naming the package, when it is missing.

@pytest.fixture(scope="module")
def real(tmp_path_factory):
    require("nbdkit")
    directory = tmp_path_factory.mktemp("e2e")
    with NbdkitServer(directory, size="64M", name="zramd0") as server:
        server.wait_control()
        yield server


def cli_real(server, capsys, monkeypatch, *argv):
    monkeypatch.setenv("ZRAMD_RUNTIME_DIR", server.directory)
    return run(capsys, *argv)


def test_real_fresh_table(real, capsys, monkeypatch):
    # Module order: this runs before anything writes to the device.
    out = lambda *a: cli_real(real, capsys, monkeypatch, *a)
    assert out() == (0, """\
NAME   ALGORITHM DISKSIZE  DATA COMPR TOTAL STREAMS MOUNTPOINT
zramd0 lz4            64M    0B    0B    0B {n:>7} 
""".format(n=NCPU), "")
    assert out("-b") == (0, """\
NAME   ALGORITHM DISKSIZE  DATA COMPR TOTAL STREAMS MOUNTPOINT
zramd0 lz4       67108864     0     0     0 {n:>7} 
""".format(n=NCPU), "")
    assert out("--raw") == (0, """\
NAME ALGORITHM DISKSIZE DATA COMPR TOTAL STREAMS MOUNTPOINT
zramd0 lz4 64M 0B 0B 0B {n} 
""".format(n=NCPU), "")
    assert out("-n", "-o", "name,zero-pages,limit,mem-used,migrated,"
               "comp-ratio,huge-pages,notify-free") == (
        0, "zramd0          0        0B       0B        0                "
           "     0           0\n", "")
    assert out("--json", "-b") == (0, """\
{
   "zramdevices": [
      {
         "name": "zramd0",
         "algorithm": "lz4",
         "disksize": 67108864,
         "data": 0,
         "compr": 0,
         "total": 0,
         "streams": %d,
         "mountpoint": null
      }
   ]
}
""" % NCPU, "")


def test_real_fresh_attributes(real, capsys, monkeypatch):
    from zramd import compress
    expect = {
        "disksize": "67108864\n",
        "initstate": "1\n",
        "comp_algorithm": compress.available("lz4"),
        "mm_stat": "       0" + "        0" * 8 + "\n",
        "io_stat": "       0        0 0        0\n",
        "debug_stat": "version: 1\n0        0\n",
        "mem_limit": "0\n",
    }
    assert re.fullmatch(r"([\w-]+ )*\[lz4\]( [\w-]+)* \n",
                        expect["comp_algorithm"])
    for attr, text in expect.items():
        assert cli_real(real, capsys, monkeypatch, "attr", "zramd0",
                        attr) == (0, text, ""), attr
    rc, out, err = cli_real(real, capsys, monkeypatch, "classes", "zramd0")
    lines = out.split("\n")
    assert rc == 0 and lines[0].split()[:3] == ["class", "size", "10%"]
    assert lines[-3] == "" and lines[-2].split()[0] == "Total"


def mm_stat(server):
    return [int(x) for x in control.call(server.control,
                                         "get mm_stat")["value"].split()]


def test_real_data_shows_in_table(real, capsys, monkeypatch):
    with NbdClient(real.uri) as h:
        page = (b"zramd compressible text " * 200)[:4096]
        h.pwrite(page * 256, 0)                 # 1 MiB of data
        h.pwrite(b"\0" * 4096 * 8, 8 << 20)     # 8 zero pages
        h.pwrite(os.urandom(4096), 16 << 20)    # one incompressible
        h.flush()
    mm = mm_stat(real)
    # Same-filled pages count in orig_data_size, as zram's pages_stored.
    assert mm[0] == (256 + 8 + 1) * 4096 and mm[5] == 8
    rc, out, err = cli_real(real, capsys, monkeypatch, "-o",
                            "NAME,DISKSIZE,DATA,ZERO-PAGES,HUGE-PAGES")
    assert (rc, out, err) == (0, """\
NAME   DISKSIZE  DATA ZERO-PAGES HUGE-PAGES
zramd0      64M    1M          8 {huge:>10}
""".format(huge=mm[7]), "")
    # Every size column agrees with mm_stat, in bytes and in human form.
    rc, out, err = cli_real(real, capsys, monkeypatch, "--raw", "-n", "-b",
                            "-o", "DATA,COMPR,TOTAL,MEM-LIMIT,MEM-USED")
    now = mm_stat(real)
    assert out.split() == [str(now[i]) for i in (0, 1, 2, 3, 4)]
    rc, out, err = cli_real(real, capsys, monkeypatch, "--raw", "-n",
                            "-o", "COMPR,TOTAL,COMP-RATIO")
    assert out.split() == [cli.size_to_human(now[1]),
                           cli.size_to_human(now[2]),
                           "%.4f" % (now[0] / now[2])]


def test_real_writes(real, capsys, monkeypatch):
    out = lambda *a: cli_real(real, capsys, monkeypatch, *a)
    assert out("attr", "zramd0", "mem_limit", "1G") == (0, "", "")
    assert out("attr", "zramd0", "mem_limit") == (0, "1073741824\n", "")
    assert mm_stat(real)[3] == 1 << 30
    assert out("-n", "-o", "LIMIT") == (0, "       1G\n", "")
    assert out("attr", "zramd0", "mem_limit", "0") == (0, "", "")
    assert mm_stat(real)[3] == 0

    # Peak, then free most of it: the peak stays until reset to current.
    with NbdClient(real.uri) as h:
        h.pwrite(os.urandom(4096 * 64), 32 << 20)
        before = mm_stat(real)
        h.trim(4096 * 64, 32 << 20)
        h.flush()
    # Bounded poll: deferred frees land shortly; if they never do, say so.
    deadline = time.monotonic() + 10
    while mm_stat(real)[2] >= before[2] and time.monotonic() < deadline:
        time.sleep(0.05)
    freed = mm_stat(real)
    assert freed[2] < before[2], (
        "mem_used_total still %d (was %d) 10 s after trimming 256 KiB of "
        "random data" % (freed[2], before[2]))
    assert freed[4] >= before[2]
    assert out("attr", "zramd0", "mem_used_max", "0") == (0, "", "")
    after = mm_stat(real)
    assert after[4] == after[2] < before[2]

    assert out("attr", "zramd0", "compact", "1") == (0, "", "")
    assert out("attr", "zramd0", "idle", "all") == (0, "", "")
    assert out("attr", "zramd0", "idle", "3600") == (0, "", "")
    assert out("attr", "zramd0", "idle", "later") == (
        1, "", "zramd: zramd0: idle: invalid value 'later': accepted: all, "
               "or an age in seconds (slots not accessed for that long are "
               "marked idle)\n")
    assert out("attr", "zramd0", "mm_stat", "1") == (
        1, "", "zramd: zramd0: mm_stat: read-only attribute; writable: "
               "mem_limit, mem_used_max, compact, idle, "
               "recomp_algorithm, recompress, backing_dev, writeback, "
               "writeback_limit, writeback_limit_enable, train_dict\n")


def test_real_errors_as_a_process(real):
    make_stale_socket(os.path.join(real.directory, "dead.sock"))
    try:
        result = run_process(real.directory, "-o", "NAME,DISKSIZE")
        assert (result.returncode, result.stdout, result.stderr) == (
            1, "NAME   DISKSIZE\nzramd0      64M\n",
            "zramd: dead: stale control socket (no server listening)\n")
        result = run_process(real.directory, "attr", "zramd7", "disksize")
        assert (result.returncode, result.stdout, result.stderr) == (
            1, "", "zramd: zramd7: no such device\n")
    finally:
        os.unlink(os.path.join(real.directory, "dead.sock"))


def test_real_malformed_request(real):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(real.control)
        reader = s.makefile("rb")
        s.sendall(b"get\n")
        reply = json.loads(reader.readline())
        assert reply == {"version": 1, "ok": False, "errno": errno.EINVAL,
                         "error": "malformed request: usage: get ATTR"}
        s.sendall(b"x" * 20000 + b"\nget initstate\n")
        assert "request too long" in json.loads(reader.readline())["error"]
        assert json.loads(reader.readline())["value"] == "1\n"
        reader.close()
    st = os.stat(real.control)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()


# Loaded by nbdkit's embedded Python from PYTHONPATH, before plugin.py: the
# control channel's timeouts made long, so that stuck clients stay stuck
# for a whole test, and a note that it was loaded.
PATIENT_SITECUSTOMIZE = """\
import zramd.control as control
control.IDLE_TIMEOUT = control.SEND_TIMEOUT = 3600.0
with open(%r, "w") as f:
    f.write("%%r %%r" %% (control.IDLE_TIMEOUT, control.SEND_TIMEOUT))
"""


@pytest.fixture
def patient(tmp_path):
    """A real nbdkit whose control channel drops no client, however long
    it is silent or leaves its replies unread."""
    require("nbdkit")
    site = tmp_path / "site"
    site.mkdir()
    loaded = tmp_path / "timeouts"
    (site / "sitecustomize.py").write_text(PATIENT_SITECUSTOMIZE
                                           % str(loaded))
    path = os.pathsep.join(
        [str(site), REPO] + [p for p in os.environ.get(
            "PYTHONPATH", "").split(os.pathsep) if p])
    with NbdkitServer(tmp_path / "server", size="16M", name="zramd2",
                      env={"PYTHONPATH": path}) as server:
        server.wait_control()
        assert loaded.read_text() == "3600.0 3600.0"
        yield server
    assert server.process.returncode == 0, server.log()
    assert "Traceback" not in server.log(), server.log()


def test_real_stuck_control_clients_do_not_stall_io(patient):
    """I/O and the control channel go on while control clients are stuck:
    eight that sent half a request and then nothing, and one whose thread
    sits in a send because it never reads its replies.  Asserted by order,
    not speed: the reads and a control request complete, and afterwards
    every stuck client is found still connected and still stuck."""
    server = patient
    silent = []
    flooder = socket.socket(socket.AF_UNIX)
    reader = None
    with NbdClient(server.uri) as h:
        try:
            h.pwrite(b"\x5a" * 65536, 0)
            for _ in range(8):
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(30)
                s.connect(server.control)
                s.sendall(b"get mm")           # half a request, then nothing
                silent.append(s)
            flooder.settimeout(30)
            flooder.connect(server.control)
            # 4000 requests in one read, 9 MB of replies: the server's
            # thread for it blocks in a send before it is done, and reads
            # no more; then fill the socket until it takes nothing.
            flooder.sendall(b"attrs\n" * 4000)
            reader = flooder.makefile("rb")
            assert json.loads(reader.readline())["ok"]
            fill_socket(flooder)
            got = []

            def reads():
                got.extend(h.pread(65536, 0) for _ in range(200))

            t = threading.Thread(target=reads, daemon=True)
            t.start()
            t.join(300)                 # a bound against a hang
            assert not t.is_alive(), "I/O stalled behind stuck control clients"
            assert got == [b"\x5a" * 65536] * 200
            assert control.call(server.control,
                                "get initstate")["value"] == "1\n"
            h.pwrite(b"\xa5" * 4096, 4096)
            assert h.pread(4096, 4096) == b"\xa5" * 4096
            # Still stuck: the server has read nothing more from the
            # flooder, and the silent clients are mid-request.
            with pytest.raises(BlockingIOError):
                flooder.send(b"ping\n" * 4096)
            for s in silent:
                s.sendall(b"_stat\n")
                with s.makefile("rb") as f:
                    reply = json.loads(f.readline())
                assert reply["ok"] and reply["attr"] == "mm_stat", reply
            flooder.settimeout(30)
            assert json.loads(reader.readline())["ok"]
        finally:
            # Unstick the server first (shutdown acts however many file
            # objects share the socket), so that a failure cannot leave
            # the NBD handle waiting behind it.
            for s in [flooder] + silent:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            if reader is not None:
                reader.close()
    assert server.process.poll() is None


def test_real_stop_with_silent_clients(tmp_path_factory):
    require("nbdkit")
    directory = tmp_path_factory.mktemp("stop")
    server = NbdkitServer(directory, size="16M", name="zramd1")
    try:
        server.wait_control()
        silent = []
        for _ in range(4):
            s = socket.socket(socket.AF_UNIX)
            s.connect(server.control)
            silent.append(s)
        assert control.call(server.control, "ping")["name"] == "zramd1"
    finally:
        status = server.stop()
    # nbdkit ended on SIGTERM by itself, not killed after stop()'s 10 s.
    assert status == 0, server.log()
    assert "Traceback" not in server.log(), server.log()
    assert not os.path.exists(server.control)
    for s in silent:
        assert s.recv(10) == b""
        s.close()


def test_status_prints_what_the_server_reports(runtime, capsys, monkeypatch):
    from zramd import procctl
    monkeypatch.setattr(procctl, "facts", {
        "instance": "0123abcd", "memory_lock": "onfault", "io_flusher": True,
        "parent_death_signal_cleared": "SIGTERM"})
    runtime("zramd0")
    rc, out, err = run(capsys, "status", "zramd0")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines == sorted(lines)
    for line in ("instance: 0123abcd", "memory_lock: onfault",
                 "io_flusher: true", "parent_death_signal_cleared: SIGTERM",
                 "name: zramd0", "algorithm: lz4"):
        assert line in lines, out
    assert not any(l.startswith(("ok:", "version:")) for l in lines)
    assert run(capsys, "status", "nosuch") == (
        1, "", "zramd: nosuch: no such device\n")
