"""What every compression backend is: a name, parameters fixed at
construction, and two calls on whole pages.

zram compresses each 4 KiB page on its own and remembers nothing between
pages, so a backend is a pure function pair with fixed settings.  The pool
already records each object's size and every page is ``PAGE_SIZE`` long, so
backends store neither: no length prefixes, no frame magic, no checksums.
Each page then costs only what the compressor itself needs.

Decompression is where corruption shows.  Whatever goes wrong, a library
error, a truncated or over-long stream, trailing bytes, an output that is
not exactly one page, becomes ``CorruptDataError`` (EIO) naming the backend
and the slot, so the device can fail that one read and count it.

A backend subclass sets the class attributes below.  Working contexts
(zstd's compressors and decompressors, deflate's z_streams) must never be
used by two threads at once: the C codecs (zramd/csrc/zcomp.c) keep them
on a free list under a mutex of their own, as many as calls ever ran at
once.  A backend with a C codec sets ``native`` to it (a
``zramd._fastpath.Codec``); the device's C slot table then compresses and
decompresses with it directly, without the GIL, and pages of a backend
without one (lzo, lzo-rle) go through ``compress``/``decompress`` here.
"""

from .. import PAGE_SIZE
from ..errors import CorruptDataError


class Compressor:
    """One configured backend.  Instances are safe to share between threads.

    ``name`` is the stable registry name; ``level`` the effective level, or
    None where the backend has none.
    """

    #: Stable name, as shown in comp_algorithm.
    name = None
    #: Accepted levels (a ``range``), or None: the backend takes no level.
    levels = None
    #: Level used when none is given.
    default_level = None
    #: Whether the backend accepts a dictionary (``dict_path``).
    takes_dict = False
    #: The C codec (zramd._fastpath.Codec) doing this backend's work, or
    #: None: the device's C slot table hands such pages to the Python path.
    native = None

    def __init__(self, level=None, dictionary=None):
        """``level`` is already checked against ``levels`` (None: the
        default); ``dictionary`` is the dictionary file's bytes (only when
        ``takes_dict``).  Raises ValueError(reason) if the configuration
        does not work, in practice an unusable dictionary."""
        self.level = self.default_level if level is None else level

    def compress(self, page):
        """Compress one page (a bytes-like object of ``PAGE_SIZE`` bytes)
        -> bytes.  The result may be longer than a page: deciding to store
        such a page raw is the caller's business, as in zram."""
        raise NotImplementedError

    def decompress(self, data, slot=None):
        """Bytes-like ``data`` (a memoryview into the pool is fine) -> the
        page, exactly ``PAGE_SIZE`` bytes.  Raises CorruptDataError naming
        this backend and ``slot`` (if given) for anything else."""
        raise NotImplementedError

    def _corrupt(self, slot, reason):
        """The CorruptDataError to raise for ``slot``; ``reason`` may be
        the library's exception."""
        where = "" if slot is None else "slot %s: " % slot
        return CorruptDataError("%s decompress: %s%s" % (self.name, where, reason))

    def _stream_fault(self, slot, out, eof, extra):
        """The error for a stream decoder that produced ``out`` and stopped
        with ``eof`` set or not, ``extra`` input bytes left over."""
        if len(out) > PAGE_SIZE:
            reason = "more than %d bytes out" % PAGE_SIZE
        elif not eof:
            reason = "truncated stream (%d bytes out)" % len(out)
        elif extra:
            reason = "%d bytes after the end of the stream" % extra
        else:
            reason = "%d bytes out, expected %d" % (len(out), PAGE_SIZE)
        return self._corrupt(slot, reason)

    def __repr__(self):
        return "<%s level=%s>" % (self.name, self.level)
