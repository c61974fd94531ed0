"""Fidelity to the kernel: the same data through kernel zram and zramd.

Writes one corpus (bench/corpus.py) to /sys/block/zram0 with lz4 and to an
in-process zramd Device with lz4, then compares their mm_stat lines.  The
targets (issue "Device"): orig_data_size, same_pages and huge_pages equal;
compr_data_size within 1%; mem_used_total within 2%.

Needs root and an unused /dev/zram0 (initstate 0); it resets the device
when done.  Usage:

    /usr/bin/python3 bench/fidelity.py [--size 256M] [--algorithm lz4]

Exit status 0 when every target holds, 1 otherwise, 2 when the kernel's
zram is not available.
"""

import argparse
import mmap
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.corpus import build, parse_size  # noqa: E402
from zramd.device import Device  # noqa: E402

ZRAM = "/sys/block/zram0"
CHUNK = 1 << 20
FIELDS = ("orig_data_size", "compr_data_size", "mem_used_total", "mem_limit",
          "mem_used_max", "same_pages", "pages_compacted", "huge_pages",
          "huge_pages_since")


def sysfs(name, value=None):
    path = os.path.join(ZRAM, name)
    if value is None:
        with open(path) as f:
            return f.read()
    with open(path, "w") as f:
        f.write(value)


def kernel_mm_stat(data, algorithm):
    """Write ``data`` to /dev/zram0 with O_DIRECT; return its mm_stat."""
    sysfs("reset", "1")
    sysfs("comp_algorithm", algorithm)
    sysfs("disksize", str(len(data)))
    fd = os.open("/dev/zram0", os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, CHUNK)     # page-aligned, as O_DIRECT wants
        for off in range(0, len(data), CHUNK):
            piece = data[off:off + CHUNK]
            buf[:len(piece)] = piece
            os.pwrite(fd, memoryview(buf)[:len(piece)], off)
        buf.close()
    finally:
        os.close(fd)
    values = [int(v) for v in sysfs("mm_stat").split()]
    sysfs("reset", "1")
    return dict(zip(FIELDS, values))


def zramd_mm_stat(data, algorithm):
    dev = Device(len(data), algorithm=algorithm)
    try:
        view = memoryview(data)
        for off in range(0, len(data), CHUNK):
            dev.write(off, view[off:off + CHUNK])
        stat = dev.mm_stat()
        return {f: getattr(stat, f) for f in FIELDS}
    finally:
        dev.close()


def compare(kernel, ours):
    """Rows of (field, kernel, zramd, ratio, target, ok)."""
    targets = {"orig_data_size": 0.0, "same_pages": 0.0, "huge_pages": 0.0,
               "compr_data_size": 0.01, "mem_used_total": 0.02}
    rows = []
    for field, tol in targets.items():
        k, z = kernel[field], ours[field]
        ratio = z / k if k else (1.0 if z == 0 else float("inf"))
        ok = abs(z - k) <= tol * k if tol else z == k
        target = "equal" if not tol else "within %d%%" % round(tol * 100)
        rows.append((field, k, z, ratio, target, ok))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description="kernel zram vs zramd mm_stat")
    ap.add_argument("--size", default="256M", type=parse_size)
    ap.add_argument("--algorithm", default="lz4")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or not os.path.isdir(ZRAM):
        print("fidelity: kernel zram at %s needs root; skipped" % ZRAM)
        return 2
    if sysfs("initstate").strip() != "0":
        print("fidelity: /dev/zram0 is in use; skipped")
        return 2
    data = build(args.size)
    kernel = kernel_mm_stat(data, args.algorithm)
    ours = zramd_mm_stat(data, args.algorithm)
    rows = compare(kernel, ours)
    print("corpus %d MiB, %s" % (args.size >> 20, args.algorithm))
    print("%-16s %14s %14s %8s  %-10s %s" % ("field", "kernel", "zramd",
                                            "ratio", "target", "ok"))
    for field, k, z, ratio, target, ok in rows:
        print("%-16s %14d %14d %8.4f  %-10s %s" % (field, k, z, ratio, target,
                                                   "yes" if ok else "NO"))
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
