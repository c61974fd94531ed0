"""lz4, the default: LZ4 block format, as the kernel's zram makes it.

zram's lz4 backend calls ``LZ4_compress_fast(src, dst, 4096, ..., 1)``: a
one-shot compression whose hash table, for inputs under 64 KiB, indexes
16-bit offsets (lz4's byU16 table).  python-lz4's ``block.compress`` takes a
different path (``LZ4_resetStream`` + ``LZ4_compress_fast_continue``, a
32-bit streaming table) whose output for the same page is on average 23
bytes longer (measured on bench/corpus.py pages against /dev/zram0, kernel
6.18: 287 of 300 pages equal byte counts with LZ4_compress_fast, 4 of 300
with python-lz4).  Those bytes decide which pages cross huge_class_size, so
for kernel-equal ``huge_pages`` and a smaller pool we call the same entry
point in the system liblz4 (the library python-lz4 itself links), from
zramd._fastpath in C, with the GIL held: a page compresses in a few
microseconds, less than a GIL hand-off costs.  (The device's whole-sector
writes compress in _fastpath too, a request at a time, with the GIL
released.)

Decompression is LZ4_decompress_safe into one page.  No size prefix is
stored: the pool knows the compressed size and the page size is fixed.
"""

from .. import _fastpath
from .base import Compressor


class Lz4(Compressor):
    name = "lz4"

    def __init__(self, level=None, dictionary=None):
        super().__init__(level, dictionary)
        # The device's C paths use it directly; it holds no state
        # between calls, so every thread shares it.  (lz4hc: the same,
        # with LZ4_compress_HC at its level.)
        self.native = _fastpath.Codec(self.name, self.level or 0)

    def compress(self, page):
        return self.native.compress(page)

    def decompress(self, data, slot=None):
        try:
            return self.native.decompress(data)
        except ValueError as e:
            raise self._corrupt(slot, e) from None
