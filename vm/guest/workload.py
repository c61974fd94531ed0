#!/usr/bin/python3
"""A swap workload whose data is checked: build RECORDS Python records
(dicts of strings, floats, ints and lists, as a real program holds them),
hashing each one as it is built, then hash them all again, twice, after
the whole set exists, so that most of them have been swapped out and read
back in between when the program runs under a memory limit smaller than
its working set.  The three digests must agree: a page swapped back as
zeros or as another page's data changes the later ones (or crashes the
interpreter, whose own objects live in the same pages).

    workload.py [--records N] [--seed S]

Prints one JSON line: records, seconds (build, each check, total), the
digest, ok, the process's peak RSS, and - read from its own cgroup v2
directory just before it exits - memory.events and memory.peak where the
kernel has them.  Exit status 0 when the digests agree, 1 when not.
Needs nothing but Python 3 (the issue 15 swap benchmark reuses it).
"""

import argparse
import hashlib
import json
import random
import resource
import sys
import time


def make_record(rng, i):
    """One record: a dict of strings, numbers and a list, about 500 bytes
    of Python objects; deterministic for a given rng state."""
    name = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz")
                   for _ in range(rng.randrange(8, 24)))
    return {
        "id": i,
        "name": name,
        "email": "%s.%d@example.org" % (name, i),
        "score": rng.random() * 1000.0,
        "ratio": rng.random(),
        "tags": [rng.choice(("red", "green", "blue", "amber", "violet"))
                 + str(rng.randrange(100)) for _ in range(rng.randrange(2, 7))],
        "history": [rng.randrange(1 << 30) for _ in range(rng.randrange(4, 12))],
        "note": "record %d of the zramd swap workload, seed-dependent %x"
                % (i, rng.getrandbits(64)),
    }


def feed(digest, record):
    """Hash one record by value (repr of its sorted items is stable)."""
    digest.update(repr(sorted(record.items())).encode())


def check(records):
    digest = hashlib.sha256()
    for record in records:
        feed(digest, record)
    return digest.hexdigest()


def cgroup_stats():
    """memory.events and memory.peak of this process's cgroup v2, or {}."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    path = next((line[3:] for line in lines if line.startswith("0::")), None)
    if path is None:
        return {}
    base = "/sys/fs/cgroup" + path.rstrip("/")
    out = {"cgroup": path}
    for name in ("memory.events", "memory.max", "memory.high",
                 "memory.peak", "memory.swap.current", "memory.swap.peak"):
        try:
            with open("%s/%s" % (base, name)) as f:
                text = f.read().strip()
        except OSError:
            continue
        if name == "memory.events":
            out[name] = {k: int(v) for k, v in
                         (line.split() for line in text.splitlines())}
        else:
            out[name] = text
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=300000)
    parser.add_argument("--seed", type=int, default=15)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    t0 = time.monotonic()
    built = hashlib.sha256()
    records = []
    for i in range(args.records):
        record = make_record(rng, i)
        feed(built, record)
        records.append(record)
    t1 = time.monotonic()
    first = check(records)
    t2 = time.monotonic()
    second = check(reversed(records[::-1]))
    t3 = time.monotonic()
    digests = [built.hexdigest(), first, second]
    ok = len(set(digests)) == 1
    result = {
        "records": args.records, "seed": args.seed, "ok": ok,
        "digest": digests[0], "digests": digests,
        "seconds": {"build": round(t1 - t0, 3), "check1": round(t2 - t1, 3),
                    "check2": round(t3 - t2, 3), "total": round(t3 - t0, 3)},
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    result.update(cgroup_stats())
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
