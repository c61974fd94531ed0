"""plugin.py under a real nbdkit: start-up refusals, what it advertises,
the python3-on-PATH trap, life across nbdkit's fork, and errno mapping."""

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

import nbdkit_server
from conftest import REPO, require, require_module
from nbdkit_server import NbdkitServer
from zramd import control, params

PLUGIN = os.path.join(REPO, "plugin.py")

pytestmark = pytest.mark.skipif(
    not os.path.exists("/usr/sbin/nbdkit") and not os.path.exists(
        "/usr/bin/nbdkit"), reason="nbdkit not installed (scripts/test "
    "installs it)")


def nbdkit_refuses(tmp_path, *args, env=None):
    """Run nbdkit with plugin ``args``; return its stderr, asserting that it
    exited non-zero without serving."""
    sock = str(tmp_path / "refused.nbd")
    run_env = dict(os.environ, ZRAMD_RUNTIME_DIR=str(tmp_path))
    run_env.update(env or {})
    run = subprocess.run(["nbdkit", "-f", "-U", sock, "python", PLUGIN,
                          *args], capture_output=True, text=True,
                         timeout=60, env=run_env, stdin=subprocess.DEVNULL)
    assert run.returncode != 0, run.stderr
    assert not os.path.exists(sock)
    return run.stderr


# -- start-up refusals -------------------------------------------------------

@pytest.mark.parametrize("args, start", [
    (["size=1G", "sise=2G"], "sise: unknown parameter; accepted: size, "
     "algorithm, level, dict, mem_limit, chain_size, name, control"),
    ([], "size: required;"),
    (["size=1Q"], "size: '1Q' is not a size; use a number of bytes"),
    (["size=1000"], "size: '1000' is 1000 bytes; accepted: a positive "
     "multiple of 4096"),
    (["size=1G", "mem_limit=1.5G"], "mem_limit: '1.5G' is not a size;"),
    (["size=1G", "algorithm=842"], "algorithm: unknown '842'; accepted: lz4"),
    (["size=1G", "algorithm=lz4hc", "level=99"], "level: "),
    (["size=1G", "level=fast"], "level: 'fast' is not a number"),
    (["size=1G", "algorithm=zstd", "dict=/nonexistent/d.zstd"],
     "dict: cannot read /nonexistent/d.zstd: No such file or directory; "
     "accepted: a readable zstd dictionary file"),
    (["size=1G", "dict=/etc/passwd"], "dict: /etc/passwd: lz4 takes no "
     "dictionary"),
    (["size=1G", "chain_size=32"], "chain_size: 32 is out of range; "
     "accepted: 4..16"),
    (["size=1G", "name=../x"], "name: '../x' is not a device name"),
    (["size=1G", "size=2G"], "size: given twice"),
])
def test_bad_configuration_is_one_line_naming_the_key(tmp_path, args, start):
    stderr = nbdkit_refuses(tmp_path, *args)
    assert stderr.count("\n") == 1 and stderr.endswith("\n"), stderr
    assert stderr.startswith("nbdkit: error: zramd: " + start), stderr
    assert "Traceback" not in stderr


def test_control_socket_in_use_is_refused(tmp_path, nbdkit_server):
    server = nbdkit_server()
    server.wait_control()
    stderr = nbdkit_refuses(tmp_path, "size=1G", "control=" + server.control)
    assert stderr == ("nbdkit: error: zramd: control: %s is in use by another "
                      "running zramd; accepted: a free path (or a different "
                      "name=)\n" % server.control)


def test_dump_plugin_lists_every_parameter():
    run = subprocess.run(["nbdkit", "python", PLUGIN, "--dump-plugin"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    keys = [line.split("=", 1)[0][len("zramd_param_"):]
            for line in run.stdout.splitlines()
            if line.startswith("zramd_param_")]
    assert keys == list(params.KEYS)
    assert keys[:8] == ["size", "algorithm", "level", "dict", "mem_limit",
                        "chain_size", "name", "control"]
    assert "thread_model=parallel" in run.stdout.splitlines()


# -- what a client is told ---------------------------------------------------

def test_nbdinfo_reports_size_and_capabilities(nbdkit_server):
    require("nbdinfo")
    server = nbdkit_server(size="48M")
    run = subprocess.run(["nbdinfo", "--json", server.uri],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    export, = json.loads(run.stdout)["exports"]
    assert export["export-size"] == 48 << 20
    assert export["is_read_only"] is False
    for flag in ("can_trim", "can_zero", "can_fast_zero", "can_flush",
                 "can_fua", "can_multi_conn"):
        assert export[flag] is True, flag
    assert "base:allocation" in export["contexts"]
    assert (export["block_size_minimum"], export["block_size_preferred"],
            export["block_size_maximum"]) == (1, 4096, 0xFFFFFFFF)


# -- python3 on PATH ---------------------------------------------------------

PROBE = textwrap.dedent("""\
    import json, sys
    API_VERSION = 2
    def dump_plugin():
        print("probe_sys_path=" + json.dumps(sys.path))
    def open(readonly): return 1
    def get_size(h): return 0
    def pread(h, buf, offset, flags): pass
    """)


def embedded_sys_path(tmp_path, env):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    run = subprocess.run(["nbdkit", "python", str(probe), "--dump-plugin"],
                         capture_output=True, text=True, timeout=60, env=env)
    line, = [l for l in run.stdout.splitlines()
             if l.startswith("probe_sys_path=")]
    return json.loads(line.split("=", 1)[1])


def venv_first_on_path(tmp_path, python):
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", "--without-pip", str(venv)],
                   check=True, timeout=120)
    return dict(os.environ, PATH="%s:%s" % (venv / "bin", os.environ["PATH"]))


def other_python3_on_path():
    """Why the first python3 on PATH cannot stand in for a foreign
    interpreter there, or None if it can: it must not be Debian's own, and
    it must be the same minor version as nbdkit's libpython (with another
    one nbdkit's interpreter cannot even start, whatever the plugin does;
    scripts/quickstart puts /usr/bin first for that)."""
    import shutil
    found = shutil.which("python3")
    if not found or os.path.realpath(found) == os.path.realpath(
            "/usr/bin/python3"):
        return "the first python3 on PATH is Debian's own"
    theirs = subprocess.run([found, "-c", "import sys; print('%d.%d' % "
                             "sys.version_info[:2])"], capture_output=True,
                            text=True, timeout=60).stdout.strip()
    ours = subprocess.run(["/usr/bin/python3", "-c", "import sys; print("
                           "'%d.%d' % sys.version_info[:2])"],
                          capture_output=True, text=True,
                          timeout=60).stdout.strip()
    if theirs != ours:
        return "the first python3 on PATH is %s, nbdkit embeds %s" % (
            theirs, ours)
    return None


_OTHER_PYTHON3 = other_python3_on_path()


@pytest.mark.parametrize("python", [
    "/usr/bin/python3",
    pytest.param("python3", marks=pytest.mark.skipif(
        _OTHER_PYTHON3 is not None, reason=_OTHER_PYTHON3 or "")),
])
def test_serves_with_a_venv_python3_first_on_path(tmp_path, python):
    """nbdkit's embedded Python takes its prefix from the first python3 on
    PATH; a venv there hides Debian's dist-packages (lz4, zstandard, libnbd
    and our editable install).  The plugin must still start and serve."""
    nbd = require_module("nbd", "python3-libnbd")
    env = venv_first_on_path(tmp_path, python)
    # The trap is real: the embedded interpreter does lose dist-packages.
    assert "/usr/lib/python3/dist-packages" not in embedded_sys_path(
        tmp_path, env)
    with NbdkitServer(tmp_path / "srv", size="16M", algorithm="zstd",
                      env=env) as server:
        server.wait_control()
        h = nbd.NBD()
        h.connect_uri(server.uri)
        data = b"venv " * 2000
        h.pwrite(data, 12345)
        assert h.pread(len(data), 12345) == data
        h.shutdown()
        assert server.process.poll() is None


# -- nbdkit --help ------------------------------------------------------------

HELP_HOOK = os.path.join(REPO, "scripts", "zramd_nbdkit_help.py")


def nbdkit_help(env=None, script=PLUGIN):
    """stdout of ``nbdkit python SCRIPT --help``; it must succeed quietly."""
    run = subprocess.run(["nbdkit", "python", script, "--help"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    return run.stdout


def zramd_keys_in_help(stdout):
    """nbdkit's part and ours (the lines after ``script: PLUGIN``)."""
    nbdkit_part, found, ours = stdout.partition("\nscript: %s\n" % PLUGIN)
    assert found, ("nbdkit --help does not list zramd's keys; the set-up "
                   "installs the hook (scripts/common.sh, install_help_hook; "
                   "scripts/test runs it):\n" + stdout)
    return nbdkit_part, ours


@pytest.mark.parametrize("first", ["", "/usr/bin"],
                         ids=["PATH-as-is", "usr-bin-first"])
def test_help_lists_every_parameter(first):
    """nbdkit 1.32 never loads the script for --help; the set-up's hook
    prints plugin.py's config_help after nbdkit's own help, whichever of
    the machine's python3 comes first on PATH."""
    env = dict(os.environ)
    if first:
        env["PATH"] = first + ":" + env["PATH"]
    nbdkit_part, ours = zramd_keys_in_help(nbdkit_help(env))
    assert "plugin: python" in nbdkit_part
    assert "script=<FILENAME>" in nbdkit_part
    assert ours == params.help_text() + "\n"
    keys = [line.split("=", 1)[0] for line in ours.splitlines()]
    assert keys == list(params.KEYS)
    assert keys[:8] == ["size", "algorithm", "level", "dict", "mem_limit",
                        "chain_size", "name", "control"]


def test_help_hook_follows_a_foreign_python3_on_path(tmp_path):
    """With a venv first on PATH nbdkit's interpreter reads the venv's site
    directory, so install_help_hook puts the hook there too; it stays out
    of python3 commands and of other scripts' --help."""
    env = venv_first_on_path(tmp_path, "/usr/bin/python3")
    site_dir = str(tmp_path / "venv" / "lib" / (
        "python%d.%d" % sys.version_info[:2]) / "site-packages")
    assert "\nscript: " not in nbdkit_help(env)            # not yet
    run = subprocess.run(["bash", "-c", '. "$0/scripts/common.sh" && '
                          "install_help_hook", REPO], capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert "nbdkit --help hook in %s\n" % site_dir in run.stderr
    _, ours = zramd_keys_in_help(nbdkit_help(env))
    assert ours == params.help_text() + "\n"
    # A python3 command does not even import it.
    check = subprocess.run(["python3", "-c", "import sys; print("
                            "'zramd_nbdkit_help' in sys.modules, sys.path)"],
                           capture_output=True, text=True, env=env,
                           timeout=60)
    assert check.stderr == "" and check.stdout.startswith("False "), check
    assert site_dir in check.stdout
    # Another Python plugin's --help is nbdkit's alone.
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    assert "\nscript: " not in nbdkit_help(env, script=str(probe))


def load_help_hook():
    import importlib.util
    spec = importlib.util.spec_from_file_location("zramd_nbdkit_help",
                                                  HELP_HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)     # not nbdkit: registers nothing
    return module


@pytest.mark.parametrize("argv, script", [
    (["nbdkit", "python", "./plugin.py", "--help"], "./plugin.py"),
    (["nbdkit", "--help", "python", "plugin.py", "size=1G"], "plugin.py"),
    (["nbdkit", "python", "script=/x/plugin.py", "--he"], "/x/plugin.py"),
    (["nbdkit", "-f", "/usr/lib/x86_64-linux-gnu/nbdkit/plugins/"
      "nbdkit-python-plugin.so", "--help", "p.py"], "p.py"),
    (["nbdkit", "python", "./plugin.py", "size=1G"], None),
    (["nbdkit", "python", "./plugin.py", "--dump-plugin"], None),
    (["nbdkit", "python", "./plugin.py", "--", "--help"], None),
    (["nbdkit", "memory", "1G", "--help"], None),
    (["nbdkit", "-U", "-", "python", "--help"], None),
])
def test_help_hook_reads_nbdkit_argv(argv, script):
    assert load_help_hook().help_script(argv) == script


# -- life across nbdkit's fork -----------------------------------------------

def test_threads_survive_when_nbdkit_forks(tmp_path):
    """Without -f nbdkit forks into the background after config_complete:
    the device and the control server must be built after the fork."""
    nbd = require_module("nbd", "python3-libnbd")
    from zramd import control
    sock, pidfile = str(tmp_path / "d.nbd"), str(tmp_path / "d.pid")
    ctl = str(tmp_path / "d.sock")
    log = open(tmp_path / "nbdkit.log", "wb")
    env = dict(os.environ, ZRAMD_RUNTIME_DIR=str(tmp_path))
    subprocess.run(["nbdkit", "--log=stderr", "-U", sock, "--pidfile",
                    pidfile, "python", PLUGIN, "size=16M", "name=forked",
                    "control=" + ctl], check=True, timeout=60, env=env,
                   stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    pid = int(open(pidfile).read())
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(ctl) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stat.S_IMODE(os.stat(ctl).st_mode) == 0o600
        h = nbd.NBD()
        h.connect_uri("nbd+unix:///?socket=" + sock)
        data = b"after the fork" * 300              # sectors 1 and 2
        h.pwrite(data, 4096)
        h.trim(4096, 8192)                          # sector 2 again
        status = control.call(ctl, "status")
        assert status["name"] == "forked" and status["pid"] == pid
        assert status["disksize"] == 16 << 20
        assert status["orig_data_size"] == 4096
        assert h.pread(4096 + 14, 4096) == data[:4096] + bytes(14)
        h.shutdown()
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while process_exists(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        log.close()
    assert not process_exists(pid)
    # cleanup() ran: the control server removed its socket.
    assert not os.path.exists(ctl)


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_stops_cleanly(nbdkit_server):
    server = nbdkit_server()
    server.wait_control()
    assert server.stop() == 0
    assert not os.path.exists(server.control)
    assert "Traceback" not in server.log()


# -- errno mapping end to end ------------------------------------------------

def test_corrupt_data_reaches_the_client_as_eio(tmp_path, monkeypatch):
    """A wrapper plugin overwrites the object stored for sector 0 with
    bytes that are no lz4 block (as a corrupted pool would hold); the
    client's read fails with EIO and the server keeps serving."""
    nbd = require_module("nbd", "python3-libnbd")
    wrapper = tmp_path / "corrupting_plugin.py"
    wrapper.write_text(textwrap.dedent("""\
        __file__ = %r
        exec(compile(open(__file__).read(), __file__, "exec"))
        from zramd.device import Device

        _write = Device.write

        def write(self, offset, data):
            _write(self, offset, data)
            if offset == 0:
                handle = self.slot_get(0)[1]
                self.pool.obj_write(handle,
                                    b"\\xff" * self.pool.obj_size(handle))

        Device.write = write
        """ % PLUGIN))
    monkeypatch.setattr(nbdkit_server, "PLUGIN", str(wrapper))
    with NbdkitServer(tmp_path / "srv", size="16M") as server:
        h = nbd.NBD()
        h.connect_uri(server.uri)
        h.pwrite(b"compressible " * 315, 0)          # stored compressed
        h.pwrite(bytes(4096), 8192)                  # same-filled: no lz4
        with pytest.raises(nbd.Error) as e:
            h.pread(4096, 0)
        assert e.value.errnum == errno.EIO
        assert h.pread(4096, 8192) == bytes(4096)    # still serving
        h.shutdown()
        assert "lz4 decompress: slot 0: malformed lz4 block" in server.log()


@pytest.mark.parametrize("filter", ["as zramd up", None],
                         ids=["filter", "plugin-alone"])
def test_enospc_past_mem_limit_reaches_the_client(nbdkit_server, filter):
    # Behind zramd's filter, the core refuses the write and the plugin
    # says ENOSPC, as it does alone.
    nbd = require_module("nbd", "python3-libnbd")
    server = nbdkit_server(size="64M", mem_limit="1M", filter=filter)
    h = nbd.NBD()
    h.connect_uri(server.uri)
    kept = os.urandom(256 << 10)
    h.pwrite(kept, 0)
    with pytest.raises(nbd.Error) as e:
        for offset in range(1 << 20, 8 << 20, 1 << 20):
            h.pwrite(os.urandom(1 << 20), offset)
    assert e.value.errnum == errno.ENOSPC
    assert h.pread(len(kept), 0) == kept              # earlier data intact
    h.pwrite(bytes(1 << 20), 32 << 20)               # zero pages take none
    assert h.pread(16, 32 << 20) == bytes(16)
    h.shutdown()
    server.wait_control()
    counts = control.call(server.control, "status")["filter"]
    if filter is None:
        assert counts is None
    else:
        assert counts["served_writes"] >= 1 and counts["passed_writes"] >= 1

