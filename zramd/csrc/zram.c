/*
 * zram.c: the slot table and I/O paths of zram.h, after
 * drivers/block/zram/zram_drv.c.
 *
 * The table
 *   Three flat arrays of nr_pages entries, each a private anonymous mmap
 *   of the device's own, so an untouched device costs only address space:
 *
 *       handle[i]  u64  pool handle, SAME fill value, or WB block
 *       meta[i]    u32  the slot word (zram_defs.h): size, flags,
 *                       priority, dictionary id
 *       atime[i]   u32  last access, seconds of the device's clock
 *
 *   A slot is allocated when it has a handle or the SAME flag; otherwise
 *   it reads as zeroes (a hole).  Every access goes through the one-line
 *   helpers below, relaxed atomics, so that the lock-free snapshots
 *   (extents, a post-processing pass choosing candidates) race with
 *   nothing; changes are made under the slot's stripe lock only.
 *
 * Stripes
 *   N_STRIPES of them, cache-line aligned: the mutex of slots i with
 *   i % N_STRIPES == s, and the counters and dictionary references those
 *   slots account to.  No lock is shared by all writers: stats sum the
 *   rows.
 *
 * Write (zram_write_page): the same-filled check and compression without
 *   any lock (with the crew for several pages), then per sector zs_malloc
 *   and the limit (zram_can_store_page), zs_obj_write, and under the
 *   stripe lock only the unlink of the old contents and the link of the
 *   new; the old object is freed after.
 * Read (zram_read_page): under the stripe lock, SAME and holes filled in,
 *   huge objects copied out, a WB slot's block pread from the backing
 *   device (as read_from_bdev, but synchronously, holding the stripe as
 *   the Python path does), compressed objects copied to scratch (a
 *   single sector: decompressed straight from the frame); then the
 *   decompression (crew), then the sectors read are touched.
 * Partial sectors (zram_read_part, zram_patch; zram_bvec_read and
 *   zram_bvec_write's read-modify-write): a read of the whole sector, and
 *   for a patch the write's store of the patched page, done only if the
 *   slot's version (zram_slot_version) is still what was read, else read
 *   and patched again: zram holds the slot across both; zramd keeps the
 *   compression out of the lock and checks instead.
 *
 * Locking: codec_lock (a writer-preferring rwlock: a request reads it for
 * all of its work; zram_lock_all writes it), then one stripe lock, then
 * the pool's.  zram_lock_all takes codec_lock, then the stripes in index
 * order.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "crew.h"
#include "zram.h"

struct zram_stripe {
    pthread_mutex_t lock;
    int64_t counters[N_COUNTERS];
    int64_t dict_refs[MAX_DICTS];
} __attribute__((aligned(64)));

struct zram {
    size_t nr_pages;
    uint64_t *handle;
    uint32_t *meta;
    uint32_t *atime;
    struct zs_pool *pool;
    size_t huge_class_size;
    struct zram_stripe stripe[N_STRIPES];
    pthread_rwlock_t codec_lock;
    struct zcomp *dict_codec[MAX_DICTS];   /* codec_lock, or all stripes */
    unsigned primary_id;                   /* likewise */
    int backing_fd;                        /* likewise; -1: none */
    atomic_llong bd_reads;                 /* pages read from backing_fd */
    atomic_ulong limit_pages;
    atomic_ulong max_used_pages;
    atomic_llong t0_ns;
};

/* The fill value is the page's first 8 bytes as a little-endian integer
 * (device.py's int.from_bytes(head, "little")): this machine's order. */
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the slot table's fill values are little-endian"
#endif

/* ---- slot accessors: the one place the arrays are touched ------------- */

static inline uint32_t
get_meta(struct zram *z, size_t i)
{
    return __atomic_load_n(&z->meta[i], __ATOMIC_RELAXED);
}

static inline void
set_meta(struct zram *z, size_t i, uint32_t v)
{
    __atomic_store_n(&z->meta[i], v, __ATOMIC_RELAXED);
}

static inline uint64_t
get_handle(struct zram *z, size_t i)
{
    return __atomic_load_n(&z->handle[i], __ATOMIC_RELAXED);
}

static inline void
set_handle(struct zram *z, size_t i, uint64_t v)
{
    __atomic_store_n(&z->handle[i], v, __ATOMIC_RELAXED);
}

static inline uint32_t
get_atime(struct zram *z, size_t i)
{
    return __atomic_load_n(&z->atime[i], __ATOMIC_RELAXED);
}

static inline void
set_atime(struct zram *z, size_t i, uint32_t v)
{
    __atomic_store_n(&z->atime[i], v, __ATOMIC_RELAXED);
}

static inline struct zram_stripe *
stripe_of(struct zram *z, size_t i)
{
    return &z->stripe[i & STRIPE_MASK];
}

static int64_t
mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);   /* Python's time.monotonic() */
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

uint32_t
zram_now(struct zram *z)
{
    int64_t d = mono_ns() - atomic_load_explicit(&z->t0_ns,
                                                 memory_order_relaxed);
    /* int(monotonic() - t0): towards zero */
    return (uint32_t)(d / 1000000000);
}

/* ---- create and destroy ------------------------------------------------- */

static void *
map_table(size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

struct zram *
zram_create(size_t nr_pages, struct zs_pool *pool)
{
    struct zram *z;
    pthread_rwlockattr_t attr;
    int i;
    if (!nr_pages || !pool) {
        errno = EINVAL;
        return NULL;
    }
    if (posix_memalign((void **)&z, 64, sizeof(*z)) != 0) {
        errno = ENOMEM;
        return NULL;
    }
    memset(z, 0, sizeof(*z));
    z->nr_pages = nr_pages;
    z->backing_fd = -1;
    z->pool = pool;
    z->huge_class_size = zs_huge_class_size(pool);
    z->handle = map_table(nr_pages * sizeof(*z->handle));
    z->meta = map_table(nr_pages * sizeof(*z->meta));
    z->atime = map_table(nr_pages * sizeof(*z->atime));
    if (!z->handle || !z->meta || !z->atime) {
        int err = errno;
        zram_destroy(z);
        errno = err;
        return NULL;
    }
    for (i = 0; i < N_STRIPES; i++)
        pthread_mutex_init(&z->stripe[i].lock, NULL);
    pthread_rwlockattr_init(&attr);
    /* A retirement of dictionaries must not wait for a gap in the I/O. */
    pthread_rwlockattr_setkind_np(
        &attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&z->codec_lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    atomic_store(&z->t0_ns, mono_ns());
    return z;
}

void
zram_destroy(struct zram *z)
{
    int i;
    if (!z)
        return;
    if (z->handle)
        munmap(z->handle, z->nr_pages * sizeof(*z->handle));
    if (z->meta)
        munmap(z->meta, z->nr_pages * sizeof(*z->meta));
    if (z->atime)
        munmap(z->atime, z->nr_pages * sizeof(*z->atime));
    if (z->meta && z->handle && z->atime) {
        for (i = 0; i < N_STRIPES; i++)
            pthread_mutex_destroy(&z->stripe[i].lock);
        pthread_rwlock_destroy(&z->codec_lock);
    }
    free(z);
}

size_t
zram_nr_pages(const struct zram *z)
{
    return z->nr_pages;
}

/* ---- locks ------------------------------------------------------------ */

void
zram_slot_lock(struct zram *z, size_t index)
{
    pthread_mutex_lock(&stripe_of(z, index)->lock);
}

int
zram_slot_trylock(struct zram *z, size_t index)
{
    return pthread_mutex_trylock(&stripe_of(z, index)->lock);
}

void
zram_slot_unlock(struct zram *z, size_t index)
{
    pthread_mutex_unlock(&stripe_of(z, index)->lock);
}

void
zram_lock_all(struct zram *z)
{
    int i;
    pthread_rwlock_wrlock(&z->codec_lock);
    for (i = 0; i < N_STRIPES; i++)
        pthread_mutex_lock(&z->stripe[i].lock);
}

int
zram_trylock_all(struct zram *z)
{
    int i;
    if (pthread_rwlock_trywrlock(&z->codec_lock) != 0)
        return -1;
    for (i = 0; i < N_STRIPES; i++)
        if (pthread_mutex_trylock(&z->stripe[i].lock) != 0) {
            while (i-- > 0)
                pthread_mutex_unlock(&z->stripe[i].lock);
            pthread_rwlock_unlock(&z->codec_lock);
            return -1;
        }
    return 0;
}

void
zram_unlock_all(struct zram *z)
{
    int i;
    for (i = N_STRIPES - 1; i >= 0; i--)
        pthread_mutex_unlock(&z->stripe[i].lock);
    pthread_rwlock_unlock(&z->codec_lock);
}

/* ---- codecs ------------------------------------------------------------ */

void
zram_set_dict_codec(struct zram *z, unsigned id, struct zcomp *c)
{
    if (id < MAX_DICTS)
        z->dict_codec[id] = c;
}

struct zcomp *
zram_dict_codec(struct zram *z, unsigned id)
{
    return id < MAX_DICTS ? z->dict_codec[id] : NULL;
}

void
zram_set_primary(struct zram *z, unsigned id)
{
    if (id < MAX_DICTS)
        z->primary_id = id;
}

void
zram_set_backing_fd(struct zram *z, int fd)
{
    z->backing_fd = fd;
    atomic_store(&z->bd_reads, 0);
}

int64_t
zram_bd_reads(struct zram *z)
{
    return atomic_load(&z->bd_reads);
}

int64_t
zram_dict_refs(struct zram *z, unsigned id)
{
    int64_t n = 0;
    int s;
    for (s = 0; s < N_STRIPES && id < MAX_DICTS; s++)
        n += z->stripe[s].dict_refs[id];
    return n;
}

/* ---- slot primitives (the stripe lock held) ------------------------------ */

uint32_t
zram_slot_meta(struct zram *z, size_t index)
{
    return get_meta(z, index);
}

uint64_t
zram_slot_handle(struct zram *z, size_t index)
{
    return get_handle(z, index);
}

void
zram_slot_touch(struct zram *z, size_t index)
{
    uint32_t meta = get_meta(z, index);
    if (meta & ZRAM_IDLE)
        set_meta(z, index, meta & ~ZRAM_IDLE);
    set_atime(z, index, zram_now(z));
    stripe_of(z, index)->counters[C_NUM_READS] += 1;
}

void
zram_slot_flags(struct zram *z, size_t index, uint32_t set, uint32_t clear)
{
    set_meta(z, index, (get_meta(z, index) & ~clear) | set);
}

void
zram_slot_version(struct zram *z, size_t index, struct zram_version *v)
{
    v->meta = get_meta(z, index) & ~SAME_PAGE_FLAGS;
    v->handle = get_handle(z, index);
    v->writes = stripe_of(z, index)->counters[C_NUM_WRITES];
}

static int
same_version(const struct zram_version *a, const struct zram_version *b)
{
    return a->meta == b->meta && a->handle == b->handle
           && a->writes == b->writes;
}

uint32_t
zram_slot_clear(struct zram *z, size_t index, uint64_t *handle)
{
    struct zram_stripe *st = stripe_of(z, index);
    uint32_t meta = get_meta(z, index);
    uint64_t h = get_handle(z, index);
    if (meta & ZRAM_SAME) {
        st->counters[C_SAME_PAGES] -= 1;
        st->counters[C_PAGES_STORED] -= 1;
    } else if (meta & ZRAM_WB) {
        st->counters[C_PAGES_STORED] -= 1;
    } else if (h) {
        if (meta & DICT_MASK)
            st->dict_refs[(meta & DICT_MASK) >> DICT_SHIFT] -= 1;
        if (meta & ZRAM_HUGE)
            st->counters[C_HUGE_PAGES] -= 1;
        if (meta & COMP_PRIORITY_MASK)
            st->counters[C_PRIO_PAGES - 1 + ((meta & COMP_PRIORITY_MASK)
                                             >> COMP_PRIORITY_SHIFT)] -= 1;
        st->counters[C_COMPR_SIZE] -= meta & SIZE_MASK;
        st->counters[C_PAGES_STORED] -= 1;
    }
    set_meta(z, index, 0);
    set_handle(z, index, 0);
    *handle = h;
    return meta;
}

void
zram_slot_set(struct zram *z, size_t index, uint32_t meta, uint64_t handle,
              int write)
{
    struct zram_stripe *st = stripe_of(z, index);
    set_meta(z, index, meta);
    set_handle(z, index, handle);
    if (meta & ZRAM_SAME) {
        st->counters[C_SAME_PAGES] += 1;
        st->counters[C_PAGES_STORED] += 1;
    } else if (meta & ZRAM_WB) {
        st->counters[C_PAGES_STORED] += 1;
    } else if (handle) {
        if (meta & DICT_MASK)
            st->dict_refs[(meta & DICT_MASK) >> DICT_SHIFT] += 1;
        if (meta & ZRAM_HUGE) {
            st->counters[C_HUGE_PAGES] += 1;
            if (write)
                st->counters[C_HUGE_SINCE] += 1;
        }
        if (meta & COMP_PRIORITY_MASK)
            st->counters[C_PRIO_PAGES - 1 + ((meta & COMP_PRIORITY_MASK)
                                             >> COMP_PRIORITY_SHIFT)] += 1;
        st->counters[C_COMPR_SIZE] += meta & SIZE_MASK;
        st->counters[C_PAGES_STORED] += 1;
    }
    if (write) {
        st->counters[C_NUM_WRITES] += 1;
        set_atime(z, index, zram_now(z));
    }
}

/* ---- stats and limits ------------------------------------------------------ */

/* Sum the stripes' counters: taking each stripe's lock (LOCK_WAIT),
 * trying it (LOCK_TRY: -1 at the first busy one), or with every stripe
 * already held by the caller (LOCK_HELD). */
enum lock_mode { LOCK_WAIT, LOCK_TRY, LOCK_HELD };

static int
sum_counters(struct zram *z, int64_t out[N_COUNTERS], enum lock_mode mode)
{
    int s, c;
    memset(out, 0, N_COUNTERS * sizeof(*out));
    for (s = 0; s < N_STRIPES; s++) {
        pthread_mutex_t *lock = &z->stripe[s].lock;
        if (mode == LOCK_WAIT)
            pthread_mutex_lock(lock);
        else if (mode == LOCK_TRY && pthread_mutex_trylock(lock) != 0)
            return -1;
        for (c = 0; c < N_COUNTERS; c++)
            out[c] += z->stripe[s].counters[c];
        if (mode != LOCK_HELD)
            pthread_mutex_unlock(lock);
    }
    return 0;
}

void
zram_counters(struct zram *z, int64_t out[N_COUNTERS])
{
    sum_counters(z, out, LOCK_WAIT);
}

int
zram_counters_try(struct zram *z, int64_t out[N_COUNTERS])
{
    return sum_counters(z, out, LOCK_TRY);
}

void
zram_counters_locked(struct zram *z, int64_t out[N_COUNTERS])
{
    sum_counters(z, out, LOCK_HELD);
}

void
zram_note_used(struct zram *z, unsigned long pages)
{
    unsigned long seen = atomic_load_explicit(&z->max_used_pages,
                                              memory_order_relaxed);
    while (pages > seen
           && !atomic_compare_exchange_weak(&z->max_used_pages, &seen, pages))
        ;
}

unsigned long
zram_max_used(struct zram *z)
{
    return atomic_load(&z->max_used_pages);
}

void
zram_set_max_used(struct zram *z, unsigned long pages)
{
    atomic_store(&z->max_used_pages, pages);
}

unsigned long
zram_limit(struct zram *z)
{
    return atomic_load(&z->limit_pages);
}

void
zram_set_limit(struct zram *z, unsigned long pages)
{
    atomic_store(&z->limit_pages, pages);
}

int64_t
zram_t0(struct zram *z)
{
    return atomic_load(&z->t0_ns);
}

void
zram_set_t0(struct zram *z, int64_t t0_ns)
{
    atomic_store(&z->t0_ns, t0_ns);
}

/* ---- read ------------------------------------------------------------------ */

struct decomp_args {
    struct zcomp *codec;
    const char *scratch;     /* sector k's object at k << PAGE_SHIFT */
    char *out;
    size_t *sector;          /* item -> sector position in the request */
    uint32_t *size;          /* item -> object size */
    atomic_size_t failed;    /* lowest sector that did not decompress */
};

static void
decomp_chunk(struct crew_batch *b, int who, size_t start, size_t n)
{
    struct decomp_args *a = b->args;
    size_t k;
    for (k = start; k < start + n; k++) {
        size_t pos = a->sector[k];
        if (zcomp_decompress(a->codec, b->ctx[who],
                             a->scratch + (pos << PAGE_SHIFT), a->size[k],
                             a->out + (pos << PAGE_SHIFT))) {
            size_t seen = atomic_load(&a->failed);
            while (pos < seen
                   && !atomic_compare_exchange_weak(&a->failed, &seen, pos))
                ;
        }
    }
}

/* What read_plain and read_decompress made of a slot. */
enum { READ_DONE = 0, READ_COMPRESSED, READ_HAND_BACK };

/* pread a WB slot's block into dst, counted in bd_reads: 0, or -1 when
 * there is no backing device, or it fails or returns less than a page
 * (the caller's path reads it again and raises).  codec_lock held. */
static int
read_backing(struct zram *z, uint64_t block, char *dst)
{
    ssize_t n;
    if (z->backing_fd < 0)
        return -1;
    do
        n = pread(z->backing_fd, dst, PAGE_SIZE, (off_t)(block << PAGE_SHIFT));
    while (n < 0 && errno == EINTR);
    if (n != PAGE_SIZE)
        return -1;
    atomic_fetch_add_explicit(&z->bd_reads, 1, memory_order_relaxed);
    return 0;
}

/* Fill dst with the page of a slot (its stripe held; meta and handle its
 * word and handle): READ_DONE; READ_COMPRESSED for an object of the
 * primary, which the caller decompresses; READ_HAND_BACK for a sector of
 * the caller's paths: recompressed by a secondary, a huge object that
 * does not read back whole, a block the backing device does not give. */
static int
read_plain(struct zram *z, uint32_t meta, uint64_t handle, char *dst)
{
    const char *at;
    size_t size;
    int w;
    if (meta & ZRAM_SAME) {
        for (w = 0; w < PAGE_SIZE; w += 8)
            memcpy(dst + w, &handle, 8);
        return READ_DONE;
    }
    if (!handle) {
        memset(dst, 0, PAGE_SIZE);
        return READ_DONE;
    }
    if (meta & ZRAM_WB)
        return read_backing(z, handle, dst) ? READ_HAND_BACK : READ_DONE;
    if (meta & COMP_PRIORITY_MASK)
        return READ_HAND_BACK;
    if (!(meta & ZRAM_HUGE))
        return READ_COMPRESSED;
    if (!(at = zs_obj_read_begin(z->pool, handle, dst, &size)))
        return READ_HAND_BACK;
    if (size != PAGE_SIZE || size != (meta & SIZE_MASK)) {
        zs_obj_read_end(z->pool, handle);
        return READ_HAND_BACK;
    }
    if (at != dst)
        memcpy(dst, at, PAGE_SIZE);
    zs_obj_read_end(z->pool, handle);
    return READ_DONE;
}

/* Decompress a slot's object (its stripe held) with codec straight into
 * dst, from the frame or, when it spans two, from its copy in obj:
 * READ_DONE, READ_HAND_BACK when it does not decompress (the caller's
 * path raises it), or -ENOMEM. */
static int
read_decompress(struct zram *z, struct zcomp *codec, uint32_t meta,
                uint64_t handle, char *obj, char *dst)
{
    const char *at, *why;
    void *dctx;
    size_t size;
    if (!(at = zs_obj_read_begin(z->pool, handle, obj, &size)))
        return READ_HAND_BACK;
    if (size != (meta & SIZE_MASK)) {
        zs_obj_read_end(z->pool, handle);
        return READ_HAND_BACK;
    }
    if (zcomp_ctx_take(codec, ZCOMP_DECOMPRESS, &dctx, &why)) {
        zs_obj_read_end(z->pool, handle);
        return -ENOMEM;
    }
    why = zcomp_decompress(codec, dctx, at, size, dst);
    zs_obj_read_end(z->pool, handle);
    zcomp_ctx_give(codec, ZCOMP_DECOMPRESS, dctx);
    return why ? READ_HAND_BACK : READ_DONE;
}

/* What a read saw of one sector, to touch it after. */
struct seen {
    uint32_t meta;
    uint64_t handle;
};

ssize_t
zram_read(struct zram *z, void *out_v, size_t first, size_t count)
{
    char *out = out_v;
    size_t i = 0, n_items = 0, done, k;
    struct decomp_args dargs = {0};
    struct crew_batch batch = {0};
    int hands = 0, n_dctx = 0, touched = 0;
    ssize_t result;
    /* A single sector (fio, swap-ins) needs no heap and no crew: read,
     * decompress and touch it in one go under its lock. */
    char one_scratch[PAGE_SIZE];
    size_t one_sector;
    uint32_t one_size;
    struct seen one_seen;
    char *scratch = one_scratch;
    size_t *item_sector = &one_sector;
    uint32_t *item_size = &one_size;
    struct seen *seen = &one_seen;

    if (count == 0)
        return 0;
    if (count > 1) {
        scratch = malloc(count << PAGE_SHIFT);
        item_sector = malloc(count * sizeof(*item_sector));
        item_size = malloc(count * sizeof(*item_size));
        seen = malloc(count * sizeof(*seen));
        if (!scratch || !item_sector || !item_size || !seen) {
            result = -ENOMEM;
            goto out_free;
        }
    }
    pthread_rwlock_rdlock(&z->codec_lock);

    /* Phase one: each slot under its stripe lock. */
    for (i = 0; i < count; i++) {
        size_t index = first + i;
        struct zram_stripe *st = stripe_of(z, index);
        char *dst = out + (i << PAGE_SHIFT);
        char *obj = scratch + (i << PAGE_SHIFT);
        uint32_t meta;
        uint64_t handle;
        int r;

        pthread_mutex_lock(&st->lock);
        meta = get_meta(z, index);
        handle = get_handle(z, index);
        r = read_plain(z, meta, handle, dst);
        if (r == READ_COMPRESSED) {
            struct zcomp *codec =
                z->dict_codec[(meta & DICT_MASK) >> DICT_SHIFT];
            const char *at;
            size_t size;
            /* One codec per batch; a page of another dictionary (rare:
             * just after training) ends the call. */
            if (!codec || (dargs.codec && codec != dargs.codec)) {
                r = READ_HAND_BACK;
            } else if (count == 1) {
                r = read_decompress(z, codec, meta, handle, obj, dst);
            } else if (!(at = zs_obj_read_begin(z->pool, handle, obj,
                                                &size))
                       || size != (meta & SIZE_MASK)) {
                if (at)
                    zs_obj_read_end(z->pool, handle);
                r = READ_HAND_BACK;
            } else {
                if (at != obj)
                    memcpy(obj, at, size);
                zs_obj_read_end(z->pool, handle);
                dargs.codec = codec;
                item_sector[n_items] = i;
                item_size[n_items++] = size;
                r = READ_DONE;
            }
        }
        if (r < 0) {
            pthread_mutex_unlock(&st->lock);
            result = r;
            goto out_unlock;
        }
        seen[i].meta = meta;
        seen[i].handle = handle;
        if (count == 1 && r == READ_DONE) {
            zram_slot_touch(z, index);
            touched = 1;
        }
        pthread_mutex_unlock(&st->lock);
        if (r != READ_DONE)
            break;
    }
    done = i;

    /* Phase two: decompress, with the crew when there are several. */
    if (n_items) {
        const char *why;
        hands = n_items > 1 ? crew_hands(n_items) : 0;
        for (n_dctx = 0; n_dctx <= hands; n_dctx++)
            if (zcomp_ctx_take(dargs.codec, ZCOMP_DECOMPRESS,
                               &batch.ctx[n_dctx], &why)) {
                result = -ENOMEM;
                goto out_ctx;
            }
        dargs.scratch = scratch;
        dargs.out = out;
        dargs.sector = item_sector;
        dargs.size = item_size;
        atomic_store(&dargs.failed, SIZE_MAX);
        batch.work = decomp_chunk;
        batch.args = &dargs;
        batch.count = n_items;
        crew_run(&batch, hands);
        if (atomic_load(&dargs.failed) < done)
            done = atomic_load(&dargs.failed);
    }

    /* Phase three: the sectors read are counted and touched; not those
     * from a sector that failed on, which the caller reads and fails.  A
     * slot rewritten or marked idle since phase one was not what this
     * read saw, and keeps what its writer or mark_idle made it. */
    for (k = touched ? done : 0; k < done; k++) {
        size_t index = first + k;
        struct zram_stripe *st = stripe_of(z, index);
        pthread_mutex_lock(&st->lock);
        st->counters[C_NUM_READS] += 1;
        if (get_meta(z, index) == seen[k].meta
                && get_handle(z, index) == seen[k].handle) {
            if (seen[k].meta & ZRAM_IDLE)
                set_meta(z, index, seen[k].meta & ~ZRAM_IDLE);
            set_atime(z, index, zram_now(z));
        }
        pthread_mutex_unlock(&st->lock);
    }
    result = (ssize_t)done;
out_ctx:
    for (k = 0; k < (size_t)n_dctx; k++)
        zcomp_ctx_give(dargs.codec, ZCOMP_DECOMPRESS, batch.ctx[k]);
out_unlock:
    pthread_rwlock_unlock(&z->codec_lock);
out_free:
    if (scratch != one_scratch) {
        free(scratch);
        free(item_sector);
        free(item_size);
        free(seen);
    }
    return result;
}

/* ---- write ----------------------------------------------------------------- */

/* What phase one of a write found for a sector. */
struct plan {
    uint32_t size;          /* compressed size; 0: SAME; PAGE_SIZE: HUGE */
    uint64_t fill;          /* SAME: the repeated 8-byte value */
};

static int
same_filled(const char *page, uint64_t *fill)
{
    uint64_t v, w;
    int i;
    memcpy(&v, page, 8);               /* the buffer need not be aligned */
    for (i = 8; i < PAGE_SIZE; i += 8) {
        memcpy(&w, page + i, 8);
        if (w != v)
            return 0;
    }
    *fill = v;
    return 1;
}

/* Room for one page's compressed form, however long: the larger of
 * LZ4_COMPRESSBOUND(4096) (4128) and ZSTD_COMPRESSBOUND(4096) (4174). */
#define SCRATCH_STRIDE (PAGE_SIZE + 128)

struct plan_args {
    struct zcomp *codec;
    const char *data;
    char *scratch;
    size_t huge_class_size;
    struct plan *plan;
};

/* Phase one: classify and compress pages start..start+n-1. */
static void
plan_chunk(struct crew_batch *b, int who, size_t start, size_t n)
{
    struct plan_args *a = b->args;
    size_t i;
    for (i = start; i < start + n; i++) {
        const char *page = a->data + (i << PAGE_SHIFT);
        struct plan *p = &a->plan[i];
        if (same_filled(page, &p->fill)) {
            p->size = 0;
            continue;
        }
        /* The whole output, then the kernel's test: a page whose
         * compressed form reaches huge_class_size is stored raw.  (A
         * capacity of huge_class_size - 1 would not do: lz4 and zstd
         * give up a few bytes before the end of a limited buffer.) */
        p->size = zcomp_compress(a->codec, b->ctx[who], page, PAGE_SIZE,
                                 a->scratch + i * SCRATCH_STRIDE,
                                 SCRATCH_STRIDE);
        if (p->size == 0 || p->size >= a->huge_class_size)
            p->size = PAGE_SIZE;
    }
}

/* A batch planning count pages of data with codec into scratch and plan
 * (phase one of a write). */
static void
plan_batch(struct crew_batch *b, struct plan_args *a, struct zram *z,
           struct zcomp *codec, const char *data, char *scratch,
           struct plan *plan, size_t count)
{
    a->codec = codec;
    a->data = data;
    a->scratch = scratch;
    a->huge_class_size = z->huge_class_size;
    a->plan = plan;
    b->work = plan_chunk;
    b->args = a;
    b->count = count;
}

/* What store_page did. */
enum { STORE_DONE = 0, STORE_HAND_BACK, STORE_STALE };

/* Store one page planned as *p in slot index (src: the compressed form,
 * or the raw page when huge; dict_id: the primary's, codec_lock read):
 * the pool object and the limit without the stripe lock, then under it
 * only the swap of old and new contents; the old object is freed after.
 * STORE_DONE; STORE_HAND_BACK, nothing changed, when over the memory
 * limit (the caller flushes the deferred frees and decides) or the slot
 * is WB (its block is the caller's to free); with expect (a
 * read-modify-write), STORE_STALE, nothing changed, when the slot's
 * version is no longer *expect, and either way the read is counted
 * (num_reads) as the caller's path counts it.  Or a negative errno:
 * -ENOMEM (no object, nothing changed), or zs_free's (stored, but the
 * old object's frames not given back). */
static int
store_page(struct zram *z, size_t index, const struct plan *p,
           const char *src, unsigned dict_id,
           const struct zram_version *expect)
{
    struct zram_stripe *st = stripe_of(z, index);
    uint32_t size = p->size, meta, old_meta;
    uint64_t handle = 0, old;

    if (size == 0) {
        meta = ZRAM_SAME;
    } else {
        unsigned long pages, limit;
        meta = size == PAGE_SIZE ? ZRAM_HUGE : (uint32_t)dict_id << DICT_SHIFT;
        if (!(handle = zs_malloc(z->pool, size)))
            return -ENOMEM;
        /* update_used_max(), and the limit as zram_can_store_page() */
        pages = zs_get_total_pages(z->pool);
        zram_note_used(z, pages);
        limit = zram_limit(z);
        if (limit && pages > limit) {
            zs_free(z->pool, handle);
            return STORE_HAND_BACK;
        }
        zs_obj_write(z->pool, handle, src, size);   /* ours: fits */
        meta |= size;
    }

    pthread_mutex_lock(&st->lock);
    old_meta = get_meta(z, index);
    if (expect) {
        struct zram_version now;
        zram_slot_version(z, index, &now);
        st->counters[C_NUM_READS] += 1;
        if (!same_version(&now, expect)) {
            pthread_mutex_unlock(&st->lock);
            if (handle)
                zs_free(z->pool, handle);
            return STORE_STALE;
        }
    }
    if (old_meta & ZRAM_WB) {
        pthread_mutex_unlock(&st->lock);
        if (handle)
            zs_free(z->pool, handle);
        return STORE_HAND_BACK;
    }
    zram_slot_clear(z, index, &old);
    zram_slot_set(z, index, meta, handle ? handle : p->fill, 1);
    pthread_mutex_unlock(&st->lock);
    if (!(old_meta & ZRAM_SAME) && old) {
        int r = zs_free(z->pool, old);
        if (r < 0 && r != -EINVAL)
            return r;
    }
    return STORE_DONE;
}

ssize_t
zram_write(struct zram *z, const void *data_v, size_t first, size_t count)
{
    const char *data = data_v;
    struct zcomp *codec;
    unsigned dict_id;
    char *scratch = NULL;
    struct plan *plan = NULL;
    struct crew_batch batch = {0};
    struct plan_args pargs;
    int hands = 0, n_cctx = 0, k;
    size_t i = 0;
    ssize_t result;

    if (count == 0)
        return 0;
    pthread_rwlock_rdlock(&z->codec_lock);
    dict_id = z->primary_id;
    codec = z->dict_codec[dict_id];
    if (!codec) {
        result = 0;                    /* no C form: all the caller's */
        goto out;
    }
    hands = count > 1 ? crew_hands(count) : 0;
    for (n_cctx = 0; n_cctx <= hands; n_cctx++) {
        const char *why;
        if (zcomp_ctx_take(codec, ZCOMP_COMPRESS, &batch.ctx[n_cctx], &why)) {
            result = -ENOMEM;
            goto out;
        }
    }
    scratch = malloc(count * SCRATCH_STRIDE);
    plan = malloc(count * sizeof(*plan));
    if (!scratch || !plan) {
        result = -ENOMEM;
        goto out;
    }

    /* Phase one: classify and compress, several pages at a time with the
     * crew. */
    plan_batch(&batch, &pargs, z, codec, data, scratch, plan, count);
    crew_run(&batch, hands);

    /* Phase two: the pool and the slots. */
    for (i = 0; i < count; i++) {
        int r = store_page(z, first + i, &plan[i],
                           plan[i].size == PAGE_SIZE
                               ? data + (i << PAGE_SHIFT)
                               : scratch + i * SCRATCH_STRIDE,
                           dict_id, NULL);
        if (r < 0) {
            result = r;
            goto out;
        }
        if (r != STORE_DONE)
            break;
    }
    result = (ssize_t)i;
out:
    for (k = 0; k < n_cctx; k++)
        zcomp_ctx_give(codec, ZCOMP_COMPRESS, batch.ctx[k]);
    pthread_rwlock_unlock(&z->codec_lock);
    free(scratch);
    free(plan);
    return result;
}

/* ---- discard, extents, mark_idle ------------------------------------------- */

size_t
zram_discard(struct zram *z, size_t first, size_t count)
{
    size_t i;
    for (i = 0; i < count; i++) {
        size_t index = first + i;
        struct zram_stripe *st = stripe_of(z, index);
        uint32_t meta;
        uint64_t h;
        pthread_mutex_lock(&st->lock);
        if (get_meta(z, index) & ZRAM_WB) {
            pthread_mutex_unlock(&st->lock);
            break;
        }
        meta = zram_slot_clear(z, index, &h);
        st->counters[C_NOTIFY_FREE] += 1;
        pthread_mutex_unlock(&st->lock);
        /* The slot no longer names it: no other request can reach it. */
        if (!(meta & ZRAM_SAME) && h)
            zs_free_deferred(z->pool, h);
    }
    return i;
}

size_t
zram_extents(struct zram *z, size_t first, size_t count,
             struct zram_run *runs, size_t max_runs)
{
    size_t i, n = 0;
    for (i = 0; i < count; i++) {
        size_t index = first + i;
        uint32_t meta = get_meta(z, index);
        uint64_t handle = get_handle(z, index);
        enum zram_extent kind = handle ? ZRAM_EXT_DATA
                                : meta & ZRAM_SAME ? ZRAM_EXT_ZERO
                                                   : ZRAM_EXT_HOLE;
        if (n && runs[n - 1].kind == kind) {
            runs[n - 1].sectors++;
        } else if (n == max_runs) {
            break;
        } else {
            runs[n].sectors = 1;
            runs[n++].kind = kind;
        }
    }
    return n;
}

size_t
zram_mark_idle(struct zram *z, int all, long cutoff)
{
    size_t marked = 0, index;
    int s;
    for (s = 0; s < N_STRIPES; s++) {
        pthread_mutex_lock(&z->stripe[s].lock);
        for (index = s; index < z->nr_pages; index += N_STRIPES) {
            uint32_t meta = get_meta(z, index);
            if (meta & (ZRAM_SAME | ZRAM_WB) || !get_handle(z, index))
                continue;
            if (all || (long)get_atime(z, index) <= cutoff) {
                if (!(meta & ZRAM_IDLE)) {
                    set_meta(z, index, meta | ZRAM_IDLE);
                    marked++;
                }
            } else if (meta & ZRAM_IDLE) {
                set_meta(z, index, meta & ~ZRAM_IDLE);
            }
        }
        pthread_mutex_unlock(&z->stripe[s].lock);
    }
    return marked;
}

/* ---- partial sectors ------------------------------------------------------- */

ssize_t
zram_read_part(struct zram *z, void *out, size_t index, size_t lo, size_t hi)
{
    char page[PAGE_SIZE];
    ssize_t r = zram_read(z, page, index, 1);
    if (r == 1)
        memcpy(out, page + lo, hi - lo);
    return r;
}

ssize_t
zram_patch(struct zram *z, size_t index, size_t lo, const void *data,
           size_t n)
{
    struct zram_stripe *st = stripe_of(z, index);
    char page[PAGE_SIZE], obj[PAGE_SIZE], out[SCRATCH_STRIDE];
    struct crew_batch batch = {0};
    struct plan_args pargs;
    struct plan plan;
    struct zcomp *codec;
    const char *why;
    ssize_t result;
    int r;

    pthread_rwlock_rdlock(&z->codec_lock);
    codec = z->dict_codec[z->primary_id];
    if (!codec) {
        result = 0;                    /* no C form: the caller's */
        goto out;
    }
    if (zcomp_ctx_take(codec, ZCOMP_COMPRESS, &batch.ctx[0], &why)) {
        result = -ENOMEM;
        goto out;
    }
    plan_batch(&batch, &pargs, z, codec, page, out, &plan, 1);
    do {
        struct zram_version seen;
        uint32_t meta;
        uint64_t handle;

        /* Read, as zram_read does one sector, and note the version; the
         * read is counted with the store.  A WB slot's block would be
         * the caller's to free: all of it is. */
        pthread_mutex_lock(&st->lock);
        meta = get_meta(z, index);
        handle = get_handle(z, index);
        zram_slot_version(z, index, &seen);
        r = meta & ZRAM_WB ? READ_HAND_BACK
                           : read_plain(z, meta, handle, page);
        if (r == READ_COMPRESSED) {
            struct zcomp *dc = z->dict_codec[(meta & DICT_MASK)
                                             >> DICT_SHIFT];
            r = dc ? read_decompress(z, dc, meta, handle, obj, page)
                   : READ_HAND_BACK;
        }
        pthread_mutex_unlock(&st->lock);
        if (r != READ_DONE) {
            result = r < 0 ? r : 0;
            goto out_ctx;
        }

        memcpy(page + lo, data, n);
        plan_chunk(&batch, 0, 0, 1);       /* one page: no crew */
        r = store_page(z, index, &plan,
                       plan.size == PAGE_SIZE ? page : out, z->primary_id,
                       &seen);
    } while (r == STORE_STALE);
    result = r < 0 ? r : r == STORE_DONE;
out_ctx:
    zcomp_ctx_give(codec, ZCOMP_COMPRESS, batch.ctx[0]);
out:
    pthread_rwlock_unlock(&z->codec_lock);
    return result;
}
