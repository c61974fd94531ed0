"""Swap side by side: one program larger than its memory limit, swapping to
one device at a time, the same run for each swap device.

    /usr/bin/python3 bench/swap.py [--records N] [--memory-high SIZE]
        [--memory-max SIZE] [--size SIZE] [--systems NAME,...]
        [--page-cluster N] [--swap-options OPTS] [--rounds N] [--json FILE]

The program is tests/swap_workload.py (Python records built and hashed,
then hashed twice more once the kernel has swapped most of them out), run
in a memory cgroup of its own: on cgroup v2 ``memory.high`` (reclaim into
swap) under a hard ``memory.max``, swap unlimited; on cgroup v1
``memory.limit_in_bytes`` is the high value.  Its digests must agree, or
the run of that device counts as failed.

Systems, each brought up, used as the only swap area, then taken down
(one that cannot run here is listed as skipped, with the reason):

    zram-lz4, zram-zstd    the kernel's zram (zramctl)
    zramd-nbd              zramd up through nbd-client (kernel nbd)
    zramd-nbdfuse          zramd up through nbdfuse and a loop device
                           (nbd unloaded for it, as on a kernel without)
    nbdkit-sparse-nbd,     nbdkit --swap memory allocator=sparse|zstd,
    nbdkit-zstd-nbd        through nbd-client -swap (kernel nbd)

Every system is swapped on with the same ``swapon --options`` (default
``discard``, what ``zramd up`` uses unless zramd.conf says otherwise):
discards change how the kernel places swap slots, hence how many requests
the device sees, so peers given different options are not side by side.

Per system: wall time, the workload's CPU time and major faults, pages
swapped out and in (/proc/vmstat), the block device's reads, writes and
discards with the mean size and time of reads and writes
(/sys/block/DEV/stat), the server's CPU time in all and per request, and
its peak memory (VmHWM of nbdkit, plus nbdfuse's; the kernel's
mem_used_max for zram).
Wall-time ratios are against the first system that ran (zram-lz4 by
default).  Run as root, on a machine with no other swap area active.
docs/benchmarks.md has the figures and what they say.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from bench.corpus import parse_size  # noqa: E402
from zramd.config import DEFAULT_OPTIONS  # noqa: E402

WORKLOAD = os.path.join(REPO, "tests", "swap_workload.py")
PYTHON = "/usr/bin/python3"
SYSTEMS = ("zram-lz4", "zram-zstd", "zramd-nbd", "zramd-nbdfuse",
           "nbdkit-sparse-nbd", "nbdkit-zstd-nbd")
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: The zramd device's name for the run (zramd.conf written under a
#: temporary --root).
NAME = "benchswap"
PRIORITY = 100


class Skip(Exception):
    """The system cannot run here; the message says why."""


def sh(argv, check=True, timeout=300):
    proc = subprocess.run(argv, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError("%s exited %d: %s" % (
            " ".join(argv), proc.returncode,
            (proc.stderr or proc.stdout).strip()[-300:]))
    return proc


def read(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def vmstat():
    out = {}
    for line in read("/proc/vmstat").splitlines():
        key, value = line.split()
        out[key] = int(value)
    return out


def swap_areas():
    return [line.split()[0] for line in read("/proc/swaps").splitlines()[1:]]


def proc_status_kib(pid, key):
    for line in read("/proc/%d/status" % pid).splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def proc_cpu_seconds(pid):
    fields = read("/proc/%d/stat" % pid).rsplit(")", 1)[-1].split()
    if len(fields) < 13:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def block_stat(device):
    """(reads, sectors read, ms reading, writes, sectors written, ms
    writing, ms busy, discards) of /dev/DEVICE
    (Documentation/block/stat.rst; discards are 0 before Linux 4.18)."""
    f = read("/sys/block/%s/stat" % os.path.basename(device)).split()
    if len(f) < 10:
        return None
    f += ["0"] * (12 - len(f))
    return tuple(int(f[i]) for i in (0, 2, 3, 4, 6, 7, 9, 11))


def swapon(device, options):
    sh(["swapon", "-p", str(PRIORITY)]
       + (["--options=" + options] if options else []) + [device])


def kernel_nbd():
    if os.path.exists("/sys/module/nbd"):
        return True
    return sh(["modprobe", "nbd"], check=False).returncode == 0


def unload_nbd():
    if os.path.exists("/sys/module/nbd"):
        sh(["rmmod", "nbd"])


def free_nbd():
    for i in range(64):
        if os.path.exists("/sys/block/nbd%d" % i) and \
                not os.path.exists("/sys/block/nbd%d/pid" % i):
            return "/dev/nbd%d" % i
    raise RuntimeError("no free /dev/nbdN")


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("%s: not ready after %ds" % (what, timeout))
        time.sleep(0.05)


# ---------------------------------------------------------------------------
# The swap devices.  Each: up() -> swap device path; servers() -> pids whose
# memory and CPU count as the device's; memory_kib(); filter_counts() (what
# zramd's nbdkit filter served and passed on; None for the others); down().

class KernelZram:
    def __init__(self, algorithm, size, options):
        self.algorithm, self.size, self.device = algorithm, size, None
        self.options = options

    def up(self):
        if sh(["modprobe", "zram"], check=False).returncode != 0 and \
                not os.path.exists("/sys/class/zram-control"):
            raise Skip("no zram module")
        # A device just made by modprobe is probed by udev (blkid holds it
        # open), and zramctl's reset then fails with EBUSY: settle first.
        for attempt in range(10):
            sh(["udevadm", "settle"], check=False)
            proc = sh(["zramctl", "--find", "--size", str(self.size),
                       "--algorithm", self.algorithm], check=False)
            if proc.returncode == 0 or "busy" not in proc.stderr:
                break
            time.sleep(1)
        if proc.returncode != 0:
            raise RuntimeError("zramctl --find: %s" % proc.stderr.strip())
        self.device = proc.stdout.strip()
        if not self.device:
            raise Skip("zramctl --find found no free zram device")
        listed = read("/sys/block/%s/comp_algorithm"
                      % os.path.basename(self.device))
        if "[%s]" % self.algorithm not in listed:
            raise Skip("the kernel's zram has no %s (%s)"
                       % (self.algorithm, listed.strip()))
        sh(["mkswap", self.device])
        swapon(self.device, self.options)
        return self.device

    def servers(self):
        return []

    def filter_counts(self):
        return None

    def memory_kib(self):
        """mm_stat's mem_used_max: the pool's peak, in KiB."""
        words = read("/sys/block/%s/mm_stat"
                     % os.path.basename(self.device)).split()
        return int(words[4]) // 1024 if len(words) > 4 else None

    def down(self):
        if self.device:
            sh(["swapoff", self.device], check=False, timeout=900)
            sh(["zramctl", "--reset", self.device], check=False)


class Zramd:
    """zramd up from a zramd.conf of one swap device, as users do."""

    def __init__(self, attach, size, options):
        self.attach, self.size = attach, size
        self.root = tempfile.mkdtemp(prefix="zramd-bench-swap.")
        os.makedirs(os.path.join(self.root, "etc", "zramd"))
        # --root is the root of a whole system (the generator's view): the
        # configuration below it, the machine's own /proc.
        os.symlink("/proc", os.path.join(self.root, "proc"))
        write(os.path.join(self.root, "etc", "zramd", "zramd.conf"),
              "[%s]\nzram-size = %d\ncompression-algorithm = lz4\n"
              "swap-priority = %d\noptions = %s\n"
              % (NAME, self.size >> 20, PRIORITY, options))
        self.state = {}
        self.reload_nbd = False

    def up(self):
        if shutil.which("zramd") is None:
            raise Skip("zramd is not installed (./scripts/quickstart)")
        if self.attach == "nbd-client":
            if not kernel_nbd():
                raise Skip("the kernel has no nbd driver")
        elif os.path.exists("/sys/module/nbd"):
            unload_nbd()
            self.reload_nbd = True
        sh(["zramd", "up", "--root", self.root, NAME], timeout=120)
        from zramd import attach
        self.state = attach.read_state(NAME) or {}
        if self.state.get("attach") != self.attach:
            raise RuntimeError("zramd up attached through %s, not %s"
                               % (self.state.get("attach"), self.attach))
        return self.state["block_device"]

    def servers(self):
        return [p for p in (self.state.get("server_pid"),
                            self.state.get("fuse_pid")) if p]

    def memory_kib(self):
        return None

    def filter_counts(self):
        from zramd import control, paths
        try:
            return control.call(paths.control_socket(NAME),
                                "status").get("filter")
        except control.ControlError:
            return None

    def down(self):
        sh(["zramd", "down", "--root", self.root, NAME], check=False,
           timeout=900)
        shutil.rmtree(self.root, ignore_errors=True)
        if self.reload_nbd:
            sh(["modprobe", "nbd"], check=False)


class NbdkitMemory:
    """nbdkit's memory plugin through nbd-client, as its manual says to
    serve swap (--swap, nbd-client -swap)."""

    def __init__(self, allocator, size, options):
        self.allocator, self.size, self.options = allocator, size, options
        self.dir = tempfile.mkdtemp(prefix="zramd-bench-nbdkit.")
        self.sock = os.path.join(self.dir, "nbd.sock")
        self.server = self.device = None

    def up(self):
        if shutil.which("nbd-client") is None or not kernel_nbd():
            raise Skip("no nbd-client or no kernel nbd driver")
        self.log = open(os.path.join(self.dir, "nbdkit.log"), "w")
        self.server = subprocess.Popen(
            ["nbdkit", "--foreground", "--swap", "--unix", self.sock,
             "memory", str(self.size), "allocator=" + self.allocator],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        wait_for(lambda: os.path.exists(self.sock), 30, "nbdkit")
        self.device = free_nbd()
        sh(["nbd-client", "-unix", self.sock, self.device, "-block-size",
            "4096", "-swap"])
        sh(["mkswap", self.device])
        swapon(self.device, self.options)
        return self.device

    def servers(self):
        return [self.server.pid] if self.server else []

    def memory_kib(self):
        return None

    def filter_counts(self):
        return None

    def down(self):
        if self.device:
            sh(["swapoff", self.device], check=False, timeout=900)
            sh(["nbd-client", "-d", self.device], check=False)
        if self.server:
            self.server.terminate()
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def make_system(name, size, options):
    return {"zram-lz4": lambda: KernelZram("lz4", size, options),
            "zram-zstd": lambda: KernelZram("zstd", size, options),
            "zramd-nbd": lambda: Zramd("nbd-client", size, options),
            "zramd-nbdfuse": lambda: Zramd("nbdfuse", size, options),
            "nbdkit-sparse-nbd": lambda: NbdkitMemory("sparse", size,
                                                      options),
            "nbdkit-zstd-nbd": lambda: NbdkitMemory("zstd", size,
                                                    options)}[name]()


# ---------------------------------------------------------------------------
# The workload in its cgroup

class Cgroup:
    def __init__(self, label, high, top):
        self.v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
        base = "/sys/fs/cgroup" if self.v2 else "/sys/fs/cgroup/memory"
        if not os.path.isdir(base):
            raise RuntimeError("no memory cgroup controller mounted")
        self.path = os.path.join(base, "zramd-bench-%d-%s"
                                 % (os.getpid(), label))
        os.mkdir(self.path)
        if self.v2:
            control = "/sys/fs/cgroup/cgroup.subtree_control"
            if "memory" not in read(control).split():
                write(control, "+memory")
            write(os.path.join(self.path, "memory.swap.max"), "max")
            write(os.path.join(self.path, "memory.max"), str(top))
            write(os.path.join(self.path, "memory.high"), str(high))
        else:
            write(os.path.join(self.path, "memory.limit_in_bytes"), str(high))

    def procs(self):
        return os.path.join(self.path, "cgroup.procs")

    def counters(self):
        out = {}
        if self.v2:
            for line in read(os.path.join(self.path,
                                          "memory.events")).splitlines():
                key, value = line.split()
                out[key] = int(value)
            peak = read(os.path.join(self.path, "memory.peak")).strip()
            if peak.isdigit():
                out["peak_kib"] = int(peak) // 1024
        else:
            out["failcnt"] = int(read(os.path.join(
                self.path, "memory.failcnt"), "0").strip() or 0)
            out["peak_kib"] = int(read(os.path.join(
                self.path, "memory.max_usage_in_bytes"), "0").strip()
                or 0) // 1024
        return out

    def remove(self):
        for _ in range(100):
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.1)


def run_workload(records, cgroup, timeout):
    """The workload in ``cgroup``: its JSON result with wall time, CPU
    time and major faults (wait4's rusage) added."""
    proc = subprocess.Popen([PYTHON, WORKLOAD, str(records), cgroup.procs()],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.stdout.read(), proc.stderr.read()
    result = {}
    for line in out.splitlines():
        if line.startswith("{"):
            result.update(json.loads(line))
    for key in ("built", "again"):
        result.pop(key, None)
    result.update(exit=proc.returncode, wall_seconds=round(wall, 2),
                  cpu_seconds=round(usage.ru_utime + usage.ru_stime, 2),
                  major_faults=usage.ru_majflt)
    if proc.returncode != 0:
        result["stderr"] = err.strip()[-300:]
    return result


def measure(name, args):
    """Bring system ``name`` up, run the workload on it, take it down."""
    system = make_system(name, args.size, args.swap_options)
    out = {"system": name}
    try:
        device = system.up()
        if swap_areas() != [device]:
            raise RuntimeError("swap areas %s, expected only %s"
                               % (swap_areas(), device))
        sh(["sync"])
        write("/proc/sys/vm/drop_caches", "3")
        servers = system.servers()
        cpu0 = sum(proc_cpu_seconds(p) for p in servers)
        vm0, bs0 = vmstat(), block_stat(device)
        cgroup = Cgroup(name, args.memory_high, args.memory_max)
        try:
            w = run_workload(args.records, cgroup, args.timeout)
            w["cgroup"] = cgroup.counters()
        finally:
            cgroup.remove()
        vm1, bs1 = vmstat(), block_stat(device)
        out.update(w)
        out["pswpout"] = vm1["pswpout"] - vm0["pswpout"]
        out["pswpin"] = vm1["pswpin"] - vm0["pswpin"]
        if bs0 and bs1:
            reads, rsec, rms, writes, wsec, wms, busy, discards = (
                b - a for a, b in zip(bs0, bs1))
            out["device"] = {
                "reads": reads, "writes": writes, "discards": discards,
                "busy_ms": busy,
                "mean_read_kib": round(rsec / 2 / reads, 1) if reads else 0,
                "mean_write_kib": round(wsec / 2 / writes, 1)
                if writes else 0,
                "mean_read_ms": round(rms / reads, 2) if reads else 0,
                "mean_write_ms": round(wms / writes, 2) if writes else 0}
        alive = [p for p in servers if os.path.exists("/proc/%d" % p)]
        out["server_alive"] = len(alive) == len(servers)
        if servers:
            out["server_cpu_seconds"] = round(
                sum(proc_cpu_seconds(p) for p in alive) - cpu0, 2)
            requests = sum(out.get("device", {}).get(key, 0) for key in
                           ("reads", "writes", "discards"))
            if requests:
                out["server_cpu_ms_per_request"] = round(
                    1000 * out["server_cpu_seconds"] / requests, 2)
            out["server_peak_kib"] = sum(proc_status_kib(p, "VmHWM")
                                         for p in alive)
        else:
            out["server_peak_kib"] = system.memory_kib()
        out["filter"] = system.filter_counts()
        problems = []
        if not w.get("same"):
            problems.append("workload exit %s, digests %s" % (
                w.get("exit"), "differ" if "same" in w else "not printed"))
        if not out["server_alive"]:
            problems.append("a server process died")
        if out["pswpout"] == 0:
            problems.append("nothing was swapped out: the workload fits in "
                            "memory.high (more --records or less "
                            "--memory-high)")
        out["status"] = "fail" if problems else "pass"
        if problems:
            out["detail"] = "; ".join(problems)
    except Skip as e:
        out.update(status="skip", detail=str(e))
    except Exception as e:
        out.update(status="fail", detail="%s: %s" % (type(e).__name__, e))
    finally:
        system.down()
    return out


def median_run(runs):
    """Of one system's runs, the one whose wall time is the median (all
    its figures are of one real run), with every run's wall time added;
    the first failure if one failed."""
    failed = [r for r in runs if r["status"] != "pass"]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r["wall_seconds"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    out["wall_all"] = [r["wall_seconds"] for r in runs]
    return out


def table(results):
    base = next((r for r in results if r["status"] == "pass"), None)
    lines = ["| system | wall s | vs %s | pswpout | pswpin | workload CPU s "
             "| server CPU s | server peak MiB | requests (r/w/d) "
             "| server CPU ms/request | mean I/O KiB (r/w) "
             "| mean I/O ms (r/w) |" % (base["system"] if base else "-"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---|"]
    for r in results:
        if r["status"] != "pass":
            lines.append("| %s | %s: %s | | | | | | | | | | |"
                         % (r["system"], r["status"], r.get("detail", "")))
            continue
        dev = r.get("device", {})
        peak = r.get("server_peak_kib")
        spread = r.get("wall_all", [])
        lines.append("| %s | %s | %.2fx | %d | %d | %.1f | %s | %s | %s "
                     "| %s | %s | %s |" % (
            r["system"], "%.1f" % r["wall_seconds"] + (
                " (%.0f-%.0f)" % (min(spread), max(spread))
                if len(spread) > 1 else ""),
            r["wall_seconds"] / base["wall_seconds"], r["pswpout"],
            r["pswpin"], r["cpu_seconds"],
            "%.1f" % r["server_cpu_seconds"] if "server_cpu_seconds" in r
            else "(kernel)",
            "%.1f" % (peak / 1024) if peak is not None else "-",
            "%s/%s/%s" % (dev.get("reads", "-"), dev.get("writes", "-"),
                          dev.get("discards", "-")),
            r.get("server_cpu_ms_per_request", "-"),
            "%s/%s" % (dev.get("mean_read_kib", "-"),
                       dev.get("mean_write_kib", "-")),
            "%s/%s" % (dev.get("mean_read_ms", "-"),
                       dev.get("mean_write_ms", "-"))))
    return "\n".join(lines)


def targets(results):
    """Issue 15's targets, as ratios of wall time from this one run."""
    wall = {r["system"]: r["wall_seconds"] for r in results
            if r["status"] == "pass"}
    rows = []
    for what, a, b, limit, better in (
            ("zramd through kernel nbd within 1.1x of nbdkit sparse",
             "zramd-nbd", "nbdkit-sparse-nbd", 1.1, "le"),
            ("zramd at least 1.5x faster than nbdkit zstd",
             "nbdkit-zstd-nbd", "zramd-nbd", 1.5, "ge"),
            ("zramd through kernel nbd within 3x of kernel zram lz4",
             "zramd-nbd", "zram-lz4", 3.0, "le")):
        if a in wall and b in wall:
            ratio = wall[a] / wall[b]
            met = ratio <= limit if better == "le" else ratio >= limit
            rows.append({"target": what, "ratio": round(ratio, 2),
                         "limit": limit, "met": met})
        else:
            rows.append({"target": what, "ratio": None, "limit": limit,
                         "met": None})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=20000,
                   help="workload records, about 1.6 KB of Python each "
                        "(default 20000)")
    p.add_argument("--memory-high", default="12M",
                   help="the workload cgroup's memory.high (v1: its limit)")
    p.add_argument("--memory-max", default="64M",
                   help="the workload cgroup's memory.max (v2)")
    p.add_argument("--size", default="512M", help="each swap device's size")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help="comma-separated, in order (default: all: %s)"
                   % ",".join(SYSTEMS))
    p.add_argument("--page-cluster", type=int,
                   help="vm.page-cluster for the run (restored after)")
    p.add_argument("--swap-options", default=DEFAULT_OPTIONS,
                   help="swapon --options for every system, '' for none "
                        "(default %r, zramd.conf's default)"
                        % DEFAULT_OPTIONS)
    p.add_argument("--timeout", type=int, default=1800,
                   help="seconds each workload may run")
    p.add_argument("--rounds", type=int, default=1,
                   help="runs of every system; the median run of each is "
                        "reported, with the range of its wall times")
    p.add_argument("--json", help="write the results here as JSON")
    args = p.parse_args(argv)
    args.size = parse_size(args.size)
    args.memory_high = parse_size(args.memory_high)
    args.memory_max = parse_size(args.memory_max)
    names = [n for n in args.systems.split(",") if n]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        p.error("unknown system(s) %s; known: %s"
                % (", ".join(unknown), ", ".join(SYSTEMS)))
    if os.geteuid() != 0:
        p.error("needs root (swapon, cgroups, modules)")
    if swap_areas():
        p.error("swap areas already active (%s): the workload would swap "
                "there too; swapoff them first" % ", ".join(swap_areas()))
    cluster_file = "/proc/sys/vm/page-cluster"
    old_cluster = read(cluster_file).strip()
    if args.page_cluster is not None:
        write(cluster_file, str(args.page_cluster))
    run = {"records": args.records, "memory_high": args.memory_high,
           "memory_max": args.memory_max, "size": args.size,
           "page_cluster": int(read(cluster_file).strip() or -1),
           "swap_options": args.swap_options,
           "kernel": os.uname().release,
           "debian": read("/etc/debian_version").strip(),
           "cpus": os.cpu_count(), "results": []}
    try:
        runs = {name: [] for name in names}
        for turn in range(args.rounds):
            # Each round starts one system later, so that a drift of the
            # machine's speed over the run does not always favour the same.
            shift = turn % len(names)
            for name in names[shift:] + names[:shift]:
                print("bench/swap: round %d: %s ..." % (turn + 1, name),
                      file=sys.stderr, flush=True)
                r = measure(name, args)
                r["round"] = turn + 1
                runs[name].append(r)
                print("bench/swap: %s %s %s" % (
                    name, r["status"], r.get("detail") or
                    "%.1f s" % r.get("wall_seconds", 0)), file=sys.stderr,
                    flush=True)
    finally:
        write(cluster_file, old_cluster)
    run["results"] = [median_run(runs[name]) for name in names]
    run["runs"] = runs              # every run, for the spread
    run["rounds"] = args.rounds
    run["targets"] = targets(run["results"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(run, f, indent=1, sort_keys=True)
    print(table(run["results"]))
    for t in run["targets"]:
        print("%-58s %s" % (t["target"], "n/a" if t["ratio"] is None else
                            "%.2fx (%s)" % (t["ratio"],
                                            "met" if t["met"] else "not met")))
    return 0 if all(r["status"] != "fail" for r in run["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
