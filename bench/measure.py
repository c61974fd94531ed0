"""The measurements, each one client program against one system's target.

Sequential (the whole corpus, one pass each way):

- NBD systems: ``nbdcopy --allocated -S 0 CORPUS URI`` (every page is sent
  as data, zero pages included, as the kernel's block layer would hand
  them to zram) and ``nbdcopy --no-extents URI null:`` (every page is read,
  even where the server reports holes or zeroes).  nbdcopy's defaults
  otherwise: up to 4 connections when the server allows multi-conn,
  256 KiB requests, 64 in flight per connection.
- The kernel's zram: ``dd bs=1M oflag=direct`` and ``dd bs=1M iflag=direct``
  (O_DIRECT, so the page cache neither absorbs the writes nor serves the
  reads), as ``DD_STREAMS`` processes at once, each on its own quarter of
  the disk, as nbdcopy spreads its requests over 4 connections.
- A separate, untimed read of the whole disk into a file is compared with
  the corpus byte for byte.

Random 4 KiB (fio, a fixed runtime, over the whole disk pre-filled with
the corpus): ``randread`` and ``randwrite`` at queue depth 1 and 8, one job,
``--ioengine=nbd`` for NBD systems and ``--ioengine=libaio --direct=1`` on
/dev/zram0.  Written buffers are half compressible
(``buffer_compress_percentage=50``), not fio's default random bytes, which
would all be stored raw.
"""

import filecmp
import json
import os
import subprocess
import time

# Concurrent dd processes for the kernel's zram: nbdcopy's default number
# of connections.
DD_STREAMS = 4


def _run(args, **kw):
    out = subprocess.run(args, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (
            " ".join(args), out.returncode, (out.stderr or out.stdout).strip()))
    return out


def _parallel_dd(src, dst, size, flag):
    """Copy ``size`` bytes with DD_STREAMS concurrent dd processes, each
    on one contiguous share (whole MiB); return seconds taken."""
    mib = size >> 20
    share = -(-mib // DD_STREAMS)
    procs = []
    t0 = time.perf_counter()
    for first in range(0, mib, share):
        count = min(share, mib - first)
        # Source and destination offsets are equal: the corpus file and
        # the disk line up, and /dev/null ignores seek.
        procs.append(subprocess.Popen(
            ["dd", "if=" + src, "of=" + dst, "bs=1M", "count=%d" % count,
             "skip=%d" % first, "seek=%d" % first, flag + "=direct",
             "conv=notrunc", "status=none"],
            stderr=subprocess.PIPE, text=True))
    errors = []
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            errors.append(err.strip())
    seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError("dd failed: " + "; ".join(errors))
    return seconds


def seq_write(system, corpus_path, size):
    """Write the corpus to the system; return seconds taken."""
    if system.block:
        return _parallel_dd(corpus_path, system.target, size, "oflag")
    t0 = time.perf_counter()
    _run(["nbdcopy", "--allocated", "-S", "0", corpus_path, system.target])
    return time.perf_counter() - t0


def seq_read(system, size):
    """Read the whole disk, throwing the data away; return seconds."""
    if system.block:
        return _parallel_dd(system.target, "/dev/null", size, "iflag")
    t0 = time.perf_counter()
    _run(["nbdcopy", "--no-extents", system.target, "null:"])
    return time.perf_counter() - t0


def verify(system, corpus_path, scratch):
    """Read the whole disk into ``scratch`` and compare it with the corpus.
    Returns True when identical.  Removes ``scratch``."""
    if system.block:
        args = ["dd", "if=" + system.target, "of=" + scratch, "bs=1M",
                "iflag=direct", "status=none"]
    else:
        args = ["nbdcopy", "--no-extents", system.target, scratch]
    try:
        _run(args)
        return filecmp.cmp(corpus_path, scratch, shallow=False)
    finally:
        try:
            os.unlink(scratch)
        except FileNotFoundError:
            pass


def fio_random(system, rw, iodepth, runtime, size, workdir):
    """One fio run of 4 KiB ``rw`` ("randread" or "randwrite") at
    ``iodepth`` for ``runtime`` seconds.  Returns (IOPS, mean latency in
    microseconds)."""
    out_path = os.path.join(workdir, "fio-%s-%s-%d.json"
                            % (system.name, rw, iodepth))
    args = ["fio", "--name=%s-%s-qd%d" % (system.name, rw, iodepth),
            "--rw=" + rw, "--bs=4k", "--iodepth=%d" % iodepth,
            "--numjobs=1", "--time_based", "--runtime=%d" % runtime,
            "--size=%d" % size, "--norandommap", "--randrepeat=0",
            "--buffer_compress_percentage=50",
            "--output-format=json", "--output=" + out_path]
    if system.block:
        args += ["--ioengine=libaio", "--direct=1",
                 "--filename=" + system.target]
    else:
        args += ["--ioengine=nbd", "--uri=" + system.target]
    _run(args, timeout=runtime + 120)
    with open(out_path) as f:
        text = f.read()
    os.unlink(out_path)
    job = json.loads(text[text.index("{"):])["jobs"][0]
    if job.get("error"):
        raise RuntimeError("fio %s: error %s" % (args[1], job["error"]))
    side = job["read" if rw == "randread" else "write"]
    return side["iops"], side["lat_ns"]["mean"] / 1000.0
