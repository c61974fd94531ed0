"""Stats are an interface: the kernel's names, order and text formats.

Each record is a frozen dataclass whose fields are the kernel's columns in
the kernel's order, and whose ``str()`` is byte for byte the line the kernel
prints (drivers/block/zram/zram_drv.c: mm_stat_show, io_stat_show,
debug_stat_show; mm/zsmalloc.c: zs_stats_size_show for the debugfs
``classes`` file).  A column never moves; a retired one prints 0, as the
kernel prints a literal ``0`` for invalid_io.  Values are bytes where the
kernel prints bytes and counts where it prints counts.
"""

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class MmStat:
    """/sys/block/zramN/mm_stat."""

    orig_data_size: int
    compr_data_size: int
    mem_used_total: int
    mem_limit: int
    mem_used_max: int
    same_pages: int
    pages_compacted: int
    huge_pages: int
    huge_pages_since: int

    def __str__(self):
        # "%8llu %8llu %8llu %8lu %8ld %8llu %8lu %8llu %8llu\n"
        return " ".join("%8d" % getattr(self, f.name) for f in fields(self)) + "\n"


@dataclass(frozen=True)
class IoStat:
    """/sys/block/zramN/io_stat; invalid_io was retired and prints 0."""

    failed_reads: int
    failed_writes: int
    invalid_io: int
    notify_free: int

    def __str__(self):
        # "%8llu %8llu 0 %8llu\n": the retired column is a bare 0.
        return "%8d %8d 0 %8d\n" % (self.failed_reads, self.failed_writes,
                                     self.notify_free)


@dataclass(frozen=True)
class DebugStat:
    """/sys/block/zramN/debug_stat (format version 1)."""

    version: int
    miss_free: int

    def __str__(self):
        # "version: %d\n0 %8llu\n": the writestall column is retired.
        return "version: %d\n0 %8d\n" % (self.version, self.miss_free)


# Fullness-group column titles of the classes file, ZS_INUSE_RATIO_10..100.
FULLNESS_TITLES = ("10%", "20%", "30%", "40%", "50%", "60%", "70%", "80%",
                   "90%", "99%", "100%")


@dataclass(frozen=True)
class ClassStat:
    """One row of debugfs zsmalloc/<pool>/classes."""

    index: int
    size: int
    fullness: tuple          # zspages per group, ZS_INUSE_RATIO_10..100
    obj_allocated: int
    obj_used: int
    pages_used: int
    pages_per_zspage: int
    objs_per_zspage: int
    freeable: int

    def __str__(self):
        return (" %5u %5u " % (self.index, self.size)
                + "".join("%9u " % n for n in self.fullness)
                + "%13u %10u %10u %16d %8u\n" % (
                    self.obj_allocated, self.obj_used, self.pages_used,
                    self.pages_per_zspage, self.freeable))


@dataclass(frozen=True)
class PoolStats:
    """The pool's counters and its per-class table (unmerged classes)."""

    pages_compacted: int
    total_pages: int
    classes: tuple           # of ClassStat, by class index

    def __str__(self):
        out = [" %5s %5s " % ("class", "size")
               + "".join("%9s " % t for t in FULLNESS_TITLES)[:-1]
               + " %13s %10s %10s %16s %8s\n" % (
                   "obj_allocated", "obj_used", "pages_used",
                   "pages_per_zspage", "freeable")]
        out += [str(c) for c in self.classes]
        totals = [sum(c.fullness[g] for c in self.classes)
                  for g in range(len(FULLNESS_TITLES))]
        out.append("\n")
        out.append(" %5s %5s " % ("Total", "")
                   + "".join("%9u " % n for n in totals)
                   + "%13u %10u %10u %16s %8u\n" % (
                       sum(c.obj_allocated for c in self.classes),
                       sum(c.obj_used for c in self.classes),
                       sum(c.pages_used for c in self.classes), "",
                       sum(c.freeable for c in self.classes)))
        return "".join(out)


@dataclass(frozen=True)
class BdStat:
    """/sys/block/zramN/bd_stat, in 4 KiB pages."""

    bd_count: int
    bd_reads: int
    bd_writes: int

    def __str__(self):
        # "%8llu %8llu %8llu\n"
        return "%8d %8d %8d\n" % (self.bd_count, self.bd_reads, self.bd_writes)


@dataclass(frozen=True)
class PolicyStat:
    """zramd's own: what the post-processing policy has done.  Columns as
    named, one line, in the kernel's ``%8llu`` style; only ever grows."""

    runs: int
    idle_marked: int
    recompressed: int
    written_back: int
    errors: int

    def __str__(self):
        return " ".join("%8d" % getattr(self, f.name) for f in fields(self)) + "\n"
