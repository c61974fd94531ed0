"""deflate: zlib's raw deflate, levels 1..9, default 6 (zlib's own).

Raw deflate (negative wbits) drops the 2-byte zlib header and the 4-byte
Adler-32 trailer from every page.  The window is one page (wbits -12):
compressing 4 KiB chunks of libc.so.6 and of the stdlib's *.py files at
level 6, it writes 0.01% more than a 32 KiB window (-15), while the kernel's
2 KiB (-11, DEFLATE_DEF_WINBITS in drivers/block/zram/backend_deflate.c)
writes 0.9% (libc) to 1.6% (*.py) more; a small window also keeps zlib's
per-call state small.

Compression and decompression run in C (zramd/csrc/backend_deflate.c
against the system zlib, as zramd._fastpath.Codec), with a free list of
z_streams per direction, as many as calls ever ran at once, so the
device's C paths compress deflate pages without the GIL.  A page
compresses to the bytes ``zlib.compress(page, level, -12)`` gives (the
same deflateInit2 parameters, memLevel 8), so sizes and mm_stat are those
of the Python backend this was.

Decompression wants a stream that ends after exactly one page, with no
input left over; the C decoder writes no more than the page.  When it
refuses a stream, zlib's decoder runs again here, in a fresh
decompressobj capped at one page plus one byte, for the words of the
error: zlib's own message, a truncated stream, trailing bytes, too much
output.
"""

import zlib

from .. import PAGE_SIZE, _fastpath
from .base import Compressor

_WBITS = -12


class Deflate(Compressor):
    name = "deflate"
    levels = range(1, 10)
    default_level = 6

    def __init__(self, level=None, dictionary=None):
        super().__init__(level, dictionary)
        self.native = _fastpath.Codec(self.name, self.level)

    def compress(self, page):
        return self.native.compress(page)

    def decompress(self, data, slot=None):
        try:
            return self.native.decompress(data)
        except ValueError as e:
            refused = e
        # zlib's decoder again, for the reason in its words.
        stream = zlib.decompressobj(_WBITS)
        try:
            out = stream.decompress(data, PAGE_SIZE + 1)
        except zlib.error as e:
            raise self._corrupt(slot, e) from e
        extra = len(stream.unused_data) + len(stream.unconsumed_tail)
        if len(out) != PAGE_SIZE or not stream.eof or extra:
            raise self._stream_fault(slot, out, stream.eof, extra)
        # Never: both decoders are zlib's inflate on the same stream.
        raise self._corrupt(slot, refused)
