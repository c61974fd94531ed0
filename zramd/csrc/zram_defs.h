/*
 * zram_defs.h: every layout, flag and size constant zramd's C and Python
 * share, defined once.  The extension module exports each of them by
 * name (zramd._fastpath.PAGE_SIZE, ...); the Python modules import them
 * from there and define none of their own.
 *
 * Three groups, one per layer:
 *
 *   page        PAGE_SIZE, the unit of everything below
 *   slot table  zram's slot word (drivers/block/zram/zram_drv.h): object
 *               size in the low bits, then the flags, the compression
 *               priority and zramd's dictionary id; the stripes of slot
 *               locks and the per-stripe counter columns
 *   pool        zsmalloc's size classes, fullness groups and handle and
 *               object layout (mm/zsmalloc.c on 4 KiB pages); the frame
 *               arena's chunks; the deferred-free queue
 *
 * The slot word of zram_drv.h's zram_table_entry.flags, as zramd packs it:
 *
 *   31       29 28        21 20  19 18    17   16   15   14  13 12        0
 *   +---------+------------+------+-----+----+----+----+----+---+---------+
 *   | unused  | dict id    | prio |INCOM|IDLE|HUGE| PP | WB |SAM| size    |
 *   +---------+------------+------+-----+----+----+----+----+---+---------+
 */
#ifndef ZRAMD_ZRAM_DEFS_H
#define ZRAMD_ZRAM_DEFS_H

/* ---- page ---------------------------------------------------------------- */

#define PAGE_SHIFT 12
#define PAGE_SIZE (1 << PAGE_SHIFT)
#define PAGE_MASK (PAGE_SIZE - 1)

/* ---- slot table ------------------------------------------------------------ */

/* Flags sit above the size, which needs PAGE_SHIFT + 1 bits (0..4096). */
#define ZRAM_FLAG_SHIFT (PAGE_SHIFT + 1)
#define SIZE_MASK ((1 << ZRAM_FLAG_SHIFT) - 1)
#define ZRAM_SAME (1 << (ZRAM_FLAG_SHIFT + 0))   /* one repeated 8-byte value */
#define ZRAM_WB (1 << (ZRAM_FLAG_SHIFT + 1))     /* on the backing device */
#define ZRAM_PP_SLOT (1 << (ZRAM_FLAG_SHIFT + 2)) /* chosen for post-processing */
#define ZRAM_HUGE (1 << (ZRAM_FLAG_SHIFT + 3))   /* stored raw: did not compress */
#define ZRAM_IDLE (1 << (ZRAM_FLAG_SHIFT + 4))   /* not accessed since marking */
#define ZRAM_INCOMPRESSIBLE (1 << (ZRAM_FLAG_SHIFT + 5)) /* no algorithm could */
/* Flags that change while the page stays the same (an access, the
 * bookkeeping of post-processing): ignored when a read-modify-write checks
 * that the slot still holds what it read. */
#define SAME_PAGE_FLAGS (ZRAM_IDLE | ZRAM_PP_SLOT | ZRAM_INCOMPRESSIBLE)
/* Two bits: which algorithm compressed the page (0: the primary). */
#define COMP_PRIORITY_SHIFT (ZRAM_FLAG_SHIFT + 6)
#define COMP_PRIORITY_MASK (3 << COMP_PRIORITY_SHIFT)
#define MAX_PRIORITIES 4         /* the primary and three secondary */
/* zramd's own: which trained primary dictionary compressed it (0: none). */
#define DICT_SHIFT (ZRAM_FLAG_SHIFT + 8)
#define MAX_DICTS 256
#define DICT_MASK ((MAX_DICTS - 1) << DICT_SHIFT)

/* Stripes of slot locks: enough that two cores rarely meet, few enough to
 * keep the per-stripe counter rows small. */
#define N_STRIPES 64
#define STRIPE_MASK (N_STRIPES - 1)

/* Per-stripe counter columns (a row of N_COUNTERS per stripe). */
#define C_PAGES_STORED 0   /* allocated slots (orig_data_size / 4096) */
#define C_COMPR_SIZE 1     /* bytes of stored objects (huge count 4096) */
#define C_SAME_PAGES 2
#define C_HUGE_PAGES 3
#define C_HUGE_SINCE 4     /* pages ever stored huge */
#define C_NOTIFY_FREE 5    /* sectors freed by discard / write-zeroes */
#define C_NUM_READS 6      /* sectors read */
#define C_NUM_WRITES 7     /* sectors written */
#define C_PRIO_PAGES 8     /* + priority - 1: pages of priority 1..3 */
#define N_COUNTERS (C_PRIO_PAGES + MAX_PRIORITIES - 1)

/* ---- pool ------------------------------------------------------------------ */

/* Size classes (mm/zsmalloc.c): 32..4096 bytes in steps of 16; the size
 * that picks a class includes an 8-byte handle header. */
#define ZS_MIN_ALLOC_SIZE 32
#define ZS_MAX_ALLOC_SIZE PAGE_SIZE
#define ZS_HANDLE_SIZE 8
#define CLASS_BITS 8
#define ZS_SIZE_CLASS_DELTA (PAGE_SIZE >> CLASS_BITS)
#define ZS_SIZE_CLASSES \
    ((ZS_MAX_ALLOC_SIZE - ZS_MIN_ALLOC_SIZE + ZS_SIZE_CLASS_DELTA - 1) \
     / ZS_SIZE_CLASS_DELTA + 1)
/* Most frames in one zspage (the kernel's CONFIG_ZSMALLOC_CHAIN_SIZE). */
#define CHAIN_SIZE_MIN 4
#define CHAIN_SIZE_MAX 16
#define CHAIN_SIZE_DEFAULT 8

/* Fullness groups, as enum fullness_group: 0 empty, 10%..90% and 99%
 * (1..10), 100% (11). */
#define ZS_INUSE_RATIO_0 0
#define ZS_INUSE_RATIO_10 1
#define ZS_INUSE_RATIO_99 10
#define ZS_INUSE_RATIO_100 11
#define NR_FULLNESS_GROUPS 12
/* A zspage's group when it is on no list. */
#define ZS_ISOLATED 254          /* off its list while compaction works */
#define ZS_FREE 255              /* released: its id waits for reuse */

/* Object and handle layout: a handle is row << HANDLE_CLASS_BITS | class
 * index; a row locates zspage << OBJ_INDEX_BITS | object index; an
 * allocated object's header is handle << 1 | OBJ_ALLOCATED_TAG. */
#define OBJ_INDEX_BITS 12        /* objects per zspage <= 256 */
#define OBJ_INDEX_MASK ((1 << OBJ_INDEX_BITS) - 1)
#define OBJ_ALLOCATED_TAG 1
#define HANDLE_CLASS_BITS 8
#define HANDLE_CLASS_MASK ((1 << HANDLE_CLASS_BITS) - 1)

/* Frames come from mmap chunks of 1 << CHUNK_SHIFT frames (32 MiB). */
#define CHUNK_SHIFT 13
#define CHUNK_FRAMES (1 << CHUNK_SHIFT)
#define CHUNK_MASK (CHUNK_FRAMES - 1)
/* After this many frames (32 MiB) are given back since the high mark, the
 * C heap that held their bookkeeping is trimmed too (malloc_trim). */
#define TRIM_FRAMES 8192

/* Deferred free, as "mm/zsmalloc: reduce zs_free() latency on swap release
 * path": 128 MiB worth of 4 KiB pages of handles, and how long the worker
 * lets a lone handle wait for company (ms). */
#define DEFERRED_CAPACITY ((128 << 20) >> PAGE_SHIFT)
#define DEFERRED_IDLE_DELAY_MS 50

#endif
