"""The compression backend registry, after the kernel's ``backends[]``
(drivers/block/zram/zcomp.c) and borg's compressor table.

Each backend is one small module with one class; ``_BACKENDS`` lists them in
the order ``comp_algorithm`` shows them, the first being the default.  Adding
an algorithm is one module and one line in that table.

A backend's parameters (level, dictionary) are fixed when it is created and
checked here, so bad configuration fails at start-up with a ConfigError
naming the key and what is accepted:

    algorithm: unknown 'foo'; accepted: lz4 lz4hc zstd deflate lzo-rle lzo
    level: 13 out of range for lz4hc; accepted: 1..12
    dict_path: /etc/zramd/d.zstd: lz4 takes no dictionary; accepted by: zstd

The hot path is ``Compressor.compress`` and ``Compressor.decompress`` (see
``base``); those take whole 4 KiB pages and keep no state between pages.
"""

import errno
import os
import stat

from ..errors import ConfigError
from .backend_deflate import Deflate
from .backend_lz4 import Lz4
from .backend_lz4hc import Lz4HC
from .backend_lzo import Lzo, LzoRle
from .backend_zstd import Zstd
from .base import Compressor

__all__ = ["Compressor", "available", "create", "names"]

_BACKENDS = {cls.name: cls for cls in (
    Lz4,        # the default, as in zram
    Lz4HC,
    Zstd,
    Deflate,
    LzoRle,     # zram's default since 5.1 (LZO1X-1 here: backend_lzo)
    Lzo,
)}


def names():
    """The registered names, in table order (a new list)."""
    return list(_BACKENDS)


def available(active):
    """The kernel's ``comp_algorithm`` text: every name followed by a space,
    ``active`` in brackets, then a newline (``lz4 lz4hc [zstd] deflate \\n``).
    Raises ConfigError if ``active`` is not registered."""
    _backend(active)
    return "".join("[%s] " % n if n == active else n + " " for n in _BACKENDS) + "\n"


def create(name, level=None, dict_path=None, dictionary=None):
    """A Compressor for backend ``name`` with ``level`` (None: the backend's
    default) and, for backends that take one, the dictionary file
    ``dict_path``, read now, or the ``dictionary`` bytes themselves (one
    trained at run time).  Raises ConfigError for an unknown name, a level
    the backend does not accept, or a dictionary that is not accepted, not
    readable or not usable."""
    cls = _backend(name)
    level = _check_level(cls, level)
    if dictionary is not None and not cls.takes_dict:
        raise ConfigError("dictionary: %s takes no dictionary" % name)
    if dict_path is not None:
        if not cls.takes_dict:
            accepted = " ".join(n for n, c in _BACKENDS.items() if c.takes_dict)
            raise ConfigError("dict_path: %s: %s takes no dictionary; accepted by: %s"
                              % (dict_path, name, accepted))
        dictionary = _read_dictionary(dict_path)
    try:
        return cls(level, dictionary)
    except ValueError as e:
        # A backend that cannot work with these settings; in practice the
        # dictionary is to blame.
        key = "algorithm: %s" % name if dict_path is None else "dict_path: %s" % dict_path
        raise ConfigError("%s: %s" % (key, e)) from e


def _backend(name):
    cls = _BACKENDS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError("algorithm: unknown %r; accepted: %s" % (name, " ".join(_BACKENDS)))
    return cls


def _check_level(cls, level):
    if level is None:
        return cls.default_level
    if cls.levels is None:
        raise ConfigError("level: %s takes no level; got %r" % (cls.name, level))
    accepted = "%d..%d" % (cls.levels[0], cls.levels[-1])
    # bool is an int, but level=True is surely a mistake.
    if not isinstance(level, int) or isinstance(level, bool):
        raise ConfigError("level: %r is not an integer; accepted for %s: %s"
                          % (level, cls.name, accepted))
    if level not in cls.levels:
        raise ConfigError("level: %d out of range for %s; accepted: %s"
                          % (level, cls.name, accepted))
    return level


#: The largest dictionary read: zstd's own trainer makes 110 KiB ones, and
#: a 4 KiB page gains nothing from megabytes of history.
MAX_DICT_BYTES = 1 << 20


def _read_dictionary(path):
    """The bytes of a dictionary file: a regular file (a FIFO or a device
    such as /dev/zero is refused, never read) of at most MAX_DICT_BYTES."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if stat.S_ISDIR(mode):
                raise ConfigError("dict_path: %s: %s"
                                  % (path, os.strerror(errno.EISDIR)))
            if not stat.S_ISREG(mode):
                raise ConfigError("dict_path: %s: not a regular file" % path)
            data = f.read(MAX_DICT_BYTES + 1)
    except OSError as e:
        raise ConfigError("dict_path: %s: %s" % (path, e.strerror or e)) from e
    except ValueError as e:             # a NUL byte in the path
        raise ConfigError("dict_path: %r: %s" % (path, e)) from e
    if len(data) > MAX_DICT_BYTES:
        raise ConfigError("dict_path: %s: larger than %d bytes"
                          % (path, MAX_DICT_BYTES))
    if not data:
        raise ConfigError("dict_path: %s: empty file" % (path,))
    return data
