"""zstd: Zstandard, levels 1..22, default 3 (ZSTD_CLEVEL_DEFAULT), with an
optional dictionary.

Parameters come from ``ZSTD_getCParams(level, PAGE_SIZE, dict size)``, the
table zstd keeps for inputs of 16 KiB or less, as the kernel's zram backend
does (``zstd_get_params(level, PAGE_SIZE)`` in backend_zstd.c): a 4 KiB
window and small hash tables, about 100 KiB of compressor state per thread
at level 3.

Every page is one frame, and the frame is cut to its minimum: the magicless
format (saves 4 bytes), no content size (every page is PAGE_SIZE), no
checksum (zram has none either), no dictionary id (the dictionary is fixed
for the device's life).  What is left is a 2-byte frame header and the block
headers: 5 bytes a page less than zstandard's default framing, 9 less than
with its checksum.

Compression and decompression run in C (zramd/csrc/zcomp.c against the
system libzstd, as zramd._fastpath.Codec): a codec keeps the digested
dictionary once (ZSTD_CDict and ZSTD_DDict, shared read-only) and a free
list of contexts, as many as calls ever ran at once (the device's C
paths compress with the GIL released), instead of one per thread: one per
thread would be 64 contexts of about 200 KiB at level 3 for nbdcopy's 4
connections of 16 nbdkit threads.  Decompression wants exactly one page
out of the frame and no input left over; the decoder refuses windows
above the one compression used, which bounds what a corrupt frame could
ask for.
"""

from .. import PAGE_SIZE, _fastpath
from .base import Compressor


class Zstd(Compressor):
    name = "zstd"
    levels = range(1, 23)
    default_level = 3
    takes_dict = True

    def __init__(self, level=None, dictionary=None):
        super().__init__(level)
        # zstd's parameter table for (page, dictionary) sizes, as
        # ZSTD_getCParams(level, srcSize, dictSize) and the kernel's
        # zstd_get_params(level, PAGE_SIZE) pick them; with a dictionary
        # the window widens to reach back into it.  Raw content or a
        # trained dictionary (zstd's dictionary magic tells which); it is
        # digested here, so a broken file fails at start-up.
        self.native = _fastpath.Codec("zstd", self.level, dictionary)
        # One round trip now proves the configuration works before the
        # device serves a page.
        zero = bytes(PAGE_SIZE)
        try:
            ok = self.native.decompress(self.native.compress(zero)) == zero
        except ValueError as e:
            raise ValueError("zstd self-test failed: %s" % e) from e
        if not ok:
            raise ValueError("zstd self-test failed: zero page did not round-trip")

    def compress(self, page):
        return self.native.compress(page)

    def decompress(self, data, slot=None):
        try:
            return self.native.decompress(data)
        except ValueError as e:
            raise self._corrupt(slot, e) from None
