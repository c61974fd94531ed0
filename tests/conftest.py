"""Shared test set-up: import paths, skips with a stated reason, and the
nbdkit servers of the end-to-end tests.

End-to-end test modules start one real nbdkit per module on a Unix socket
(``tests/nbdkit_server.NbdkitServer``); a test that needs a tool that is
missing skips and says which (``require``), never silently.
"""

import fcntl
import os
import shutil
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
for _path in (REPO, TESTS):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from nbdkit_server import NbdkitServer  # noqa: E402


def require(*tools):
    """Skip the calling test unless every program in ``tools`` is on PATH."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip("not installed: %s (scripts/test installs it)"
                    % " ".join(missing))


def blockdev_missing(tools):
    """Why a test of real block devices (nbdfuse, loop, swap, mounts)
    cannot run here, or None: root, /dev/fuse, loop devices and ``tools``
    on PATH."""
    if os.geteuid() != 0:
        return "needs root (losetup, mount, swapon)"
    if not os.path.exists("/dev/fuse"):
        return "needs FUSE (/dev/fuse missing)"
    if not os.path.exists("/dev/loop-control"):
        return "needs loop devices (/dev/loop-control missing)"
    for tool in tools:
        if shutil.which(tool) is None:
            return "needs %s" % tool
    return None


def race(workers, compactor, done):
    """Start ``compactor`` and ``workers`` (threads, not yet started) with
    the interpreter switching threads as often as it can, so unlocked
    sequences really interleave; join the workers, set ``done`` and join
    the compactor.  The switch interval is restored before returning."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        compactor.start()
        for t in workers:
            t.start()
        for t in workers:
            t.join(120)
    finally:
        done.set()
        compactor.join(30)
        sys.setswitchinterval(interval)


def require_module(name, package):
    """Import ``name`` or skip, naming the Debian package that has it."""
    return pytest.importorskip(name, reason="python module %s missing "
                               "(apt-get install %s)" % (name, package))


@pytest.fixture
def runtime_dir(tmp_path, monkeypatch):
    """A private ``$ZRAMD_RUNTIME_DIR``, so a test never touches /run/zramd
    where a real device may live."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    monkeypatch.setenv("ZRAMD_RUNTIME_DIR", str(runtime))
    return runtime


@pytest.fixture
def nbdkit_server(tmp_path):
    """A factory: ``nbdkit_server(size="64M", **params)`` starts a server in
    a directory of its own under this test's tmp_path; all are stopped at
    the end of the test."""
    servers = []

    def start(size="64M", **params):
        directory = tmp_path / ("nbdkit%d" % len(servers))
        server = NbdkitServer(directory, size=size, **params)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def module_server(tmp_path_factory):
    """One nbdkit (64 MiB, lz4) shared by the tests of a module.  At the
    end it must stop cleanly, with no Python traceback in its log."""
    require("nbdkit")
    server = NbdkitServer(tmp_path_factory.mktemp("nbdkit"), size="64M")
    yield server
    assert server.stop() == 0, server.log()
    assert "Traceback" not in server.log(), server.log()


#: Shared by every suite on this kernel, the host's and a release root's
#: (scripts/release-root binds /dev).
SWAP_LOCK = "/dev/shm/zramd-swap-tests.lock"


@pytest.fixture
def swap_lock():
    """Hold the machine-wide lock of the tests that put swap areas to use.
    The kernel spreads swapped pages over the areas of equal priority, so
    two suites at once would swap into each other's devices, and pages
    would be lost when the other suite's device went."""
    with open(SWAP_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


class NbdClient:
    """A python3-libnbd connection that is always shut down, so a failing
    test never leaves nbdkit waiting for it::

        with NbdClient(server.uri) as h:
            h.pwrite(b"...", 0)
    """

    def __init__(self, uri, strict=True):
        nbd = require_module("nbd", "python3-libnbd")
        self.handle = nbd.NBD()
        self.handle.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        if not strict:
            # Let requests past the end reach the server instead of being
            # refused by libnbd itself.
            self.handle.set_strict_mode(0)
        self.handle.connect_uri(uri)

    def __enter__(self):
        return self.handle

    def __exit__(self, *exc):
        try:
            self.handle.shutdown()
        except Exception:
            pass
        del self.handle             # libnbd closes the connection here


class HookedLock:
    """A lock standing in for one of the device's, to force an
    interleaving without timing: ``action`` (set it, it runs once) runs
    the next time the lock is taken, before taking it, and ``contended``
    (an Event, optional) is set when a thread finds the lock taken and is
    about to wait for it."""

    def __init__(self, lock, contended=None):
        self.lock, self.contended, self.action = lock, contended, None

    def acquire(self, blocking=True, timeout=-1):
        action, self.action = self.action, None
        if action is not None:
            action()
        if self.lock.acquire(blocking=False):
            return True
        if self.contended is not None:
            self.contended.set()
        return self.lock.acquire(blocking, timeout)

    def release(self):
        self.lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def fill_socket(sock, chunk=b"attrs\n" * 64):
    """Send ``chunk`` on ``sock`` until it takes no more (the peer has
    stopped reading and both buffers are full); leaves it non-blocking."""
    sock.setblocking(False)
    try:
        while True:
            sock.send(chunk)
    except BlockingIOError:
        pass
