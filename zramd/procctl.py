"""What a server behind swap sets on its own process, through prctl(2) and
mlockall(2), and what it found: one dict, ``facts``, that the control
channel's ``status`` reports.

    parent-death signal  nbdkit 1.32.1 to at least 1.33.11 (not 1.42.3)
                         call prctl(PR_SET_PDEATHSIG, SIGTERM) at start
                         even without --exit-with-parent, so a server started
                         in the foreground quits (at its next request) once
                         the thread that started it exits: ``zramd up``
                         does, at once.  ``keep_running_without_parent``
                         clears it unless --exit-with-parent was asked for.
    memory lock          mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT):
                         every page the server touches stays resident, and
                         pages it never touches (nbdkit's large .bss, thread
                         stacks beyond their depth) cost nothing, unlike
                         nbdkit --swap (no MCL_ONFAULT).
    IO_FLUSHER           PR_SET_IO_FLUSHER (Linux 5.6+): the kernel treats
                         the thread as part of the block I/O path, so its
                         own allocations do not recurse into the I/O it
                         serves.  A thread flag: threads inherit it from the
                         thread that creates them, and it survives execve,
                         so it is best set before exec (``set_io_flusher``
                         in the child) and again on the thread that will
                         start the others.

Each call returns what it did; none raises for a kernel or a privilege
that refuses, except ``lock_memory`` (a swap server that could be swapped
out must not start).
"""

import ctypes
import errno
import os
import signal

PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
PR_SET_IO_FLUSHER = 57
PR_GET_IO_FLUSHER = 58
MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.restype = ctypes.c_int
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong, ctypes.c_ulong)
_libc.mlockall.restype = ctypes.c_int
_libc.mlockall.argtypes = (ctypes.c_int,)

#: What this process did and found; reported by the control channel.
facts = {"parent_death_signal_cleared": None, "memory_lock": "none",
         "io_flusher": None}


def _prctl(option, arg=0):
    """prctl(option, arg, 0, 0, 0); returns its value or raises OSError."""
    result = _libc.prctl(option, arg, 0, 0, 0)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def parent_death_signal():
    """The calling thread's parent-death signal (0: none)."""
    value = ctypes.c_int(0)
    if _libc.prctl(PR_GET_PDEATHSIG, ctypes.cast(ctypes.pointer(value),
                                                 ctypes.c_void_p).value,
                   0, 0, 0) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return value.value


def _asked_to_exit_with_parent():
    try:
        with open("/proc/self/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    # nbdkit's options end at the plugin name; a plugin key cannot look
    # like this.
    return b"--exit-with-parent" in argv


def keep_running_without_parent():
    """Clear the parent-death signal nbdkit set without being asked.
    Returns the signal cleared (a signal.Signals), or None."""
    sig = parent_death_signal()
    if not sig or _asked_to_exit_with_parent():
        facts["parent_death_signal_cleared"] = None
        return None
    _prctl(PR_SET_PDEATHSIG, 0)
    cleared = signal.Signals(sig)
    facts["parent_death_signal_cleared"] = cleared.name
    return cleared


def lock_memory():
    """Lock every page this process has or will touch, as it is touched.
    Raises OSError (EPERM, ENOMEM under RLIMIT_MEMLOCK) when refused."""
    if _libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL:
            # A kernel before 4.4 knows no MCL_ONFAULT: lock everything.
            if _libc.mlockall(MCL_CURRENT | MCL_FUTURE) == 0:
                facts["memory_lock"] = "all"
                return "all"
            err = ctypes.get_errno()
        raise OSError(err, "mlockall: %s" % os.strerror(err))
    facts["memory_lock"] = "onfault"
    return "onfault"


def io_flusher():
    """Whether the calling thread has PR_SET_IO_FLUSHER (None: the kernel
    cannot say)."""
    try:
        return bool(_prctl(PR_GET_IO_FLUSHER))
    except OSError:
        return None


def set_io_flusher():
    """Mark the calling thread (and the threads and programs it starts) an
    IO flusher.  Returns True if set; False where the kernel is older than
    5.6 or CAP_SYS_RESOURCE is missing."""
    try:
        _prctl(PR_SET_IO_FLUSHER, 1)
    except OSError:
        facts["io_flusher"] = bool(io_flusher())
        return False
    facts["io_flusher"] = True
    return True
