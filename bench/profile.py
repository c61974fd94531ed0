"""Profile zramd's hot paths with py-spy: a sequential write of the corpus
and 4 KiB random reads, sampled in the nbdkit process serving plugin.py.

Starts one zramd server (tests/nbdkit_server.py), attaches
``py-spy record --format raw --function`` to it for each phase, and
prints the top functions by own time ("self", the sampled frame is this
function) and by inclusive time ("total", the function is anywhere on the
stack), as a share of the samples of that phase.  Samples where a thread
is idle (waiting for a request, or for the GIL) are left out by py-spy,
so the shares are of the CPU the server spent.  Usage:

    /usr/bin/python3 bench/profile.py [--size 256M] [--algorithm lz4]
                                      [--seconds 10] [--top 15] [--keep DIR]
                                      [--native]

py-spy is a standalone binary (``pip install py-spy``); it must be on
PATH or given with --py-spy.  The raw stacks are kept in --keep DIR (for
a flame graph: ``py-spy`` writes SVG with ``--format flamegraph``).
"""

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import corpus as corpus_mod  # noqa: E402
from bench import measure, systems  # noqa: E402


def parse_raw(path):
    """(samples, self Counter, total Counter) of a py-spy raw file, keyed
    by "function (file)" with the repository prefix removed.

    Left out: the control channel's accept thread (blocked in accept(),
    which py-spy does not always recognise as idle) and stacks without a
    Python frame (nbdkit's main thread in poll())."""
    own = collections.Counter()
    total = collections.Counter()
    samples = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or "_accept_loop" in stack or ".py:" not in stack:
                continue
            n = int(count)
            frames = [short(fr) for fr in stack.split(";")]
            frames = fold_waits(frames)
            samples += n
            own[frames[-1]] += n
            for fr in set(frames):
                total[fr] += n
    return samples, own, total


# Native leaves (under --native) that are a thread waiting, not working:
# py-spy's idle filter does not apply to native stacks.
WAITS = (("pthread_cond_timedwait", "[wait for the GIL]"),
         ("PyThread_acquire_lock_timed", "[wait for a threading lock]"))


def fold_waits(frames):
    """Replace the native frames below the last Python frame by one
    "[wait ...]" frame when they are a wait."""
    last_py = max(i for i, fr in enumerate(frames) if ".py:" in fr)
    tail = frames[last_py + 1:]
    for needle, name in WAITS:
        if any(needle in fr for fr in tail):
            return frames[:last_py + 1] + [name]
    return frames


def short(frame):
    """Drop the repository prefix; name anonymous native frames by their
    library only ("0x7f.. (libc.so.6)" -> "[native] (libc.so.6)")."""
    if frame.startswith("0x"):
        return "[native] " + frame.split(" ", 1)[-1]
    return frame.replace(REPO + "/", "")


def record(py_spy, pid, out, rate, action, native=False):
    """Sample ``pid`` while ``action()`` runs."""
    spy = subprocess.Popen([py_spy, "record", "-p", str(pid), "-o", out,
                            "--format", "raw", "--function", "-r", str(rate)]
                           + (["--native"] if native else []),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    time.sleep(1.0)             # let py-spy attach
    if spy.poll() is not None:
        raise RuntimeError("py-spy failed: " + spy.stderr.read().strip())
    try:
        action()
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            _, err = spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.communicate()
            err = ""
    if not os.path.exists(out):
        raise RuntimeError("py-spy wrote no profile: " + err.strip())


def top(title, path, n):
    samples, own, total = parse_raw(path)
    lines = ["%s: %d samples" % (title, samples),
             "  %6s %6s  %s" % ("self%", "total%", "function (file)")]
    if not samples:
        return "\n".join(lines)
    shown = [k for k, _ in own.most_common(n)]
    shown += [k for k, _ in total.most_common(n) if k not in shown
              and not k.startswith(("<module>", "process", "thread"))][:5]
    for key in shown:
        lines.append("  %6.1f %6.1f  %s" % (100.0 * own[key] / samples,
                                            100.0 * total[key] / samples, key))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description="py-spy profile of zramd")
    ap.add_argument("--size", default="256M", type=corpus_mod.parse_size)
    ap.add_argument("--algorithm", default="lz4")
    ap.add_argument("--seconds", type=int, default=10,
                    help="random-read phase length")
    ap.add_argument("--iodepth", type=int, default=1)
    ap.add_argument("--rate", type=int, default=500, help="samples/s")
    ap.add_argument("--native", action="store_true",
                    help="also sample C frames (lz4, zstd, libc, the "
                         "nbdkit python glue); slows the server down")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--keep", help="directory to keep the raw profiles in")
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    args = ap.parse_args(argv)
    if not shutil.which(args.py_spy) and not os.path.exists(args.py_spy):
        sys.exit("bench/profile.py: py-spy not found (pip install py-spy)")

    workdir = tempfile.mkdtemp(prefix="zramd-profile-", dir="/dev/shm")
    keep = args.keep or workdir
    os.makedirs(keep, exist_ok=True)
    system = systems.Zramd(args.algorithm)
    try:
        corpus_path = os.path.join(workdir, "corpus.bin")
        with open(corpus_path, "wb") as f:
            f.write(corpus_mod.build(args.size))
        system.start(workdir, args.size)
        write_prof = os.path.join(keep, "write-%s.txt" % args.algorithm)
        read_prof = os.path.join(keep, "randread-%s.txt" % args.algorithm)
        seconds = []
        record(args.py_spy, system.pid, write_prof, args.rate,
               lambda: seconds.append(
                   measure.seq_write(system, corpus_path, args.size)),
               args.native)
        iops = []
        record(args.py_spy, system.pid, read_prof, args.rate,
               lambda: iops.append(measure.fio_random(
                   system, "randread", args.iodepth, args.seconds,
                   args.size, workdir)), args.native)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        system.stop()
    print("zramd %s, %d MiB corpus (under py-spy at %d samples/s%s)"
          % (args.algorithm, args.size >> 20, args.rate,
             ", native" if args.native else ""))
    print(top("sequential write, %.1f MB/s"
              % (args.size / seconds[0] / 1e6), write_prof, args.top))
    print(top("4 KiB random read QD%d, %.0f IOPS, %.1f us"
              % (args.iodepth, iops[0][0], iops[0][1]), read_prof, args.top))
    if args.keep:
        print("raw stacks in %s" % keep)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
