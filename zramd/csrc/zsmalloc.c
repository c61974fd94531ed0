/*
 * zsmalloc.c: a zsmalloc-style allocator of small objects over 4 KiB
 * frames it maps itself; mm/zsmalloc.c on 4 KiB pages.
 *
 * Size classes
 *   255 classes from 32 to 4096 bytes in steps of 16.  The size that picks
 *   a class includes an 8-byte handle header (zs_malloc's size +=
 *   ZS_HANDLE_SIZE).  Each class packs its objects into zspages: chains of
 *   1..chain_size frames, as many as waste least
 *   (calculate_zspage_chain_size).  Neighbouring classes whose zspages
 *   hold as many objects on as many frames are merged (can_merge).  A
 *   class of one object per one-frame zspage is huge: its objects carry
 *   no header (the zspage keeps the handle).
 *
 * Zspages and objects
 *   A zspage is a list of frame numbers that need not be contiguous.
 *   Object k starts at byte k * class size of the chain, so it may span
 *   two frames:
 *
 *       frame 7 (4096 B)                     frame 3 (4096 B)
 *       +--------+--------+-----+------------+-----------+--------+---
 *       | obj 0  | obj 1  | ... | obj 4 ...  |... obj 4  | obj 5  |
 *       +--------+--------+-----+------------+-----------+--------+---
 *       ^hdr|data                ^hdr|data -> continues in frame 3
 *
 *   An allocated object's 8-byte header holds handle << 1 | 1; a free
 *   one's holds (next + 1) << 1, the zspage's free list (tag bit clear).
 *   Objects at or above the zspage's `unused` were never handed out, so a
 *   new zspage needs no initialisation.  Headers start on 16-byte
 *   boundaries and never straddle frames.
 *
 * Zspage metadata: columns
 *   Each class numbers its zspages 0, 1, 2, ... and keeps their metadata
 *   in flat arrays indexed by that id (inuse, unused, freeobj, group,
 *   prev, next, and pages_per_zspage frames per id).  Released ids wait on
 *   free_ids and are reused first.  When a class's last zspage goes, its
 *   arrays are freed whole, so the metadata follows the pool down.
 *
 * Handles
 *   A handle is row << 8 | class index.  Row r (from 1) of the class's
 *   handle table holds loc[r] = zspage id << 12 | object index and
 *   sizes[r] = the size asked for (0: free).  The indirection lets
 *   compaction move an object by rewriting loc[r].  Freed rows are reused
 *   from free_rows, last freed first.
 *
 * Fullness groups
 *   As get_fullness_group: 0 (empty), 10%..90% and 99% (1..10), 100%
 *   (11).  Each group is an intrusive doubly linked list through prev and
 *   next, headed by heads[g]; bit g of nonempty says it has members.
 *   malloc takes the head of the fullest group with room; compaction
 *   moves objects from the emptiest zspages into the fullest.
 *
 * Frames (the arena)
 *   Frames come from private anonymous mmap chunks of CHUNK_FRAMES frames
 *   (32 MiB), numbered across chunks; frame f is at chunks[f >> 13] +
 *   (f & 8191) * 4096.  A freed frame goes back to the OS at once
 *   (MADV_DONTNEED; under mlockall, munlock first and lock again on
 *   fault), and its number on a free stack.  Chunks are unmapped only
 *   when the pool is destroyed.  After TRIM_FRAMES frames are given back
 *   since the high mark, malloc_trim returns the heap that held their
 *   metadata.
 *
 * Deferred free
 *   As "mm/zsmalloc: reduce zs_free() latency on swap release path": a
 *   queue of at most DEFERRED_CAPACITY handles (zs_deferred_capacity
 *   changes it; 0 makes every free immediate), drained by a worker thread
 *   of the pool's own that lets a lone handle wait DEFERRED_IDLE_DELAY_MS
 *   for company.  zs_free_deferred only try-locks the queue: when it is
 *   busy or full the handle is freed at once.  A queued handle stays
 *   allocated, so it is never handed out again before it is really
 *   freed.  A drain swaps the queue for an empty one and frees the batch
 *   without the queue's lock.  The worker starts at the first handle
 *   queued in a process (a pool made before a fork gets one in the child)
 *   and stops in zs_destroy_pool, which drains what is left.
 *
 * Locking
 *   Lock order: drain_lock, then compact_lock, then one class lock
 *   (zs_audit alone takes them all, by class index), then the arena's
 *   lock.  The deferred queue's lock is never held while taking another
 *   but by zs_audit, which checks the queued handles under it.
 *   - A class's lock guards everything of the class that changes: its
 *     columns, lists, handle table and counters.  malloc, free, read and
 *     write take their handle's class lock and no other (and the arena's
 *     while a zspage is made; frames are given back after the class lock
 *     is let go).
 *   - Readers (obj_read_begin .. obj_read_end) count themselves in the
 *     class under its lock and then use a zero-copy pointer without it;
 *     compaction waits on no_readers until there are none.
 *   - compact_lock makes compactions take turns.
 *   No lock is held while calling out of this file but for lock_wait,
 *   which only ever waits for the lock it is given.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "zsmalloc.h"

#define GROUPS_WITH_ROOM ((1u << ZS_INUSE_RATIO_100) - 1)
/* Frame numbers are 32-bit: at most this many chunks. */
#define MAX_CHUNKS (1ul << (32 - CHUNK_SHIFT))

struct arena {
    pthread_mutex_t lock;
    char **chunks;                /* MAX_CHUNKS slots, filled in order */
    uint32_t nchunks;
    uint32_t *free;               /* free frame numbers, a stack */
    size_t nfree, free_cap;
    unsigned long frames_in_use;  /* written under lock, read atomically */
    unsigned long high_mark;      /* frames in use at the last peak/trim */
};

struct size_class {
    pthread_mutex_t lock;
    pthread_cond_t no_readers;
    int index, size, ppz, opz, huge, header;
    uint8_t fullness[257];        /* get_fullness_group(inuse); opz <= 256 */
    long readers;
    int compacting;
    unsigned long obj_allocated, obj_used;
    int32_t heads[NR_FULLNESS_GROUPS];
    uint32_t counts[NR_FULLNESS_GROUPS];
    unsigned nonempty;
    /* zspage columns: nz ids, room for zcap */
    uint32_t nz, zcap;
    uint16_t *inuse, *unused;
    int16_t *freeobj;
    uint8_t *group;
    int32_t *prev, *next;
    uint32_t *frames;             /* ppz per id */
    uint64_t *zhandle;            /* huge classes: the one object's handle */
    uint32_t *free_ids, n_free_ids;   /* room for zcap */
    /* handle table: rows 1..nrows-1, room for rowcap (row 0 unused) */
    uint32_t nrows, rowcap;
    uint64_t *loc;
    uint16_t *sizes;
    uint32_t *free_rows, n_free_rows; /* room for rowcap */
};

struct zs_pool {
    int chain_size;
    size_t huge_class_size;
    struct size_class *by_index[ZS_SIZE_CLASSES];   /* merged share one */
    struct size_class *classes[ZS_SIZE_CLASSES];    /* unmerged, by index */
    int nclasses;
    struct size_class *handle_class[HANDLE_CLASS_MASK + 1]; /* NULL: none */
    pthread_mutex_t compact_lock;
    unsigned long pages_compacted;
    struct arena arena;
    void (*lock_wait)(pthread_mutex_t *lock);
    struct deferred {
        pthread_mutex_t lock;     /* the queue; try-locked by producers */
        pthread_cond_t wake;      /* a first handle queued, or stop */
        pthread_cond_t half;      /* half full, or stop */
        unsigned long *q, *spare; /* the queue; a drained batch, reused */
        size_t n, cap, spare_cap;
        size_t capacity;          /* most handles queued; 0: free at once */
        pthread_mutex_t drain_lock;   /* drains take turns */
        pthread_t worker;
        pid_t worker_pid;         /* the process it runs in; 0: none */
        int held;                 /* no worker (zs_deferred_hold) */
        int stopping;
    } dq;
};

/* Set on the pool's own threads (the drain worker): they wait for a lock
 * with pthread_mutex_lock, never through the caller's lock_wait. */
static __thread int pool_thread;

/* ---- small helpers ----------------------------------------------------- */

static void
lock(struct zs_pool *pool, pthread_mutex_t *m)
{
    if (pthread_mutex_trylock(m) != 0) {
        if (pool_thread)
            pthread_mutex_lock(m);
        else
            pool->lock_wait(m);
    }
}

static void
unlock(pthread_mutex_t *m)
{
    pthread_mutex_unlock(m);
}

static void
default_lock_wait(pthread_mutex_t *m)
{
    pthread_mutex_lock(m);
}

/* get_size_class_index() for size bytes including the header. */
static int
class_index(size_t size)
{
    int idx = 0;
    if (size > ZS_MIN_ALLOC_SIZE)
        idx = (int)((size - ZS_MIN_ALLOC_SIZE + ZS_SIZE_CLASS_DELTA - 1)
                    / ZS_SIZE_CLASS_DELTA);
    return idx < ZS_SIZE_CLASSES - 1 ? idx : ZS_SIZE_CLASSES - 1;
}

static struct size_class *
class_for(struct zs_pool *pool, size_t size)
{
    return pool->by_index[class_index(size + ZS_HANDLE_SIZE)];
}

/* calculate_zspage_chain_size(): least waste, first minimum wins. */
static int
chain_size_for(int class_size, int chain_size)
{
    int i, best = 1, min_waste = -1;
    if ((class_size & (class_size - 1)) == 0)
        return 1;
    for (i = 1; i <= chain_size; i++) {
        int waste = (i * PAGE_SIZE) % class_size;
        if (min_waste < 0 || waste < min_waste) {
            best = i;
            min_waste = waste;
        }
    }
    return best;
}

/* The class and row of a live handle, class lock to be taken by the
 * caller; NULL when the handle names no class. */
static struct size_class *
handle_class(struct zs_pool *pool, unsigned long handle)
{
    return pool->handle_class[handle & HANDLE_CLASS_MASK];
}

/* Whether row is a live row of cls (class lock held). */
static int
row_live(struct size_class *cls, unsigned long row)
{
    return row > 0 && row < cls->nrows && cls->sizes[row];
}

static unsigned long
freeable(struct size_class *cls)
{
    unsigned long wasted;
    if (cls->obj_allocated <= cls->obj_used)
        return 0;
    wasted = cls->obj_allocated - cls->obj_used;
    return wasted / cls->opz * cls->ppz;
}

/* ---- the arena ----------------------------------------------------------- */

static char *
frame_address(struct arena *a, uint32_t frame)
{
    return a->chunks[frame >> CHUNK_SHIFT]
        + ((size_t)(frame & CHUNK_MASK) << PAGE_SHIFT);
}

/* One more chunk's frames on the free stack (arena lock held). */
static int
arena_grow(struct arena *a)
{
    uint32_t first, i;
    char *chunk;
    if (a->nchunks == MAX_CHUNKS)
        return -ENOMEM;
    /* Room on the stack for every frame there will be, so that freeing
     * never needs to grow it. */
    if (((size_t)a->nchunks + 1) * CHUNK_FRAMES > a->free_cap) {
        size_t cap = ((size_t)a->nchunks + 1) * CHUNK_FRAMES;
        uint32_t *grown = realloc(a->free, cap * sizeof(*grown));
        if (!grown)
            return -ENOMEM;
        a->free = grown;
        a->free_cap = cap;
    }
    /* Private, not shared: MADV_DONTNEED only gives private anonymous
     * memory back to the OS. */
    chunk = mmap(NULL, (size_t)CHUNK_FRAMES << PAGE_SHIFT,
                 PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (chunk == MAP_FAILED)
        return -ENOMEM;
    first = a->nchunks << CHUNK_SHIFT;
    a->chunks[a->nchunks++] = chunk;
    /* Highest first, so the stack hands out low frame numbers first. */
    for (i = CHUNK_FRAMES; i > 0; i--)
        a->free[a->nfree++] = first + i - 1;
    return 0;
}

/* n frames into out (arena lock taken here).  0 or -ENOMEM. */
static int
arena_alloc(struct zs_pool *pool, uint32_t *out, int n)
{
    struct arena *a = &pool->arena;
    int i, r = 0;
    lock(pool, &a->lock);
    while (a->nfree < (size_t)n && (r = arena_grow(a)) == 0)
        ;
    if (r == 0) {
        for (i = 0; i < n; i++)
            out[i] = a->free[--a->nfree];
        __atomic_store_n(&a->frames_in_use, a->frames_in_use + n,
                         __ATOMIC_RELAXED);
        if (a->frames_in_use > a->high_mark)
            a->high_mark = a->frames_in_use;
    }
    unlock(&a->lock);
    return r;
}

/* MADV_DONTNEED a range of a process locked with mlockall (swap=true): the
 * kernel refuses it on locked pages, so unlock, drop, and lock again on
 * fault only, which keeps later pages of the range locked without
 * touching them now. */
static int
unlocked_dontneed(char *addr, size_t len)
{
    if (munlock(addr, len) || madvise(addr, len, MADV_DONTNEED)
            || mlock2(addr, len, MLOCK_ONFAULT))
        return -errno;
    return 0;
}

static int
cmp_frame(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Give n frames back to the OS and to the free stack (no lock held).  The
 * madvise happens before a frame is published as free.  0, or -errno of
 * the first madvise that failed (the frames are freed all the same). */
static int
arena_free(struct zs_pool *pool, const uint32_t *frames, int n)
{
    struct arena *a = &pool->arena;
    uint32_t sorted[CHAIN_SIZE_MAX], *runs = sorted;
    int i, start, err = 0, trim;
    if (n <= 0)
        return 0;
    if (n > CHAIN_SIZE_MAX && !(runs = malloc(n * sizeof(*runs))))
        runs = NULL;                  /* one madvise per frame, unsorted */
    if (runs) {
        memcpy(runs, frames, n * sizeof(*runs));
        qsort(runs, n, sizeof(*runs), cmp_frame);
    }
    /* One madvise per run of consecutive frames in one chunk. */
    for (start = 0; start < n; ) {
        const uint32_t *f = runs ? runs : frames;
        int end = start + 1;
        size_t len;
        char *addr;
        while (runs && end < n && f[end] == f[end - 1] + 1
               && (f[end] & CHUNK_MASK))
            end++;
        addr = frame_address(a, f[start]);
        len = (size_t)(end - start) << PAGE_SHIFT;
        if (madvise(addr, len, MADV_DONTNEED)) {
            int r = errno == EINVAL ? unlocked_dontneed(addr, len) : -errno;
            if (r && !err)
                err = r;
        }
        start = end;
    }
    if (runs != sorted)
        free(runs);
    lock(pool, &a->lock);
    /* free_cap covers every frame ever made: the push cannot overflow. */
    for (i = 0; i < n; i++)
        a->free[a->nfree++] = frames[i];
    __atomic_store_n(&a->frames_in_use, a->frames_in_use - n,
                     __ATOMIC_RELAXED);
    trim = a->frames_in_use + TRIM_FRAMES <= a->high_mark
        || (a->frames_in_use == 0 && a->high_mark);
    if (trim)
        a->high_mark = a->frames_in_use;
    unlock(&a->lock);
    if (trim)
        malloc_trim(0);    /* the heap's free pages anywhere, not only its top */
    return err;
}

/* ---- a class's columns (class lock held) ------------------------------------ */

static void
class_clear(struct size_class *cls)
{
    int g;
    free(cls->inuse);
    free(cls->unused);
    free(cls->freeobj);
    free(cls->group);
    free(cls->prev);
    free(cls->next);
    free(cls->frames);
    free(cls->zhandle);
    free(cls->free_ids);
    free(cls->loc);
    free(cls->sizes);
    free(cls->free_rows);
    cls->inuse = cls->unused = NULL;
    cls->freeobj = NULL;
    cls->group = NULL;
    cls->prev = cls->next = NULL;
    cls->frames = cls->free_ids = cls->free_rows = NULL;
    cls->zhandle = cls->loc = NULL;
    cls->sizes = NULL;
    cls->nz = cls->zcap = cls->n_free_ids = 0;
    cls->nrows = 1;               /* row 0 is never handed out */
    cls->rowcap = cls->n_free_rows = 0;
    cls->obj_allocated = cls->obj_used = 0;
    for (g = 0; g < NR_FULLNESS_GROUPS; g++) {
        cls->heads[g] = -1;
        cls->counts[g] = 0;
    }
    cls->nonempty = 0;
}

#define GROW(ptr, cap) do { \
        void *grown_ = realloc((ptr), (size_t)(cap) * sizeof(*(ptr))); \
        if (!grown_) \
            return -ENOMEM; \
        (ptr) = grown_; \
    } while (0)

/* Room for one more zspage id.  0 or -ENOMEM (the columns unchanged in
 * meaning: only some grew). */
static int
zspage_room(struct size_class *cls)
{
    uint32_t cap;
    if (cls->nz < cls->zcap)
        return 0;
    cap = cls->zcap ? 2 * cls->zcap : 4;
    GROW(cls->inuse, cap);
    GROW(cls->unused, cap);
    GROW(cls->freeobj, cap);
    GROW(cls->group, cap);
    GROW(cls->prev, cap);
    GROW(cls->next, cap);
    GROW(cls->free_ids, cap);
    GROW(cls->frames, (size_t)cap * cls->ppz);
    if (cls->huge)
        GROW(cls->zhandle, cap);
    cls->zcap = cap;
    return 0;
}

/* Room for one more handle row. */
static int
row_room(struct size_class *cls)
{
    uint32_t cap;
    if (cls->nrows < cls->rowcap)
        return 0;
    cap = cls->rowcap ? 2 * cls->rowcap : 16;
    GROW(cls->loc, cap);
    GROW(cls->sizes, cap);
    GROW(cls->free_rows, cap);
    if (!cls->rowcap) {
        cls->loc[0] = 0;
        cls->sizes[0] = 0;
    }
    cls->rowcap = cap;
    return 0;
}

#undef GROW

/* A zspage for cls, holding no object and on no list (ISOLATED); its id,
 * or -ENOMEM. */
static long
new_zspage(struct zs_pool *pool, struct size_class *cls)
{
    uint32_t frames[CHAIN_SIZE_MAX], z;
    int i, r;
    if ((r = zspage_room(cls)) < 0)
        return r;
    if ((r = arena_alloc(pool, frames, cls->ppz)) < 0)
        return r;
    if (cls->n_free_ids) {
        z = cls->free_ids[--cls->n_free_ids];
    } else {
        z = cls->nz++;
        cls->prev[z] = cls->next[z] = -1;
        if (cls->huge)
            cls->zhandle[z] = 0;
    }
    for (i = 0; i < cls->ppz; i++)
        cls->frames[(size_t)z * cls->ppz + i] = frames[i];
    cls->inuse[z] = 0;
    cls->unused[z] = 0;
    cls->freeobj[z] = -1;
    cls->group[z] = ZS_ISOLATED;
    cls->obj_allocated += cls->opz;
    return z;
}

/* Forget empty zspage z, already off its list; its frames into out (the
 * caller gives them to the arena after the class lock).  Returns how many. */
static int
release_zspage(struct size_class *cls, uint32_t z, uint32_t *out)
{
    int i;
    for (i = 0; i < cls->ppz; i++)
        out[i] = cls->frames[(size_t)z * cls->ppz + i];
    cls->obj_allocated -= cls->opz;
    if (cls->obj_allocated) {
        cls->group[z] = ZS_FREE;
        if (cls->huge)
            cls->zhandle[z] = 0;
        cls->free_ids[cls->n_free_ids++] = z;   /* room: zcap */
    } else {
        /* The class's last zspage: free the columns whole rather than
         * keep them at their high-water size. */
        class_clear(cls);
    }
    return cls->ppz;
}

static void
list_link(struct size_class *cls, int32_t z, int g)
{
    int32_t head = cls->heads[g];
    cls->prev[z] = -1;
    cls->next[z] = head;
    if (head >= 0)
        cls->prev[head] = z;
    else
        cls->nonempty |= 1u << g;
    cls->heads[g] = z;
    cls->group[z] = g;
    cls->counts[g]++;
}

static void
list_unlink(struct size_class *cls, int32_t z)
{
    int g = cls->group[z];
    int32_t p = cls->prev[z], n = cls->next[z];
    if (p >= 0) {
        cls->next[p] = n;
    } else {
        cls->heads[g] = n;
        if (n < 0)
            cls->nonempty &= ~(1u << g);
    }
    if (n >= 0)
        cls->prev[n] = p;
    cls->counts[g]--;
    cls->group[z] = ZS_ISOLATED;
}

/* Unlink and return the head of the first non-empty group from g going
 * by step, stopping before end; -1 if none. */
static int32_t
isolate(struct size_class *cls, int g, int end, int step)
{
    for (; g != end; g += step) {
        int32_t z = cls->heads[g];
        if (z >= 0) {
            list_unlink(cls, z);
            return z;
        }
    }
    return -1;
}

/* Where byte start of zspage z's chain is. */
static char *
chain_address(struct zs_pool *pool, struct size_class *cls, uint32_t z,
              size_t start)
{
    return frame_address(&pool->arena,
                         cls->frames[(size_t)z * cls->ppz
                                     + (start >> PAGE_SHIFT)])
        + (start & PAGE_MASK);
}

static uint64_t
header_read(struct zs_pool *pool, struct size_class *cls, uint32_t z,
            long idx)
{
    uint64_t word;
    memcpy(&word, chain_address(pool, cls, z, (size_t)idx * cls->size), 8);
    return word;
}

static void
header_write(struct zs_pool *pool, struct size_class *cls, uint32_t z,
             long idx, uint64_t word)
{
    memcpy(chain_address(pool, cls, z, (size_t)idx * cls->size), &word, 8);
}

/* Hand a free object of zspage z (which has room) to handle: from its free
 * list, else its first never-used index.  Counts it in inuse; the caller
 * regroups.  Returns its index. */
static long
obj_take(struct zs_pool *pool, struct size_class *cls, uint32_t z,
         uint64_t handle)
{
    long idx = cls->freeobj[z];
    int reuse = idx >= 0;
    if (!reuse)
        idx = cls->unused[z]++;
    if (cls->huge) {
        cls->freeobj[z] = -1;
        cls->zhandle[z] = handle;
    } else {
        if (reuse)
            cls->freeobj[z] =
                (int16_t)((header_read(pool, cls, z, idx) >> 1) - 1);
        header_write(pool, cls, z, idx, handle << 1 | OBJ_ALLOCATED_TAG);
    }
    cls->inuse[z]++;
    return idx;
}

/* Object idx of zspage z (not a huge class) back on the zspage's free
 * list; uncounts it in inuse. */
static void
obj_put(struct zs_pool *pool, struct size_class *cls, uint32_t z, long idx)
{
    header_write(pool, cls, z, idx, (uint64_t)(cls->freeobj[z] + 1) << 1);
    cls->freeobj[z] = (int16_t)idx;
    cls->inuse[z]--;
}

/* The object of a live row: its first byte's address, the bytes of it in
 * that frame, and the second frame's address if it spans two. */
static void
obj_locate(struct zs_pool *pool, struct size_class *cls, unsigned long row,
           char **first, size_t *first_len, char **second)
{
    uint64_t loc = cls->loc[row];
    uint32_t z = (uint32_t)(loc >> OBJ_INDEX_BITS);
    size_t start = (size_t)(loc & OBJ_INDEX_MASK) * cls->size + cls->header;
    size_t size = cls->sizes[row];
    *first = chain_address(pool, cls, z, start);
    *first_len = PAGE_SIZE - (start & PAGE_MASK);
    *second = NULL;
    if (size > *first_len)
        *second = chain_address(pool, cls, z, start + *first_len);
    else
        *first_len = size;
}

/* ---- deferred free --------------------------------------------------------- */

static void
deferred_init(struct deferred *d)
{
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    d->capacity = DEFERRED_CAPACITY;
    pthread_mutex_init(&d->lock, NULL);
    pthread_mutex_init(&d->drain_lock, NULL);
    pthread_cond_init(&d->wake, &attr);
    pthread_cond_init(&d->half, &attr);
    pthread_condattr_destroy(&attr);
}

static void
deferred_fini(struct deferred *d)
{
    free(d->q);
    free(d->spare);
    pthread_cond_destroy(&d->half);
    pthread_cond_destroy(&d->wake);
    pthread_mutex_destroy(&d->drain_lock);
    pthread_mutex_destroy(&d->lock);
}

/* Room for n more handles in the queue (lock held); -1 without memory. */
static int
deferred_room(struct deferred *d, size_t n)
{
    size_t cap = d->cap ? d->cap : 1024;
    unsigned long *grown;
    if (d->n + n <= d->cap)
        return 0;
    while (cap < d->n + n)
        cap *= 2;
    if (!(grown = realloc(d->q, cap * sizeof(*grown))))
        return -1;
    d->q = grown;
    d->cap = cap;
    return 0;
}

static void *
deferred_worker(void *arg)
{
    struct zs_pool *pool = arg;
    struct deferred *d = &pool->dq;
    struct timespec until;
    pool_thread = 1;
    pthread_mutex_lock(&d->lock);
    for (;;) {
        while (!d->n && !d->stopping)
            pthread_cond_wait(&d->wake, &d->lock);
        if (d->stopping)
            break;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_nsec += DEFERRED_IDLE_DELAY_MS * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        while (d->n < d->capacity / 2 && !d->stopping
               && pthread_cond_timedwait(&d->half, &d->lock, &until) == 0)
            ;
        pthread_mutex_unlock(&d->lock);
        zs_free_deferred_flush(pool);
        pthread_mutex_lock(&d->lock);
    }
    pthread_mutex_unlock(&d->lock);
    return NULL;
}

/* A worker running in this process, started if need be (lock held); 0,
 * or -1 when the pool is held or no thread could be started. */
static int
deferred_worker_up(struct zs_pool *pool)
{
    struct deferred *d = &pool->dq;
    pid_t pid = getpid();
    if (d->held || d->stopping)
        return -1;
    if (d->worker_pid == pid)
        return 0;
    if (pthread_create(&d->worker, NULL, deferred_worker, pool) != 0)
        return -1;
    d->worker_pid = pid;
    return 0;
}

/* Stop this process's worker and wait for it to end. */
static void
deferred_stop(struct zs_pool *pool)
{
    struct deferred *d = &pool->dq;
    int running;
    pthread_mutex_lock(&d->lock);
    running = d->worker_pid == getpid();
    d->stopping = 1;
    pthread_cond_broadcast(&d->wake);
    pthread_cond_broadcast(&d->half);
    pthread_mutex_unlock(&d->lock);
    if (running)
        pthread_join(d->worker, NULL);
    pthread_mutex_lock(&d->lock);
    d->worker_pid = 0;
    d->stopping = 0;
    pthread_mutex_unlock(&d->lock);
}

int
zs_free_deferred(struct zs_pool *pool, unsigned long handle)
{
    struct deferred *d = &pool->dq;
    size_t n;
    if (!zs_obj_size(pool, handle))
        return -EINVAL;
    if (pthread_mutex_trylock(&d->lock) != 0)
        return zs_free(pool, handle);
    if (d->n >= d->capacity
            || (deferred_worker_up(pool) < 0 && !d->held)
            || deferred_room(d, 1) < 0) {
        pthread_mutex_unlock(&d->lock);
        return zs_free(pool, handle);
    }
    d->q[d->n++] = handle;
    n = d->n;
    if (n == 1)
        pthread_cond_signal(&d->wake);
    if (n == d->capacity / 2)
        pthread_cond_signal(&d->half);
    pthread_mutex_unlock(&d->lock);
    return 0;
}

int
zs_free_deferred_flush(struct zs_pool *pool)
{
    struct deferred *d = &pool->dq;
    unsigned long *batch;
    size_t n, cap, i;
    int r, err = 0;
    lock(pool, &d->drain_lock);
    pthread_mutex_lock(&d->lock);
    batch = d->q;
    n = d->n;
    cap = d->cap;
    d->q = d->spare;
    d->cap = d->spare_cap;
    d->n = 0;
    d->spare = NULL;
    d->spare_cap = 0;
    pthread_mutex_unlock(&d->lock);
    for (i = 0; i < n; i++) {
        r = zs_free(pool, batch[i]);
        if (r == -EINVAL) {
            /* Not allocated (a caller freed it behind the queue's back):
             * the rest go back to the front of the queue, not leaked. */
            size_t rest = n - i - 1;
            pthread_mutex_lock(&d->lock);
            if (deferred_room(d, rest) == 0) {
                memmove(d->q + rest, d->q, d->n * sizeof(*d->q));
                memcpy(d->q, batch + i + 1, rest * sizeof(*d->q));
                d->n += rest;
                rest = 0;
            }
            pthread_mutex_unlock(&d->lock);
            for (i++; rest; i++, rest--)
                zs_free(pool, batch[i]);
            err = -EINVAL;
            break;
        }
        if (r < 0 && !err)
            err = r;
    }
    pthread_mutex_lock(&d->lock);
    if (!d->spare) {
        d->spare = batch;
        d->spare_cap = cap;
        batch = NULL;
    }
    pthread_mutex_unlock(&d->lock);
    free(batch);
    unlock(&d->drain_lock);
    return err;
}

size_t
zs_deferred_pending(struct zs_pool *pool)
{
    size_t n;
    pthread_mutex_lock(&pool->dq.lock);
    n = pool->dq.n;
    pthread_mutex_unlock(&pool->dq.lock);
    return n;
}

int
zs_deferred_start(struct zs_pool *pool)
{
    int r;
    pthread_mutex_lock(&pool->dq.lock);
    pool->dq.held = 0;
    r = deferred_worker_up(pool);
    pthread_mutex_unlock(&pool->dq.lock);
    return r < 0 ? -EAGAIN : 0;
}

void
zs_deferred_capacity(struct zs_pool *pool, size_t capacity)
{
    pthread_mutex_lock(&pool->dq.lock);
    pool->dq.capacity = capacity;
    pthread_mutex_unlock(&pool->dq.lock);
}

void
zs_deferred_hold(struct zs_pool *pool)
{
    deferred_stop(pool);
    pthread_mutex_lock(&pool->dq.lock);
    pool->dq.held = 1;
    pthread_mutex_unlock(&pool->dq.lock);
}

/* zs_audit's last check: every queued handle is live. */
static int
deferred_audit(struct zs_pool *pool, char *why, size_t len)
{
    struct deferred *d = &pool->dq;
    size_t i;
    int r = 0;
    pthread_mutex_lock(&d->lock);
    for (i = 0; i < d->n && !r; i++)
        if (!zs_obj_size(pool, d->q[i])) {
            snprintf(why, len, "queued for deferred free but not live: %lu",
                     d->q[i]);
            r = -1;
        }
    pthread_mutex_unlock(&d->lock);
    return r;
}

/* ---- pool ------------------------------------------------------------------- */

struct zs_pool *
zs_create_pool(int chain_size)
{
    struct zs_pool *pool;
    struct size_class *prev = NULL;
    int i;
    if (chain_size < CHAIN_SIZE_MIN || chain_size > CHAIN_SIZE_MAX) {
        errno = EINVAL;
        return NULL;
    }
    if (!(pool = calloc(1, sizeof(*pool))))
        return NULL;
    pool->chain_size = chain_size;
    pool->lock_wait = default_lock_wait;
    pthread_mutex_init(&pool->compact_lock, NULL);
    deferred_init(&pool->dq);
    pthread_mutex_init(&pool->arena.lock, NULL);
    /* Untouched, the table costs address space only. */
    pool->arena.chunks = mmap(NULL, MAX_CHUNKS * sizeof(char *),
                              PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                              -1, 0);
    if (pool->arena.chunks == MAP_FAILED) {
        free(pool);
        errno = ENOMEM;
        return NULL;
    }
    /* zs_create_pool(): from the largest class down, merging equal
     * geometries and finding huge_class_size on the way. */
    for (i = ZS_SIZE_CLASSES - 1; i >= 0; i--) {
        int size = ZS_MIN_ALLOC_SIZE + i * ZS_SIZE_CLASS_DELTA;
        int ppz, opz, n;
        struct size_class *cls;
        if (size > ZS_MAX_ALLOC_SIZE)
            size = ZS_MAX_ALLOC_SIZE;
        ppz = chain_size_for(size, chain_size);
        opz = ppz * PAGE_SIZE / size;
        if (ppz != 1 && opz != 1 && !pool->huge_class_size)
            pool->huge_class_size = size - (ZS_HANDLE_SIZE - 1);
        if (prev && prev->ppz == ppz && prev->opz == opz) {
            pool->by_index[i] = prev;
            continue;
        }
        if (!(cls = calloc(1, sizeof(*cls))))
            break;
        cls->index = i;
        cls->size = size;
        cls->ppz = ppz;
        cls->opz = opz;
        cls->huge = ppz == 1 && opz == 1;
        cls->header = cls->huge ? 0 : ZS_HANDLE_SIZE;
        for (n = 0; n <= opz; n++)
            cls->fullness[n] = n == 0 ? ZS_INUSE_RATIO_0
                : n == opz ? ZS_INUSE_RATIO_100
                : (100 * n / opz) / 10 + 1;
        pthread_mutex_init(&cls->lock, NULL);
        pthread_cond_init(&cls->no_readers, NULL);
        class_clear(cls);
        pool->by_index[i] = pool->handle_class[i] = prev = cls;
    }
    for (i = 0; i < ZS_SIZE_CLASSES; i++)
        if (pool->handle_class[i])
            pool->classes[pool->nclasses++] = pool->handle_class[i];
    if (!pool->by_index[0]) {        /* a class could not be made */
        zs_destroy_pool(pool);
        errno = ENOMEM;
        return NULL;
    }
    return pool;
}

int
zs_destroy_pool(struct zs_pool *pool)
{
    struct arena *a = &pool->arena;
    int i;
    deferred_stop(pool);
    zs_free_deferred_flush(pool);
    for (i = 0; i < pool->nclasses; i++) {
        long readers;
        lock(pool, &pool->classes[i]->lock);
        readers = pool->classes[i]->readers;
        unlock(&pool->classes[i]->lock);
        if (readers)
            return -EBUSY;
    }
    for (i = 0; i < pool->nclasses; i++) {
        struct size_class *cls = pool->classes[i];
        class_clear(cls);
        pthread_mutex_destroy(&cls->lock);
        pthread_cond_destroy(&cls->no_readers);
        free(cls);
    }
    if (a->chunks != MAP_FAILED) {
        uint32_t c;
        for (c = 0; c < a->nchunks; c++)
            munmap(a->chunks[c], (size_t)CHUNK_FRAMES << PAGE_SHIFT);
        munmap(a->chunks, MAX_CHUNKS * sizeof(char *));
    }
    free(a->free);
    pthread_mutex_destroy(&a->lock);
    pthread_mutex_destroy(&pool->compact_lock);
    deferred_fini(&pool->dq);
    free(pool);
    malloc_trim(0);
    return 0;
}

void
zs_set_lock_wait(struct zs_pool *pool, void (*wait)(pthread_mutex_t *))
{
    pool->lock_wait = wait ? wait : default_lock_wait;
}

unsigned long
zs_malloc(struct zs_pool *pool, size_t size)
{
    struct size_class *cls;
    unsigned room;
    long z, row, idx;
    int g, new_group;
    uint64_t handle;

    if (size == 0 || size > ZS_MAX_ALLOC_SIZE) {
        errno = EINVAL;
        return 0;
    }
    cls = class_for(pool, size);
    lock(pool, &cls->lock);
    room = cls->nonempty & GROUPS_WITH_ROOM;
    if (room) {
        /* find_get_zspage(): the head of the fullest group with room */
        g = 31 - __builtin_clz(room);
        z = cls->heads[g];
    } else {
        g = ZS_ISOLATED;
        if ((z = new_zspage(pool, cls)) < 0)
            goto nomem;
    }
    if (cls->n_free_rows) {
        row = cls->free_rows[--cls->n_free_rows];
    } else if (row_room(cls) == 0) {
        row = cls->nrows++;
    } else {
        if (g == ZS_ISOLATED) {       /* the new zspage goes back */
            uint32_t frames[CHAIN_SIZE_MAX];
            int n = release_zspage(cls, z, frames);
            unlock(&cls->lock);
            arena_free(pool, frames, n);
            errno = ENOMEM;
            return 0;
        }
        goto nomem;
    }
    handle = (uint64_t)row << HANDLE_CLASS_BITS | cls->index;
    idx = obj_take(pool, cls, z, handle);
    new_group = cls->fullness[cls->inuse[z]];
    if (new_group != g) {
        if (g != ZS_ISOLATED)
            list_unlink(cls, z);
        list_link(cls, z, new_group);
    }
    cls->loc[row] = (uint64_t)z << OBJ_INDEX_BITS | idx;
    cls->sizes[row] = size;
    cls->obj_used++;
    unlock(&cls->lock);
    return handle;

nomem:
    unlock(&cls->lock);
    errno = ENOMEM;
    return 0;
}

int
zs_free(struct zs_pool *pool, unsigned long handle)
{
    struct size_class *cls = handle_class(pool, handle);
    unsigned long row = handle >> HANDLE_CLASS_BITS;
    uint32_t frames[CHAIN_SIZE_MAX], z;
    uint64_t loc;
    int n = 0, inuse;

    if (!cls)
        return -EINVAL;
    lock(pool, &cls->lock);
    if (!row_live(cls, row)) {
        unlock(&cls->lock);
        return -EINVAL;
    }
    loc = cls->loc[row];
    z = (uint32_t)(loc >> OBJ_INDEX_BITS);
    cls->loc[row] = 0;
    cls->sizes[row] = 0;
    cls->free_rows[cls->n_free_rows++] = row;     /* room: rowcap */
    cls->obj_used--;
    inuse = cls->inuse[z] - 1;
    if (inuse) {
        /* a huge zspage (one object) never gets here: it has a header */
        int new_group = cls->fullness[inuse];
        obj_put(pool, cls, z, loc & OBJ_INDEX_MASK);
        if (new_group != cls->group[z]) {
            list_unlink(cls, z);
            list_link(cls, z, new_group);
        }
    } else {
        cls->inuse[z] = 0;
        list_unlink(cls, z);
        n = release_zspage(cls, z, frames);
    }
    unlock(&cls->lock);
    return n ? arena_free(pool, frames, n) : 0;
}

size_t
zs_obj_size(struct zs_pool *pool, unsigned long handle)
{
    struct size_class *cls = handle_class(pool, handle);
    unsigned long row = handle >> HANDLE_CLASS_BITS;
    size_t size = 0;
    if (!cls)
        return 0;
    lock(pool, &cls->lock);
    if (row_live(cls, row))
        size = cls->sizes[row];
    unlock(&cls->lock);
    return size;
}

int
zs_obj_write(struct zs_pool *pool, unsigned long handle, const void *src,
             size_t n)
{
    struct size_class *cls = handle_class(pool, handle);
    unsigned long row = handle >> HANDLE_CLASS_BITS;
    char *first, *second;
    size_t first_len;
    if (!cls)
        return -EINVAL;
    lock(pool, &cls->lock);
    if (!row_live(cls, row) || n > cls->sizes[row]) {
        unlock(&cls->lock);
        return -EINVAL;
    }
    obj_locate(pool, cls, row, &first, &first_len, &second);
    if (n <= first_len) {
        memcpy(first, src, n);
    } else {
        memcpy(first, src, first_len);
        memcpy(second, (const char *)src + first_len, n - first_len);
    }
    unlock(&cls->lock);
    return 0;
}

const void *
zs_obj_read_begin(struct zs_pool *pool, unsigned long handle,
                  void *local_copy, size_t *size)
{
    struct size_class *cls = handle_class(pool, handle);
    unsigned long row = handle >> HANDLE_CLASS_BITS;
    char *first, *second;
    size_t first_len;
    if (!cls)
        goto invalid;
    lock(pool, &cls->lock);
    if (!row_live(cls, row)) {
        unlock(&cls->lock);
        goto invalid;
    }
    *size = cls->sizes[row];
    obj_locate(pool, cls, row, &first, &first_len, &second);
    cls->readers++;
    unlock(&cls->lock);
    if (!second)
        return first;
    memcpy(local_copy, first, first_len);
    memcpy((char *)local_copy + first_len, second, *size - first_len);
    return local_copy;

invalid:
    errno = EINVAL;
    return NULL;
}

void
zs_obj_read_end(struct zs_pool *pool, unsigned long handle)
{
    struct size_class *cls = handle_class(pool, handle);
    if (!cls)
        return;
    lock(pool, &cls->lock);
    cls->readers--;
    if (cls->compacting && !cls->readers)
        pthread_cond_broadcast(&cls->no_readers);
    unlock(&cls->lock);
}

/* ---- compaction ------------------------------------------------------------- */

/* Copy n bytes from byte start of zspage z's chain into buf, or back. */
static void
span_copy(struct zs_pool *pool, struct size_class *cls, uint32_t z,
          size_t start, char *buf, size_t n, int to_chain)
{
    while (n) {
        char *at = chain_address(pool, cls, z, start);
        size_t part = PAGE_SIZE - (start & PAGE_MASK);
        if (part > n)
            part = n;
        if (to_chain)
            memcpy(at, buf, part);
        else
            memcpy(buf, at, part);
        buf += part;
        start += part;
        n -= part;
    }
}

/* Move allocated objects of src into dst until dst is full or src empty,
 * rewriting their handles' rows. */
static void
migrate(struct zs_pool *pool, struct size_class *cls, uint32_t src,
        uint32_t dst)
{
    char buf[PAGE_SIZE];
    long idx;
    for (idx = 0; idx < cls->unused[src]; idx++) {
        uint64_t word, handle;
        long new_idx;
        if (cls->inuse[src] == 0 || cls->inuse[dst] == cls->opz)
            return;
        word = header_read(pool, cls, src, idx);
        if (!(word & OBJ_ALLOCATED_TAG))
            continue;
        handle = word >> 1;
        span_copy(pool, cls, src, (size_t)idx * cls->size, buf, cls->size, 0);
        new_idx = obj_take(pool, cls, dst, handle);
        span_copy(pool, cls, dst, (size_t)new_idx * cls->size, buf,
                  cls->size, 1);
        obj_put(pool, cls, src, idx);
        cls->loc[handle >> HANDLE_CLASS_BITS] =
            (uint64_t)dst << OBJ_INDEX_BITS | new_idx;
    }
}

/* __zs_compact() for one class (class lock held, no readers): dst from
 * the fullest groups with room, src from the emptiest, both off their
 * lists while objects move.  The frames of emptied zspages go to out (room
 * for freeable() of them); returns how many. */
static unsigned long
compact_class(struct size_class *cls, struct zs_pool *pool, uint32_t *out)
{
    unsigned long n = 0;
    int32_t dst = -1, src;
    while (freeable(cls)) {
        if (dst < 0) {
            dst = isolate(cls, ZS_INUSE_RATIO_99, ZS_INUSE_RATIO_0, -1);
            if (dst < 0)
                break;
        }
        src = isolate(cls, ZS_INUSE_RATIO_10, ZS_INUSE_RATIO_100, 1);
        if (src < 0)
            break;
        migrate(pool, cls, src, dst);
        if (cls->inuse[src])
            list_link(cls, src, cls->fullness[cls->inuse[src]]);
        else
            n += release_zspage(cls, src, out + n);
        if (cls->inuse[dst] == cls->opz) {
            list_link(cls, dst, ZS_INUSE_RATIO_100);
            dst = -1;
        }
    }
    if (dst >= 0)
        list_link(cls, dst, cls->fullness[cls->inuse[dst]]);
    return n;
}

unsigned long
zs_compact(struct zs_pool *pool)
{
    unsigned long freed = 0;
    int i;
    lock(pool, &pool->compact_lock);
    for (i = 0; i < pool->nclasses; i++) {
        struct size_class *cls = pool->classes[i];
        uint32_t *frames;
        unsigned long n, want;
        if (cls->huge)
            continue;
        lock(pool, &cls->lock);
        if (!freeable(cls)) {
            unlock(&cls->lock);
            continue;
        }
        cls->compacting = 1;
        while (cls->readers)
            pthread_cond_wait(&cls->no_readers, &cls->lock);
        cls->compacting = 0;
        /* What is freeable now, after the wait, bounds what is freed. */
        want = freeable(cls);
        if (!want || !(frames = malloc(want * sizeof(*frames)))) {
            unlock(&cls->lock);          /* nothing, or no memory: skip */
            continue;
        }
        n = compact_class(cls, pool, frames);
        unlock(&cls->lock);
        arena_free(pool, frames, (int)n);
        free(frames);
        freed += n;
    }
    __atomic_add_fetch(&pool->pages_compacted, freed, __ATOMIC_RELAXED);
    unlock(&pool->compact_lock);
    return freed;
}

/* ---- stats ------------------------------------------------------------------- */

unsigned long
zs_get_total_pages(struct zs_pool *pool)
{
    return __atomic_load_n(&pool->arena.frames_in_use, __ATOMIC_RELAXED);
}

unsigned long
zs_pages_compacted(struct zs_pool *pool)
{
    return __atomic_load_n(&pool->pages_compacted, __ATOMIC_RELAXED);
}

size_t
zs_huge_class_size(struct zs_pool *pool)
{
    return pool->huge_class_size;
}

int
zs_lookup_class_index(struct zs_pool *pool, size_t size)
{
    if (size == 0 || size > ZS_MAX_ALLOC_SIZE)
        return -1;
    return class_for(pool, size)->index;
}

int
zs_class_count(struct zs_pool *pool)
{
    return pool->nclasses;
}

void
zs_class_stats(struct zs_pool *pool, int i, struct zs_class_stat *out)
{
    struct size_class *cls = pool->classes[i];
    int g;
    lock(pool, &cls->lock);
    out->index = cls->index;
    out->size = cls->size;
    for (g = ZS_INUSE_RATIO_10; g < NR_FULLNESS_GROUPS; g++)
        out->fullness[g - ZS_INUSE_RATIO_10] = cls->counts[g];
    out->obj_allocated = cls->obj_allocated;
    out->obj_used = cls->obj_used;
    out->pages_used = cls->obj_allocated / cls->opz * cls->ppz;
    out->pages_per_zspage = cls->ppz;
    out->objs_per_zspage = cls->opz;
    out->freeable = freeable(cls);
    unlock(&cls->lock);
}

/* ---- audit --------------------------------------------------------------------- */

#define CHECK(ok, ...) do { \
        if (!(ok)) { \
            snprintf(why, len, __VA_ARGS__); \
            goto broken; \
        } \
    } while (0)

/* Bit i of a bitmap of n bits. */
static int
bit_test_set(uint8_t *map, unsigned long i)
{
    int was = map[i >> 3] >> (i & 7) & 1;
    map[i >> 3] |= 1 << (i & 7);
    return was;
}

/* The object at (z, idx) of cls claims handle: its row must point back
 * and be claimed once. */
static int
audit_handle(struct zs_pool *pool, struct size_class *cls, uint32_t z,
             long idx, uint64_t handle, uint8_t *claimed, char *why,
             size_t len)
{
    unsigned long row = handle >> HANDLE_CLASS_BITS;
    CHECK((handle & HANDLE_CLASS_MASK) == (uint64_t)cls->index
          && row > 0 && row < cls->nrows,
          "class %d zspage %u object %ld: handle %#llx is not the class's",
          cls->index, z, idx, (unsigned long long)handle);
    CHECK(!bit_test_set(claimed, row), "handle %#llx held by two objects",
          (unsigned long long)handle);
    CHECK(cls->loc[row] == ((uint64_t)z << OBJ_INDEX_BITS | idx),
          "handle %#llx: loc %#llx, object at zspage %u index %ld",
          (unsigned long long)handle, (unsigned long long)cls->loc[row], z,
          idx);
    CHECK(cls->sizes[row] && class_for(pool, cls->sizes[row]) == cls,
          "handle %#llx: size %u is not for class %d",
          (unsigned long long)handle, cls->sizes[row], cls->index);
    return 0;
broken:
    return -1;
}

static int
audit_class(struct zs_pool *pool, struct size_class *cls, uint8_t *owner,
            unsigned long *owned, char *why, size_t len)
{
    uint8_t *on_list = NULL, *is_free = NULL, *claimed = NULL, *objs = NULL;
    unsigned long used = 0, live = 0, i;
    uint32_t z;
    int g, ci = cls->index, r = -1;

    CHECK(cls->readers >= 0, "class %d: readers %ld", ci, cls->readers);
    CHECK(cls->nz <= cls->zcap && cls->nrows >= 1
          && (cls->nrows <= cls->rowcap || cls->nrows == 1),
          "class %d: %u ids in %u, %u rows in %u", ci, cls->nz, cls->zcap,
          cls->nrows, cls->rowcap);
    on_list = calloc(cls->nz / 8 + 1, 1);
    is_free = calloc(cls->nz / 8 + 1, 1);
    claimed = calloc(cls->nrows / 8 + 1, 1);
    objs = calloc(cls->opz / 8 + 1, 1);
    CHECK(on_list && is_free && claimed && objs, "audit: out of memory");
    /* Fullness lists. */
    for (g = 0; g < NR_FULLNESS_GROUPS; g++) {
        int32_t at = cls->heads[g], prev = -1;
        unsigned long count = 0;
        int listed = (cls->nonempty >> g) & 1;
        CHECK(listed == (at >= 0), "class %d: nonempty bit %d is %d, head %d",
              ci, g, listed, at);
        while (at >= 0) {
            CHECK((uint32_t)at < cls->nz && !bit_test_set(on_list, at),
                  "class %d group %d: bad or repeated id %d", ci, g, at);
            CHECK(cls->prev[at] == prev,
                  "class %d zspage %d: prev %d, expected %d", ci, at,
                  cls->prev[at], prev);
            CHECK(cls->group[at] == g,
                  "class %d zspage %d: on list %d, group says %d", ci, at, g,
                  cls->group[at]);
            CHECK(cls->inuse[at] <= cls->opz
                  && cls->fullness[cls->inuse[at]] == g,
                  "class %d zspage %d: inuse %d does not belong in group %d",
                  ci, at, cls->inuse[at], g);
            CHECK(cls->inuse[at] > 0, "class %d zspage %d: empty zspage kept",
                  ci, at);
            prev = at;
            at = cls->next[at];
            count++;
            live++;
        }
        CHECK(count == cls->counts[g],
              "class %d group %d: %lu on list, counts says %u", ci, g, count,
              cls->counts[g]);
    }
    for (i = 0; i < cls->n_free_ids; i++) {
        z = cls->free_ids[i];
        CHECK(z < cls->nz && !bit_test_set(is_free, z),
              "class %d: id %u on free_ids twice or out of range", ci, z);
        CHECK(!(on_list[z >> 3] >> (z & 7) & 1),
              "class %d: id %u both free and live", ci, z);
        CHECK(cls->group[z] == ZS_FREE, "class %d: free id %u has group %d",
              ci, z, cls->group[z]);
    }
    CHECK(cls->n_free_ids + live == cls->nz,
          "class %d: %lu ids neither free nor on a list (isolated)", ci,
          cls->nz - cls->n_free_ids - live);
    /* Objects of each live zspage. */
    for (z = 0; z < cls->nz; z++) {
        unsigned long allocated = 0, nfree = 0;
        int p;
        long idx;
        if (!(on_list[z >> 3] >> (z & 7) & 1))
            continue;
        CHECK(cls->inuse[z] <= cls->unused[z] && cls->unused[z] <= cls->opz,
              "class %d zspage %u: inuse %d unused %d of %d", ci, z,
              cls->inuse[z], cls->unused[z], cls->opz);
        used += cls->inuse[z];
        for (p = 0; p < cls->ppz; p++) {
            uint32_t f = cls->frames[(size_t)z * cls->ppz + p];
            CHECK(f < pool->arena.nchunks * (unsigned long)CHUNK_FRAMES
                  && !bit_test_set(owner, f),
                  "frame %u of class %d zspage %u: out of range or in two"
                  " zspages", f, ci, z);
            (*owned)++;
        }
        if (cls->huge) {
            if (audit_handle(pool, cls, z, 0, cls->zhandle[z], claimed, why,
                             len) < 0)
                goto broken;
            continue;
        }
        memset(objs, 0, cls->opz / 8 + 1);
        for (idx = 0; idx < cls->unused[z]; idx++) {
            uint64_t word = header_read(pool, cls, z, idx);
            if (word & OBJ_ALLOCATED_TAG) {
                allocated++;
                if (audit_handle(pool, cls, z, idx, word >> 1, claimed, why,
                                 len) < 0)
                    goto broken;
            }
        }
        for (idx = cls->freeobj[z]; idx >= 0; ) {
            uint64_t word;
            CHECK(idx < cls->unused[z] && !bit_test_set(objs, idx),
                  "class %d zspage %u: free list hits %ld", ci, z, idx);
            word = header_read(pool, cls, z, idx);
            CHECK(!(word & OBJ_ALLOCATED_TAG),
                  "class %d zspage %u: object %ld on the free list is"
                  " allocated", ci, z, idx);
            nfree++;
            idx = (long)(word >> 1) - 1;
        }
        CHECK(allocated == cls->inuse[z]
              && allocated + nfree == cls->unused[z],
              "class %d zspage %u: %lu allocated + %lu free of %d used,"
              " inuse %d", ci, z, allocated, nfree, cls->unused[z],
              cls->inuse[z]);
    }
    CHECK(cls->obj_allocated == live * cls->opz,
          "class %d: obj_allocated %lu for %lu zspages", ci,
          cls->obj_allocated, live);
    CHECK(cls->obj_used == used, "class %d: obj_used %lu, counted %lu", ci,
          cls->obj_used, used);
    /* Handle rows: live (claimed by an object above) or free, once. */
    for (i = 1; i < cls->nrows; i++)
        CHECK(!cls->sizes[i] == !(claimed[i >> 3] >> (i & 7) & 1),
              "class %d: row %lu has %s", ci, i, cls->sizes[i]
              ? "a size but no object" : "an object but no size");
    for (i = 0; i < cls->n_free_rows; i++) {
        unsigned long row = cls->free_rows[i];
        CHECK(row > 0 && row < cls->nrows && !cls->sizes[row]
              && !bit_test_set(claimed, row),
              "class %d: row %lu free twice, live or out of range", ci, row);
    }
    for (i = 1; i < cls->nrows; i++)
        CHECK(claimed[i >> 3] >> (i & 7) & 1,
              "class %d: row %lu neither live nor free", ci, i);
    r = 0;
broken:
    free(on_list);
    free(is_free);
    free(claimed);
    free(objs);
    return r;
}

int
zs_audit(struct zs_pool *pool, char *why, size_t len)
{
    struct arena *a = &pool->arena;
    uint8_t *owner = NULL;
    unsigned long owned = 0, i;
    int c, r = -1;

    for (c = 0; c < pool->nclasses; c++)
        lock(pool, &pool->classes[c]->lock);
    lock(pool, &a->lock);
    owner = calloc((size_t)a->nchunks * CHUNK_FRAMES / 8 + 1, 1);
    CHECK(owner, "audit: out of memory");
    for (c = 0; c < pool->nclasses; c++)
        if (audit_class(pool, pool->classes[c], owner, &owned, why, len) < 0)
            goto broken;
    CHECK(a->frames_in_use == owned, "arena counts %lu frames, zspages hold"
          " %lu", a->frames_in_use, owned);
    CHECK(a->nfree + owned == (size_t)a->nchunks * CHUNK_FRAMES,
          "arena: %zu free and %lu held of %lu frames", a->nfree, owned,
          (unsigned long)a->nchunks * CHUNK_FRAMES);
    for (i = 0; i < a->nfree; i++)
        CHECK(!bit_test_set(owner, a->free[i]),
              "frame %u both free and held (or free twice)", a->free[i]);
    r = 0;
broken:
    free(owner);
    unlock(&a->lock);
    for (c = pool->nclasses - 1; c >= 0; c--)
        unlock(&pool->classes[c]->lock);
    return r < 0 ? r : deferred_audit(pool, why, len);
}

#undef CHECK

/* ---- planted faults (tests) ------------------------------------------------------ */

static long
first_live_zspage(struct size_class *cls)
{
    uint32_t z;
    for (z = 0; z < cls->nz; z++)
        if (cls->group[z] < NR_FULLNESS_GROUPS)
            return z;
    return -1;
}

static long
first_live_row(struct size_class *cls)
{
    uint32_t r;
    for (r = 1; r < cls->nrows; r++)
        if (cls->sizes[r])
            return r;
    return -1;
}

int
zs_plant_fault(struct zs_pool *pool, size_t size, const char *what)
{
    struct size_class *cls;
    long z, row;
    int r = 0;
    if (size == 0 || size > ZS_MAX_ALLOC_SIZE)
        return -1;
    cls = class_for(pool, size);
    lock(pool, &cls->lock);
    z = first_live_zspage(cls);
    row = first_live_row(cls);
    if (z < 0 || row < 0)
        r = -1;
    else if (!strcmp(what, "counts"))
        cls->counts[cls->group[z]]++;
    else if (!strcmp(what, "id both free and live") && cls->n_free_ids
             < cls->zcap)
        cls->free_ids[cls->n_free_ids++] = z;
    else if (!strcmp(what, "inuse against group"))
        cls->inuse[z]++;
    else if (!strcmp(what, "list link"))
        cls->prev[cls->heads[cls->group[z]]] = z;
    else if (!strcmp(what, "row free twice") && cls->n_free_rows
             && cls->n_free_rows < cls->rowcap)
        cls->free_rows[cls->n_free_rows++] = cls->free_rows[0];
    else if (!strcmp(what, "loc not pointing back"))
        cls->loc[row] ^= 1;
    else if (!strcmp(what, "free list"))
        cls->freeobj[z] = cls->unused[z];
    else if (!strcmp(what, "frame in two zspages") && cls->nz > 1)
        cls->frames[cls->ppz] = cls->frames[0];
    else
        r = -1;
    unlock(&cls->lock);
    return r;
}
