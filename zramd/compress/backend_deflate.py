"""deflate: zlib's raw deflate, levels 1..9, default 6 (zlib's own).

Raw deflate (negative wbits) drops the 2-byte zlib header and the 4-byte
Adler-32 trailer from every page.  The window is one page (wbits -12):
compressing 4 KiB chunks of libc.so.6 and of the stdlib's *.py files at
level 6, it writes 0.01% more than a 32 KiB window (-15), while the kernel's
2 KiB (-11, DEFLATE_DEF_WINBITS in drivers/block/zram/backend_deflate.c)
writes 0.9% (libc) to 1.6% (*.py) more; a small window also keeps zlib's
per-call state small.

Decompression uses a fresh decompressobj rather than zlib.decompress(): it
costs the same, but reports trailing bytes (zlib.decompress ignores them)
and lets us cap the output at one page plus one byte, so a corrupt stream
cannot balloon.  zlib calls keep no state between pages: one instance serves
every thread.
"""

import zlib

from .. import PAGE_SIZE
from .base import Compressor

_WBITS = -12


class Deflate(Compressor):
    name = "deflate"
    levels = range(1, 10)
    default_level = 6

    def compress(self, page):
        return zlib.compress(page, self.level, _WBITS)

    def decompress(self, data, slot=None):
        stream = zlib.decompressobj(_WBITS)
        try:
            out = stream.decompress(data, PAGE_SIZE + 1)
        except zlib.error as e:
            raise self._corrupt(slot, e) from e
        extra = len(stream.unused_data) + len(stream.unconsumed_tail)
        if len(out) != PAGE_SIZE or not stream.eof or extra:
            raise self._stream_fault(slot, out, stream.eof, extra)
        return out
