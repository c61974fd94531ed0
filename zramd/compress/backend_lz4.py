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
point in the system liblz4 (the library python-lz4 itself links) through
ctypes.  The call keeps the GIL (``PyDLL``, not ``CDLL``): a page takes a
few microseconds to compress, less than handing the GIL to one of nbdkit's
other worker threads and taking it back costs on a busy server (sequential
writes through nbdkit, 64 MiB corpus, three alternating runs: 166-168 MB/s
keeping it against 140-160 MB/s dropping it).

Decompression uses python-lz4 (LZ4_decompress_safe); the block format is
the same either way.  No size prefix is stored: the pool knows the
compressed size and the page size is fixed.
"""

import ctypes
import ctypes.util
import threading

from lz4.block import LZ4BlockError, decompress as _decompress

from .. import PAGE_SIZE
from .base import Compressor


def _load_compress_fast():
    path = ctypes.util.find_library("lz4") or "liblz4.so.1"
    fn = ctypes.PyDLL(path).LZ4_compress_fast
    # (const char *src, char *dst, int srcSize, int dstCapacity, int
    # acceleration) -> int.  No argtypes: bytes, a ctypes buffer and small
    # ints convert natively, 0.8 us a call sooner than through from_param.
    fn.restype = ctypes.c_int
    return fn


_compress_fast = _load_compress_fast()
# LZ4_COMPRESSBOUND(4096): the most a page can grow to.
_BOUND = PAGE_SIZE + PAGE_SIZE // 255 + 16
LZ4_ACCELERATION_DEFAULT = 1


class Lz4(Compressor):
    name = "lz4"

    def __init__(self, level=None, dictionary=None):
        super().__init__(level, dictionary)
        self._out = threading.local()     # per-thread output buffer

    def compress(self, page):
        out = getattr(self._out, "buf", None)
        if out is None:
            buf = ctypes.create_string_buffer(_BOUND)
            out = self._out.buf = (buf, memoryview(buf).cast("B"))
        page = bytes(page)
        n = _compress_fast(page, out[0], len(page), _BOUND,
                           LZ4_ACCELERATION_DEFAULT)
        if n <= 0:
            raise ValueError("lz4 compress: LZ4_compress_fast failed (%d)" % n)
        return bytes(out[1][:n])

    def decompress(self, data, slot=None):
        try:
            out = _decompress(data, uncompressed_size=PAGE_SIZE)
        except LZ4BlockError as e:
            raise self._corrupt(slot, e) from e
        # A valid block that is simply short decodes without complaint.
        if len(out) != PAGE_SIZE:
            raise self._corrupt(slot, "%d bytes out, expected %d" % (len(out), PAGE_SIZE))
        return out
