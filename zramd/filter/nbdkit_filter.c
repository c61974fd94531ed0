/*
 * nbdkit_filter.c: zramd's nbdkit filter, in front of the python plugin
 * (nbdkit --filter=.../zramd/_nbdkit_filter*.so python plugin.py ...).
 *
 * A read or write of whole sectors goes from nbdkit's worker thread
 * straight to the device's core (csrc/zram.c), through the struct
 * zramd_core the core offered after the fork (offer.h says how they
 * meet); nbdkit's python plugin, its GIL and its Python call are not on
 * that path.  Everything else passes on to the plugin unchanged: a
 * request before the offer or not of whole sectors, every other
 * callback (open, trim, zero, flush, extents, ...), and the rest of a
 * request from the first sector the core hands back (secondary
 * algorithms, lzo, corrupt objects, mem_limit), which the plugin's own
 * pread/pwrite then finish as they would have all of it.  So the
 * filter changes how fast a request is served, never what it returns.
 *
 * State: one core at a time (a server serves one device), a copy of
 * the offer under core_lock.  Requests take it shared, offer and
 * withdraw exclusively, so withdraw returns once no request uses the
 * core and the device may be freed; the lock prefers the writer, so a
 * steady stream of requests cannot hold withdraw off.  core_lock comes
 * before every lock of the core (stripes, codec, pool classes), and the
 * core never calls back here.  The counts are relaxed atomics.
 */

#define _GNU_SOURCE                  /* pthread_rwlockattr_setkind_np */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-filter.h>

#include "offer.h"
#include "../csrc/zram_defs.h"

static pthread_rwlock_t core_lock;
static struct zramd_core core;       /* core.z NULL: none offered */
static _Atomic uint64_t served[2], passed[2];     /* [0] reads, [1] writes */

static int
face_offer(const struct zramd_core *offered)
{
    if (offered->abi != ZRAMD_FILTER_ABI)
        return -1;
    pthread_rwlock_wrlock(&core_lock);
    core = *offered;
    pthread_rwlock_unlock(&core_lock);
    nbdkit_debug("zramd: whole sectors served by the core (%zu sectors)",
                 offered->nr_pages);
    return 0;
}

static void
face_withdraw(void *z)
{
    pthread_rwlock_wrlock(&core_lock);
    if (core.z == z)
        memset(&core, 0, sizeof core);
    pthread_rwlock_unlock(&core_lock);
}

static void
face_counts(struct zramd_filter_counts *out)
{
    out->served_reads = atomic_load_explicit(&served[0], memory_order_relaxed);
    out->served_writes = atomic_load_explicit(&served[1], memory_order_relaxed);
    out->passed_reads = atomic_load_explicit(&passed[0], memory_order_relaxed);
    out->passed_writes = atomic_load_explicit(&passed[1], memory_order_relaxed);
}

NBDKIT_DLL_PUBLIC const struct zramd_filter_face zramd_filter_face = {
    .abi = ZRAMD_FILTER_ABI,
    .offer = face_offer,
    .withdraw = face_withdraw,
    .counts = face_counts,
};

static void
zramd_load(void)
{
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr,
                                  PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&core_lock, &attr);
    pthread_rwlockattr_destroy(&attr);
}

/* The sectors of [offset, offset + count) the core served, from the
 * first: all of them (count >> PAGE_SHIFT), or fewer when the request
 * is not whole sectors inside the disk, nothing is offered yet, or the
 * core handed a sector back. */
static size_t
core_request(int is_write, void *buf, uint32_t count, uint64_t offset)
{
    size_t first = offset >> PAGE_SHIFT, n = count >> PAGE_SHIFT, done = 0;
    ssize_t r;
    if (((offset | count) & PAGE_MASK) || !n)
        return 0;
    pthread_rwlock_rdlock(&core_lock);
    if (core.z && first <= core.nr_pages && n <= core.nr_pages - first) {
        while (done < n) {
            char *at = (char *)buf + (done << PAGE_SHIFT);
            r = is_write ? core.write(core.z, at, first + done, n - done)
                         : core.read(core.z, at, first + done, n - done);
            if (r <= 0)
                break;
            done += r;
        }
    }
    pthread_rwlock_unlock(&core_lock);
    return done;
}

static int
zramd_pread(nbdkit_next *next, void *handle, void *buf, uint32_t count,
            uint64_t offset, uint32_t flags, int *err)
{
    uint32_t done = core_request(0, buf, count, offset) << PAGE_SHIFT;
    if (done == count && count) {
        atomic_fetch_add_explicit(&served[0], 1, memory_order_relaxed);
        return 0;
    }
    atomic_fetch_add_explicit(&passed[0], 1, memory_order_relaxed);
    return next->pread(next, (char *)buf + done, count - done,
                       offset + done, flags, err);
}

static int
zramd_pwrite(nbdkit_next *next, void *handle, const void *buf,
             uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
    /* The core only reads buf on a write. */
    uint32_t done = core_request(1, (void *)buf, count, offset) << PAGE_SHIFT;
    if (done == count && count) {
        atomic_fetch_add_explicit(&served[1], 1, memory_order_relaxed);
        return 0;
    }
    atomic_fetch_add_explicit(&passed[1], 1, memory_order_relaxed);
    return next->pwrite(next, (const char *)buf + done, count - done,
                        offset + done, flags, err);
}

static struct nbdkit_filter filter = {
    .name = "zramd",
    .longname = "zramd's whole-sector fast path",
    .load = zramd_load,
    .pread = zramd_pread,
    .pwrite = zramd_pwrite,
};

NBDKIT_REGISTER_FILTER (filter)
