/*
 * backend_deflate.c: raw deflate through the system zlib
 * (zcomp_backend.h), as the kernel's backend_deflate.c but with a 4 KiB
 * window (compress/backend_deflate.py says why).  A page compresses as
 * Python's zlib.compress(page, level, -12) does, byte for byte:
 * deflateInit2(level, Z_DEFLATED, -12, memLevel 8, Z_DEFAULT_STRATEGY),
 * then one deflate(Z_FINISH); the same bytes give the same compressed
 * sizes, huge pages and mm_stat as the Python backend wrote before.
 *
 * No dictionary.  A context is a z_stream made once for its direction
 * (deflateInit2 or inflateInit2) and reset before every call
 * (deflateReset, inflateReset keep the parameters and the memory), one
 * thread's at a time (zcomp.c's free lists).  A compression context is
 * about 150 KiB at these parameters (8 KiB window, 32 Ki hash heads,
 * 16 Ki symbols), a decompression one 7 KiB and its 4 KiB window.
 *
 * Decompression accepts what the Python backend accepts and no more: a
 * stream that ends (Z_STREAM_END) after exactly one page of output, with
 * no input left over.  inflate writes only into the page (avail_out is
 * PAGE_SIZE): a stream that has more to give stops at the page's end and
 * is refused.
 */

#include <limits.h>
#include <stdlib.h>
#include <zlib.h>

#include "zram_defs.h"
#include "zcomp_backend.h"

/* Raw deflate (no zlib header or Adler-32) with a 2^12-byte window; and
 * zlib's memLevel default (DEF_MEM_LEVEL), which Python's zlib.compress
 * passes. */
#define DEFLATE_WBITS (-12)
#define DEFLATE_MEM_LEVEL 8

static const char *
zlib_why(int r)
{
    switch (r) {
    case Z_MEM_ERROR:
        return "out of memory";
    case Z_VERSION_ERROR:
        return "zlib version mismatch";
    default:
        return "zlib refused a parameter";
    }
}

static void *
deflate_ctx_new(struct zcomp *c, enum zcomp_dir dir, const char **why)
{
    z_stream *zs = calloc(1, sizeof(*zs));
    int r;
    if (!zs) {
        *why = "out of memory";
        return NULL;
    }
    if (dir == ZCOMP_COMPRESS)
        r = deflateInit2(zs, c->level, Z_DEFLATED, DEFLATE_WBITS,
                         DEFLATE_MEM_LEVEL, Z_DEFAULT_STRATEGY);
    else
        r = inflateInit2(zs, DEFLATE_WBITS);
    if (r != Z_OK) {
        free(zs);
        *why = zlib_why(r);
        return NULL;
    }
    return zs;
}

static void
deflate_ctx_free(enum zcomp_dir dir, void *ctx)
{
    if (dir == ZCOMP_COMPRESS)
        deflateEnd(ctx);
    else
        inflateEnd(ctx);
    free(ctx);
}

/* Up to a page, the whole input sits in zlib's window (2 << 12 bytes,
 * slid only once strstart passes 7930) and in one block (16383 symbols
 * at memLevel 8), so _tr_flush_block can always store it: the output is
 * at most the stored block, a header byte, LEN and NLEN and the bytes.
 * One byte more: deflate(Z_FINISH) returns Z_STREAM_END only if it did
 * not fill the output (else it wants another call).  Past a page (only
 * Codec.compress takes that), zlib's own conservative bound. */
static size_t
deflate_bound(size_t len)
{
    return len <= PAGE_SIZE ? len + 5 + 1 : deflateBound(Z_NULL, len);
}

static size_t
deflate_compress(struct zcomp *c, void *ctx, const void *src, size_t len,
                 void *dst, size_t cap)
{
    z_stream *zs = ctx;
    if (deflateReset(zs) != Z_OK)
        return 0;
    zs->next_in = (Bytef *)src;
    zs->avail_in = (uInt)len;
    zs->next_out = dst;
    zs->avail_out = (uInt)cap;
    if (deflate(zs, Z_FINISH) != Z_STREAM_END)
        return 0;                      /* cap was too small */
    return cap - zs->avail_out;
}

static const char *
deflate_decompress(struct zcomp *c, void *ctx, const void *src, size_t n,
                   void *page)
{
    z_stream *zs = ctx;
    int r;
    if (n > UINT_MAX)
        return "oversized stream";
    if (inflateReset(zs) != Z_OK)
        return "inflateReset failed";
    zs->next_in = (Bytef *)src;
    zs->avail_in = (uInt)n;
    zs->next_out = page;
    zs->avail_out = PAGE_SIZE;
    r = inflate(zs, Z_FINISH);
    if (r == Z_STREAM_END) {
        if (zs->avail_out)
            return "short stream";
        if (zs->avail_in)
            return "bytes after the end of the stream";
        return NULL;
    }
    if (r == Z_DATA_ERROR)
        return zs->msg ? zs->msg : "invalid deflate stream";
    if (r == Z_MEM_ERROR)
        return "out of memory";
    /* Z_OK or Z_BUF_ERROR: the input ran out before the stream's end,
     * or the page is full and the stream has not ended. */
    return zs->avail_out ? "truncated stream"
                         : "no end of stream after a page";
}

const struct zcomp_ops backend_deflate = {
    .name = "deflate",
    .ctx_new = deflate_ctx_new,
    .ctx_free = deflate_ctx_free,
    .bound = deflate_bound,
    .compress = deflate_compress,
    .decompress = deflate_decompress,
};
