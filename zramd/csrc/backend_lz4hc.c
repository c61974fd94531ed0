/*
 * backend_lz4hc.c: lz4hc (zcomp_backend.h), as the kernel's
 * backend_lz4hc.c: LZ4_compress_HC at the codec's level.  It writes lz4's
 * block format, so lz4's bound and decompressor (backend_lz4.c) serve it.
 * No dictionary, no contexts, no state: any thread may call at any time.
 */

#include <lz4hc.h>

#include "zcomp_backend.h"

static size_t
lz4hc_compress(struct zcomp *c, void *ctx, const void *src, size_t len,
               void *dst, size_t cap)
{
    int n = LZ4_compress_HC(src, dst, (int)len, (int)cap, c->level);
    return n > 0 ? (size_t)n : 0;
}

const struct zcomp_ops backend_lz4hc = {
    .name = "lz4hc",
    .bound = lz4_bound,
    .compress = lz4hc_compress,
    .decompress = lz4_decompress,
};
