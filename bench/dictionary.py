"""A zstd dictionary trained from the device's own pages: ratio before and
after.

Writes the corpus (bench/corpus.py) to an in-process zstd Device, trains a
dictionary on its stored pages (the ``train_dict`` control attribute does
the same in a served device), writes the corpus again so every page is
compressed with the dictionary, and prints compr_data_size, mem_used_total
and the compression ratio (orig_data_size / compr_data_size, and over
mem_used_total) for both passes.  Usage:

    /usr/bin/python3 bench/dictionary.py [--size 128M] [--level 3]
        [--dict-size 65536] [--samples 4096]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.corpus import build, parse_size  # noqa: E402
from zramd.device import Device  # noqa: E402

CHUNK = 1 << 20


def fill(dev, data):
    view = memoryview(data)
    for off in range(0, len(data), CHUNK):
        dev.write(off, view[off:off + CHUNK])
    dev.pool.free_deferred_flush()
    return dev.mm_stat()


def main(argv=None):
    ap = argparse.ArgumentParser(description="trained zstd dictionary")
    ap.add_argument("--size", default="128M", type=parse_size)
    ap.add_argument("--level", default=3, type=int)
    ap.add_argument("--dict-size", default=65536, type=int)
    ap.add_argument("--samples", default=4096, type=int)
    args = ap.parse_args(argv)
    data = build(args.size)
    dev = Device(len(data), algorithm="zstd", level=args.level)
    try:
        before = fill(dev, data)
        dict_id = dev.train_dictionary(args.dict_size, args.samples)
        after = fill(dev, data)
        dev.compact()
        after = dev.mm_stat()
        assert dev.read(0, len(data)) == data
    finally:
        dev.close()
    print("corpus %d MiB, zstd level %d, dictionary %d bytes from %d pages"
          " (id %d)" % (args.size >> 20, args.level, args.dict_size,
                        args.samples, dict_id))
    print("%-18s %14s %14s %10s %10s" % ("pass", "compr_data", "mem_used",
                                          "orig/compr", "orig/mem"))
    for name, mm in (("no dictionary", before), ("trained dictionary", after)):
        print("%-18s %14d %14d %10.3f %10.3f" % (
            name, mm.compr_data_size, mm.mem_used_total,
            mm.orig_data_size / mm.compr_data_size,
            mm.orig_data_size / mm.mem_used_total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
