"""Microbenchmark of the pool (zramd.zsmalloc.Pool): operations per second.

Not a test.  The object sizes are what the device would hand the pool for
real data: the shared corpus (bench/corpus.py: Python stdlib and shared
libraries from /usr/lib, zero and same-filled pages, random pages) is cut
into 4 KiB pages, same-filled pages are dropped (zram keeps them out of the
pool), every other page is compressed with zramd's lz4 backend, and a
length that reaches the pool's huge_class_size becomes 4096 (stored raw),
as zram_write_page() does.  The size mix is printed with the results.

Phases, each timed on its own over every object:

    malloc+write   malloc(size), then obj_write() of that many bytes
    read           obj_read_begin() into a local copy, obj_read_end()
    free           free() of every object
    deferred       malloc+write again, then free_deferred() of every
                   object and one free_deferred_flush() (counted in the
                   time, so the rate includes the real frees)

Usage:

    /usr/bin/python3 bench/bench_pool.py [--size 64M] [--seed 1]
        [--chain 8] [--repeat 3]

The best of --repeat runs is printed per phase (least disturbed by the
other processes on a shared machine).
"""

import argparse
import os
import sys
import time
from array import array

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.corpus import build, parse_size  # noqa: E402
from zramd import compress  # noqa: E402
from zramd.zsmalloc import Pool  # noqa: E402

PAGE = 4096


def object_sizes(size, seed, huge_class_size):
    """Pool object sizes for the corpus of `size` bytes, in corpus order,
    and the bytes to write (a compressed page of each length is not needed:
    the pool copies bytes, it does not look at them)."""
    data = build(size, seed)
    comp = compress.create("lz4")
    sizes = array("H")
    same = 0
    for off in range(0, len(data), PAGE):
        page = data[off:off + PAGE]
        if page == page[:8] * (PAGE // 8):
            same += 1
            continue
        n = len(comp.compress(page))
        sizes.append(PAGE if n >= huge_class_size else n)
    return sizes, same


def describe(sizes, same, pages):
    huge = sum(1 for s in sizes if s == PAGE)
    ordered = sorted(sizes)
    q = [ordered[int(len(ordered) * f)] for f in (0.1, 0.25, 0.5, 0.75, 0.9)]
    print("corpus: %d pages: %d same-filled (not in the pool), %d objects,"
          " %d huge (4096)" % (pages, same, len(sizes), huge))
    print("object sizes: mean %d, p10 %d, p25 %d, median %d, p75 %d, p90 %d"
          % ((sum(sizes) // max(len(sizes), 1),) + tuple(q)))


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_once(sizes, chain):
    blob = os.urandom(PAGE)
    blobs = {n: blob[:n] for n in set(sizes)}
    pool = Pool(chain_size=chain)
    handles = array("Q", bytes(8 * len(sizes)))
    local_copy = bytearray(PAGE)
    result = {}

    def malloc_write():
        malloc, write = pool.malloc, pool.obj_write
        for i, n in enumerate(sizes):
            h = malloc(n)
            write(h, blobs[n])
            handles[i] = h

    def read():
        begin, end = pool.obj_read_begin, pool.obj_read_end
        for h in handles:
            end(h, begin(h, local_copy))

    def free():
        f = pool.free
        for h in handles:
            f(h)

    def free_deferred():
        f = pool.free_deferred
        for h in handles:
            f(h)
        pool.free_deferred_flush()

    try:
        result["malloc+write"] = timed(malloc_write)
        result["pool_pages"] = pool.total_pages()
        result["read"] = timed(read)
        result["free"] = timed(free)
        assert pool.total_pages() == 0
        malloc_write()
        result["deferred"] = timed(free_deferred)
        assert pool.total_pages() == 0
    finally:
        pool.close()
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="64M", type=parse_size,
                    help="corpus size (default 64M)")
    ap.add_argument("--seed", default=1, type=int)
    ap.add_argument("--chain", default=8, type=int,
                    help="Pool chain_size, 4..16 (default 8)")
    ap.add_argument("--repeat", default=3, type=int)
    args = ap.parse_args(argv)

    probe = Pool(chain_size=args.chain)
    huge_class_size = probe.huge_class_size
    probe.close()
    sizes, same = object_sizes(args.size, args.seed, huge_class_size)
    describe(sizes, same, args.size // PAGE)
    print("pool: chain_size %d, huge_class_size %d; best of %d runs"
          % (args.chain, huge_class_size, args.repeat))

    best = {}
    for _ in range(args.repeat):
        r = run_once(sizes, args.chain)
        pool_pages = r.pop("pool_pages")
        for k, v in r.items():
            best[k] = min(best.get(k, v), v)
    stored = sum(sizes)
    print("pool held %d frames (%.1f MiB) for %.1f MiB of objects (%.1f%%)"
          % (pool_pages, pool_pages * PAGE / 2**20, stored / 2**20,
             100.0 * stored / max(pool_pages * PAGE, 1)))
    n = len(sizes)
    print("%-14s %12s %10s" % ("phase", "ops/s", "us/op"))
    for k in ("malloc+write", "read", "free", "deferred"):
        print("%-14s %12.0f %10.2f" % (k, n / best[k], 1e6 * best[k] / n))


if __name__ == "__main__":
    main()
