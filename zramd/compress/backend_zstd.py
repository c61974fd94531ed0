"""zstd: Zstandard through python ``zstandard``, levels 1..22, default 3
(ZSTD_CLEVEL_DEFAULT), with an optional dictionary.

Parameters come from ``from_level(level, source_size=PAGE_SIZE)``, the
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

zstandard's compressor and decompressor objects are not thread-safe, so a
call borrows a pair from a shared free list (``_ContextPool``) and puts it
back afterwards; a pair is built when the list is empty.  The list holds as
many pairs as calls ever ran at once (compression drops the GIL), a handful
on two cores, where one pair per thread would be 64 pairs (about 200 KiB
each at level 3) for nbdcopy's 4 connections of 16 nbdkit threads.  The
dictionary is digested once at construction and its digested forms are
shared read-only by every pair.

Decompression goes through ``decompressobj``: zstandard 0.20's one-shot
``decompress()`` wants the content size from the frame header and cannot
read it from a magicless frame.  The stream object also tells us whether
the frame ended and whether bytes were left over.  The decompressor refuses
windows above one page, which bounds what a corrupt frame can expand to.
"""

import zstandard

from .. import PAGE_SIZE
from ..errors import CorruptDataError
from .base import Compressor


class _Contexts:
    """A compressor and a decompressor that work together."""

    __slots__ = ("cctx", "dctx")

    def __init__(self, params, zdict, window):
        self.cctx = zstandard.ZstdCompressor(compression_params=params, dict_data=zdict)
        self.dctx = zstandard.ZstdDecompressor(
            dict_data=zdict, max_window_size=max(window, PAGE_SIZE),
            format=zstandard.FORMAT_ZSTD1_MAGICLESS)


class _ContextPool:
    """Free ``_Contexts``; list.pop and list.append are atomic under the
    GIL, so taking and giving back need no lock."""

    def __init__(self, params, zdict, window):
        self._args = (params, zdict, window)
        self._free = []

    def take(self):
        try:
            return self._free.pop()
        except IndexError:
            return _Contexts(*self._args)

    def give(self, ctx):
        self._free.append(ctx)


class Zstd(Compressor):
    name = "zstd"
    levels = range(1, 23)
    default_level = 3
    takes_dict = True

    def __init__(self, level=None, dictionary=None):
        super().__init__(level)
        # With a dictionary the window must reach back into it: zstd's
        # parameter table for (page, dictionary) sizes widens it, as
        # ZSTD_getCParams(level, srcSize, dictSize) does for a CDict.
        params = zstandard.ZstdCompressionParameters.from_level(
            self.level, source_size=PAGE_SIZE,
            dict_size=len(dictionary) if dictionary else 0,
            format=zstandard.FORMAT_ZSTD1_MAGICLESS,
            write_content_size=0, write_checksum=0, write_dict_id=0)
        zdict = None
        if dictionary is not None:
            # Raw content or a trained dictionary (zstd's dictionary magic
            # tells which).  Digesting it here rejects a broken file at
            # start-up and builds the CDict once for all threads.
            zdict = zstandard.ZstdCompressionDict(dictionary)
            try:
                zdict.precompute_compress(compression_params=params)
            except zstandard.ZstdError as e:
                raise ValueError("not a usable zstd dictionary: %s" % e) from e
        self._pool = _ContextPool(params, zdict, 1 << params.window_log)
        # One round trip now: it builds the DDict, which zstandard does
        # lazily on first use, before threads can race to do it, and proves
        # the configuration works before the device serves a page.
        zero = bytes(PAGE_SIZE)
        try:
            ok = self.decompress(self.compress(zero)) == zero
        except (zstandard.ZstdError, CorruptDataError) as e:
            raise ValueError("zstd self-test failed: %s" % e) from e
        if not ok:
            raise ValueError("zstd self-test failed: zero page did not round-trip")

    def compress(self, page):
        ctx = self._pool.take()
        try:
            return ctx.cctx.compress(page)
        finally:
            self._pool.give(ctx)

    def decompress(self, data, slot=None):
        ctx = self._pool.take()
        try:
            # The stream works in ctx's decompressor: read all of it
            # before the pair goes back.
            stream = ctx.dctx.decompressobj(write_size=PAGE_SIZE)
            out = stream.decompress(data)
            eof, unused = stream.eof, len(stream.unused_data)
        except zstandard.ZstdError as e:
            raise self._corrupt(slot, e) from e
        finally:
            self._pool.give(ctx)
        if len(out) != PAGE_SIZE or not eof or unused:
            raise self._stream_fault(slot, out, eof, unused)
        return out
