/*
 * zram.h: the slot table and the I/O paths of a device, as
 * drivers/block/zram/zram_drv.c has them, over a pool (zsmalloc.h) and
 * the C codecs (zcomp.h).  Nothing here touches Python.
 *
 * A device of nr_pages 4 KiB sectors ("slots") keeps per slot a handle
 * (a pool handle, the 8-byte fill value of a SAME slot, or a WB slot's
 * block on the backing device, read with pread from the descriptor the
 * caller gives), the slot word of zram_defs.h (size,
 * flags, compression priority, dictionary id) and the second of its last
 * access.  Slot i is guarded by the mutex of stripe i % N_STRIPES, which
 * also guards that stripe's row of counters and of dictionary
 * references.  The codec table (the primary codec by dictionary id) is
 * guarded by codec_lock: read-held by a request for all of its work,
 * write-held, with every stripe, to change it (zram_lock_all).
 *
 * Lock order: codec_lock, then one stripe (or all, by index), then the
 * pool's.
 *
 * Requests (zram_read, zram_write, zram_read_part, zram_patch,
 * zram_discard) take their own locks and do what they can in C; a sector
 * they cannot do ends the call, which returns how many sectors it did,
 * and the caller does that one itself through the slot primitives (and
 * calls again for the rest).  Such a sector is: written back (WB) when
 * the backing device (zram_set_backing_fd) does not give its block whole,
 * recompressed by a secondary algorithm (priority > 0), of a dictionary
 * id with no C codec (a compressor without a C form), one that does not
 * decompress (corrupt), or, for a write or a patch, over the memory
 * limit, or a slot that is WB (its block is the caller's to free).
 *
 * The slot primitives (zram_slot_*) are for the caller's own paths (the
 * sectors above, post-processing): the caller holds the slot's stripe
 * (zram_slot_lock) unless a primitive says otherwise.
 */
#ifndef ZRAMD_ZRAM_H
#define ZRAMD_ZRAM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "zram_defs.h"
#include "zsmalloc.h"
#include "zcomp.h"

struct zram;

/* A device of nr_pages slots (> 0) over pool, whose tables are mapped now
 * (reserved; the OS commits them page by page).  NULL with errno. */
struct zram *zram_create(size_t nr_pages, struct zs_pool *pool);
/* Unmap the tables and free the device; the pool is the caller's.  The
 * objects the slots hold are not freed (the pool's teardown does). */
void zram_destroy(struct zram *z);
size_t zram_nr_pages(const struct zram *z);

/* ---- requests: whole sectors first..first+count-1, inside the disk ---- */

/* Fill out (count pages) from the slots; touches each sector read (IDLE
 * cleared, atime, num_reads).  Sectors done, or -ENOMEM. */
ssize_t zram_read(struct zram *z, void *out, size_t first, size_t count);

/* Store count pages of data in the slots, each same-filled, compressed by
 * the primary codec (0 done when it has no C codec) or huge.  Sectors
 * done, or -ENOMEM (no memory for scratch, contexts or objects). */
ssize_t zram_write(struct zram *z, const void *data, size_t first,
                   size_t count);

/* ---- requests: one partial sector (bytes lo..hi-1 of sector index) ---- */

/* Copy bytes lo..hi-1 of the sector into out, read and touched as by
 * zram_read.  1 done, 0 handed back (as zram_read would), or -ENOMEM. */
ssize_t zram_read_part(struct zram *z, void *out, size_t index, size_t lo,
                       size_t hi);

/* Read-modify-write: replace bytes lo..lo+n-1 of the sector with data
 * (lo + n <= PAGE_SIZE), stored as zram_write stores, and only if the
 * slot still holds what was read (zram_slot_version), else read and
 * patched again; the read counts in num_reads.  1 done; 0 handed back,
 * nothing changed: no C codec, a slot WB or read as zram_read would hand
 * it back, over the memory limit; or -ENOMEM. */
ssize_t zram_patch(struct zram *z, size_t index, size_t lo, const void *data,
                   size_t n);

/* Free the slots (discard, write-zeroes), counting notify_free; their
 * pool objects go to the pool's deferred free.  Sectors done: a WB slot
 * ends the call (its block is the caller's to free). */
size_t zram_discard(struct zram *z, size_t first, size_t count);

/* Kinds of extents, per sector. */
enum zram_extent { ZRAM_EXT_HOLE = 0, ZRAM_EXT_ZERO = 1, ZRAM_EXT_DATA = 2 };
struct zram_run {
    size_t sectors;
    enum zram_extent kind;
};
/* Runs of one kind from first on, at most max_runs of them; the number of
 * runs.  A snapshot: takes no lock. */
size_t zram_extents(struct zram *z, size_t first, size_t count,
                    struct zram_run *runs, size_t max_runs);

/* Flag IDLE every slot holding a pool object (all: every one; else those
 * last accessed at or before cutoff, seconds of the device's clock), and
 * clear IDLE on those accessed since.  Newly marked slots. */
size_t zram_mark_idle(struct zram *z, int all, long cutoff);

/* ---- locks ------------------------------------------------------------ */

void zram_slot_lock(struct zram *z, size_t index);
int zram_slot_trylock(struct zram *z, size_t index);   /* 0: taken */
void zram_slot_unlock(struct zram *z, size_t index);
/* codec_lock for writing, then every stripe; and back. */
void zram_lock_all(struct zram *z);
int zram_trylock_all(struct zram *z);                  /* 0: taken */
void zram_unlock_all(struct zram *z);

/* ---- codecs (caller holds zram_lock_all) -------------------------------- */

/* The C codec of pages compressed by the primary with dictionary id (0:
 * none), or NULL: no C form (those pages are the caller's). */
void zram_set_dict_codec(struct zram *z, unsigned id, struct zcomp *c);
struct zcomp *zram_dict_codec(struct zram *z, unsigned id);
/* The dictionary id new pages are compressed with. */
void zram_set_primary(struct zram *z, unsigned id);
/* The backing device's descriptor for WB slots' reads (-1: none), its
 * count of pages read restarted; the caller keeps fd open until it is
 * replaced. */
void zram_set_backing_fd(struct zram *z, int fd);
/* Pages read from the backing device since it was set (no lock). */
int64_t zram_bd_reads(struct zram *z);
/* Stored pages compressed with dictionary id. */
int64_t zram_dict_refs(struct zram *z, unsigned id);

/* ---- slot primitives --------------------------------------------------- */

/* The slot word and handle: under the lock, or a snapshot without. */
uint32_t zram_slot_meta(struct zram *z, size_t index);
uint64_t zram_slot_handle(struct zram *z, size_t index);
/* Count a read of the slot: IDLE cleared, atime, num_reads. */
void zram_slot_touch(struct zram *z, size_t index);
/* meta = (meta & ~clear) | set. */
void zram_slot_flags(struct zram *z, size_t index, uint32_t set,
                     uint32_t clear);
/* What a read-modify-write checks before it stores: the slot word but
 * for SAME_PAGE_FLAGS, the handle, and the stripe's count of writes,
 * which tells a handle freed and handed out again (to this slot, by two
 * writes) from the one read. */
struct zram_version {
    uint32_t meta;
    uint64_t handle;
    int64_t writes;
};
void zram_slot_version(struct zram *z, size_t index, struct zram_version *v);
/* Unlink the slot: counters updated, word and handle zeroed.  Returns the
 * old word; *handle is the old handle (a pool handle to free, a WB
 * block to free, or a SAME fill value: the word says which). */
uint32_t zram_slot_clear(struct zram *z, size_t index, uint64_t *handle);
/* Link new contents into an empty slot, the counters as zram_slot_clear
 * undoes them; write: also num_writes, atime and huge_pages_since. */
void zram_slot_set(struct zram *z, size_t index, uint32_t meta,
                   uint64_t handle, int write);

/* ---- stats and limits (no lock needed) ---------------------------------- */

/* The counters summed over the stripes (each row under its lock). */
void zram_counters(struct zram *z, int64_t out[N_COUNTERS]);
/* The same without waiting: 0, or -1 (nothing summed) when a stripe is
 * held elsewhere. */
int zram_counters_try(struct zram *z, int64_t out[N_COUNTERS]);
/* The same, every stripe held by the caller (zram_lock_all). */
void zram_counters_locked(struct zram *z, int64_t out[N_COUNTERS]);
/* update_used_max(): keep the peak of pool pages. */
void zram_note_used(struct zram *z, unsigned long pages);
unsigned long zram_max_used(struct zram *z);
void zram_set_max_used(struct zram *z, unsigned long pages);
unsigned long zram_limit(struct zram *z);
void zram_set_limit(struct zram *z, unsigned long pages);
/* The device's clock: seconds since t0 (CLOCK_MONOTONIC nanoseconds,
 * Python's time.monotonic()), set at creation and movable by tests. */
int64_t zram_t0(struct zram *z);
void zram_set_t0(struct zram *z, int64_t t0_ns);
uint32_t zram_now(struct zram *z);

#endif
