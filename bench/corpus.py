"""Build the benchmark corpus: real data as swap and disks see it.

Make-up, in 4 KiB pages, interleaved in runs so that no system benefits from
one long uniform stretch:

- 60%  real files: a tar stream of /usr/lib/python3.11 (text and .pyc),
       followed by shared libraries from /usr/lib/x86_64-linux-gnu (.so);
- 25%  zero-filled pages (the most common page in swap);
- 5%   other same-filled pages (an 8-byte pattern repeated);
- 10%  random bytes (already compressed data: media, encrypted blobs).

The mix is deterministic for a given size and seed, so two runs and two
systems see the same bytes.  Usage:

    /usr/bin/python3 bench/corpus.py OUT [--size 256M] [--seed 1]
"""

import argparse
import glob
import io
import os
import random
import sys
import sysconfig
import tarfile

PAGE = 4096
RUN_PAGES = 16          # pages per run of one kind


def parse_size(text):
    """Bytes of "512M", "1.5G", "64MiB" or "4096"."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("B").rstrip("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def real_data(limit):
    """Up to ``limit`` bytes of real files: a tar of the running Python's
    stdlib (so Debian 12 and 13 corpora differ), then shared libraries."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(sysconfig.get_paths()["stdlib"], recursive=True,
                filter=lambda info: info if buf.tell() < limit else None)
    data = bytearray(buf.getvalue()[:limit])
    for path in sorted(glob.glob("/usr/lib/x86_64-linux-gnu/*.so*")):
        if len(data) >= limit:
            break
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "rb") as f:
                data += f.read(limit - len(data))
    if len(data) < limit:
        # Small machine: repeat what there is rather than invent data.
        data = (data * (limit // max(len(data), 1) + 1))[:limit]
    return bytes(data)


def build(size, seed=1):
    """Return ``size`` bytes (a multiple of 4096) of corpus."""
    if size % PAGE:
        raise ValueError("size must be a multiple of 4096")
    rng = random.Random(seed)
    pages = size // PAGE
    real = real_data(int(pages * 0.6 + RUN_PAGES) * PAGE)
    real_pos = 0
    out = bytearray()
    while len(out) < size:
        n = min(RUN_PAGES, (size - len(out)) // PAGE)
        kind = rng.random()
        if kind < 0.60:
            chunk = real[real_pos:real_pos + n * PAGE]
            if len(chunk) < n * PAGE:
                real_pos = 0
                chunk = real[:n * PAGE]
            real_pos += n * PAGE
        elif kind < 0.85:
            chunk = bytes(n * PAGE)
        elif kind < 0.90:
            chunk = rng.getrandbits(64).to_bytes(8, "little") * (n * PAGE // 8)
        else:
            chunk = rng.randbytes(n * PAGE)
        out += chunk
    return bytes(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--size", default="256M", type=parse_size)
    ap.add_argument("--seed", default=1, type=int)
    args = ap.parse_args(argv)
    data = build(args.size, args.seed)
    with open(args.out, "wb") as f:
        f.write(data)
    print("%s: %d bytes" % (args.out, len(data)), file=sys.stderr)


if __name__ == "__main__":
    main()
