"""scripts/quickstart end to end: it serves a device in the background,
prints how to reach it, is idempotent, and refuses bad configuration.

The script installs what is missing; here everything must already be
installed (scripts/test sees to it), or the test skips rather than run
apt-get or repoint the editable install from inside the suite.
"""

import os
import signal
import subprocess
import time

import pytest

from conftest import REPO, NbdClient, require

QUICKSTART = os.path.join(REPO, "scripts", "quickstart")


def _not_ready():
    check = subprocess.run(
        ["bash", "-c", '. scripts/common.sh; '
         'missing_packages "${RUNTIME_PACKAGES[@]}"'],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    if check.returncode != 0 or check.stdout.strip():
        return "packages missing: %s" % " ".join(check.stdout.split())
    found = subprocess.run(["/usr/bin/python3", "-c",
                            "import zramd; print(zramd.__file__)"],
                           cwd="/", capture_output=True, text=True)
    if found.stdout.strip() != os.path.join(REPO, "zramd", "__init__.py"):
        return "zramd is not installed from this clone (run scripts/test)"
    return None


_NOT_READY = _not_ready()
pytestmark = pytest.mark.skipif(_NOT_READY is not None,
                                reason=_NOT_READY or "")


def quickstart(runtime, *args):
    env = dict(os.environ, ZRAMD_RUNTIME_DIR=str(runtime))
    return subprocess.run([QUICKSTART, *args], capture_output=True,
                          text=True, timeout=120, env=env,
                          stdin=subprocess.DEVNULL)


def stop(pidfile):
    pid = int(open(pidfile).read())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def test_quickstart_serves_in_the_background(tmp_path):
    require("nbdinfo", "zramd")
    runtime = tmp_path / "run"
    nbd_sock, ctl = runtime / "qs0.nbd", runtime / "qs0.sock"
    pidfile = runtime / "qs0.pid"
    done = quickstart(runtime, "qs0", "64M", "algorithm=zstd")
    try:
        assert done.returncode == 0, done.stderr
        first_pid = pidfile.read_text()
        out = done.stdout
        for text in ("NBD socket      %s" % nbd_sock,
                     "control socket  %s" % ctl,
                     "nbdfuse %s/qs0.fuse --unix %s" % (runtime, nbd_sock),
                     "losetup --direct-io=on --sector-size 4096 --show -f "
                     "%s/qs0.fuse/nbd" % runtime,
                     "zramd attr qs0 mm_stat"):
            assert text in out, out
        # It really serves, on that socket, with those parameters.
        size = subprocess.run(["nbdinfo", "--size",
                               "nbd+unix:///?socket=%s" % nbd_sock],
                              capture_output=True, text=True, timeout=60)
        assert size.stdout.strip() == str(64 << 20)
        with NbdClient("nbd+unix:///?socket=%s" % nbd_sock) as h:
            h.pwrite(b"quick start" * 400, 0)
        env = dict(os.environ, ZRAMD_RUNTIME_DIR=str(runtime))
        mm = subprocess.run(["zramd", "attr", "qs0", "comp_algorithm"],
                            cwd="/", env=env,
                            capture_output=True, text=True, timeout=60)
        assert "[zstd]" in mm.stdout, mm.stderr
        # A second run leaves the running device alone.
        again = quickstart(runtime, "qs0", "64M")
        assert again.returncode == 0, again.stderr
        assert "qs0 is already served by nbdkit" in again.stderr
        assert pidfile.read_text() == first_pid
    finally:
        if pidfile.exists():
            stop(pidfile)


def test_quickstart_refuses_bad_configuration(tmp_path):
    done = quickstart(tmp_path / "run", "qs1", "1000")
    assert done.returncode == 1
    assert "size: '1000' is 1000 bytes" in done.stderr
    assert "qs1: nbdkit did not start" in done.stderr
    assert not (tmp_path / "run" / "qs1.nbd").exists()
