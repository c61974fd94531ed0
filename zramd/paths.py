"""Where a device's files live at run time.

Every served device ``NAME`` owns a few entries in one runtime directory
(``$ZRAMD_RUNTIME_DIR``, else ``/run/zramd``)::

    NAME.sock        control channel (Unix socket, mode 0600)
    NAME.nbd         NBD Unix socket, when zramd starts the server itself
    NAME.state.json  what ``zramd up`` attached: block device, FUSE dir, pids

The CLI finds devices by listing ``*.sock`` here; ``zramd up``/``down`` use
the state file to undo exactly what they did.
"""

import os

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
