/*
 * backend_lz4.c: lz4 (zcomp_backend.h), as the kernel's backend_lz4.c:
 * LZ4_compress_fast at acceleration 1.  Its bound and block decompressor
 * serve lz4hc too (backend_lz4hc.c), which writes the same block format.
 * No dictionary, no contexts (liblz4 keeps its state on the stack), no
 * state at all: any thread may call at any time.
 */

#include <limits.h>
#include <lz4.h>

#include "zram_defs.h"
#include "zcomp_backend.h"

size_t
lz4_bound(size_t len)
{
    return (size_t)LZ4_compressBound((int)len);
}

static size_t
lz4_compress(struct zcomp *c, void *ctx, const void *src, size_t len,
             void *dst, size_t cap)
{
    int n = LZ4_compress_fast(src, dst, (int)len, (int)cap, 1);
    return n > 0 ? (size_t)n : 0;
}

const char *
lz4_decompress(struct zcomp *c, void *ctx, const void *src, size_t n,
               void *page)
{
    int got;
    if (n == 0 || n > INT_MAX)
        return "empty or oversized block";
    got = LZ4_decompress_safe(src, page, (int)n, PAGE_SIZE);
    if (got < 0)
        return "malformed lz4 block";
    if (got != PAGE_SIZE)
        return "short block";
    return NULL;
}

const struct zcomp_ops backend_lz4 = {
    .name = "lz4",
    .bound = lz4_bound,
    .compress = lz4_compress,
    .decompress = lz4_decompress,
};
