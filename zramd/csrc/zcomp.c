/*
 * zcomp.c: the C codecs (zcomp.h) against the system liblz4 and libzstd.
 *
 * A codec's parameters are fixed at creation; zstd's digested dictionary
 * (ZSTD_CDict and ZSTD_DDict) is kept once and shared read-only by every
 * context.  The free lists of contexts are the only state that changes,
 * guarded by ctx_lock, held only to push or pop.
 */

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <lz4.h>
#include <lz4hc.h>
#define ZSTD_STATIC_LINKING_ONLY
#include <zstd.h>

#include "zram_defs.h"
#include "zcomp.h"

/* A growable stack of pointers (a free list). */
struct ptr_stack {
    void **items;
    size_t n, cap;
};

struct zcomp {
    enum zcomp_kind kind;
    int level;
    unsigned window_log;           /* zstd: what the decoder accepts */
    ZSTD_CDict *cdict;
    ZSTD_DDict *ddict;
    pthread_mutex_t ctx_lock;      /* guards the two free lists */
    struct ptr_stack free[2];      /* by enum zcomp_dir */
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

struct zcomp *
zcomp_create(const char *algorithm, int level, const void *dict,
             size_t dict_len, const char **why)
{
    struct zcomp *c = calloc(1, sizeof(*c));
    if (!c) {
        *why = "out of memory";
        return NULL;
    }
    pthread_mutex_init(&c->ctx_lock, NULL);
    c->level = level;
    if (strcmp(algorithm, "lz4") == 0 || strcmp(algorithm, "lz4hc") == 0) {
        /* lz4hc writes the same block format; only compression differs */
        c->kind = algorithm[3] ? ZCOMP_LZ4HC : ZCOMP_LZ4;
        if (dict) {
            *why = "lz4 takes no dictionary";
            goto fail;
        }
        return c;
    }
    if (strcmp(algorithm, "zstd") != 0) {
        *why = "no native codec";
        goto fail;
    }
    c->kind = ZCOMP_ZSTD;
    {
        /* The parameters zstd picks for a page and this dictionary, as
         * the kernel's zstd_get_params(level, PAGE_SIZE) does. */
        ZSTD_compressionParameters cp = ZSTD_getCParams(
            level, PAGE_SIZE, dict ? dict_len : 0);
        c->window_log = cp.windowLog < 12 ? 12 : cp.windowLog;
        if (dict) {
            ZSTD_customMem mem = {NULL, NULL, NULL};
            c->cdict = ZSTD_createCDict_advanced(
                dict, dict_len, ZSTD_dlm_byCopy, ZSTD_dct_auto, cp, mem);
            c->ddict = ZSTD_createDDict(dict, dict_len);
            if (!c->cdict || !c->ddict) {
                *why = "not a usable zstd dictionary";
                goto fail;
            }
        }
    }
    return c;
fail:
    zcomp_destroy(c);
    return NULL;
}

void
zcomp_destroy(struct zcomp *c)
{
    size_t i;
    if (!c)
        return;
    for (i = 0; i < c->free[ZCOMP_COMPRESS].n; i++)
        ZSTD_freeCCtx(c->free[ZCOMP_COMPRESS].items[i]);
    for (i = 0; i < c->free[ZCOMP_DECOMPRESS].n; i++)
        ZSTD_freeDCtx(c->free[ZCOMP_DECOMPRESS].items[i]);
    free(c->free[0].items);
    free(c->free[1].items);
    ZSTD_freeCDict(c->cdict);
    ZSTD_freeDDict(c->ddict);
    pthread_mutex_destroy(&c->ctx_lock);
    free(c);
}

enum zcomp_kind
zcomp_kind(const struct zcomp *c)
{
    return c->kind;
}

static void *
new_cctx(struct zcomp *c, const char **why)
{
    ZSTD_CCtx *cctx = ZSTD_createCCtx();
    size_t r;
    if (!cctx) {
        *why = "out of memory";
        return NULL;
    }
    if (c->cdict)
        r = ZSTD_CCtx_refCDict(cctx, c->cdict);
    else
        r = ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, c->level);
    if (!ZSTD_isError(r))
        r = ZSTD_CCtx_setParameter(cctx, ZSTD_c_format, ZSTD_f_zstd1_magicless);
    if (!ZSTD_isError(r))
        r = ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, 0);
    if (!ZSTD_isError(r))
        r = ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 0);
    if (!ZSTD_isError(r))
        r = ZSTD_CCtx_setParameter(cctx, ZSTD_c_dictIDFlag, 0);
    if (ZSTD_isError(r)) {
        ZSTD_freeCCtx(cctx);
        *why = ZSTD_getErrorName(r);
        return NULL;
    }
    return cctx;
}

static void *
new_dctx(struct zcomp *c, const char **why)
{
    ZSTD_DCtx *dctx = ZSTD_createDCtx();
    size_t r;
    if (!dctx) {
        *why = "out of memory";
        return NULL;
    }
    r = ZSTD_DCtx_setParameter(dctx, ZSTD_d_format, ZSTD_f_zstd1_magicless);
    if (!ZSTD_isError(r))
        r = ZSTD_DCtx_setParameter(dctx, ZSTD_d_windowLogMax, c->window_log);
    if (!ZSTD_isError(r) && c->ddict)
        r = ZSTD_DCtx_refDDict(dctx, c->ddict);
    if (ZSTD_isError(r)) {
        ZSTD_freeDCtx(dctx);
        *why = ZSTD_getErrorName(r);
        return NULL;
    }
    return dctx;
}

int
zcomp_ctx_take(struct zcomp *c, enum zcomp_dir dir, void **ctx,
               const char **why)
{
    struct ptr_stack *st = &c->free[dir];
    *ctx = NULL;
    if (c->kind != ZCOMP_ZSTD)
        return 0;
    pthread_mutex_lock(&c->ctx_lock);
    if (st->n)
        *ctx = st->items[--st->n];
    pthread_mutex_unlock(&c->ctx_lock);
    if (!*ctx)
        *ctx = dir == ZCOMP_COMPRESS ? new_cctx(c, why) : new_dctx(c, why);
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
    if (r < 0) {
        if (dir == ZCOMP_COMPRESS)
            ZSTD_freeCCtx(ctx);
        else
            ZSTD_freeDCtx(ctx);
    }
}

void
zcomp_free_contexts(struct zcomp *c, size_t *cctx, size_t *dctx)
{
    pthread_mutex_lock(&c->ctx_lock);
    *cctx = c->free[ZCOMP_COMPRESS].n;
    *dctx = c->free[ZCOMP_DECOMPRESS].n;
    pthread_mutex_unlock(&c->ctx_lock);
}

size_t
zcomp_bound(const struct zcomp *c, size_t len)
{
    return c->kind != ZCOMP_ZSTD ? (size_t)LZ4_compressBound((int)len)
                                 : ZSTD_compressBound(len);
}

size_t
zcomp_compress(struct zcomp *c, void *ctx, const void *src, size_t len,
               void *dst, size_t cap)
{
    if (c->kind == ZCOMP_LZ4) {
        int n = LZ4_compress_fast(src, dst, (int)len, (int)cap, 1);
        return n > 0 ? (size_t)n : 0;
    } else if (c->kind == ZCOMP_LZ4HC) {
        int n = LZ4_compress_HC(src, dst, (int)len, (int)cap, c->level);
        return n > 0 ? (size_t)n : 0;
    } else {
        size_t n = ZSTD_compress2(ctx, dst, cap, src, len);
        return ZSTD_isError(n) ? 0 : n;
    }
}

const char *
zcomp_decompress(struct zcomp *c, void *ctx, const void *src, size_t n,
                 void *page)
{
    if (c->kind != ZCOMP_ZSTD) {
        int got;
        if (n == 0 || n > INT_MAX)
            return "empty or oversized block";
        got = LZ4_decompress_safe(src, page, (int)n, PAGE_SIZE);
        if (got < 0)
            return "malformed lz4 block";
        if (got != PAGE_SIZE)
            return "short block";
        return NULL;
    } else {
        size_t got = ZSTD_decompressDCtx(ctx, page, PAGE_SIZE, src, n);
        if (ZSTD_isError(got))
            return ZSTD_getErrorName(got);
        if (got != PAGE_SIZE)
            return "short frame";
        return NULL;
    }
}
