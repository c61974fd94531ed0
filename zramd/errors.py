"""One exception hierarchy for zramd; each class carries the errno that the
NBD client sees when the error ends a request.

Messages name the operation and the object, e.g.
``zstd decompress: slot 1234: corrupt frame``.  Only ``plugin.py`` turns
these into ``nbdkit.set_error(err.errno)``.
"""

import errno as _errno


class ZramdError(Exception):
    """Base class: ``errno`` is what a failed NBD request reports."""

    errno = _errno.EIO

    def __init__(self, message):
        super().__init__(message)
        self.message = message


class InvalidRequestError(ZramdError):
    """A request outside the disk, or a malformed argument (EINVAL)."""

    errno = _errno.EINVAL


class NoSpaceError(ZramdError):
    """The write would take the pool past mem_limit (ENOSPC)."""

    errno = _errno.ENOSPC


class CorruptDataError(ZramdError):
    """Stored data failed to decompress or has the wrong length (EIO)."""

    errno = _errno.EIO


class ConfigError(ZramdError):
    """Bad configuration, refused at start-up; names the key and what is
    accepted (EINVAL)."""

    errno = _errno.EINVAL
