"""``zramd up`` / ``zramd down`` round trips as root on the nbdfuse path:
swap and an ext4 mount, each leaving nothing behind (no process, loop
device, FUSE mount or socket); an already running server is used and left
running; a failing bring-up is unwound; a bad configuration changes
nothing.  Configuration comes from a root-prefixed tree, the runtime
directory is per test ($ZRAMD_RUNTIME_DIR)."""

import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest

from conftest import blockdev_missing
from nbdkit_server import NbdkitServer
from zramd import attach, config, control
from zramd.errors import ConfigError, ZramdError

MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _missing():
    missing = blockdev_missing(("nbdkit", "nbdfuse", "fusermount3", "losetup",
                                "mkswap", "swapon", "mkfs.ext4"))
    if missing is None and attach.kernel_nbd():
        return "the kernel has nbd: zramd up would use nbd-client, not nbdfuse"
    return missing


pytestmark = [pytest.mark.skipif(_missing() is not None,
                                 reason=_missing() or ""),
              pytest.mark.usefixtures("swap_lock")]


# ---------------------------------------------------------------------------
# What is left behind

def _processes_mentioning(text):
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open("/proc/%s/stat" % pid) as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            found.append("process %s: %s" % (pid, cmd.strip()))
    return found


def _loops_backed_under(directory):
    found = []
    for dev in os.listdir("/sys/block"):
        try:
            with open("/sys/block/%s/loop/backing_file" % dev) as f:
                backing = f.read().strip()
        except OSError:
            continue
        if backing.startswith(directory):
            found.append("loop /dev/%s -> %s" % (dev, backing))
    return found


def _mounts_under(*directories):
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            if any(mp == d or mp.startswith(d + "/") for d in directories):
                found.append("mount %s" % mp)
    return found


def leftovers(run_dir, *mount_points):
    left = _processes_mentioning(run_dir)
    left += _loops_backed_under(run_dir)
    left += _mounts_under(run_dir, *mount_points)
    if os.path.isdir(run_dir):
        left += ["file %s" % e for e in sorted(os.listdir(run_dir))]
    return left


def _force_cleanup(run_dir, mount_points):
    """Whatever a failed test left: swapoff, umount, losetup -d, fusermount,
    kill.  Best effort, never raises."""
    for line in _loops_backed_under(run_dir):
        dev = line.split()[1]
        subprocess.run(["swapoff", dev], capture_output=True)
    for mp in mount_points:
        subprocess.run(["umount", "-l", mp], capture_output=True)
    for line in _loops_backed_under(run_dir):
        subprocess.run(["losetup", "-d", line.split()[1]], capture_output=True)
    time.sleep(0.2)
    for line in _mounts_under(run_dir):
        subprocess.run(["fusermount3", "-u", "-z", line.split()[1]],
                       capture_output=True)
    for line in _processes_mentioning(run_dir):
        pid = int(line.split()[1].rstrip(":"))
        try:
            os.kill(pid, 9)
        except OSError:
            pass


# ---------------------------------------------------------------------------
# Fixtures

class Env:
    def __init__(self, tmp_path):
        self.root = str(tmp_path / "root")
        self.run = str(tmp_path / "run")
        self.mnt = str(tmp_path / "mnt")
        os.makedirs(os.path.join(self.root, "proc"))
        os.makedirs(os.path.join(self.root, "etc/zramd"))
        with open(os.path.join(self.root, "proc/meminfo"), "w") as f:
            f.write("MemTotal:        1048576 kB\n")      # ram = 1024 MiB

    names = ()

    def cgroups(self):
        """zramd's memory cgroups of the devices this test configured (not
        those of another suite running at the same time)."""
        try:
            return {e for e in os.listdir(attach.CGROUP_V1_MEMORY)
                    if any(re.fullmatch("zramd-%s-[0-9]+" % re.escape(n), e)
                           for n in self.names)}
        except FileNotFoundError:
            return set()

    def left(self, *mount_points):
        """leftovers() plus cgroups zramd made during the test."""
        return leftovers(self.run, *mount_points) + sorted(
            "cgroup %s" % c for c in self.cgroups() - self.cgroups_before)

    def configure(self, text):
        with open(os.path.join(self.root, "etc/zramd/zramd.conf"), "w") as f:
            f.write(text)
        self.names = tuple(set(self.names)
                           | set(re.findall(r"^\[([^]]+)\]", text, re.M)))
        # Left by an earlier run, not by this test.
        self.cgroups_before = self.cgroups_before | self.cgroups()

    def state(self, name):
        with open(os.path.join(self.run, name + ".state.json")) as f:
            return json.load(f)


@pytest.fixture
def env(tmp_path, monkeypatch):
    e = Env(tmp_path)
    e.cgroups_before = e.cgroups()
    monkeypatch.setenv("ZRAMD_RUNTIME_DIR", e.run)
    yield e
    try:
        attach.down()
    except Exception:
        pass
    left = leftovers(e.run, e.mnt)
    if left:
        _force_cleanup(e.run, [e.mnt])
    for c in e.cgroups() - e.cgroups_before:
        try:
            os.rmdir(os.path.join(attach.CGROUP_V1_MEMORY, c))
        except OSError:
            pass


def _can_lower_oom_score():
    r = subprocess.run(["sh", "-c", "echo -1 > /proc/self/oom_score_adj"],
                       capture_output=True)
    return r.returncode == 0


def _has_cap_sys_resource():
    with open("/proc/self/status") as f:
        caps = [int(l.split()[1], 16) for l in f if l.startswith("CapEff:")]
    return bool(caps[0] >> 24 & 1)


def swap_entry(device):
    with open("/proc/swaps") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[0] == device:
                return {"size": int(fields[2]) * 1024,
                        "priority": int(fields[4])}
    return None


def status_of(name):
    return control.call(os.path.join(os.environ["ZRAMD_RUNTIME_DIR"],
                                     name + ".sock"), "status")


def cmdline(pid):
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        return f.read().split(b"\0")


# ---------------------------------------------------------------------------
# Round trips

def test_swap_round_trip(env):
    env.configure("[zswap]\nzram-size = ram / 16\nswap-priority = 42\n"
                  "compression-algorithm = zstd(level=1)\n")
    (state,) = attach.up(root=env.root)
    dev = state["block_device"]
    assert dev.startswith("/dev/loop")
    # The state file is what the CLI reads.
    on_disk = env.state("zswap")
    assert on_disk["block_device"] == dev and on_disk["use"] == "swap"
    assert on_disk["active"] is True and on_disk["mount_point"] is None
    assert on_disk["fuse_dir"] == os.path.join(env.run, "zswap.fuse")
    # swapon with the configured priority, on the whole 64 MiB.
    entry = swap_entry(dev)
    assert entry is not None, open("/proc/swaps").read()
    assert entry["priority"] == 42
    assert 63 * MiB <= entry["size"] < 64 * MiB      # less the header page
    # The loop device: on the FUSE file, direct I/O, 4 KiB sectors.
    base = os.path.basename(dev)
    with open("/sys/block/%s/loop/backing_file" % base) as f:
        assert f.read().strip() == os.path.join(env.run, "zswap.fuse", "nbd")
    with open("/sys/block/%s/loop/dio" % base) as f:
        assert f.read().strip() == "1"
    with open("/sys/block/%s/queue/logical_block_size" % base) as f:
        assert f.read().strip() == "4096"
    # The server: ours, locked on fault (swap=true, not nbdkit's --swap),
    # few threads, configured size, an IO flusher like nbdfuse.
    pid = on_disk["server_pid"]
    argv = cmdline(pid)
    assert argv[0].endswith(b"nbdkit") and b"swap=true" in argv
    assert b"--swap" not in argv
    with open("/proc/%d/status" % pid) as f:
        st = dict(line.split(":", 1) for line in f)
    assert int(st["VmLck"].split()[0]) > 0
    assert int(st["VmRSS"].split()[0]) < int(st["VmLck"].split()[0])
    status = status_of("zswap")
    assert status["memory_lock"] == "onfault"
    assert on_disk["server_memory_lock"] == "onfault"
    # PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE, which some containers
    # withhold.
    flusher = _has_cap_sys_resource()
    assert on_disk["server_io_flusher"] is status["io_flusher"] is flusher
    assert on_disk["fuse_io_flusher"] is flusher
    # nbdfuse attached by the instance's export name.
    assert len(on_disk["server_instance"]) == 32
    assert on_disk["server_instance"] == status["instance"]
    assert cmdline(on_disk["fuse_pid"])[-2] == (
        "nbd+unix:///%s?socket=%s" % (status["instance"],
                                      os.path.join(env.run, "zswap.nbd"))
    ).encode()
    assert int(st["Threads"]) <= 16
    # nbdfuse, which cannot be locked, runs with memory.swappiness 0.
    if os.path.exists(os.path.join(attach.CGROUP_V1_MEMORY,
                                   "memory.swappiness")):
        with open("/proc/%d/cgroup" % on_disk["fuse_pid"]) as f:
            group = [l.split(":", 2)[2].strip() for l in f
                     if l.split(":")[1] == "memory"][0]
        assert group == "/" + os.path.basename(on_disk["memory_cgroup"])
        with open(on_disk["memory_cgroup"] + "/memory.swappiness") as f:
            assert f.read().strip() == "0"
    with open("/proc/%d/oom_score_adj" % pid) as f:
        # Lowering needs CAP_SYS_RESOURCE, which some containers withhold.
        assert int(f.read()) == (attach.SERVER_OOM_SCORE_ADJ
                                 if _can_lower_oom_score() else 0)
    with open("/proc/%d/environ" % pid, "rb") as f:
        assert b"MALLOC_ARENA_MAX=2" in f.read().split(b"\0")
    status = status_of("zswap")
    assert status["disksize"] == 64 * MiB and status["algorithm"] == "zstd"
    assert status["num_writes"] > 0                   # mkswap's header
    # up again: nothing changes.
    (again,) = attach.up(["zswap"], root=env.root)
    assert again["block_device"] == dev and again["server_pid"] == pid
    # down: nothing left.
    assert attach.down(["zswap"]) == ["zswap"]
    assert swap_entry(dev) is None
    assert env.left() == []


def test_ext4_round_trip(env):
    mnt = os.path.join(env.mnt, "scratch")
    env.configure("[zdisk]\nzram-size = 96\nfs-type = ext4\n"
                  "mount-point = %s\noptions = discard,noatime\n"
                  "fs-create-options = -L 'zram tmp' -m 0\n" % mnt)
    (state,) = attach.up(["zdisk"], root=env.root)
    dev = state["block_device"]
    assert env.state("zdisk")["use"] == "fs"
    assert env.state("zdisk")["mount_point"] == mnt
    found = [line.split() for line in open("/proc/self/mounts")
             if line.split()[1] == mnt]
    assert len(found) == 1
    src, _, fstype, opts = found[0][:4]
    assert (src, fstype) == (dev, "ext4")
    assert "discard" in opts.split(",") and "noatime" in opts.split(",")
    assert b"--swap" not in cmdline(state["server_pid"])
    # fs-create-options reached mkfs: the label, and no reserved blocks.
    label = subprocess.run(["blkid", "-s", "LABEL", "-o", "value", dev],
                           capture_output=True, text=True).stdout.strip()
    assert label == "zram tmp"
    sb = subprocess.run(["tune2fs", "-l", dev], capture_output=True,
                        text=True).stdout
    assert "Reserved block count:     0\n" in sb, sb
    # The file system works and its data reaches the plugin.
    data = os.urandom(3 * MiB)
    with open(os.path.join(mnt, "f"), "wb") as f:
        f.write(data)
    os.sync()
    assert open(os.path.join(mnt, "f"), "rb").read() == data
    assert status_of("zdisk")["orig_data_size"] >= 3 * MiB
    attach.down()
    assert not os.path.ismount(mnt)
    assert env.left(mnt) == []


def test_cli_up_down_several_devices(env):
    mnt = os.path.join(env.mnt, "d")
    env.configure("[za]\nzram-size = 32\n"
                  "[zb]\nzram-size = 32\nfs-type=ext2\nmount-point=%s\n" % mnt)
    run = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-m", "zramd.attach", "up",
                        "--root", env.root], env=run, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("za: /dev/loop") and lines[0].endswith(" [SWAP]")
    assert lines[1].startswith("zb: /dev/loop") and lines[1].endswith(" " + mnt)
    assert list(attach.states()) == ["za", "zb"]      # the order of up
    r = subprocess.run([sys.executable, "-m", "zramd.attach", "down"],
                       env=run, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert env.left(mnt) == []


def test_uses_a_running_server_and_leaves_it(env):
    env.configure("[zrun]\nzram-size = 32\n")
    with NbdkitServer(env.run, size="32M", name="zrun",
                      extra_args=("--swap",)) as srv:
        srv.wait_control()
        # The NBD probe speaks NBD: the greeting, then NBD_OPT_ABORT.
        # (NbdkitServer's own readiness probe, connection 1, leaves an
        # error line; ours must add none.)
        assert attach._nbd_answers(srv.socket) == srv.process.pid
        assert attach._nbd_answers(srv.control) is None
        (state,) = attach.up(root=env.root, start_server=False)
        assert state["server_started"] is False
        assert state["server_pid"] == srv.process.pid      # SO_PEERCRED
        assert swap_entry(state["block_device"]) is not None
        attach.down()
        # Our layers are gone, the server still serves.
        assert srv.process.poll() is None
        assert status_of("zrun")["disksize"] == 32 * MiB
        assert _loops_backed_under(env.run) == []
        assert _mounts_under(env.run) == []
    errors = [line for line in srv.log().splitlines()
              if "error" in line and "python[1]:" not in line]
    assert errors == []
    _remove_server_sockets(env, "zrun", "nbdkit.log")
    assert env.left() == []


def test_running_server_of_another_size_is_refused(env):
    env.configure("[zsize]\nzram-size = 64\n")
    with NbdkitServer(env.run, size="32M", name="zsize") as srv:
        srv.wait_control()
        with pytest.raises(ZramdError) as exc:
            attach.up(root=env.root)
        assert exc.value.message == (
            "zsize: the running server's disk is %d bytes, zramd.conf says %d "
            "(stop that server, or change zram-size)" % (32 * MiB, 64 * MiB))
        assert srv.process.poll() is None
        assert _loops_backed_under(env.run) == [] == _mounts_under(env.run)
        assert not os.path.exists(os.path.join(env.run, "zsize.state.json"))


def test_unlocked_server_refused_for_swap(env):
    # A server that may itself be swapped out must not back swap...
    env.configure("[zlk]\nzram-size = 32\n")
    with NbdkitServer(env.run, size="32M", name="zlk") as srv:
        srv.wait_control()
        with pytest.raises(ZramdError) as exc:
            attach.up(root=env.root)
        assert exc.value.message == (
            "zlk: the running server (pid %d) is not locked in memory and "
            "cannot back swap (start it with swap=true, as zramd@zlk.service "
            "does)" % srv.process.pid)
        assert _loops_backed_under(env.run) == []
        # ... but may back a file system.
        mnt = os.path.join(env.mnt, "lk")
        env.configure("[zlk]\nzram-size = 32\nmount-point = %s\n" % mnt)
        (state,) = attach.up(root=env.root)
        assert state["use"] == "fs" and os.path.ismount(mnt)
        attach.down()
        assert not os.path.ismount(mnt)


def test_no_server_refused_without_one(env):
    env.configure("[zns]\nzram-size = 32\n")
    with pytest.raises(ZramdError) as exc:
        attach.up(root=env.root, start_server=False)
    assert "zns: no server answers" in exc.value.message
    # The command says it zramctl's way: "zramd: NAME: reason", status 1.
    r = subprocess.run([sys.executable, "-m", "zramd.attach", "up",
                        "--no-server", "--root", env.root, "zns"],
                       env=dict(os.environ, PYTHONPATH=REPO),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("zramd: zns: no server answers on ")
    assert env.left() == []


def test_failed_up_is_unwound(env):
    mnt = os.path.join(env.mnt, "bad")
    env.configure("[zbad]\nzram-size = 32\nfs-type = nosuchfs\n"
                  "mount-point = %s\n" % mnt)
    with pytest.raises(ZramdError) as exc:
        attach.up(root=env.root)
    assert exc.value.message.startswith("zbad: mkfs -t nosuchfs")
    # The server, nbdfuse and the loop device it got that far with: gone.
    assert env.left(mnt) == []


def test_bad_config_changes_nothing(env):
    env.configure("[zok]\nzram-size = 32\n[zbroken]\nzram-size = ram /\n")
    with pytest.raises(ConfigError) as exc:
        attach.up(root=env.root)
    assert "zramd.conf:4: [zbroken] zram-size" in exc.value.message
    assert not os.path.exists(env.run) or env.left() == []
    with pytest.raises(ConfigError) as exc:
        attach.up(["nosuch"], root=env.root)


def test_unknown_name_and_idle_down(env):
    env.configure("[zone]\nzram-size = 32\n")
    with pytest.raises(ConfigError) as exc:
        attach.up(["ztwo"], root=env.root)
    assert exc.value.message == "ztwo: not configured (configured: zone)"
    assert attach.down(["zone"]) == []
    assert attach.down() == []


def test_cli_down_of_a_device_not_up_says_so(env, capsys):
    assert attach.main(["down", "--root", env.root, "nosuch"]) == 0
    assert capsys.readouterr().err == (
        "zramd: nosuch: not up, nothing to take down\n")


def test_down_refuses_busy_mount_and_keeps_state(env):
    mnt = os.path.join(env.mnt, "busy")
    env.configure("[zbusy]\nzram-size = 32\nfs-type = ext4\n"
                  "mount-point = %s\n" % mnt)
    attach.up(root=env.root)
    holder = open(os.path.join(mnt, "held"), "w")
    try:
        with pytest.raises(ZramdError) as exc:
            attach.down(["zbusy"])
        assert exc.value.message.startswith("zbusy: umount")
        # Nothing under the busy file system was torn down.
        assert os.path.ismount(mnt)
        assert env.state("zbusy")["block_device"].startswith("/dev/loop")
        assert attach.states()["zbusy"]["use"] == "fs"
    finally:
        holder.close()
    assert attach.down(["zbusy"]) == ["zbusy"]
    assert env.left(mnt) == []


def test_stale_state_is_cleared_by_up(env):
    # A state file left by a crashed zramd (its pids long gone, reused by
    # something else: our own pid here) is undone without harm, then the
    # device comes up.
    env.configure("[zstale]\nzram-size = 32\n")
    os.makedirs(env.run)
    stale = {"version": 1, "name": "zstale", "server_pid": os.getpid(),
             "server_started": True, "attach": "nbdfuse",
             "nbd_socket": os.path.join(env.run, "zstale.nbd"),
             "control_socket": os.path.join(env.run, "zstale.sock"),
             "fuse_dir": os.path.join(env.run, "zstale.fuse"),
             "fuse_pid": os.getpid(), "block_device": "/dev/loop999",
             "use": "swap", "mount_point": None, "active": True}
    with open(os.path.join(env.run, "zstale.state.json"), "w") as f:
        json.dump(stale, f)
    (state,) = attach.up(root=env.root)
    assert state["server_pid"] != os.getpid()
    assert swap_entry(state["block_device"]) is not None
    attach.down()
    assert env.left() == []


def test_add_subcommands_parses():
    import argparse
    parser = argparse.ArgumentParser(prog="zramd")
    sub = parser.add_subparsers(dest="command")
    attach.add_subcommands(sub)
    a = parser.parse_args(["up", "zramd0", "scratch", "--no-server"])
    assert (a.command, a.names, a.start_server) == ("up", ["zramd0", "scratch"],
                                                    False)
    assert a.func is attach._cmd_up
    a = parser.parse_args(["down"])
    assert (a.command, a.names, a.func) == ("down", [], attach._cmd_down)


UNIT_CMD = [sys.executable, "-m", "zramd.attach"]


def _serve_as_the_unit(env, name):
    """zramd@NAME's ExecStart and ExecStartPost: ``serve`` (exec nbdkit,
    same pid), then ``wait`` until it answers.  Returns the server."""
    run = dict(os.environ, PYTHONPATH=REPO)
    server = subprocess.Popen(UNIT_CMD + ["serve", "--root", env.root, name],
                              env=run, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    r = subprocess.run(UNIT_CMD + ["wait", "--timeout", "30", name],
                       env=run, capture_output=True, text=True, timeout=60)
    if r.returncode != 0 or server.poll() is not None:
        server.kill()
        server.wait(20)
        pytest.fail("serve %s: %s (server exit %s)"
                    % (name, r.stderr, server.returncode))
    return server


def _remove_server_sockets(env, name, *more):
    """Remove what a server zramd up did not start (or that died) leaves
    in the runtime directory: its sockets, and the files named in
    ``more``."""
    for leftover in (name + ".nbd", name + ".sock") + more:
        p = os.path.join(env.run, leftover)
        if os.path.exists(p):
            os.unlink(p)


def test_the_units_command_sequence(env):
    # What systemd does with zramd@NAME and zramd-attach@NAME, minus
    # systemd: serve (exec nbdkit, same pid), wait, up --no-server, down,
    # then stopping the server (SIGTERM to the main pid).
    env.configure("[zunit]\nzram-size = 32\n")
    os.makedirs(env.run)
    run = dict(os.environ, PYTHONPATH=REPO)
    cmd = UNIT_CMD
    server = _serve_as_the_unit(env, "zunit")
    try:
        argv = cmdline(server.pid)            # exec'd: same pid, nbdkit now
        assert argv[0] == b"nbdkit" and b"swap=true" in argv
        assert b"--foreground" in argv
        r = subprocess.run(cmd + ["up", "--no-server", "--root", env.root,
                                  "zunit"], env=run, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        state = env.state("zunit")
        assert state["server_pid"] == server.pid
        assert state["server_started"] is False
        assert swap_entry(state["block_device"]) is not None
        r = subprocess.run(cmd + ["down", "zunit"], env=run,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert server.poll() is None          # the unit's server still runs
        assert _loops_backed_under(env.run) == [] == _mounts_under(env.run)
    finally:
        server.terminate()
        server.wait(20)
    _remove_server_sockets(env, "zunit")
    assert env.left() == []


def test_serve_restarts_over_the_sockets_of_the_last_server(env):
    # systemctl restart, or Restart=on-failure after a crash: nbdkit left
    # its NBD socket in the preserved runtime directory, and nbdkit will
    # not listen on an existing path.
    env.configure("[zagain]\nzram-size = 16\nmount-point = /mnt/zagain\n")
    os.makedirs(env.run)
    for attempt in range(2):
        server = _serve_as_the_unit(env, "zagain")
        server.kill()                 # no clean exit: as after a crash
        server.wait(20)
        assert os.path.exists(os.path.join(env.run, "zagain.nbd"))
    _remove_server_sockets(env, "zagain")
    assert env.left() == []


WORKLOAD = """\
import hashlib, os, random, sys
with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
chunks = [bytearray(random.Random(i).randbytes(2048) * 512)
          for i in range(int(sys.argv[2]))]
print("filled", flush=True)
sys.stdin.readline()
ok = all(c == random.Random(i).randbytes(2048) * 512
         for i, c in enumerate(chunks))
print("ok" if ok else "corrupt", flush=True)
"""


@pytest.mark.skipif(not os.access("/sys/fs/cgroup/memory", os.W_OK),
                    reason="needs the cgroup v1 memory controller, writable")
def test_swap_from_up_takes_pages_and_down_gives_them_back(env):
    env.configure("[zpress]\nzram-size = 128\nswap-priority = 32767\n")
    (state,) = attach.up(root=env.root)
    dev = state["block_device"]
    cgroup = "/sys/fs/cgroup/memory/zramd-attach-test-%d" % os.getpid()
    os.mkdir(cgroup)
    proc = None
    try:
        with open(os.path.join(cgroup, "memory.limit_in_bytes"), "w") as f:
            f.write(str(32 * MiB))
        proc = subprocess.Popen([sys.executable, "-c", WORKLOAD, cgroup, "96"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "filled"
        with open("/proc/swaps") as f:
            used = [int(l.split()[3]) * 1024 for l in f
                    if l.split()[0] == dev]
        assert used and used[0] >= 48 * MiB, used
        # The pool holds it compressed: each 4 KiB page is one random 2 KiB
        # twice over, so about half.
        st = status_of("zpress")
        assert st["orig_data_size"] >= 48 * MiB
        assert st["mem_used_total"] < st["orig_data_size"] * 0.6
        out, _ = proc.communicate("check\n", timeout=120)
        assert out.strip() == "ok"
    finally:
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait()
        for _ in range(50):
            try:
                os.rmdir(cgroup)
                break
            except OSError:
                time.sleep(0.1)
    attach.down()
    assert env.left() == []


def test_down_goes_in_reverse_order_of_up(env, monkeypatch):
    os.makedirs(env.run)
    for name, since in (("zb", 1.0), ("za", 2.0), ("zc", 3.0)):
        with open(os.path.join(env.run, name + ".state.json"), "w") as f:
            json.dump({"name": name, "since": since}, f)
    assert list(attach.states()) == ["zb", "za", "zc"]
    taken = []
    monkeypatch.setattr(attach, "take_down", lambda st: taken.append(st["name"]))
    assert attach.down() == ["zc", "za", "zb"] == taken
    taken.clear()
    assert attach.down(["zb", "zc", "zz"]) == ["zc", "zb"] == taken


@pytest.mark.parametrize("conf, commands", [
    ("[zs]\nzram-size = 16\n",
     [["mkswap", "/dev/loop9"],
      ["swapon", "--priority", "100", "--options=discard", "/dev/loop9"]]),
    ("[zs]\nzram-size = 16\noptions =\n",
     [["mkswap", "/dev/loop9"], ["swapon", "--priority", "100", "/dev/loop9"]]),
    ("[zs]\nzram-size = 16\nmount-point = /mnt/zs\noptions =\n",
     [["mkfs", "-t", "ext2", "-q", "/dev/loop9"],
      ["mount", "-t", "ext2", "/dev/loop9", "/mnt/zs"]]),
])
def test_use_commands_and_empty_options(env, monkeypatch, conf, commands):
    # "options =" is zram-generator's way of saying no options at all: no
    # -o for mount, no --options for swapon.
    env.configure(conf)
    (dev,) = config.load(env.root).values()
    ran = []
    monkeypatch.setattr(attach, "_run", lambda name, argv: ran.append(argv))
    monkeypatch.setattr(attach, "_write_state", lambda state: None)
    monkeypatch.setattr(attach.os, "makedirs", lambda *a, **k: None)
    attach._use(dev, {"block_device": "/dev/loop9"})
    assert ran == commands


def test_nbd_client_commands(env, monkeypatch):
    # The kernel-nbd path cannot run here (no nbd module): check the
    # commands it would run, up and down.
    from zramd import config
    env.configure("[zk]\nzram-size = 32\n")
    dev = config.load(env.root)["zk"]
    os.makedirs(env.run)
    calls = []
    monkeypatch.setattr(attach, "_run",
                        lambda name, argv, check=True, timeout=None:
                        calls.append(argv))
    monkeypatch.setattr(attach, "_free_nbd", lambda: "/dev/nbd3")
    state = {"name": "zk", "version": 1, "server_instance": "f00d"}
    attach._attach_nbd_client(dev, state)
    assert calls == [["nbd-client", "-unix", os.path.join(env.run, "zk.nbd"),
                      "/dev/nbd3", "-block-size", "4096", "-N", "f00d",
                      "-swap"]]
    assert state["block_device"] == "/dev/nbd3"
    assert env.state("zk")["attach"] == "nbd-client"
    calls.clear()
    monkeypatch.setattr(attach, "_swaps", lambda: ["/dev/nbd3"])
    state.update(use="swap")
    attach.take_down(state)
    assert calls == [["swapoff", "/dev/nbd3"], ["nbd-client", "-d", "/dev/nbd3"]]
    assert not os.path.exists(os.path.join(env.run, "zk.state.json"))


# ---------------------------------------------------------------------------
# What a runtime directory may hold, and what a state file may make root do

@pytest.mark.parametrize("spoil, message", [
    (lambda run: os.chmod(run, 0o777), "writable by group or others"),
    (lambda run: os.chown(run, 1000, 1000), "owned by uid 1000"),
])
def test_up_refuses_a_runtime_dir_others_could_write(env, spoil, message):
    env.configure("[zrd]\nzram-size = 32\n")
    os.makedirs(env.run)
    spoil(env.run)
    with pytest.raises(ZramdError, match=message):
        attach.up(root=env.root)
    assert os.listdir(env.run) == []


def test_up_refuses_a_runtime_dir_that_is_a_link(env, tmp_path):
    env.configure("[zrd]\nzram-size = 32\n")
    real = tmp_path / "elsewhere"
    real.mkdir()
    os.symlink(real, env.run)
    with pytest.raises(ZramdError, match="is a symbolic link"):
        attach.up(root=env.root)
    with pytest.raises(ZramdError, match="is a symbolic link"):
        attach.down()
    assert os.listdir(real) == []


def test_state_is_never_written_through_a_planted_link(env, tmp_path):
    os.makedirs(env.run)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, os.path.join(env.run, "zx.state.json.tmp"))
    attach._write_state({"name": "zx", "since": 1.0})
    assert victim.read_text() == "precious\n"
    assert env.state("zx") == {"name": "zx", "since": 1.0}
    st = os.stat(os.path.join(env.run, "zx.state.json"))
    assert stat.S_IMODE(st.st_mode) == 0o600
    os.unlink(os.path.join(env.run, "zx.state.json"))
    os.symlink(victim, os.path.join(env.run, "zx.state.json"))
    with pytest.raises(ZramdError, match="unreadable state"):
        attach.read_state("zx")


def test_a_planted_state_cannot_make_down_touch_other_things(env, tmp_path,
                                                             capsys):
    os.makedirs(env.run)
    victims = [tmp_path / "log", tmp_path / "fuse.log"]
    for v in victims:
        v.write_text("keep\n")
    (tmp_path / "dir").mkdir()
    planted = {"name": "zpl", "since": 1.0, "use": None, "active": False,
               "server_started": True, "server_pid": None,
               "server_log": str(victims[0]), "fuse_log": str(victims[1]),
               "attach": "nbdfuse", "fuse_dir": str(tmp_path / "dir"),
               "memory_cgroup": attach.CGROUP_V1_MEMORY,
               "block_device": "/dev/sda",
               "nbd_socket": str(tmp_path / "x.nbd"),
               "control_socket": str(tmp_path / "x.sock")}
    with open(os.path.join(env.run, "zpl.state.json"), "w") as f:
        json.dump(planted, f)
    cgroup_root = os.path.isdir(attach.CGROUP_V1_MEMORY)   # v1 only
    assert attach.down() == ["zpl"]
    for v in victims:
        assert v.read_text() == "keep\n"
    assert (tmp_path / "dir").is_dir()
    assert os.path.isdir(attach.CGROUP_V1_MEMORY) == cgroup_root
    err = capsys.readouterr().err
    for key in ("server_log", "fuse_log", "fuse_dir", "memory_cgroup",
                "block_device", "nbd_socket", "control_socket"):
        assert "zramd: zpl: state's %s " % key in err, err
    assert "left alone" in err
    assert not os.path.exists(os.path.join(env.run, "zpl.state.json"))


def test_a_bad_state_file_does_not_stop_the_others(env, capsys):
    os.makedirs(env.run)
    for name, content in (("zbad", "[]"), ("zok", '{"name": "zok"}'),
                          ("zwho", '{"name": "zother"}')):
        with open(os.path.join(env.run, name + ".state.json"), "w") as f:
            f.write(content)
    assert attach.down() == ["zok"]
    err = capsys.readouterr().err
    assert "zramd: zbad: " in err and "not the state of zbad" in err
    assert "zramd: zwho: " in err and "skipped" in err


def test_device_files_of_one_name_are_not_another_names():
    # "a"'s nbdfuse log was "a.fuse.log", which was also the server log of
    # a device named "a.fuse": taking one down deleted the other's log.
    names = ("a", "a.fuse", "a.server", "a.fuse.fuse")
    files = [f(n) for n in names for f in (
        attach.paths.server_log, attach.paths.fuse_log,
        attach.paths.fuse_dir, attach.paths.state_file,
        attach.paths.nbd_socket, attach.paths.control_socket)]
    assert len(files) == len(set(files))
