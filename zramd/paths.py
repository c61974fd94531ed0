"""Where a device's files live at run time.

Every served device ``NAME`` owns a few entries in one runtime directory
(``$ZRAMD_RUNTIME_DIR``, else ``/run/zramd``)::

    NAME.sock        control channel (Unix socket, mode 0600)
    NAME.nbd         NBD Unix socket, when zramd starts the server itself
    NAME.state.json  what ``zramd up`` attached: block device, FUSE dir, pids

    NAME.server.log  what the server said, while zramd up's server runs
    NAME.fuse/       nbdfuse's mount point; NAME.fuse.log its messages

The CLI finds devices by listing ``*.sock`` here; ``zramd up``/``down`` use
the state file to undo exactly what they did.  Root acts on what it finds
here, so a directory another user could plant files in is refused
(``check_private_dir``).
"""

import os
import stat

from zramd.errors import ZramdError


class UnsafeDirectoryError(ZramdError):
    """A runtime or socket directory that another user could write."""

DEFAULT_RUNTIME_DIR = "/run/zramd"


def runtime_dir():
    """The runtime directory: ``$ZRAMD_RUNTIME_DIR`` or ``/run/zramd``."""
    return os.environ.get("ZRAMD_RUNTIME_DIR") or DEFAULT_RUNTIME_DIR


def control_socket(name):
    """Default control socket path of device ``name``."""
    return os.path.join(runtime_dir(), name + ".sock")


def nbd_socket(name):
    """NBD socket path of device ``name`` when zramd starts the server."""
    return os.path.join(runtime_dir(), name + ".nbd")


def state_file(name):
    """JSON record of what ``zramd up`` attached for device ``name``."""
    return os.path.join(runtime_dir(), name + ".state.json")


def check_private_dir(path):
    """Refuse ``path`` unless it is a real directory (not a symlink) owned
    by us or root and writable by nobody else; returns ``path``.  Raises
    UnsafeDirectoryError naming what is wrong, FileNotFoundError if it
    does not exist."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDirectoryError("%s: is a symbolic link; refusing to use "
                                   "it" % path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectoryError("%s: is not a directory" % path)
    if st.st_uid not in (os.geteuid(), 0):
        raise UnsafeDirectoryError("%s: owned by uid %d, not by uid %d or "
                                   "root; refusing to use it"
                                   % (path, st.st_uid, os.geteuid()))
    if st.st_mode & 0o022:
        raise UnsafeDirectoryError("%s: writable by group or others (mode "
                                   "%04o); refusing to use it"
                                   % (path, stat.S_IMODE(st.st_mode)))
    return path


def private_runtime_dir(create=False):
    """The runtime directory, checked (``check_private_dir``); with
    ``create``, made first (mode 0755) if missing.  Without, a missing
    one raises FileNotFoundError."""
    path = runtime_dir()
    if create:
        os.makedirs(path, mode=0o755, exist_ok=True)
    return check_private_dir(path)


def server_log(name):
    """nbdkit's messages when zramd up started the server."""
    return os.path.join(runtime_dir(), name + ".server.log")


def fuse_dir(name):
    """nbdfuse's mount point directory (its file is ``nbd`` inside)."""
    return os.path.join(runtime_dir(), name + ".fuse")


def fuse_log(name):
    """nbdfuse's messages."""
    return fuse_dir(name) + ".log"
