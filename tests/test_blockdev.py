"""Real block devices on a real server: nbdkit + plugin.py on a Unix socket,
nbdfuse turning it into a file, and ``losetup --direct-io=on --sector-size
4096`` turning the file into /dev/loopN.  As root:

- ext4: mkfs, mount, write files, umount, ``fsck -f`` clean, mount again,
  checksums match;
- trim: fstrim and blkdiscard reach the plugin as trim, and orig_data_size
  and mem_used_total fall (read through the control socket);
- swap: mkswap + ``swapon --discard``, and a workload in a cgroup v1 memory
  limit pushes at least 128 MiB through the device and checks its data.

Each test skips, saying why, where root, FUSE, loop devices or the cgroup
v1 memory controller are missing.  Everything is undone even on failure.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import blockdev_missing
from nbdkit_server import NbdkitServer
from zramd import control

MiB = 1 << 20
CGROUP_MEMORY = "/sys/fs/cgroup/memory"


def _missing():
    return blockdev_missing(("nbdkit", "nbdfuse", "fusermount3", "losetup",
                             "mkfs.ext4", "e2fsck", "fstrim", "blkdiscard",
                             "mkswap", "swapon"))


pytestmark = pytest.mark.skipif(_missing() is not None,
                                reason=_missing() or "")


def run(*argv, **kw):
    return subprocess.run(argv, check=True, capture_output=True, text=True,
                          **kw)


class LoopDevice:
    """nbdfuse + losetup over a running server; ``close()`` undoes both."""

    def __init__(self, server, directory):
        self.fuse_dir = os.path.join(directory, "fuse")
        os.makedirs(self.fuse_dir, exist_ok=True)
        pidfile = os.path.join(directory, "nbdfuse.pid")
        self.loop = None
        self.fuse = subprocess.Popen(
            ["nbdfuse", "--pidfile", pidfile, os.path.join(self.fuse_dir, "nbd"),
             "--unix", server.socket],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not os.path.exists(pidfile):
            if self.fuse.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("nbdfuse did not start")
            time.sleep(0.05)
        try:
            self.loop = run("losetup", "--find", "--show", "--direct-io=on",
                            "--sector-size", "4096",
                            os.path.join(self.fuse_dir, "nbd")).stdout.strip()
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.loop:
            subprocess.run(["losetup", "--detach", self.loop],
                           capture_output=True)
            base = os.path.basename(self.loop)
            deadline = time.monotonic() + 10
            while (os.path.exists("/sys/block/%s/loop/backing_file" % base)
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            self.loop = None
        deadline = time.monotonic() + 10
        while self.fuse.poll() is None and time.monotonic() < deadline:
            subprocess.run(["fusermount3", "-u", self.fuse_dir],
                           capture_output=True)
            try:
                self.fuse.wait(0.5)
            except subprocess.TimeoutExpired:
                pass
        if self.fuse.poll() is None:
            self.fuse.kill()
            self.fuse.wait()
            subprocess.run(["fusermount3", "-u", "-z", self.fuse_dir],
                           capture_output=True)


def status(server):
    return control.call(server.control, "status")


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def half_random(size, seed):
    """``size`` bytes, each 4 KiB page half random, half zero: compresses to
    about a half, like real data."""
    import random
    rnd = random.Random(seed)
    page = []
    for _ in range(size // 4096):
        page.append(rnd.randbytes(2048))
        page.append(bytes(2048))
    return b"".join(page)


@pytest.fixture
def server(tmp_path):
    with NbdkitServer(str(tmp_path / "srv"), size="256M",
                      extra_args=("--threads", "4")) as srv:
        srv.wait_control()
        yield srv


@pytest.fixture
def loopdev(server, tmp_path):
    dev = LoopDevice(server, str(tmp_path))
    yield dev
    dev.close()


@pytest.fixture
def mountpoint(tmp_path):
    mp = str(tmp_path / "mnt")
    os.makedirs(mp)
    yield mp
    if os.path.ismount(mp):
        subprocess.run(["umount", mp], capture_output=True)
    if os.path.ismount(mp):
        subprocess.run(["umount", "-l", mp], capture_output=True)


def test_loop_device_properties(loopdev):
    base = os.path.basename(loopdev.loop)
    with open("/sys/block/%s/queue/logical_block_size" % base) as f:
        assert f.read().strip() == "4096"
    with open("/sys/block/%s/loop/dio" % base) as f:
        assert f.read().strip() == "1"
    with open("/sys/block/%s/size" % base) as f:
        assert int(f.read()) * 512 == 256 * MiB


def test_ext4_fsck_and_checksums(server, loopdev, mountpoint):
    loop = loopdev.loop
    run("mkfs.ext4", "-q", loop)
    run("mount", "-t", "ext4", loop, mountpoint)
    sums = {}
    for i in range(12):
        data = half_random((i + 1) * 512 * 1024 + 123, seed=i)
        path = os.path.join(mountpoint, "f%02d" % i)
        with open(path, "wb") as f:
            f.write(data)
        sums[os.path.basename(path)] = hashlib.sha256(data).hexdigest()
    os.makedirs(os.path.join(mountpoint, "tree"))
    lib = os.path.dirname(os.__file__)
    for name in sorted(os.listdir(lib))[:200]:
        src = os.path.join(lib, name)
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(mountpoint, "tree", name))
            sums["tree/" + name] = sha256(src)
    run("umount", mountpoint)
    written = status(server)["orig_data_size"]
    assert written > 40 * MiB          # the data went to the plugin
    fsck = subprocess.run(["e2fsck", "-f", "-n", loop], capture_output=True,
                          text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    run("mount", "-t", "ext4", "-o", "ro", loop, mountpoint)
    got = {rel: sha256(os.path.join(mountpoint, rel)) for rel in sums}
    assert got == sums
    run("umount", mountpoint)


def test_fstrim_and_blkdiscard_free_memory(server, loopdev, mountpoint):
    loop = loopdev.loop
    run("mkfs.ext4", "-q", loop)
    run("mount", "-t", "ext4", loop, mountpoint)
    with open(os.path.join(mountpoint, "big"), "wb") as f:
        for i in range(64):
            f.write(half_random(MiB, seed=1000 + i))
    os.sync()
    full = status(server)
    assert full["orig_data_size"] > 60 * MiB
    assert full["mem_used_total"] > 25 * MiB
    os.unlink(os.path.join(mountpoint, "big"))
    os.sync()
    out = run("fstrim", "-v", mountpoint).stdout
    assert "trimmed" in out

    def fell(before, fraction):
        def check():
            now = status(server)
            return (now["orig_data_size"] < before["orig_data_size"] * fraction
                    and now["mem_used_total"] < before["mem_used_total"]
                    * fraction)
        return check
    assert wait_for(fell(full, 0.1)), (full, status(server))
    trimmed = status(server)
    # They went as discards (the kernel's notify_free counts the sectors a
    # discard freed), not as writes of zeroes.
    freed = (full["orig_data_size"] - trimmed["orig_data_size"]) // 4096
    assert trimmed["notify_free"] - full["notify_free"] >= freed
    assert trimmed["num_writes"] - full["num_writes"] < freed // 100
    # Fill again, then blkdiscard the whole device: memory back to ~0.
    with open(os.path.join(mountpoint, "again"), "wb") as f:
        f.write(half_random(16 * MiB, seed=7))
    run("umount", mountpoint)
    refilled = status(server)
    assert refilled["orig_data_size"] > 15 * MiB
    run("blkdiscard", "-f", loop)
    assert wait_for(lambda: status(server)["orig_data_size"] == 0)
    assert (status(server)["notify_free"] - refilled["notify_free"]
            >= refilled["orig_data_size"] // 4096)
    assert wait_for(lambda: status(server)["mem_used_total"]
                    < refilled["mem_used_total"] / 10), status(server)


# ---------------------------------------------------------------------------
# Swap under a cgroup v1 memory limit

WORKLOAD = textwrap.dedent("""\
    import hashlib, os, random, sys
    cgroup, total_mib = sys.argv[1], int(sys.argv[2])
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    chunks, sums = [], []
    for i in range(total_mib):
        rnd = random.Random(i)
        page = b"".join(rnd.randbytes(2048) + bytes(2048) for _ in range(256))
        chunks.append(bytearray(page))
        sums.append(hashlib.sha256(page).digest())
    print("filled", flush=True)
    sys.stdin.readline()             # the parent looks at the swap meanwhile
    bad = [i for i, c in enumerate(chunks) if hashlib.sha256(c).digest() != sums[i]]
    print("bad", len(bad), flush=True)
    sys.exit(1 if bad else 0)
    """)


def _cgroup_missing():
    if not os.path.exists(os.path.join(CGROUP_MEMORY, "memory.limit_in_bytes")):
        return "needs the cgroup v1 memory controller at %s" % CGROUP_MEMORY
    if not os.access(CGROUP_MEMORY, os.W_OK):
        return "cannot create cgroups in %s" % CGROUP_MEMORY
    return None


def swap_used(device):
    with open("/proc/swaps") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields and os.path.realpath(fields[0]) == device:
                return int(fields[3]) * 1024
    return None


@pytest.fixture
def swap_server(tmp_path):
    # A server behind swap runs locked in memory (swap=true), as zramd up
    # does.
    with NbdkitServer(str(tmp_path / "srv"), size="384M", swap="true",
                      extra_args=("--threads", "4"),
                      env={"MALLOC_ARENA_MAX": "2"}) as srv:
        srv.wait_control()
        yield srv


@pytest.mark.skipif(_cgroup_missing() is not None,
                    reason=_cgroup_missing() or "")
def test_swap_workload_in_memory_cgroup(swap_lock, swap_server, tmp_path):
    server = swap_server
    dev = LoopDevice(server, str(tmp_path))
    cgroup = os.path.join(CGROUP_MEMORY, "zramd-test-%d" % os.getpid())
    proc = None
    swapped_on = False
    try:
        run("mkswap", dev.loop)
        run("swapon", "--discard", "--priority", "32767", dev.loop)
        swapped_on = True
        os.mkdir(cgroup)
        with open(os.path.join(cgroup, "memory.limit_in_bytes"), "w") as f:
            f.write(str(64 * MiB))
        with open(os.path.join(cgroup, "memory.swappiness"), "w") as f:
            f.write("100")
        proc = subprocess.Popen([sys.executable, "-c", WORKLOAD, cgroup,
                                 "224"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        line = proc.stdout.readline()
        assert line.strip() == "filled", proc.stderr.read()
        used = swap_used(dev.loop)
        stats = status(server)
        # At least 128 MiB went out through our device and into the pool.
        assert used is not None and used >= 128 * MiB, used
        assert stats["orig_data_size"] >= 128 * MiB, stats
        assert stats["mem_used_total"] < stats["orig_data_size"]
        out, err = proc.communicate("verify\n", timeout=180)
        assert proc.returncode == 0, (out, err)
        assert "bad 0" in out
        with open(os.path.join(cgroup, "memory.failcnt")) as f:
            assert int(f.read()) > 0         # the limit did bite
        assert vm(server, "VmLck") > 0           # swap=true locked it
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if swapped_on:
            subprocess.run(["swapoff", dev.loop], capture_output=True)
        if os.path.isdir(cgroup):
            wait_for(lambda: not open(os.path.join(cgroup, "cgroup.procs")).read().strip(), 5)
            os.rmdir(cgroup)
        dev.close()


def vm(server, field):
    """A /proc/PID/status field of the server, in bytes."""
    with open("/proc/%d/status" % server.process.pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def test_discard_frees_memory_of_a_locked_server(swap_server, tmp_path):
    # Under swap=true (mlockall) the pool's memory is locked: trimming must
    # still succeed and give it back (madvise(MADV_DONTNEED) alone refuses
    # locked pages with EINVAL).
    server = swap_server
    dev = LoopDevice(server, str(tmp_path))
    try:
        with open(dev.loop, "r+b", buffering=0) as f:
            for i in range(32):
                f.write(half_random(MiB, seed=2000 + i))
            os.fsync(f.fileno())
        full = status(server)
        assert full["orig_data_size"] >= 32 * MiB
        rss = vm(server, "VmRSS")
        run("blkdiscard", "-f", dev.loop)
        assert wait_for(lambda: status(server)["orig_data_size"] == 0), \
            status(server)
        assert wait_for(lambda: status(server)["mem_used_total"]
                        < full["mem_used_total"] / 10), status(server)
        # ... and the process really gave the memory back.
        assert wait_for(lambda: vm(server, "VmRSS")
                        < rss - full["mem_used_total"] / 2), \
            (rss, vm(server, "VmRSS"), full["mem_used_total"])
        # and the device still works afterwards
        with open(dev.loop, "r+b", buffering=0) as f:
            data = half_random(MiB, seed=3)
            f.write(data)
            os.fsync(f.fileno())
            f.seek(0)
            assert f.read(MiB) == data
    finally:
        dev.close()
