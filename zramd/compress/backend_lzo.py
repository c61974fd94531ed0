"""lzo and lzo-rle: LZO1X-1 from the system liblzo2, through ctypes.

The kernel's ``lzo`` (drivers/block/zram/backend_lzo.c) is LZO1X-1 as
lib/lzo/lzo1x_compress.c makes it; ``lzo-rle``, zram's default since 5.1,
is the same compressor with a run-length extension for runs of zero bytes
and a 2-byte version prefix, a stream only the kernel's own decompressor
reads.  zramd's pages are read back only by zramd, so both names compress
with liblzo2's ``lzo1x_1_compress`` and decompress with
``lzo1x_decompress_safe``: the ``lzo`` stream is the kernel's format, and
``lzo-rle`` is LZO1X-1 under the name zram-generator users ask for.  How
far its sizes are from the kernel's lzo-rle is measured in
docs/operations.md ("lzo and lzo-rle").

There is no C codec (``native`` is None): the device hands these pages to
its Python path.  ctypes releases the GIL for each call, and the 128 KiB of
work memory LZO1X-1 needs (its 16384-entry dictionary of pointers) is one
buffer per thread, as the kernel keeps one per CPU stream.

Decompression wants exactly one page out and no input left over; the safe
decoder checks every length against both buffers, so a corrupt stream
cannot read or write out of bounds.
"""

import ctypes
import ctypes.util
import threading

from .. import PAGE_SIZE
from .base import Compressor

#: lzo1x.h: LZO1X_1_MEM_COMPRESS = 16384 * lzo_sizeof_dict_t (a pointer).
_WORK_MEM = 16384 * ctypes.sizeof(ctypes.c_void_p)
#: lzoconf.h's worst case for LZO1X-1: in + in / 16 + 64 + 3.
_OUT_MAX = PAGE_SIZE + PAGE_SIZE // 16 + 64 + 3

#: lzoconf.h's error codes, for messages.
_ERRORS = {-1: "error", -2: "out of memory", -3: "not compressible",
           -4: "input overrun (truncated stream)",
           -5: "output overrun (more than %d bytes out)" % PAGE_SIZE,
           -6: "lookbehind overrun", -7: "end of stream not found",
           -8: "bytes after the end of the stream"}


def _load():
    """liblzo2 with its prototypes set and lzo_init() done, or raise
    ValueError naming what is missing."""
    name = ctypes.util.find_library("lzo2") or "liblzo2.so.2"
    try:
        lib = ctypes.CDLL(name)
    except OSError as e:
        raise ValueError("liblzo2 not found (Debian: apt-get install "
                         "liblzo2-2): %s" % e) from None
    size_p = ctypes.POINTER(ctypes.c_size_t)
    for fn in (lib.lzo1x_1_compress, lib.lzo1x_decompress_safe):
        fn.restype = ctypes.c_int
        fn.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p,
                       size_p, ctypes.c_void_p)
    lib.lzo_version.restype = ctypes.c_uint
    # lzo_init() is the macro __lzo_init_v2(version, sizeof(short),
    # sizeof(int), sizeof(long), sizeof(lzo_uint32_t), sizeof(lzo_uint),
    # lzo_sizeof_dict_t, sizeof(char *), sizeof(lzo_voidp),
    # sizeof(lzo_callback_t)): the library checks our ABI against its own.
    ptr = ctypes.sizeof(ctypes.c_void_p)
    init = lib.__lzo_init_v2
    init.restype = ctypes.c_int
    init.argtypes = (ctypes.c_uint,) + (ctypes.c_int,) * 9
    r = init(lib.lzo_version(), ctypes.sizeof(ctypes.c_short),
             ctypes.sizeof(ctypes.c_int), ctypes.sizeof(ctypes.c_long), 4,
             ctypes.sizeof(ctypes.c_size_t), ptr, ptr, ptr, 6 * ptr)
    if r != 0:
        raise ValueError("liblzo2: lzo_init() failed (%d)" % r)
    return lib


_lib = None
_lib_lock = threading.Lock()


def _library():
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _load()
        return _lib


class Lzo(Compressor):
    name = "lzo"

    def __init__(self, level=None, dictionary=None):
        super().__init__(level, dictionary)
        self._lib = _library()
        self._local = threading.local()

    def _buffers(self):
        local = self._local
        try:
            return local.work, local.out, local.out_len
        except AttributeError:
            local.work = ctypes.create_string_buffer(_WORK_MEM)
            local.out = ctypes.create_string_buffer(_OUT_MAX)
            local.out_len = ctypes.c_size_t()
            return local.work, local.out, local.out_len

    def compress(self, page):
        work, out, out_len = self._buffers()
        data = page if type(page) is bytes else bytes(page)
        out_len.value = _OUT_MAX
        r = self._lib.lzo1x_1_compress(data, len(data), out,
                                       ctypes.byref(out_len), work)
        if r != 0:          # LZO1X-1 cannot fail on a buffer this size
            raise RuntimeError("%s compress: %s" % (self.name,
                                                    _ERRORS.get(r, r)))
        return ctypes.string_at(out, out_len.value)

    def decompress(self, data, slot=None):
        _, out, out_len = self._buffers()
        src = bytes(data)
        if not src:
            raise self._corrupt(slot, "empty stream")
        out_len.value = PAGE_SIZE
        r = self._lib.lzo1x_decompress_safe(src, len(src), out,
                                            ctypes.byref(out_len), None)
        if r != 0:
            raise self._corrupt(slot, _ERRORS.get(r, "error %d" % r))
        if out_len.value != PAGE_SIZE:
            raise self._corrupt(slot, "%d bytes out, expected %d"
                                % (out_len.value, PAGE_SIZE))
        return ctypes.string_at(out, PAGE_SIZE)


class LzoRle(Lzo):
    """zram's default name; LZO1X-1 without the kernel's run-length
    extension (see the module docstring)."""

    name = "lzo-rle"
