"""Instructions per operation of the in-process Device, under callgrind.

The measure of docs/benchmarks.md: a fresh ``Device(8 MiB)`` filled with
the corpus (bench/corpus.py), then 4000 random 4 KiB reads or writes, or
64 requests of 256 KiB read or written in order; the same run with no
operations is subtracted, and the difference divided by the operations
(by the sectors for the 256 KiB rows).  Crew threads are included.  The
count does not depend on the machine's load.  Usage:

    /usr/bin/python3 bench/callgrind.py [--algorithm lz4 zstd] [--ops ...]

It runs valgrind on itself (``--child``) once per row and once per
algorithm with no operations; each run takes a minute or so.
"""

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SIZE = 8 << 20
PAGE = 4096
OPS = {"randread": 4000, "randwrite": 4000, "seqread": 64, "seqwrite": 64}
ROWS = (("randread", "4 KiB random read"),
        ("randwrite", "4 KiB random write"),
        ("seqread", "256 KiB sequential read, per sector"),
        ("seqwrite", "256 KiB sequential write, per sector"))


def child(algorithm, op, count):
    from bench import corpus
    from zramd.device import Device
    data = corpus.build(SIZE)
    dev = Device(SIZE, algorithm=algorithm)
    for pos in range(0, SIZE, 256 << 10):
        dev.write(pos, data[pos:pos + (256 << 10)])
    rng = random.Random(7)
    pages = SIZE // PAGE
    if op == "randread":
        buf = bytearray(PAGE)
        for _ in range(count):
            dev.read_into(rng.randrange(pages) * PAGE, buf)
    elif op == "randwrite":
        for _ in range(count):
            src = rng.randrange(pages) * PAGE
            dev.write(rng.randrange(pages) * PAGE, data[src:src + PAGE])
    elif op == "seqread":
        buf = bytearray(256 << 10)
        for k in range(count):
            dev.read_into((k * len(buf)) % SIZE, buf)
    elif op == "seqwrite":
        n = 256 << 10
        for k in range(count):
            pos = (k * n + (n >> 1)) % (SIZE - n)   # other pages than there
            dev.write((k * n) % SIZE, data[pos:pos + n])
    dev.close()


def instructions(algorithm, op, count):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file="
                        + out, sys.executable, os.path.abspath(__file__),
                        "--child", algorithm, op, str(count)],
                       check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, cwd=REPO)
        with open(out) as f:
            for line in f:
                m = re.match(r"(?:summary|totals): (\d+)", line)
                if m:
                    return int(m.group(1))
    raise RuntimeError("no totals in callgrind output")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--algorithm", nargs="+", default=["lz4", "zstd"])
    ap.add_argument("--ops", nargs="+", default=list(OPS))
    args = ap.parse_args(argv)
    if args.child:
        algorithm, op, count = args.child
        child(algorithm, op, int(count))
        return 0
    for algorithm in args.algorithm:
        base = instructions(algorithm, "randread", 0)
        for op, title in ROWS:
            if op not in args.ops:
                continue
            n = OPS[op]
            sectors = n * 64 if op.startswith("seq") else n
            per = (instructions(algorithm, op, n) - base) / sectors
            print("%s\t%s\t%.0f" % (algorithm, title, per), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
