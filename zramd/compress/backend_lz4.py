"""lz4, the default: LZ4 block format, fast mode.

Like zram's lz4 backend this is the raw block (LZ4_compress_default /
LZ4_decompress_safe), not the frame format, and without python-lz4's 4-byte
size prefix (``store_size=False``): the pool knows the compressed size and
the page size is fixed.  The library keeps no state between calls, so one
instance serves every thread.
"""

from lz4.block import LZ4BlockError, compress as _compress, decompress as _decompress

from .. import PAGE_SIZE
from .base import Compressor


class Lz4(Compressor):
    name = "lz4"

    def compress(self, page):
        return _compress(page, store_size=False)

    def decompress(self, data, slot=None):
        try:
            out = _decompress(data, uncompressed_size=PAGE_SIZE)
        except LZ4BlockError as e:
            raise self._corrupt(slot, e) from e
        # A valid block that is simply short decodes without complaint.
        if len(out) != PAGE_SIZE:
            raise self._corrupt(slot, "%d bytes out, expected %d" % (len(out), PAGE_SIZE))
        return out
