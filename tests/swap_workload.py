"""A program larger than its memory: builds RECORDS Python records (dicts
of strings, floats and lists, as real programs hold), hashing each as it is
built, then hashes them all again twice, after the kernel has had to swap
most of them out and back in.  Run it inside a memory cgroup smaller than
the records.

    python3 swap_workload.py [--pageout [--pause]] RECORDS [CGROUP_PROCS_FILE]

With CGROUP_PROCS_FILE the program first moves itself into that cgroup.
With --pageout it also asks the kernel to page out all its anonymous
memory once the records are built (madvise MADV_PAGEOUT, Linux 5.4+), so
they go to swap without any memory limit: no OOM killer can end the run.
With --pause it then prints {"swapped_kib": N} and waits for a line on
standard input before reading the records back.
Prints one line of JSON: records, the three digests, peak RSS, the swap
in use after the pageout (VmSwap), and whether the digests agree; exits 0 when they do, 3 when they do not (a page
came back other than it went out).  A page that cannot be read back at all
kills the program (SIGBUS), which its parent sees as the exit signal.
"""

import ctypes
import hashlib
import json
import os
import random
import resource
import sys


def record(rng, i):
    return {"id": i,
            "name": "user-%08d-%s" % (i, rng.getrandbits(40)),
            "email": "u%d@example.%s" % (i, rng.choice(("org", "net", "com"))),
            "score": rng.random() * 1000.0,
            "tags": [rng.choice(("a", "bb", "ccc", "dddd")) * rng.randint(1, 8)
                     for _ in range(rng.randint(1, 6))],
            "history": [rng.randint(0, 1 << 30) for _ in range(8)]}


def digest_of(rec, h):
    h.update(repr(sorted(rec.items())).encode())


MADV_PAGEOUT = 21


def page_out():
    """Ask the kernel to reclaim every private anonymous mapping now."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            anonymous = len(fields) < 6 or fields[5] == "[heap]"
            if anonymous and fields[1].startswith("rw") and fields[1][3] == "p":
                start, end = (int(x, 16) for x in fields[0].split("-"))
                libc.madvise(start, end - start, MADV_PAGEOUT)


def vm_swap_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSwap:"):
                return int(line.split()[1])
    return 0


def main(argv):
    pageout, pause = "--pageout" in argv, "--pause" in argv
    argv = [a for a in argv if a not in ("--pageout", "--pause")]
    count = int(argv[1])
    if len(argv) > 2:
        with open(argv[2], "w") as f:
            f.write(str(os.getpid()))
    rng = random.Random(count)
    built = hashlib.sha256()
    records = []
    for i in range(count):
        rec = record(rng, i)
        digest_of(rec, built)
        records.append(rec)
    if pageout:
        page_out()
    swapped = vm_swap_kib()
    if pause:
        print(json.dumps({"swapped_kib": swapped}), flush=True)
        sys.stdin.readline()
    again = []
    for _ in range(2):
        h = hashlib.sha256()
        for rec in records:
            digest_of(rec, h)
        again.append(h.hexdigest())
    result = {"records": count, "built": built.hexdigest(), "again": again,
              "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
              "swapped_kib": swapped,
              "same": again == [built.hexdigest()] * 2}
    print(json.dumps(result), flush=True)
    return 0 if result["same"] else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv))
