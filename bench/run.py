"""The benchmark harness: zramd beside kernel zram and nbdkit's memory
plugin, in one run.

Builds the corpus (bench/corpus.py) in /dev/shm, then for each system in
bench/systems.py starts a fresh disk of the corpus size and measures
sequential write and read of the whole corpus (checking the data read
back), memory after the fill, and 4 KiB random read and write at queue
depth 1 and 8 (bench/measure.py).  Prints a table and the targets of
issue 7, and writes docs/benchmarks.md and docs/benchmarks.png
(bench/report.py).  Usage:

    /usr/bin/python3 bench/run.py [--size 256M] [--quick]
                                  [--systems zramd-lz4,nbdkit-zstd,...]
                                  [--repeat N] [--json results.json]
                                  [--no-docs]

Needs nbdkit (memory and python plugins), nbdcopy (libnbd-bin), fio with
its nbd engine, and matplotlib (python3-matplotlib) for the plot.  The
kernel's zram is used when /sys/block/zram0 exists, is unused and we are
root; it is reset afterwards.  Exit status 0 when every system that ran
returned its data intact, 1 otherwise (targets do not affect it).
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import corpus as corpus_mod  # noqa: E402
from bench import measure, report, systems  # noqa: E402

DOCS = os.path.join(REPO, "docs")
PAGE = 4096


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def check_tools(need_plot):
    missing = [t for t in ("nbdkit", "nbdcopy", "fio", "dd")
               if shutil.which(t) is None]
    if missing:
        sys.exit("bench/run.py: missing programs: %s (apt-get install -y "
                 "nbdkit libnbd-bin fio)" % ", ".join(missing))
    if need_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit("bench/run.py: matplotlib is missing, needed for the "
                     "plot: apt-get install -y python3-matplotlib "
                     "(or pass --no-plot)")


def first_line(args):
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) >> 20
    return ("%d CPUs (nproc), %s, %d GiB RAM; Linux %s; %s; %s; %s; "
            "Python %s" % (os.cpu_count(), cpu, mem, platform.release(),
                           first_line(["nbdkit", "--version"]),
                           first_line(["nbdcopy", "--version"]),
                           first_line(["fio", "--version"]),
                           platform.python_version()))


def zram_algorithms():
    try:
        with open(os.path.join(systems.ZRAM, "comp_algorithm")) as f:
            return f.read().strip()
    except OSError:
        return "no /sys/block/zram0"


def load_average():
    return "%.2f %.2f %.2f" % os.getloadavg()


def corpus_counts(data):
    """Zero, other same-filled, and remaining pages of the corpus."""
    zero = same = 0
    zpage = bytes(PAGE)
    pages = len(data) // PAGE
    for i in range(pages):
        page = data[i * PAGE:(i + 1) * PAGE]
        if page == zpage:
            zero += 1
        elif page == page[:8] * (PAGE // 8):
            same += 1
    other = pages - zero - same
    pct = lambda n: 100.0 * n / pages  # noqa: E731
    return ("%d pages: %d zero-filled (%.1f%%), %d other same-filled "
            "(%.1f%%), %d real or random data (%.1f%%)"
            % (pages, zero, pct(zero), same, pct(same), other, pct(other)))


def corpus_doc():
    """The make-up paragraph of bench/corpus.py's docstring."""
    doc = corpus_mod.__doc__ or ""
    start = doc.find("Make-up")
    end = doc.find("The mix")
    if start < 0 or end <= start:
        return doc.strip() or "(bench/corpus.py has no description)"
    return doc[start:end].strip()


def run_system(system, corpus_path, size, runtime, workdir):
    """Measure one system; return its result dict."""
    result = {"name": system.name, "label": system.label,
              "algorithm": system.algorithm, "skipped": None, "error": None,
              "write_mbs": None, "read_mbs": None, "verified": None,
              "rss_before": None, "rss_after": None, "rss_growth": None,
              "mm_stat": None, "fio": {}}
    try:
        reason = system.available()
    except Exception as exc:
        reason = "cannot tell whether it is available: %s" % exc
    if reason:
        result["skipped"] = reason
        log("%s: skipped: %s" % (system.name, reason))
        return result
    log("%s: starting" % system.name)
    # A directory of its own per measurement: sockets are not reused.
    workdir = tempfile.mkdtemp(prefix=system.name + "-", dir=workdir)
    try:
        system.start(workdir, size)
        if system.pid:
            result["rss_before"] = systems.vm_rss(system.pid)
        seconds = measure.seq_write(system, corpus_path, size)
        result["write_mbs"] = size / seconds / 1e6
        if system.pid:
            result["rss_after"] = systems.vm_rss(system.pid)
            result["rss_growth"] = result["rss_after"] - result["rss_before"]
        result["mm_stat"] = system.mm_stat()
        log("%s: write %.1f MB/s" % (system.name, result["write_mbs"]))
        seconds = measure.seq_read(system, size)
        result["read_mbs"] = size / seconds / 1e6
        log("%s: read %.1f MB/s" % (system.name, result["read_mbs"]))
        result["verified"] = measure.verify(
            system, corpus_path, os.path.join(workdir, "readback.bin"))
        if not result["verified"]:
            log("%s: DATA READ BACK DIFFERS FROM THE CORPUS" % system.name)
        for rw in ("randread", "randwrite"):
            for qd in (1, 8):
                iops, lat = measure.fio_random(system, rw, qd, runtime,
                                               size, workdir)
                result["fio"]["%s-%d" % (rw, qd)] = (iops, lat)
                log("%s: %s QD%d %.0f IOPS, %.1f us"
                    % (system.name, rw, qd, iops, lat))
    except Exception as exc:    # one system's failure must not end the run
        result["error"] = "%s: %s" % (type(exc).__name__,
                                      str(exc).strip().splitlines()[0]
                                      if str(exc).strip() else "")
        log("%s: error: %s" % (system.name, exc))
    finally:
        try:
            system.stop()
        except Exception as exc:
            log("%s: stop failed: %s" % (system.name, exc))
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def merge(runs):
    """One result from repeated runs of a system: the median of each speed
    figure; memory from the first run (the same bytes give the same
    mm_stat); verified only if every run read its data back intact."""
    first = dict(runs[0])
    ok = [r for r in runs if not r.get("skipped") and not r.get("error")]
    if len(runs) == 1 or not ok:
        first["runs"] = len(ok)
        return first
    first["runs"] = len(ok)
    for key in ("write_mbs", "read_mbs"):
        first[key] = statistics.median(r[key] for r in ok)
    first["fio"] = {
        key: (statistics.median(r["fio"][key][0] for r in ok),
              statistics.median(r["fio"][key][1] for r in ok))
        for key in ok[0]["fio"]}
    first["verified"] = all(r.get("verified") for r in ok)
    errors = [r["error"] for r in runs if r.get("error")]
    if errors:
        first["error"] = errors[0]
    return first


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="zramd vs kernel zram vs nbdkit memory, one run")
    ap.add_argument("--size", default="256M", type=corpus_mod.parse_size,
                    help="corpus and disk size (default 256M)")
    ap.add_argument("--quick", action="store_true",
                    help="3 s per random I/O test instead of 10 s")
    ap.add_argument("--runtime", type=int,
                    help="seconds per random I/O test (overrides --quick)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure each system N times (fresh disk each "
                         "time) and report the medians")
    ap.add_argument("--seed", type=int, default=1, help="corpus seed")
    ap.add_argument("--systems",
                    help="comma-separated subset of: " + ", ".join(
                        s.name for s in systems.all_systems()))
    ap.add_argument("--md", default=os.path.join(DOCS, "benchmarks.md"),
                    help="markdown output (default docs/benchmarks.md)")
    ap.add_argument("--png", default=os.path.join(DOCS, "benchmarks.png"),
                    help="plot output (default docs/benchmarks.png)")
    ap.add_argument("--no-docs", action="store_true",
                    help="print the table only; write neither file")
    ap.add_argument("--json", metavar="PATH",
                    help="also write the raw results as JSON (for "
                         "before/after comparisons)")
    ap.add_argument("--no-plot", action="store_true",
                    help="skip the plot (matplotlib not needed)")
    ap.add_argument("--server-threads", type=int, metavar="N",
                    help="nbdkit worker threads per connection for zramd "
                         "(default: as zramd up runs it)")
    args = ap.parse_args(argv)
    if args.size <= 0 or args.size % (1 << 20):
        ap.error("--size must be a positive multiple of 1 MiB")
    runtime = args.runtime or (3 if args.quick else 10)
    plot_path = None if (args.no_plot or args.no_docs) else args.png
    check_tools(plot_path is not None)

    chosen = systems.all_systems()
    if args.systems:
        wanted = args.systems.split(",")
        unknown = set(wanted) - {s.name for s in chosen}
        if unknown:
            ap.error("unknown systems: %s" % ", ".join(sorted(unknown)))
        chosen = [s for s in chosen if s.name in wanted]
    for system in chosen:
        if hasattr(system, "threads"):
            system.threads = args.server_threads

    started = time.monotonic()
    load_before = load_average()
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    workdir = tempfile.mkdtemp(prefix="zramd-bench-", dir=base)
    try:
        log("building a %d MiB corpus" % (args.size >> 20))
        data = corpus_mod.build(args.size, args.seed)
        corpus_path = os.path.join(workdir, "corpus.bin")
        with open(corpus_path, "wb") as f:
            f.write(data)
        counts = corpus_counts(data)
        del data
        results = []
        for system in chosen:
            runs = []
            for _ in range(max(args.repeat, 1)):
                runs.append(run_system(system, corpus_path, args.size,
                                       runtime, workdir))
                if runs[-1].get("skipped"):
                    break
            results.append(merge(runs))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    targets = report.evaluate_targets(results, args.size)
    print(report.text_table(results, args.size))
    print()
    print(report.text_targets(targets))

    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short",
                                 "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "?"
    except FileNotFoundError:       # no git (a release root): say so
        commit = "?"
    info = {"corpus_size": args.size, "runtime": runtime,
            "repeat": max(args.repeat, 1),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "commit": commit,
            "command": ("/usr/bin/python3 bench/run.py " + " ".join(
                shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                         else argv))).strip(),
            "machine": machine(), "zram_algorithms": zram_algorithms(),
            "load_before": load_before,
            "load_after": load_average(),
            "elapsed": time.monotonic() - started,
            "corpus_doc": corpus_doc(), "corpus_counts": counts}
    if not args.no_docs:
        header = report.split_header(args.md)
        png_name = None
        if plot_path:
            report.plot(results, plot_path,
                        "zramd benchmarks, %d MiB corpus, %s"
                        % (args.size >> 20, info["date"]))
            png_name = os.path.relpath(plot_path, os.path.dirname(
                os.path.abspath(args.md)))
        with open(args.md, "w") as f:
            f.write(report.markdown(results, targets, info, header, png_name))
        log("wrote %s%s" % (args.md, " and " + plot_path if plot_path else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results, "targets": targets},
                      f, indent=1, default=str)
    bad = [r for r in results if r.get("error") or r.get("verified") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
