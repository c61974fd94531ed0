"""lz4hc: lz4's high-compression mode (LZ4_compress_HC), levels 1..12,
default 9 (LZ4HC_CLEVEL_DEFAULT).

It spends more time searching for matches but writes the same block format,
so pages decompress with plain lz4 at lz4 speed: the choice for data written
once and read often.
"""

from .backend_lz4 import Lz4


class Lz4HC(Lz4):
    name = "lz4hc"
    levels = range(1, 13)
    default_level = 9

