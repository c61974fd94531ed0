/*
 * zsmalloc.h: the pool's API, as mm/zsmalloc.c exports it.
 *
 * A pool hands out opaque non-zero handles to objects of 1..4096 bytes.
 * Callers never see a size class, a zspage or a frame.  Every function is
 * safe to call from any thread; the pool takes its own locks (see
 * zsmalloc.c).  The caller serialises use of one handle: no two threads
 * free, write or read-and-free the same handle at once (zram's slot lock
 * does that).  No function calls back into its caller except through the
 * lock-wait hook.
 */
#ifndef ZRAMD_ZSMALLOC_H
#define ZRAMD_ZSMALLOC_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "zram_defs.h"

struct zs_pool;

/* One row of debugfs zsmalloc/<pool>/classes (an unmerged class). */
struct zs_class_stat {
    int index, size;
    unsigned long fullness[NR_FULLNESS_GROUPS - 1];  /* 10% .. 99%, 100% */
    unsigned long obj_allocated, obj_used, pages_used;
    int pages_per_zspage, objs_per_zspage;
    unsigned long freeable;
};

/* A pool whose zspages chain up to chain_size frames (CHAIN_SIZE_MIN..
 * CHAIN_SIZE_MAX).  NULL with errno EINVAL (chain_size) or ENOMEM. */
struct zs_pool *zs_create_pool(int chain_size);

/* Stop the deferred-free worker, free what is queued, give every frame
 * back to the OS and free the pool.  -EBUSY (and nothing more done) while
 * a read is open (obj_read_begin without obj_read_end). */
int zs_destroy_pool(struct zs_pool *pool);

/* How a thread waits for a pool lock another thread holds: the default
 * is pthread_mutex_lock; the Python glue sets one that lets the GIL go
 * meanwhile.  Called only when a trylock failed. */
void zs_set_lock_wait(struct zs_pool *pool,
                      void (*wait)(pthread_mutex_t *lock));

/* Allocate an object of size bytes; its handle.  0 with errno EINVAL (size
 * 0 or past ZS_MAX_ALLOC_SIZE) or ENOMEM (no frames or metadata). */
unsigned long zs_malloc(struct zs_pool *pool, size_t size);

/* Free the object now; its zspage's frames go back to the OS when it
 * empties.  0; -EINVAL when handle is not allocated (nothing done);
 * -errno when the frames could not be given back (the object is freed). */
int zs_free(struct zs_pool *pool, unsigned long handle);

/* Deferred free (zsmalloc.c, "Deferred free").  zs_free_deferred queues
 * the object for the pool's worker, or frees it now when the queue is
 * busy or full: 0 (or zs_free's -errno); -EINVAL when handle is not
 * allocated (nothing done).  zs_free_deferred_flush frees everything
 * queued before it returns: 0; -EINVAL when a queued handle was no longer
 * allocated (the ones after it stay queued); zs_free's -errno.
 * zs_deferred_pending: handles queued now.  zs_deferred_start starts the
 * worker in this process now rather than at the first queued handle
 * (0, or -EAGAIN); zs_deferred_hold stops it and starts none until
 * zs_deferred_start, so that handles wait for a flush (tests).
 * zs_deferred_capacity sets how many handles may wait (DEFERRED_CAPACITY
 * at first; 0: every deferred free is immediate, as the kernel's zs_free
 * at a discard). */
int zs_free_deferred(struct zs_pool *pool, unsigned long handle);
int zs_free_deferred_flush(struct zs_pool *pool);
size_t zs_deferred_pending(struct zs_pool *pool);
int zs_deferred_start(struct zs_pool *pool);
void zs_deferred_hold(struct zs_pool *pool);
void zs_deferred_capacity(struct zs_pool *pool, size_t capacity);

/* The size handle was allocated with; 0 when it is not allocated. */
size_t zs_obj_size(struct zs_pool *pool, unsigned long handle);

/* Copy n bytes (at most the object's size) into the object.  0, or
 * -EINVAL (not allocated, or n too large: nothing written). */
int zs_obj_write(struct zs_pool *pool, unsigned long handle,
                 const void *src, size_t n);

/* The object's bytes: a pointer into its frame when it lies in one
 * (zero-copy), else a copy in local_copy (PAGE_SIZE bytes).  *size is
 * its size.  Until zs_obj_read_end compaction does not move it.  NULL with
 * errno EINVAL when handle is not allocated (nothing to end). */
const void *zs_obj_read_begin(struct zs_pool *pool, unsigned long handle,
                              void *local_copy, size_t *size);
void zs_obj_read_end(struct zs_pool *pool, unsigned long handle);

/* Move objects from the emptiest zspages of each class into the fullest
 * and free the emptied ones; the frames freed (also added to
 * pages_compacted).  Waits for open reads of a class before moving any
 * of its objects: call it with nothing of the pool's open. */
unsigned long zs_compact(struct zs_pool *pool);

unsigned long zs_get_total_pages(struct zs_pool *pool);
unsigned long zs_pages_compacted(struct zs_pool *pool);

/* The first object size stored in a huge class (zs_huge_class_size). */
size_t zs_huge_class_size(struct zs_pool *pool);

/* Index of the class an object of size bytes lands in (merged classes
 * share one); -1 for a size out of range. */
int zs_lookup_class_index(struct zs_pool *pool, size_t size);

/* Unmerged classes, and the stats row of the i-th (0 <= i < count). */
int zs_class_count(struct zs_pool *pool);
void zs_class_stats(struct zs_pool *pool, int i, struct zs_class_stat *out);

/* Check the metadata's invariants, holding every lock.  0 when sound,
 * else -1 with the first broken one described in why. */
int zs_audit(struct zs_pool *pool, char *why, size_t len);

/* Tests only: break one invariant (what: a name in zsmalloc.c) of the
 * class of size-byte objects on purpose, so that the tests can see
 * zs_audit report it.  0, or -1 when there is nothing to break. */
int zs_plant_fault(struct zs_pool *pool, size_t size, const char *what);

#endif
