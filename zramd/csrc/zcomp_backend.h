/*
 * zcomp_backend.h: what a C codec backend fills in, as the kernel's
 * struct zcomp_ops (drivers/block/zram/backend_*.c): one const table of
 * operations per algorithm, listed in backends[] of zcomp.c, the
 * registry.  Adding an algorithm is one backend file and one line there.
 *
 * A backend sees the codec's fixed parameters (level; its own private
 * data, set up once from the dictionary) and, for each call, a working
 * context it made for that direction; zcomp.c owns the free lists of
 * contexts and their lock.  No operation takes a lock or calls out.
 */
#ifndef ZRAMD_ZCOMP_BACKEND_H
#define ZRAMD_ZCOMP_BACKEND_H

#include <pthread.h>
#include <stddef.h>

#include "zcomp.h"

/* A growable stack of pointers (a free list). */
struct ptr_stack {
    void **items;
    size_t n, cap;
};

struct zcomp {
    const struct zcomp_ops *ops;
    int level;
    void *priv;                    /* the backend's, from setup() */
    pthread_mutex_t ctx_lock;      /* guards the two free lists */
    struct ptr_stack free[2];      /* by enum zcomp_dir */
};

struct zcomp_ops {
    const char *name;
    /* Fix c->priv from c->level and the dictionary (NULL: none); 0, or
     * -1 with *why set.  NULL: nothing to set up and no dictionary. */
    int (*setup)(struct zcomp *c, const void *dict, size_t dict_len,
                 const char **why);
    /* Free what setup made (also after it failed half-way); may be NULL. */
    void (*release)(struct zcomp *c);
    /* A new working context for dir, or NULL with *why set.  NULL when
     * the backend needs none (its calls then get ctx NULL). */
    void *(*ctx_new)(struct zcomp *c, enum zcomp_dir dir, const char **why);
    void (*ctx_free)(enum zcomp_dir dir, void *ctx);
    /* The most bytes compressing len bytes can give. */
    size_t (*bound)(size_t len);
    /* As zcomp_compress and zcomp_decompress (zcomp.h). */
    size_t (*compress)(struct zcomp *c, void *ctx, const void *src,
                       size_t len, void *dst, size_t cap);
    const char *(*decompress)(struct zcomp *c, void *ctx, const void *src,
                              size_t n, void *page);
};

/* lz4's block bound and decompressor, which lz4hc shares. */
size_t lz4_bound(size_t len);
const char *lz4_decompress(struct zcomp *c, void *ctx, const void *src,
                           size_t n, void *page);

extern const struct zcomp_ops backend_lz4, backend_lz4hc, backend_zstd,
    backend_deflate;

#endif
