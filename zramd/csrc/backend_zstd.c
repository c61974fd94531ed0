/*
 * backend_zstd.c: zstd at a level, with an optional dictionary
 * (zcomp_backend.h), as the kernel's backend_zstd.c: the parameters zstd
 * picks for a 4 KiB page (zstd_get_params(level, PAGE_SIZE)), magicless
 * frames with no content size, checksum or dictionary id (see
 * compress/backend_zstd.py).  The digested dictionary (ZSTD_CDict and
 * ZSTD_DDict) is made once at setup and shared read-only by every
 * context; a context is one thread's at a time (zcomp.c's free lists).
 */

#include <stdlib.h>
#define ZSTD_STATIC_LINKING_ONLY
#include <zstd.h>

#include "zram_defs.h"
#include "zcomp_backend.h"

struct zstd_params {
    unsigned window_log;           /* what the decoder accepts */
    ZSTD_CDict *cdict;
    ZSTD_DDict *ddict;
};

static int
zstd_setup(struct zcomp *c, const void *dict, size_t dict_len,
           const char **why)
{
    ZSTD_compressionParameters cp = ZSTD_getCParams(
        c->level, PAGE_SIZE, dict ? dict_len : 0);
    struct zstd_params *p = calloc(1, sizeof(*p));
    if (!p) {
        *why = "out of memory";
        return -1;
    }
    c->priv = p;
    p->window_log = cp.windowLog < 12 ? 12 : cp.windowLog;
    if (dict) {
        ZSTD_customMem mem = {NULL, NULL, NULL};
        p->cdict = ZSTD_createCDict_advanced(
            dict, dict_len, ZSTD_dlm_byCopy, ZSTD_dct_auto, cp, mem);
        p->ddict = ZSTD_createDDict(dict, dict_len);
        if (!p->cdict || !p->ddict) {
            *why = "not a usable zstd dictionary";
            return -1;
        }
    }
    return 0;
}

static void
zstd_release(struct zcomp *c)
{
    struct zstd_params *p = c->priv;
    if (!p)
        return;
    ZSTD_freeCDict(p->cdict);
    ZSTD_freeDDict(p->ddict);
    free(p);
    c->priv = NULL;
}

static void *
zstd_new_cctx(struct zcomp *c, const struct zstd_params *p, const char **why)
{
    ZSTD_CCtx *cctx = ZSTD_createCCtx();
    size_t r;
    if (!cctx) {
        *why = "out of memory";
        return NULL;
    }
    if (p->cdict)
        r = ZSTD_CCtx_refCDict(cctx, p->cdict);
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
zstd_new_dctx(const struct zstd_params *p, const char **why)
{
    ZSTD_DCtx *dctx = ZSTD_createDCtx();
    size_t r;
    if (!dctx) {
        *why = "out of memory";
        return NULL;
    }
    r = ZSTD_DCtx_setParameter(dctx, ZSTD_d_format, ZSTD_f_zstd1_magicless);
    if (!ZSTD_isError(r))
        r = ZSTD_DCtx_setParameter(dctx, ZSTD_d_windowLogMax, p->window_log);
    if (!ZSTD_isError(r) && p->ddict)
        r = ZSTD_DCtx_refDDict(dctx, p->ddict);
    if (ZSTD_isError(r)) {
        ZSTD_freeDCtx(dctx);
        *why = ZSTD_getErrorName(r);
        return NULL;
    }
    return dctx;
}

static void *
zstd_ctx_new(struct zcomp *c, enum zcomp_dir dir, const char **why)
{
    return dir == ZCOMP_COMPRESS ? zstd_new_cctx(c, c->priv, why)
                                 : zstd_new_dctx(c->priv, why);
}

static void
zstd_ctx_free(enum zcomp_dir dir, void *ctx)
{
    if (dir == ZCOMP_COMPRESS)
        ZSTD_freeCCtx(ctx);
    else
        ZSTD_freeDCtx(ctx);
}

static size_t
zstd_bound(size_t len)
{
    return ZSTD_compressBound(len);
}

static size_t
zstd_compress(struct zcomp *c, void *ctx, const void *src, size_t len,
              void *dst, size_t cap)
{
    size_t n = ZSTD_compress2(ctx, dst, cap, src, len);
    return ZSTD_isError(n) ? 0 : n;
}

static const char *
zstd_decompress(struct zcomp *c, void *ctx, const void *src, size_t n,
                void *page)
{
    size_t got = ZSTD_decompressDCtx(ctx, page, PAGE_SIZE, src, n);
    if (ZSTD_isError(got))
        return ZSTD_getErrorName(got);
    if (got != PAGE_SIZE)
        return "short frame";
    return NULL;
}

const struct zcomp_ops backend_zstd = {
    .name = "zstd",
    .setup = zstd_setup,
    .release = zstd_release,
    .ctx_new = zstd_ctx_new,
    .ctx_free = zstd_ctx_free,
    .bound = zstd_bound,
    .compress = zstd_compress,
    .decompress = zstd_decompress,
};
