"""``zramd up`` and ``zramd down``: from zramd.conf to a swap area or a
mounted file system, and back.

Bringing a device up is a stack of four layers, built bottom to top and torn
down top to bottom::

    use        swapon /dev/loopN            mount /dev/loopN /mount/point
                 (after mkswap)               (after mkfs -t TYPE)
    block dev  losetup --direct-io=on --sector-size 4096 RUN/NAME.fuse/nbd
               (nbd-client -unix RUN/NAME.nbd /dev/nbdN with the kernel's nbd)
    file       nbdfuse RUN/NAME.fuse/nbd nbd+unix:///INSTANCE?socket=RUN/NAME.nbd
    server     nbdkit -f -U RUN/NAME.nbd --filter=.../_nbdkit_filter*.so
                 python plugin.py size=... [swap=true]

``RUN`` is zramd.paths.runtime_dir().  Each step is recorded at once in the
state file ``RUN/NAME.state.json`` (rewritten atomically), so ``down`` - or
the unwinding of a failed ``up`` - undoes exactly what was done, whatever
step the bring-up reached.  ``block_device`` appears in the state once the
block device exists, ``active`` once it is in use.

The server is started only when the device's control socket does not answer;
a server that was already running (say, under ``zramd@NAME.service``) is
used and left running by ``down``, which stops only what ``up`` started.

A server behind swap must never wait for swap itself: for swap devices
nbdkit runs in the foreground with the plugin's ``swap=true``
(mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT), zramd.procctl; a lock
would be lost if nbdkit forked).  Every page it touches is then resident,
thread stacks included, so the server is started with few threads
(``--threads``), a bounded number of malloc arenas and small stacks; see
docs/operations.md for the measured VmRSS.  nbdfuse cannot be locked; for
swap it runs in a cgroup v1 memory group with swappiness 0 where there is
one.  Both are marked IO flushers before exec where the kernel lets us.  A
running server is used for swap only if it is locked (VmLck > 0).

Each server has an instance id (its status's ``instance``) and serves the
disk under that export name: the client attaches by it, so a server
started anew is refused rather than taken for the old disk, and ``lost``
tells a device whose server is gone or replaced.

Errors are ZramdError (ConfigError for configuration) whose message starts
with the device name: ``zramd0: swapon: ...``.
"""

import argparse
import fcntl
import functools
import importlib.machinery
import json
import os
import re
import resource
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import urllib.parse

import zramd
from zramd import config, paths, procctl
from zramd.errors import ConfigError, ZramdError

STATE_VERSION = 1

#: nbdkit worker threads per connection, and nbdfuse connections: every
#: thread stack the server touches stays resident, so keep the product
#: small.  nbdkit before 1.34 can abort when a client dies with requests in
#: flight and two or more workers (docs/operations.md, "Known limit: nbdkit
#: 1.32 and dying clients"): one worker there.  Later nbdkit gets
#: SERVER_THREADS (docs/benchmarks.md, "Worker threads per connection").
#: A swap device gets SERVER_THREADS_SWAP everywhere: its requests are
#: small and come a few at a time, so extra workers only hand the
#: connection to each other (each hand-off a wake-up), and a server with
#: one cost 40% less CPU a request and made the swapping program 23%
#: faster (docs/benchmarks.md, "One worker for swap").
SERVER_THREADS = 4
SERVER_THREADS_NBDKIT_1_32 = 1
SERVER_THREADS_SWAP = 1
#: The first nbdkit release without that abort.
NBDKIT_SAFE_THREADS = (1, 34)
FUSE_CONNECTIONS = 2
#: Stack size of every server thread (RLIMIT_STACK at exec; glibc takes the
#: default pthread stack from it).  The plugin's Python frames are shallow.
SERVER_STACK = 1 << 20
#: glibc malloc arenas in the server (default 8 x cores, 64 MiB reserved each).
SERVER_MALLOC_ARENAS = 2

START_TIMEOUT = 30.0
#: What an NBD server sends first (NBDMAGIC, then IHAVEOPT), and what a
#: probe sends back to leave (the NBD protocol, "newstyle negotiation").
NBD_GREETING = b"NBDMAGIC" + b"IHAVEOPT"
NBD_FLAG_C_FIXED_NEWSTYLE = 1
NBD_OPT_ABORT = 2
STOP_TIMEOUT = 10.0
#: Longest wait for one step of a take-down (swapoff, umount, detach).
STEP_TIMEOUT = 60

#: Where plugin.py is looked for, after $ZRAMD_PLUGIN and the source tree.
PLUGIN_PATHS = ("/usr/local/lib/zramd/plugin.py", "/usr/lib/zramd/plugin.py")


class AttachError(ZramdError):
    """A step of up or down failed; the message names device and command."""


# ---------------------------------------------------------------------------
# Small helpers

def plugin_path():
    """plugin.py to serve: $ZRAMD_PLUGIN, the source tree this package was
    imported from, then /usr/local/lib/zramd, /usr/lib/zramd."""
    env = os.environ.get("ZRAMD_PLUGIN")
    if env:
        return env
    here = os.path.dirname(os.path.dirname(os.path.abspath(zramd.__file__)))
    for path in (os.path.join(here, "plugin.py"),) + PLUGIN_PATHS:
        if os.path.isfile(path):
            return path
    raise AttachError("plugin.py not found (set ZRAMD_PLUGIN, or install it "
                      "as %s)" % PLUGIN_PATHS[0])


def _run(name, argv, check=True, timeout=None):
    """Run a command; on failure raise AttachError naming device and tool.
    Past ``timeout`` seconds the command is killed and AttachError raised
    without waiting for it (a swapoff stuck in the kernel cannot be)."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise AttachError("%s: %s: not installed" % (name, argv[0])) from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AttachError("%s: %s did not finish within %ds"
                          % (name, " ".join(argv), timeout)) from None
    proc = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise AttachError("%s: %s failed (exit %d): %s"
                          % (name, " ".join(argv), proc.returncode,
                             msg[-1] if msg else "no message"))
    return proc


def _answers(path):
    """Whether a Unix socket at ``path`` accepts a connection; returns the
    listening process's pid (SO_PEERCRED) or None."""
    if not os.path.exists(path):
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(path)
        except OSError:
            return None
        return _peer_pid(s)


def _peer_pid(sock):
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(creds[:4], sys.byteorder)


def _nbd_answers(path):
    """Whether an NBD server answers on ``path``: it sends the newstyle
    greeting, and we leave politely with NBD_OPT_ABORT (so nbdkit has no
    broken handshake to log).  Returns the server's pid or None."""
    if not os.path.exists(path):
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(path)
            greeting = b""
            while len(greeting) < 18:        # magic, IHAVEOPT, flags
                chunk = s.recv(18 - len(greeting))
                if not chunk:
                    return None
                greeting += chunk
            if greeting[:16] != NBD_GREETING:
                return None
            pid = _peer_pid(s)
            s.sendall(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE)
                      + NBD_GREETING[8:]
                      + struct.pack(">II", NBD_OPT_ABORT, 0))
            try:
                s.recv(64)                   # the ack (optional per spec)
            except OSError:
                pass
            return pid
        except OSError:
            return None


def _alive(pid):
    """Whether ``pid`` runs (a zombie child is reaped and counts as dead)."""
    if not pid:
        return False
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _runs(pid, program, marker):
    """Whether ``pid`` is ``program`` with ``marker`` in its arguments (not
    some other process that got the pid since)."""
    argv = _cmdline(pid)
    return (bool(argv) and os.path.basename(argv[0]) == program.encode()
            and any(marker and marker.encode() in a for a in argv[1:]))


def _wait(predicate, timeout, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def _stop_process(pid, timeout=STOP_TIMEOUT):
    """SIGTERM, then SIGKILL after ``timeout``; returns when it is gone."""
    if not _alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
        if not _wait(lambda: not _alive(pid), timeout):
            os.kill(pid, signal.SIGKILL)
            _wait(lambda: not _alive(pid), timeout)
    except ProcessLookupError:
        pass


def _mounts():
    """[(source, mount point)] from /proc/self/mountinfo, octal-unescaped."""
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mp = left.split()[4]
            src = right.split()[1]
            result.append((_unescape(src), _unescape(mp)))
    return result


def _unescape(s):
    """Undo the kernel's octal escapes (space, tab, newline, backslash)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def _is_mounted(path):
    return any(mp == path for _, mp in _mounts())


def _swaps():
    with open("/proc/swaps") as f:
        return [line.split()[0] for line in f.readlines()[1:] if line.strip()]


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------
# State file

def read_state(name):
    """The state of device ``name``, or None when it is not up.  Raises
    AttachError for a state file that is not a regular file holding a JSON
    object (never followed through a symbolic link)."""
    path = paths.state_file(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise AttachError("%s: %s: unreadable state: %s"
                          % (name, path, e.strerror)) from None
    try:
        with os.fdopen(fd) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ValueError("not a regular file")
            state = json.load(f)
        if not isinstance(state, dict) or state.get("name") != name:
            raise ValueError("not the state of %s" % name)
    except (OSError, ValueError) as e:
        raise AttachError("%s: %s: unreadable state: %s"
                          % (name, path, e)) from None
    return state


def _create_private(path, mode=0o600, append=False):
    """Open ``path`` for writing, created with ``mode``, never through a
    symbolic link; a new file unless ``append``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_APPEND if append else os.O_EXCL
    return os.open(path, flags, mode)


def _write_state(state):
    path = paths.state_file(state["name"])
    tmp = path + ".tmp"
    _unlink(tmp)                    # a leftover, or a link planted there
    with os.fdopen(_create_private(tmp), "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def states():
    """{name: state} of every device with a state file, in the order they
    were brought up (then by name)."""
    result = {}
    try:
        entries = sorted(os.listdir(paths.private_runtime_dir()))
    except FileNotFoundError:
        return result
    except paths.UnsafeDirectoryError as e:
        raise AttachError(e.message) from None
    for entry in entries:
        if entry.endswith(".state.json"):
            name = entry[:-len(".state.json")]
            try:
                st = read_state(name)
            except AttachError as e:
                # One bad file must not stop the teardown of the others.
                _say(name, "%s; skipped" % e.message)
                continue
            if st is not None:
                result[name] = st
    order = sorted(result, key=lambda n: (result[n].get("since", 0), n))
    return {n: result[n] for n in order}


# ---------------------------------------------------------------------------
# The server

_nbdkit_version = []


def nbdkit_version():
    """nbdkit's version as a tuple of ints, from ``nbdkit --version``
    (asked once); (0,) when nbdkit cannot say."""
    if not _nbdkit_version:
        try:
            out = subprocess.run(["nbdkit", "--version"], capture_output=True,
                                 text=True, timeout=30).stdout
            match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
        except (OSError, subprocess.SubprocessError):
            match = None
        _nbdkit_version.append(tuple(int(g) for g in match.groups() if g)
                               if match else (0,))
    return _nbdkit_version[0]


def server_threads(swap=False):
    """Worker threads per connection for the installed nbdkit, for a swap
    device when ``swap``."""
    if swap:
        return SERVER_THREADS_SWAP
    if nbdkit_version() < NBDKIT_SAFE_THREADS:
        return SERVER_THREADS_NBDKIT_1_32
    return SERVER_THREADS


#: What the build names zramd's nbdkit filter (setup.py), suffixed as
#: the C extensions of this interpreter are.
FILTER_MODULE = "_nbdkit_filter"


def filter_path():
    """zramd's nbdkit filter (zramd/filter/) built for this interpreter,
    else the newest built for another (it uses no Python; whether nbdkit
    loads it is server_filter's question), or None."""
    here = os.path.dirname(os.path.abspath(zramd.__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, FILTER_MODULE + suffix)
        if os.path.isfile(path):
            return path
    others = [os.path.join(here, n) for n in os.listdir(here)
              if n.startswith(FILTER_MODULE + ".") and n.endswith(".so")]
    return max(others, key=os.path.getmtime) if others else None


@functools.lru_cache(maxsize=None)
def server_filter():
    """(path, None) when the installed nbdkit loads zramd's filter, else
    (None, why not).  nbdkit loads only a filter built against its own
    version, so it is asked (``nbdkit --filter=PATH null --version``, once
    per process)."""
    path = filter_path()
    if path is None:
        return None, "zramd's nbdkit filter is not built"
    try:
        proc = subprocess.run(["nbdkit", "--filter=" + path, "null",
                               "--version"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return None, str(e)
    if proc.returncode == 0 and re.search(r"^zramd ", proc.stdout, re.M):
        return path, None
    # nbdkit's error line; 1.42 adds a line pointing to its manual.
    said = proc.stderr.strip().splitlines()
    errors = [line for line in said if "error" in line]
    if errors or said:
        return None, (errors or said)[0]
    return None, "nbdkit exit status %d" % proc.returncode


def filter_args(name):
    """nbdkit's arguments that put zramd's filter in front of the plugin
    for device ``name``: ``["--filter=PATH"]``, or none, with a warning
    saying why and how to rebuild, when nbdkit would not load it."""
    path, why = server_filter()
    if path:
        return ["--filter=" + path]
    _say(name, "%s: serving through the python plugin alone (slower); "
         "rebuild: pip install -e %s" % (why, os.path.dirname(
             os.path.dirname(os.path.abspath(zramd.__file__)))))
    return []


def server_command(dev, plugin=None, nbd_socket=None, control=None):
    """nbdkit's argv for device ``dev`` (a DeviceConfig): foreground, the
    plugin's ``swap=true`` (locked on fault, IO flusher) and one worker
    per connection when the device is swap, and zramd's filter in front
    of the plugin (whole sectors served by the C core with no Python
    call).  Without a filter nbdkit loads, the plugin serves everything,
    slower, and a warning says why and how to rebuild."""
    argv = ["nbdkit", "--foreground",
            "--threads", str(server_threads(dev.is_swap)),
            "--unix", nbd_socket or paths.nbd_socket(dev.name)]
    argv += filter_args(dev.name)
    argv += ["python", plugin or plugin_path()]
    argv += dev.plugin_params()
    if dev.is_swap:
        argv.append("swap=true")
    argv += ["name=%s" % dev.name,
             "control=%s" % (control or paths.control_socket(dev.name))]
    return argv


def server_environment(base=None):
    """The server's environment: bounded malloc arenas, and Debian's
    python3 first on PATH (nbdkit's embedded interpreter takes its prefix
    from the python3 it finds there)."""
    env = dict(os.environ if base is None else base)
    env["MALLOC_ARENA_MAX"] = str(SERVER_MALLOC_ARENAS)
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin" + (
        ":" + env["PATH"] if env.get("PATH") else "")
    src = os.path.dirname(os.path.dirname(os.path.abspath(zramd.__file__)))
    env["PYTHONPATH"] = src + (":" + env["PYTHONPATH"]
                               if env.get("PYTHONPATH") else "")
    return env


def limit_stack():
    """Small stacks for every thread of the process about to exec."""
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if hard != resource.RLIM_INFINITY:
        size = min(SERVER_STACK, hard)
    else:
        size = SERVER_STACK
    resource.setrlimit(resource.RLIMIT_STACK, (size, hard))


#: The server holds the disk: far down the OOM killer's list (the units
#: set the same OOMScoreAdjust=).
SERVER_OOM_SCORE_ADJ = -900


def _server_preexec():
    """In the server's child before exec: small stacks, OOM protection."""
    limit_stack()
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(SERVER_OOM_SCORE_ADJ))
    except OSError:
        pass                # not root: the default score


def _spawn(name, argv, log_path, preexec=None, io_flusher=False, env=None):
    """Start ``argv`` in a session of its own, its output to ``log_path``,
    running ``preexec`` in the child first.  With ``io_flusher``, the child
    marks itself PR_SET_IO_FLUSHER before exec (inherited by all its
    threads).  Returns (Popen, whether IO_FLUSHER was set or None)."""
    report_r, report_w = os.pipe()

    def child():
        if preexec is not None:
            preexec()
        if io_flusher:
            os.write(report_w, b"1" if procctl.set_io_flusher() else b"0")
    try:
        with os.fdopen(_create_private(log_path, append=True), "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    env=env, preexec_fn=child,
                                    start_new_session=True)
    except FileNotFoundError:
        raise AttachError("%s: %s: not installed" % (name, argv[0])) from None
    finally:
        os.close(report_w)
        with os.fdopen(report_r, "rb") as report:
            said = report.read()
    return proc, {b"1": True, b"0": False}.get(said)


def serve(name, root="/"):
    """Replace this process by the server of device ``name`` (the
    ExecStart of zramd@.service: same PID, so systemd watches nbdkit)."""
    dev = _select(config.load(root), [name])[0]
    try:
        paths.private_runtime_dir(create=True)
    except paths.UnsafeDirectoryError as e:
        raise AttachError("%s: %s" % (name, e.message)) from None
    # A restart (or Restart=on-failure after a crash) finds the last
    # server's sockets in the preserved runtime directory.
    _remove_stale_sockets(dev.name)
    argv = server_command(dev)
    env = server_environment()
    limit_stack()
    os.execvpe(argv[0], argv, env)


def _remove_stale_sockets(name):
    """Remove device ``name``'s NBD and control sockets when nobody answers
    on them: nbdkit leaves its -U socket behind when it exits and refuses
    to start on an existing one ("Address already in use")."""
    for path in (paths.nbd_socket(name), paths.control_socket(name)):
        if _stale_socket(name, path):
            _unlink(path)


def _stale_socket(name, path):
    """Whether ``path`` is a Unix socket nobody listens on (connect is
    refused).  False when absent or answered; AttachError when it is not
    a socket, or the connect fails otherwise (a full backlog, a stopped
    server): that says nothing of whether a server is there."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise AttachError("%s: %s is not a socket; not replacing it"
                              % (name, path))
    except FileNotFoundError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(path)
        except ConnectionRefusedError:
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            raise AttachError("%s: %s: cannot tell whether a server listens "
                              "(%s); not replacing it"
                              % (name, path, e.strerror or e)) from None
    return False


def _start_server(dev, state):
    nbd = paths.nbd_socket(dev.name)
    control = paths.control_socket(dev.name)
    _remove_stale_sockets(dev.name)
    log_path = paths.server_log(dev.name)
    _unlink(log_path)
    argv = server_command(dev, nbd_socket=nbd, control=control)
    proc, _ = _spawn(dev.name, argv, log_path, preexec=_server_preexec,
                     io_flusher=dev.is_swap, env=server_environment())
    state.update(server_pid=proc.pid, server_started=True, server_log=log_path)
    _write_state(state)

    def ready():
        if proc.poll() is not None:
            raise AttachError("%s: nbdkit exited with status %d: %s"
                              % (dev.name, proc.returncode, _tail(log_path)))
        return (_answers(control) is not None
                and _nbd_answers(nbd) is not None)
    if not _wait(ready, START_TIMEOUT):
        raise AttachError("%s: nbdkit not ready after %ds: %s"
                          % (dev.name, START_TIMEOUT, _tail(log_path)))


def _tail(path, lines=5):
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------
# The block device

def kernel_nbd():
    """Whether the kernel's NBD driver is there (then nbd-client attaches)."""
    return os.path.exists("/dev/nbd0")


def nbd_uri(socket_path, export=None):
    """The NBD URI of ``export`` (default: the default export) served on
    the Unix socket ``socket_path``."""
    return "nbd+unix:///%s?socket=%s" % (
        urllib.parse.quote(export or "", safe=""),
        urllib.parse.quote(socket_path, safe="/"))


#: Held from choosing a free /dev/nbdN until nbd-client has connected it:
#: two zramd up at once (the attach units start in parallel at boot) chose
#: the same device, and the second nbd-client failed.  Machine-wide, as
#: the devices are, whatever the runtime directory.
NBD_LOCK = "/run/lock/zramd-nbd.lock"


def _nbd_lock():
    """An open file holding NBD_LOCK (flock, exclusive); close it to let go."""
    lock_dir = os.path.dirname(NBD_LOCK)
    path = NBD_LOCK if os.path.isdir(lock_dir) else "/run/zramd-nbd.lock"
    f = open(path, "a")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def _free_nbd():
    i = 0
    while os.path.exists("/dev/nbd%d" % i):
        if not os.path.exists("/sys/block/nbd%d/pid" % i):
            return "/dev/nbd%d" % i
        i += 1
    raise AttachError("no free /dev/nbdN")


def _attach_nbd_client(dev, state):
    with _nbd_lock():
        device = _free_nbd()
        argv = ["nbd-client", "-unix", paths.nbd_socket(dev.name), device,
                "-block-size", "4096"]
        if state.get("server_instance"):
            argv += ["-N", state["server_instance"]]
        if dev.is_swap:
            argv.append("-swap")
        state.update(attach="nbd-client")
        _run(dev.name, argv)
    state.update(block_device=device)
    _write_state(state)


def _attach_nbdfuse(dev, state):
    fuse_dir = paths.fuse_dir(dev.name)
    pidfile = fuse_dir + ".pid"
    os.makedirs(fuse_dir, mode=0o700, exist_ok=True)
    _unlink(pidfile)
    log_path = paths.fuse_log(dev.name)
    argv = ["nbdfuse", "--pidfile", pidfile,
            "--connections", str(FUSE_CONNECTIONS),
            os.path.join(fuse_dir, "nbd"),
            nbd_uri(paths.nbd_socket(dev.name), state.get("server_instance"))]
    state.update(attach="nbdfuse", fuse_dir=fuse_dir, fuse_log=log_path)
    _write_state(state)
    preexec = None
    if dev.is_swap:
        cgroup = _make_noswap_cgroup(dev.name)
        if cgroup:
            state.update(memory_cgroup=cgroup)
            _write_state(state)
            preexec = lambda: _join_cgroup(cgroup)     # noqa: E731
    proc, flusher = _spawn(dev.name, argv, log_path, preexec=preexec,
                           io_flusher=dev.is_swap)
    state.update(fuse_pid=proc.pid, fuse_io_flusher=flusher)
    _write_state(state)

    def ready():
        if proc.poll() is not None:
            raise AttachError("%s: nbdfuse exited with status %d: %s"
                              % (dev.name, proc.returncode, _tail(log_path)))
        return os.path.exists(pidfile) and os.path.getsize(pidfile) > 0
    if not _wait(ready, START_TIMEOUT):
        raise AttachError("%s: nbdfuse not ready after %ds"
                          % (dev.name, START_TIMEOUT))
    _unlink(pidfile)
    out = _run(dev.name, ["losetup", "--find", "--show", "--direct-io=on",
                          "--sector-size", "4096",
                          os.path.join(fuse_dir, "nbd")])
    state.update(block_device=out.stdout.strip())
    _write_state(state)


# nbdfuse cannot be locked in memory like nbdkit (it has no --swap, and
# mlockall does not survive exec).  With the cgroup v1 memory controller,
# it runs in a group of its own with memory.swappiness 0: reclaim then
# leaves its anonymous pages alone unless nothing else is left (under
# systemd with cgroup v2, the units' MemorySwapMax=0 does it instead).
CGROUP_V1_MEMORY = "/sys/fs/cgroup/memory"


def _make_noswap_cgroup(name):
    """Create ``CGROUP_V1_MEMORY/zramd-NAME-PID`` with swappiness 0; returns
    its path, or None where there is no (writable) cgroup v1 memory
    controller."""
    if not os.path.exists(os.path.join(CGROUP_V1_MEMORY, "memory.swappiness")):
        return None
    path = os.path.join(CGROUP_V1_MEMORY, "zramd-%s-%d" % (name, os.getpid()))
    try:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "memory.swappiness"), "w") as f:
            f.write("0")
    except OSError:
        _remove_cgroup(path)
        return None
    return path


def _join_cgroup(path):
    """In the child before exec: move into ``path`` so that every page it
    touches from now on is charged there."""
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    except OSError:
        pass                # left where it was: still works, less guarded


def _remove_cgroup(path, timeout=5.0):
    """rmdir a (soon) empty cgroup; False if it stays busy."""
    def gone():
        try:
            os.rmdir(path)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True
    return _wait(gone, timeout)


def _loop_backing(device):
    """The backing file of loop device ``device``, or None if unbound."""
    base = os.path.basename(device)
    try:
        with open("/sys/block/%s/loop/backing_file" % base) as f:
            return f.read().strip()
    except OSError:
        return None


# ---------------------------------------------------------------------------
# Use: swap or file system

def _use(dev, state):
    device = state["block_device"]
    if dev.is_swap:
        _run(dev.name, ["mkswap", device])
        state.update(use="swap", mount_point=None)
        _write_state(state)
        options = ["--options=" + dev.options] if dev.options else []
        _run(dev.name, ["swapon", "--priority", str(dev.swap_priority)]
             + options + [device])
    else:
        mkfs = ["mkfs", "-t", dev.fs_type]
        if dev.fs_type.startswith("ext") or dev.fs_type in ("xfs", "btrfs"):
            mkfs.append("-q")
        _run(dev.name, mkfs + list(dev.fs_create_options) + [device])
        os.makedirs(dev.mount_point, exist_ok=True)
        state.update(use="fs", mount_point=dev.mount_point,
                     fs_type=dev.fs_type)
        _write_state(state)
        options = ["-o", dev.options] if dev.options else []
        _run(dev.name, ["mount", "-t", dev.fs_type] + options
             + [device, dev.mount_point])


# ---------------------------------------------------------------------------
# up and down

def _select(devices, names):
    if not names:
        return list(devices.values())
    unknown = [n for n in names if n not in devices]
    if unknown:
        raise ConfigError("%s: not configured (configured: %s)"
                          % (unknown[0], ", ".join(devices) or "none"))
    return [devices[n] for n in names]


def _is_up(state):
    """Whether a recorded device is still fully up, on its own server."""
    if not state.get("active") or lost(state):
        return False
    device = state.get("block_device")
    if state.get("use") == "swap":
        return device in _swaps()
    return any(src == device and mp == state.get("mount_point")
               for src, mp in _mounts())


def lost(state):
    """Why what was stored on a recorded device can no longer be read back,
    or None while the server it was attached to still runs: that server
    exited, or another instance answers in its place (a restart)."""
    device, pid = state.get("block_device"), state.get("server_pid")
    if not device or not pid:
        return None
    gone = ("whatever was stored on %s is gone; zramd down %s clears it"
            % (device, state["name"]))
    if not (_alive(pid) and _runs(pid, "nbdkit", state.get("nbd_socket"))):
        return "its server (pid %d) has exited: %s" % (pid, gone)
    instance = state.get("server_instance")
    if instance:
        try:
            now = _server_status(state["name"], state.get("control_socket"))
        except AttachError:
            return None             # alive but busy: not known to be lost
        if now.get("instance") != instance:
            return ("its server was replaced: instance %s was attached, "
                    "%s answers now: %s" % (instance, now.get("instance"),
                                            gone))
    return None


def _locked_bytes(pid):
    """VmLck of ``pid`` in bytes (0 when unknown)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmLck:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _server_status(name, socket_path=None):
    """The ``status`` reply of device ``name``'s server; AttachError naming
    the socket when it does not answer."""
    from zramd import control
    path = socket_path or paths.control_socket(name)
    try:
        return control.call(path, "status")
    except ZramdError as e:
        raise AttachError("%s: %s: %s" % (name, path, e.message)) from None


def _check_server(dev, pid, status):
    """A running server must serve the configured size, and a server for
    swap must be locked in memory (swap=true, or nbdkit --swap): refuse to
    put anything else to use."""
    if status.get("disksize") != dev.size:
        raise AttachError(
            "%s: the running server's disk is %s bytes, zramd.conf says %d "
            "(stop that server, or change zram-size)"
            % (dev.name, status.get("disksize"), dev.size))
    if dev.is_swap and not _locked_bytes(pid):
        raise AttachError(
            "%s: the running server (pid %d) is not locked in memory and "
            "cannot back swap (start it with swap=true, as zramd@%s.service "
            "does)" % (dev.name, pid, dev.name))


def wait_server(name, timeout=START_TIMEOUT):
    """Wait until device ``name``'s NBD and control sockets both answer
    (the ExecStartPost of zramd@.service); returns the server's pid."""
    nbd, control = paths.nbd_socket(name), paths.control_socket(name)
    if not _wait(lambda: _answers(control) and _nbd_answers(nbd), timeout):
        raise AttachError("%s: no server answers on %s and %s after %ds"
                          % (name, nbd, control, timeout))
    return _answers(control)


def bring_up(dev, start_server=True):
    """Bring one configured device up; returns its state.  A device that is
    already up is left alone; a half-done one is torn down first.  On
    failure everything this call did is undone before the error is raised.
    With ``start_server`` false a running server is required (the units:
    zramd@NAME.service owns it).
    """
    name = dev.name
    try:
        paths.private_runtime_dir(create=True)
    except paths.UnsafeDirectoryError as e:
        raise AttachError("%s: %s" % (name, e.message)) from None
    old = read_state(name)
    if old is not None:
        if _is_up(old):
            return old
        reason = lost(old)
        if reason:
            _say(name, "lost: %s" % reason)
        take_down(old)
    state = {"version": STATE_VERSION, "name": name, "server_pid": None,
             "server_started": False, "nbd_socket": paths.nbd_socket(name),
             "control_socket": paths.control_socket(name), "fuse_dir": None,
             "fuse_pid": None, "use": None, "mount_point": None,
             "active": False, "since": time.time()}
    _write_state(state)
    try:
        pid = _answers(paths.control_socket(name))
        if pid is not None:
            if _nbd_answers(paths.nbd_socket(name)) is None:
                raise AttachError("%s: a server answers on %s but not on %s"
                                  % (name, paths.control_socket(name),
                                     paths.nbd_socket(name)))
            state.update(server_pid=pid)
            _write_state(state)
            _check_server(dev, pid, _server_status(name))
        elif start_server:
            _start_server(dev, state)
        else:
            raise AttachError("%s: no server answers on %s (is zramd@%s."
                              "service running?)"
                              % (name, paths.control_socket(name), name))
        # The client attaches by this instance's export name: a server
        # started anew has another and refuses it (plugin.py, open).
        status = _server_status(name)
        state.update(server_instance=status.get("instance"),
                     server_io_flusher=status.get("io_flusher"),
                     server_memory_lock=status.get("memory_lock"))
        _write_state(state)
        if kernel_nbd():
            _attach_nbd_client(dev, state)
        else:
            _attach_nbdfuse(dev, state)
        _use(dev, state)
        state.update(active=True)
        _write_state(state)
    except BaseException:
        try:
            take_down(state)
        except ZramdError as e:
            print("zramd: %s: while undoing a failed up: %s"
                  % (name, e.message), file=sys.stderr)
        raise
    return state


def _say(name, message):
    print("zramd: %s: %s" % (name, message), file=sys.stderr)


def _swap_used(device):
    """KiB in use on swap area ``device`` (None: not a swap area)."""
    with open("/proc/swaps") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields and fields[0] == device:
                return int(fields[3])
    return None


_VETTED_PATHS = {"fuse_dir": paths.fuse_dir, "fuse_log": paths.fuse_log,
                 "server_log": paths.server_log, "nbd_socket": paths.nbd_socket,
                 "control_socket": paths.control_socket}


def _vetted(state):
    """``state`` less what zramd up would never have written there: paths
    other than the device's own in the runtime directory, a memory cgroup
    not of its name, a block device that is not its loop device (backed by
    its FUSE file) or an nbd device.  A state file is only as trustworthy
    as its directory; this keeps a planted one from making root delete,
    unmount or switch off anything else.  Says what it drops."""
    name = state["name"]
    out = dict(state)

    def drop(key, why):
        _say(name, "state's %s %r %s: left alone" % (key, out.pop(key), why))
    for key, expected in _VETTED_PATHS.items():
        if out.get(key) is not None and out[key] != expected(name):
            drop(key, "is not %s" % expected(name))
    cgroup = out.get("memory_cgroup")
    if cgroup is not None and not re.fullmatch(
            re.escape(os.path.join(CGROUP_V1_MEMORY, "zramd-%s-" % name))
            + r"[0-9]+", str(cgroup)):
        drop("memory_cgroup", "is not a cgroup of zramd's")
    device = out.get("block_device")
    if device is not None:
        if out.get("attach") == "nbd-client":
            ours = re.fullmatch(r"/dev/nbd[0-9]+", str(device))
        else:
            ours = (re.fullmatch(r"/dev/loop[0-9]+", str(device))
                    and _loop_backing(device) in (
                        None, os.path.join(paths.fuse_dir(name), "nbd")))
        if not ours:
            drop("block_device", "is not this device's")
    return out


def take_down(state):
    """Undo what ``state`` records, top layer first; removes the state
    file last.  Raises AttachError, leaving the state in place, when the
    swap area or file system is still in use (swapoff or umount failed or
    took longer than STEP_TIMEOUT).  When the server is gone, says so on
    stderr, with what that cost.  Touches only what zramd up itself would
    have recorded (``_vetted``)."""
    state = _vetted(state)
    name = state["name"]
    device = state.get("block_device")
    reason = lost(state)
    # 1. use
    if state.get("use") == "swap" and device and device in _swaps():
        if reason:
            used = _swap_used(device)
            _say(name, "%s: %d KiB swapped out there cannot be read back; "
                 "the kernel kills the processes that touch them (SIGBUS)"
                 % (device, used or 0))
        _run(name, ["swapoff", device], timeout=STEP_TIMEOUT)
    elif state.get("use") == "fs" and device:
        mp = state.get("mount_point")

        def mounted():
            return any(src == device and m == mp for src, m in _mounts())
        if mounted():
            # A file system can be busy for a moment after its last user
            # (a scanner, a closing file): try for a little while, then
            # report what umount says.
            if not _wait(lambda: (_run(name, ["umount", mp], check=False,
                                       timeout=STEP_TIMEOUT)
                                  .returncode == 0 or not mounted()),
                         2.0, interval=0.25):
                _run(name, ["umount", mp], timeout=STEP_TIMEOUT)
    state.update(active=False)
    _write_state(state)
    # 2. block device
    fuse_dir = state.get("fuse_dir")
    if state.get("attach") == "nbd-client" and device:
        _run(name, ["nbd-client", "-d", device], check=False,
             timeout=STEP_TIMEOUT)
    elif state.get("attach") == "nbdfuse":
        backing = os.path.join(fuse_dir, "nbd") if fuse_dir else None
        if device and backing and _loop_backing(device) == backing:
            _run(name, ["losetup", "--detach", device], timeout=STEP_TIMEOUT)
            if not _wait(lambda: _loop_backing(device) != backing, 10):
                raise AttachError("%s: %s still bound to %s"
                                  % (name, device, backing))
        state.pop("block_device", None)
        _write_state(state)
        # 3. the FUSE file
        if fuse_dir and _is_mounted(fuse_dir):
            def unmounted():
                _run(name, ["fusermount3", "-u", fuse_dir], check=False,
                     timeout=STEP_TIMEOUT)
                return not _is_mounted(fuse_dir)
            if not _wait(unmounted, 10, interval=0.2):
                raise AttachError("%s: cannot unmount %s (busy)"
                                  % (name, fuse_dir))
        pid = state.get("fuse_pid")
        if pid and _alive(pid) and _runs(pid, "nbdfuse", fuse_dir):
            if not _wait(lambda: not _alive(pid), 5):
                _stop_process(pid)
        if fuse_dir:
            try:
                os.rmdir(fuse_dir)
            except FileNotFoundError:
                pass
            _unlink(fuse_dir + ".pid")
        if state.get("fuse_log"):
            _unlink(state["fuse_log"])
    if state.get("memory_cgroup"):
        if not _remove_cgroup(state["memory_cgroup"]):
            _say(name, "%s: still holds processes; left in place"
                 % state["memory_cgroup"])
        state.pop("memory_cgroup")
    state.pop("block_device", None)
    state.update(fuse_pid=None)
    _write_state(state)
    # 4. the server, if we started it
    if state.get("server_started"):
        pid = state.get("server_pid")
        if pid and _runs(pid, "nbdkit", state.get("nbd_socket")):
            _stop_process(pid)
        for path in (state.get("nbd_socket"), state.get("control_socket")):
            if path and _stale_socket(name, path):
                _unlink(path)
        if state.get("server_log") and reason:
            # What the server said last is why it is gone.
            _say(name, "its log is kept: %s" % state["server_log"])
        elif state.get("server_log"):
            _unlink(state["server_log"])
    _unlink(paths.state_file(name))


def up(names=None, root="/", start_server=True):
    """Bring up ``names`` (default: every configured device) as configured
    under ``root``.  The whole configuration is read and checked first, so
    a bad file changes nothing.  Returns the states, in order."""
    devices = _select(config.load(root), names)
    return [bring_up(dev, start_server) for dev in devices]


def down(names=None, root="/"):
    """Take down ``names`` (default: every device that is up), the last
    brought up first.  A name that is not up is skipped.  Returns the names
    taken down."""
    recorded = states()
    todo = [n for n in recorded if not names or n in names]
    done = []
    for name in reversed(todo):
        take_down(recorded[name])
        done.append(name)
    return done


# ---------------------------------------------------------------------------
# Command line

def add_subcommands(subparsers):
    """Register ``up`` and ``down`` on the ``zramd`` command's subparsers."""
    p = subparsers.add_parser(
        "up", help="start, attach and use configured devices",
        description="Start the server of each configured device (or use one "
                    "already running), attach a block device and put it to "
                    "use as swap or a mounted file system.")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="devices to bring up (default: all configured)")
    p.add_argument("--no-server", dest="start_server", action="store_false",
                   help="use the running server (zramd@NAME.service), "
                        "never start one")
    p.add_argument("--root", default="/", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_up)
    p = subparsers.add_parser(
        "down", help="take devices down: swapoff/umount, detach, stop",
        description="Undo zramd up, in reverse order: swapoff or umount, "
                    "detach the block device, unmount the FUSE file and stop "
                    "the server zramd up started.")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="devices to take down (default: all that are up)")
    p.add_argument("--root", default="/", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_down)


def _report(err):
    print("zramd: %s" % err.message, file=sys.stderr)
    return 1


def _cmd_up(args):
    try:
        for state in up(args.names or None, root=args.root,
                        start_server=args.start_server):
            where = ("[SWAP]" if state.get("use") == "swap"
                     else state.get("mount_point"))
            print("%s: %s %s" % (state["name"], state["block_device"], where))
    except ZramdError as e:
        return _report(e)
    return 0


def _cmd_down(args):
    try:
        done = down(args.names or None, root=args.root)
    except ZramdError as e:
        return _report(e)
    # Not an error (zramd-attach@NAME's ExecStop must succeed on a device
    # that never came up), but a mistyped name should not pass unseen.
    for name in args.names:
        if name not in done:
            print("zramd: %s: not up, nothing to take down" % name,
                  file=sys.stderr)
    return 0


def main(argv=None):
    """``python3 -m zramd.attach up|down|serve|wait ...`` (the units)."""
    parser = argparse.ArgumentParser(prog="zramd")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    p = sub.add_parser("serve", help="exec the server of one device")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--root", default="/", help=argparse.SUPPRESS)
    p.set_defaults(func=lambda a: serve(a.name, a.root))
    p = sub.add_parser("wait", help="wait until one device's server answers")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--timeout", type=float, default=START_TIMEOUT)
    p.set_defaults(func=lambda a: wait_server(a.name, a.timeout) and 0)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ZramdError as e:
        return _report(e)


if __name__ == "__main__":
    sys.exit(main())
