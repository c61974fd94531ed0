"""Swap as a user has it: ``zramd up`` from zramd.conf, run as its own
command that exits at once (as from a shell or a unit), then a program
larger than its memory whose records are hashed as built and again after
they were swapped out and back in (tests/swap_workload.py); the server and
nbdfuse must still run afterwards and ``zramd down`` leave nothing.  Then
what happens when the server dies anyway: a restarted server is a new
instance that refuses the old export name, the device reads as errors,
never as zeros, ``zramd`` calls the device lost and ``zramd down`` says
what could not be undone.

Runs on the nbdfuse path (this machine's kernel has no nbd) as root."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import NbdClient, require_module
from test_attach import (REPO, _missing, _remove_server_sockets,  # noqa: F401
                         _serve_as_the_unit, env, status_of)
from zramd import attach

pytestmark = [pytest.mark.skipif(_missing() is not None,
                                 reason=_missing() or ""),
              pytest.mark.usefixtures("swap_lock")]

MiB = 1 << 20
ZRAMD = [sys.executable, "-c", "import sys, zramd.cli; sys.exit(zramd.cli.main())"]
WORKLOAD = [sys.executable, os.path.join(REPO, "tests", "swap_workload.py")]
CGROUP_V1_MEMORY = "/sys/fs/cgroup/memory"


def zramd(env, *args, timeout=180):
    """Run the ``zramd`` command as a user would: its own process."""
    return subprocess.run(ZRAMD + list(args), capture_output=True, text=True,
                          timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=REPO,
                                   ZRAMD_RUNTIME_DIR=env.run))


def up(env, name):
    r = zramd(env, "up", "--root", env.root, name)
    assert r.returncode == 0, r.stderr
    return env.state(name)


def running(pid, program):
    return attach._alive(pid) and attach._runs(
        pid, program, attach.paths.runtime_dir())


def wait_for(predicate, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("still waiting for " + what)
        time.sleep(0.1)


class Workload:
    """swap_workload.py --pageout --pause: builds the records, pages them
    out, says how much went to swap, then waits for a line on stdin before
    hashing them again."""

    def __init__(self, records, cgroup_procs=None):
        argv = WORKLOAD + ["--pageout", "--pause", str(records)]
        if cgroup_procs:
            argv.append(cgroup_procs)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        self.swapped = json.loads(line)["swapped_kib"] * 1024 if line else 0

    def finish(self, timeout=300):
        """(exit status, the final report or None)."""
        out, _ = self.proc.communicate("go\n", timeout=timeout)
        lines = out.strip().splitlines()
        return self.proc.returncode, json.loads(lines[-1]) if lines else None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.parametrize("pauses", [(0.0, 2.0, 0.0)])
def test_swap_up_from_the_command_holds_pages_round_after_round(env, pauses):
    # nbdkit 1.32 arms a parent-death SIGTERM nobody asked for: with the
    # server started by a zramd up that exits at once, it used to quit at
    # the first swap write.  Each round: up, (a pause or none), 60,000
    # records paged out to the device and checked when read back.
    env.configure("[zsw]\nzram-size = 256\ncompression-algorithm = lz4\n"
                  "swap-priority = 32767\n")
    for pause in pauses:
        state = up(env, "zsw")
        time.sleep(pause)
        work = Workload(60000)
        try:
            assert work.swapped >= 40 * MiB, work.swapped
            # The pages reached the server: it holds at least what the
            # kernel says went out (writes may still be in flight).
            wait_for(lambda: status_of("zsw")["orig_data_size"]
                     >= work.swapped, "the swapped pages at the server")
            code, report = work.finish()
        finally:
            work.kill()
        assert code == 0 and report["same"], report
        assert running(state["server_pid"], "nbdkit")
        assert running(state["fuse_pid"], "nbdfuse")
        r = zramd(env, "down", "zsw")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert env.left() == []


@pytest.mark.skipif(not os.access(CGROUP_V1_MEMORY, os.W_OK),
                    reason="needs the cgroup v1 memory controller, writable")
def test_swap_under_a_memory_cgroup_keeps_the_server(env):
    # The user's case: right after up, a program several times larger than
    # its memory cgroup.  Under cgroup v1, the memcg's OOM killer may still
    # end the program while its swap writes are in flight through FUSE
    # (docs/operations.md); the server and nbdfuse must live on, and a
    # program that finishes must read back what it wrote.
    env.configure("[zcg]\nzram-size = 256\nswap-priority = 32767\n")
    cgroup = os.path.join(CGROUP_V1_MEMORY, "swap-test-%d" % os.getpid())
    os.mkdir(cgroup)
    try:
        with open(os.path.join(cgroup, "memory.limit_in_bytes"), "w") as f:
            f.write(str(40 * MiB))
        for round_ in range(2):
            state = up(env, "zcg")
            proc = subprocess.run(
                WORKLOAD + ["80000", os.path.join(cgroup, "cgroup.procs")],
                capture_output=True, text=True, timeout=600)
            if proc.returncode == 0:
                assert json.loads(proc.stdout)["same"], proc.stdout
            else:
                # Only the memcg's OOM killer may have ended it; never a
                # page read back wrong (exit 3) or unreadable (SIGBUS).
                assert proc.returncode == -signal.SIGKILL, proc
                with open(os.path.join(cgroup, "memory.oom_control")) as f:
                    assert "oom_kill 0" not in f.read()
            assert running(state["server_pid"], "nbdkit")
            assert running(state["fuse_pid"], "nbdfuse")
            assert status_of("zcg")["disksize"] == 256 * MiB
            r = zramd(env, "down", "zcg")
            assert r.returncode == 0 and r.stderr == "", r.stderr
            assert env.left() == []
    finally:
        for _ in range(100):
            try:
                os.rmdir(cgroup)
                break
            except OSError:
                time.sleep(0.1)


def test_restarted_server_never_serves_the_old_swap(env):
    # kill -9 the server while pages are swapped out to it, restart it the
    # way zramd@.service's Restart=on-failure does: the new instance is
    # empty and must never be taken for the old disk.
    env.configure("[zre]\nzram-size = 128\nswap-priority = 32767\n")
    state = up(env, "zre")
    old_instance = state["server_instance"]
    work = Workload(40000)
    server = None
    try:
        assert work.swapped >= 24 * MiB
        wait_for(lambda: status_of("zre")["orig_data_size"] >= work.swapped,
                 "the swapped pages at the server")
        os.kill(state["server_pid"], signal.SIGKILL)
        wait_for(lambda: not attach._alive(state["server_pid"]),
                 "the killed server to go")
        for path in (state["nbd_socket"], state["control_socket"]):
            os.unlink(path)                  # as serve's stale-socket check
        server = _serve_as_the_unit(env, "zre")
        assert status_of("zre")["instance"] != old_instance
        # The old export name is refused by the new server (libnbd's words
        # for it differ between releases), the default export is not ...
        nbd = require_module("nbd", "python3-libnbd")
        h = nbd.NBD()
        with pytest.raises(nbd.Error):
            h.connect_uri(attach.nbd_uri(state["nbd_socket"], old_instance))
        del h
        with NbdClient(attach.nbd_uri(state["nbd_socket"])) as h:
            assert h.get_size() == 128 * MiB
        # ... and the device reads as errors, never as zeros.
        r = subprocess.run(["dd", "if=" + state["block_device"], "of=/dev/null",
                            "bs=4096", "skip=1", "count=64", "iflag=direct"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "Input/output error" in r.stderr, r
        # The program touching its swapped-out records dies (SIGBUS) or
        # finds them whole in the swap cache; it never reads other data.
        code, report = work.finish()
        assert code == -signal.SIGBUS or (code == 0 and report["same"]), \
            (code, report)
        # zramd names the device lost and why.
        r = zramd(env)
        assert r.returncode == 1
        assert ("zramd: zre: lost: its server (pid %d) has exited: whatever "
                "was stored on %s is gone; zramd down zre clears it"
                % (state["server_pid"], state["block_device"])) in r.stderr
        # down: finishes, says what could not be read back, leaves the new
        # server (not the one it started) running.
        r = zramd(env, "down", "zre", timeout=300)
        assert r.returncode == 0, r.stderr
        assert "zramd: zre: lost: " not in r.stdout
        assert ("%s: " % state["block_device"]) in r.stderr
        assert "cannot be read back" in r.stderr
        assert server.poll() is None
        assert not os.path.exists(os.path.join(env.run, "zre.state.json"))
    finally:
        work.kill()
        if server is not None:
            server.terminate()
            server.wait(30)
    _remove_server_sockets(env, "zre", "zre.server.log")
    assert env.left() == []


def test_up_after_the_server_died_starts_afresh_and_says_so(env):
    env.configure("[zup]\nzram-size = 64\nswap-priority = 32767\n")
    state = up(env, "zup")
    os.kill(state["server_pid"], signal.SIGKILL)
    wait_for(lambda: not attach._alive(state["server_pid"]), "the server to go")
    r = zramd(env, "up", "--root", env.root, "zup")
    assert r.returncode == 0, r.stderr
    assert "zramd: zup: lost: its server (pid %d) has exited" \
        % state["server_pid"] in r.stderr
    again = env.state("zup")
    assert again["server_pid"] != state["server_pid"]
    assert again["server_instance"] != state["server_instance"]
    assert running(again["server_pid"], "nbdkit")
    r = zramd(env, "down", "zup")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert env.left() == []
