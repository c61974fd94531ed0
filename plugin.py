"""nbdkit glue: serve a zramd Device over NBD.

    nbdkit python ./plugin.py size=1G [algorithm=zstd level=3 ...]

Each callback is a line or two; the work is in zramd.  The life of the
server, in nbdkit's order (nbdkit-plugin(3)):

    config / config_complete    parse and validate (zramd.params); no threads
    (nbdkit binds its sockets and forks into the background)
    after_fork                  build the Device, start the deferred-free worker
                                and the control server (small thread stacks);
                                pread and pwrite become the Device's C
                                callables, and zramd's nbdkit filter, where
                                it is in front, serves whole sectors from
                                the core (_serve_from_c)
    open ... pread/pwrite/...   one handle per connection: the Device itself
    cleanup                     stop the control server, close the Device

Threads started before the fork would die with the parent, so nothing but
validation happens before ``after_fork``.

Errors: a ZramdError (or OSError) in an I/O callback reaches the client with
its errno through ``nbdkit.set_error`` (ENOSPC past mem_limit, EIO for
corrupt data, EINVAL for a bad request).  A configuration error ends nbdkit
at start-up with one line naming the key; see ``_refuse``.

The embedded interpreter is Debian's libpython3.11, but it takes its
prefix from whatever ``python3`` comes first on PATH: with a venv or pyenv
python3 there, sys.path holds that interpreter's stdlib and site-packages
and lacks Debian's dist-packages, where python3-lz4, python3-zstandard and
our editable install live.  So before importing zramd we put this file's
directory first and add Debian's dist-packages directories (with their
.pth files) when they are missing.
"""

import errno
import os
import site
import sys
import threading
import uuid

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
for _dir in ("/usr/local/lib/python%d.%d/dist-packages" % sys.version_info[:2],
             "/usr/lib/python3/dist-packages"):
    if _dir not in sys.path and os.path.isdir(_dir):
        site.addsitedir(_dir)

import nbdkit  # noqa: E402  (provided by nbdkit's embedded interpreter)

from zramd import procctl, threadstate  # noqa: E402
from zramd import params as _params  # noqa: E402
from zramd.control import ControlServer  # noqa: E402
from zramd.errors import ConfigError, ZramdError  # noqa: E402

API_VERSION = 2

# First, while whoever started nbdkit still waits for it to answer: nbdkit
# may have armed a parent-death SIGTERM that nobody asked for (zramd.procctl).
procctl.keep_running_without_parent()

# nbdkit 1.32's python plugin never shows config_help itself (--help does
# not load the script): scripts/zramd_nbdkit_help.py prints it after
# nbdkit's --help, and dump_plugin lists the same keys.
config_help = _params.help_text()

_parser = _params.ParamParser()
_config = None          # zramd.params.Params, from config_complete
_device = None          # zramd.device.Device, from after_fork
_control = None         # zramd.control.ControlServer, from after_fork


def _refuse(err):
    """End nbdkit at start-up with one line: ``nbdkit: error: zramd: MSG``.

    Raising from config() would make nbdkit print the whole Python
    traceback, which buries the message.  Nothing needs undoing yet: nbdkit
    has not bound a socket, forked or written a pidfile.
    """
    sys.stderr.write("nbdkit: error: zramd: %s\n" % err.message)
    sys.stderr.flush()
    os._exit(1)


def _io(function, *args):
    """Call a Device method; a failure reaches the client with its errno."""
    threadstate.pin()
    try:
        return function(*args)
    except (ZramdError, OSError) as err:
        nbdkit.set_error(err.errno or errno.EIO)
        raise


def dump_plugin():
    for key, placeholder, text in _params.PARAMETERS:
        print("zramd_param_%s=<%s> %s" % (key, placeholder, text))


def config(key, value):
    try:
        _parser.set(key, value)
    except ConfigError as err:
        _refuse(err)


def config_complete():
    global _config
    try:
        _config = _parser.complete()
    except ConfigError as err:
        _refuse(err)


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


# Stack of the threads we start (control server and its clients, deferred
# free, policy).  They run shallow Python code, and under nbdkit --swap
# (mlockall without MCL_ONFAULT) every stack is locked in full as soon as
# it is mapped: 8 MiB each by default.
THREAD_STACK_BYTES = 512 * 1024


def after_fork():
    global _device, _control
    if _config.swap:
        # Before the device and the threads: they inherit IO_FLUSHER, and
        # their pages are locked as they are touched.
        try:
            procctl.lock_memory()
        except OSError as err:
            raise ZramdError("swap: cannot lock the server in memory: %s "
                             "(run as root, or raise RLIMIT_MEMLOCK)"
                             % err.strerror) from None
        procctl.set_io_flusher()
    else:
        procctl.facts["io_flusher"] = bool(procctl.io_flusher())
    procctl.facts["instance"] = uuid.uuid4().hex
    threading.stack_size(THREAD_STACK_BYTES)
    _device = _config.build_device()
    _device.pool.start_worker()
    _serve_from_c()
    _control = ControlServer(_device, _config.control, _config.name)
    _control.start()


def cleanup():
    if _control is not None:
        _control.stop()
    if _device is not None:
        _device.close()


def open(readonly):
    # The export name "" is the disk; so is this instance's id, which
    # zramd up attaches with, so that a client reconnecting after the
    # server was restarted is refused instead of served an empty disk.
    name = nbdkit.export_name()
    if name not in ("", procctl.facts["instance"]):
        nbdkit.set_error(errno.ENOENT)
        raise ZramdError("export %r: not this server (instance %s): the "
                         "disk it named is gone"
                         % (name, procctl.facts["instance"]))
    return _device


def get_size(h):
    return h.size


def block_size(h):
    # The device takes any byte range; whole 4 KiB sectors are cheapest.
    return (1, 4096, 0xFFFFFFFF)


def can_write(h):
    return True


def can_flush(h):
    return True


def can_trim(h):
    return True


def can_zero(h):
    return True


def can_fast_zero(h):
    return True


def can_multi_conn(h):
    return True


def can_extents(h):
    return True


def can_fua(h):
    # Memory is as durable as it gets once a write returns.
    return nbdkit.FUA_NATIVE


def is_rotational(h):
    return False


# done: the bytes the C callables already served (see _serve_from_c).
def pread(h, buf, offset, flags, done=0):
    _io(h.read_into, offset + done, memoryview(buf)[done:] if done else buf)


def pwrite(h, buf, offset, flags, done=0):
    _io(h.write, offset + done, memoryview(buf)[done:] if done else buf)


def _serve_from_c():
    """Make pread and pwrite the device's C callables (nbdkit looks them
    up in this module at every request): a request of whole sectors then
    runs no Python code at all, and the functions above, given the byte
    the C callable reached, finish the rest.  With zramd's filter in front
    (zramd.attach.server_command), such a request does not reach the
    plugin at all."""
    global pread, pwrite
    callbacks = _device.nbd_callbacks(threadstate.pin, pread, pwrite)
    if callbacks is not None:
        pread, pwrite = callbacks
    try:
        _device.offer_to_filter()
    except RuntimeError as err:
        # Served by the plugin alone: slower, never wrong.
        sys.stderr.write("nbdkit: warning: zramd: %s; serving through the "
                         "python plugin alone\n" % err)
        sys.stderr.flush()


def flush(h, flags):
    _io(h.flush)


def trim(h, count, offset, flags):
    _io(h.discard, offset, count)


def zero(h, count, offset, flags):
    # Zeroing is always fast and may always trim: same-filled slots.
    _io(h.write_zeroes, offset, count)


_EXTENT_TYPES = {"hole": nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO,
                 "zero": nbdkit.EXTENT_ZERO,
                 "data": 0}


def extents(h, count, offset, flags):
    # One extent per reply: nbdkit 1.32 sends a reply's extents with one
    # send() each and, when one fails (the client died), goes on to the
    # next on the closed socket and aborts (docs/operations.md, "Known
    # limit: nbdkit 1.32 and dying clients").  Clients ask again for the
    # rest (qemu-img takes only the first one anyway).
    return [(start, length, _EXTENT_TYPES[kind])
            for start, length, kind in _io(h.extents, offset, count, 1)]
