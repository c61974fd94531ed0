/*
 * zcomp.c: the C codecs (zcomp.h) and their registry, as the kernel's
 * drivers/block/zram/zcomp.c.  backends[] lists one const table of
 * operations per algorithm (zcomp_backend.h; one file each:
 * backend_lz4.c, backend_lz4hc.c, backend_zstd.c for zstd with
 * dictionaries, backend_deflate.c
 * for deflate through zlib); the algorithms with no C form (lzo and
 * lzo-rle, through liblzo2 and ctypes) are zramd/compress's alone.
 *
 * A codec is its backend's table, its fixed parameters (level, and what
 * the backend set up from the dictionary, shared read-only by every
 * context) and two free lists of working contexts, one per direction:
 * the only state that changes, guarded by ctx_lock, held only to push or
 * pop.  So any thread may compress or decompress at any time with a
 * context it took, and there are as many contexts as calls ever ran at
 * once.
 */

#include <stdlib.h>
#include <string.h>

#include "zcomp_backend.h"

/* The registry: what zcomp_create looks a name up in. */
static const struct zcomp_ops *const backends[] = {
    &backend_lz4,
    &backend_lz4hc,
    &backend_zstd,
    &backend_deflate,
};

/* Push; 0, or -1 when it cannot grow (the caller frees the item). */
static int
ptr_push(struct ptr_stack *st, void *item)
{
    if (st->n == st->cap) {
        size_t cap = st->cap ? 2 * st->cap : 4;
        void **grown = realloc(st->items, cap * sizeof(*grown));
        if (!grown)
            return -1;
        st->items = grown;
        st->cap = cap;
    }
    st->items[st->n++] = item;
    return 0;
}

static const struct zcomp_ops *
lookup_backend(const char *algorithm)
{
    size_t i;
    for (i = 0; i < sizeof(backends) / sizeof(backends[0]); i++)
        if (strcmp(backends[i]->name, algorithm) == 0)
            return backends[i];
    return NULL;
}

struct zcomp *
zcomp_create(const char *algorithm, int level, const void *dict,
             size_t dict_len, const char **why)
{
    const struct zcomp_ops *ops = lookup_backend(algorithm);
    struct zcomp *c;
    if (!ops) {
        *why = "no native codec";
        return NULL;
    }
    if (dict && !ops->setup) {
        *why = "takes no dictionary";
        return NULL;
    }
    c = calloc(1, sizeof(*c));
    if (!c) {
        *why = "out of memory";
        return NULL;
    }
    pthread_mutex_init(&c->ctx_lock, NULL);
    c->ops = ops;
    c->level = level;
    if (ops->setup && ops->setup(c, dict, dict_len, why) < 0) {
        zcomp_destroy(c);
        return NULL;
    }
    return c;
}

void
zcomp_destroy(struct zcomp *c)
{
    size_t i;
    int dir;
    if (!c)
        return;
    for (dir = ZCOMP_COMPRESS; dir <= ZCOMP_DECOMPRESS; dir++) {
        for (i = 0; i < c->free[dir].n; i++)
            c->ops->ctx_free(dir, c->free[dir].items[i]);
        free(c->free[dir].items);
    }
    if (c->ops->release)
        c->ops->release(c);
    pthread_mutex_destroy(&c->ctx_lock);
    free(c);
}

int
zcomp_ctx_take(struct zcomp *c, enum zcomp_dir dir, void **ctx,
               const char **why)
{
    struct ptr_stack *st = &c->free[dir];
    *ctx = NULL;
    if (!c->ops->ctx_new)
        return 0;
    pthread_mutex_lock(&c->ctx_lock);
    if (st->n)
        *ctx = st->items[--st->n];
    pthread_mutex_unlock(&c->ctx_lock);
    if (!*ctx)
        *ctx = c->ops->ctx_new(c, dir, why);
    return *ctx ? 0 : -1;
}

void
zcomp_ctx_give(struct zcomp *c, enum zcomp_dir dir, void *ctx)
{
    int r;
    if (!ctx)
        return;
    pthread_mutex_lock(&c->ctx_lock);
    r = ptr_push(&c->free[dir], ctx);
    pthread_mutex_unlock(&c->ctx_lock);
    if (r < 0)
        c->ops->ctx_free(dir, ctx);
}

void
zcomp_free_contexts(struct zcomp *c, size_t *cctx, size_t *dctx)
{
    pthread_mutex_lock(&c->ctx_lock);
    *cctx = c->free[ZCOMP_COMPRESS].n;
    *dctx = c->free[ZCOMP_DECOMPRESS].n;
    pthread_mutex_unlock(&c->ctx_lock);
}

const char *
zcomp_name(const struct zcomp *c)
{
    return c->ops->name;
}

size_t
zcomp_bound(const struct zcomp *c, size_t len)
{
    return c->ops->bound(len);
}

size_t
zcomp_max_bound(size_t len)
{
    size_t i, most = 0;
    for (i = 0; i < sizeof(backends) / sizeof(backends[0]); i++)
        if (backends[i]->bound(len) > most)
            most = backends[i]->bound(len);
    return most;
}

size_t
zcomp_compress(struct zcomp *c, void *ctx, const void *src, size_t len,
               void *dst, size_t cap)
{
    return c->ops->compress(c, ctx, src, len, dst, cap);
}

const char *
zcomp_decompress(struct zcomp *c, void *ctx, const void *src, size_t n,
                 void *page)
{
    return c->ops->decompress(c, ctx, src, n, page);
}
