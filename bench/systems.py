"""The systems under test: one object per compressed (or plain) RAM disk.

Every system has the same small life cycle, so the harness treats them
alike::

    system.available()  -> None, or the reason it is skipped
    system.start(workdir, size)      a fresh, empty disk of ``size`` bytes
    system.target                    what clients open: an NBD URI, or a
                                     block device path (``system.block``)
    system.pid                       the server process (RSS), or None
    system.mm_stat()                 the kernel's mm_stat fields as a dict,
                                     or None when the system has no such
                                     report
    system.stop()                    tear down; the kernel's zram is reset

The systems:

- ``zramd-lz4``, ``zramd-zstd``: ``nbdkit --filter=... python plugin.py
  algorithm=...`` with zramd's nbdkit filter in front, as zramd up serves,
  started through tests/nbdkit_server.py; mm_stat over the control socket
  (zramd/control.py, ``get mm_stat``).
- ``nbdkit-zstd``: ``nbdkit memory allocator=zstd``, the peer written in C.
- ``nbdkit-sparse``: ``nbdkit memory allocator=sparse``, no compression:
  the ceiling of the NBD transport on this machine.
- ``kernel-zram``: /dev/zram0 with lz4, when present, unused
  (initstate 0) and we are root.  Reset before and after.
"""

import os
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(REPO, "plugin.py")
ZRAM = "/sys/block/zram0"

MM_STAT_FIELDS = ("orig_data_size", "compr_data_size", "mem_used_total",
                  "mem_limit", "mem_used_max", "same_pages",
                  "pages_compacted", "huge_pages", "huge_pages_since")


def parse_mm_stat(text):
    """The kernel's mm_stat line as a dict (missing trailing columns of an
    older kernel are left out)."""
    return dict(zip(MM_STAT_FIELDS, (int(v) for v in text.split())))


def vm_rss(pid):
    """Resident set size of process ``pid`` in bytes."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS for pid %d" % pid)


class System:
    name = "?"
    label = "?"
    algorithm = None        # compression algorithm, None for none
    block = False           # target is a block device path, not a URI
    target = None
    pid = None

    def available(self):
        return None

    def start(self, workdir, size):
        raise NotImplementedError

    def stop(self):
        pass

    def mm_stat(self):
        return None

    def __str__(self):
        return self.name


class NbdkitMemory(System):
    """``nbdkit memory size=SIZE allocator=ALLOCATOR`` on a Unix socket."""

    def __init__(self, allocator):
        self.allocator = allocator
        self.name = "nbdkit-" + allocator
        self.label = "nbdkit memory allocator=" + allocator
        self.algorithm = "zstd" if allocator == "zstd" else None
        self.process = None
        self._log = None

    def available(self):
        try:
            out = subprocess.run(["nbdkit", "memory", "--help"],
                                 capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            return "nbdkit is not installed"
        if out.returncode != 0:
            return "nbdkit memory plugin missing: " + out.stderr.strip()
        return None

    def start(self, workdir, size):
        sock = os.path.join(workdir, self.name + ".nbd")
        self.log_path = os.path.join(workdir, self.name + ".log")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            ["nbdkit", "-f", "-U", sock, "memory", "size=%d" % size,
             "allocator=" + self.allocator],
            stdout=self._log, stderr=subprocess.STDOUT)
        wait_socket(sock, self.process, self.log_path)
        self.pid = self.process.pid
        self.target = "nbd+unix:///?socket=" + sock

    def stop(self):
        if self.process is not None:
            stop_process(self.process)
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None


class Zramd(System):
    """zramd's plugin.py in nbdkit, through tests/nbdkit_server.py."""

    def __init__(self, algorithm):
        self.algorithm = algorithm
        self.name = "zramd-" + algorithm
        self.label = "zramd algorithm=" + algorithm
        self.server = None
        self.extra = {}
        self.threads = None

    def available(self):
        if not os.path.exists(PLUGIN):
            return "plugin.py not written yet"
        if not os.path.exists("/usr/lib/x86_64-linux-gnu/nbdkit/plugins/"
                              "nbdkit-python-plugin.so") and \
                subprocess.run(["nbdkit", "python", "--version"],
                               capture_output=True).returncode != 0:
            return "nbdkit python plugin (nbdkit-plugin-python) missing"
        return None

    def start(self, workdir, size):
        if REPO not in sys.path:
            sys.path.insert(0, REPO)
        from tests.nbdkit_server import NbdkitServer
        from zramd.attach import server_threads
        # As `zramd up` and the systemd unit run it (server_threads() worker
        # threads per connection; see zramd/attach.py for why so few),
        # unless the run asks for another number (--server-threads).
        threads = self.threads or server_threads()
        self.server = NbdkitServer(os.path.join(workdir, self.name),
                                   size=str(size), name=self.name,
                                   algorithm=self.algorithm,
                                   extra_args=("--threads", str(threads)),
                                   **self.extra)
        try:
            self.server.wait_control()
            self._control = True
        except RuntimeError:
            # No control channel in this build: memory from RSS only.
            self._control = False
        self.pid = self.server.process.pid
        self.target = self.server.uri

    def mm_stat(self):
        if not self._control:
            return None
        from zramd import control
        reply = control.call(self.server.control, "get mm_stat")
        return parse_mm_stat(reply["value"])

    def stop(self):
        if self.server is not None:
            self.server.stop()
            self.log = self.server.log()
            self.server = None


class KernelZram(System):
    """The kernel's zram on /dev/zram0, lz4."""

    name = "kernel-zram"
    label = "kernel zram (/dev/zram0)"
    block = True

    def __init__(self, algorithm="lz4"):
        self.algorithm = algorithm
        self.target = "/dev/zram0"
        self._started = False

    @staticmethod
    def sysfs(attr, value=None):
        path = os.path.join(ZRAM, attr)
        if value is None:
            with open(path) as f:
                return f.read()
        with open(path, "w") as f:
            f.write(value)

    def available(self):
        if os.geteuid() != 0:
            return "needs root"
        if not os.path.isdir(ZRAM):
            return "no %s (zram module not loaded)" % ZRAM
        if self.sysfs("initstate").strip() != "0":
            return "/dev/zram0 is in use (initstate 1)"
        algos = self.sysfs("comp_algorithm").replace("[", " ").replace("]", " ")
        if self.algorithm not in algos.split():
            return "kernel zram has no %s (has: %s)" % (self.algorithm,
                                                       algos.strip())
        return None

    def start(self, workdir, size):
        self.sysfs("reset", "1")
        self.sysfs("comp_algorithm", self.algorithm)
        self.sysfs("disksize", str(size))
        self._started = True

    def mm_stat(self):
        return parse_mm_stat(self.sysfs("mm_stat"))

    def stop(self):
        if self._started:
            self.sysfs("reset", "1")
            self._started = False


def wait_socket(path, process, log_path, timeout=30.0):
    """Wait until a server accepts connections on the Unix socket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with open(log_path, "rb") as f:
                log = f.read().decode(errors="replace")
            raise RuntimeError("server exited with %s:\n%s"
                               % (process.returncode, log))
        if os.path.exists(path):
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(path)
                    return
                except OSError:
                    pass
        time.sleep(0.05)
    stop_process(process)
    raise RuntimeError("server did not start on %s" % path)


def stop_process(process):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def all_systems():
    """Every system, in table order."""
    return [Zramd("lz4"), Zramd("zstd"), NbdkitMemory("zstd"),
            NbdkitMemory("sparse"), KernelZram("lz4")]
