/*
 * zcomp.h: one configured compressor on 4 KiB pages, in C, as the
 * kernel's zcomp: a backend from the registry of zcomp.c (lz4, lz4hc,
 * zstd with an optional dictionary, deflate; one file and one const
 * table of operations each, zcomp_backend.h) with its parameters fixed
 * at creation.  The algorithms without a C form (lzo, lzo-rle) are
 * Python: zramd/compress.
 *
 * Contexts (zstd's and deflate's; lz4 needs none) come from a free list
 * on the codec, guarded by the codec's own mutex, so any thread may
 * compress or decompress at any time with a context it took: as many
 * contexts as calls ever ran at once.  Nothing here calls out or touches
 * Python.
 */
#ifndef ZRAMD_ZCOMP_H
#define ZRAMD_ZCOMP_H

#include <stddef.h>

enum zcomp_dir { ZCOMP_COMPRESS = 0, ZCOMP_DECOMPRESS = 1 };

struct zcomp;

/* A codec for algorithm (a backend's name: "lz4", "lz4hc", "zstd",
 * "deflate") at level, with the dictionary dict of dict_len bytes (NULL
 * for none).  NULL when it cannot be made, with *why saying why ("no
 * native codec": no such backend; "takes no dictionary"; "not a usable
 * zstd dictionary"; "out of memory"). */
struct zcomp *zcomp_create(const char *algorithm, int level,
                           const void *dict, size_t dict_len,
                           const char **why);
void zcomp_destroy(struct zcomp *c);
/* The backend's name. */
const char *zcomp_name(const struct zcomp *c);

/* A working context for one direction, for one thread at a time, into
 * *ctx (NULL for lz4, which needs none).  0, or -1 with *why set (out of
 * memory, or zstd or zlib refused a parameter). */
int zcomp_ctx_take(struct zcomp *c, enum zcomp_dir dir, void **ctx,
                   const char **why);
/* Give a context back to the free list (NULL: nothing). */
void zcomp_ctx_give(struct zcomp *c, enum zcomp_dir dir, void *ctx);
/* Contexts on the free lists (compression, decompression). */
void zcomp_free_contexts(struct zcomp *c, size_t *cctx, size_t *dctx);

/* The most bytes compressing len bytes can give: with c's backend; with
 * any backend of the registry. */
size_t zcomp_bound(const struct zcomp *c, size_t len);
size_t zcomp_max_bound(size_t len);

/* Compress len bytes of src into dst (capacity cap); the size, or 0 when
 * it does not fit (or failed). */
size_t zcomp_compress(struct zcomp *c, void *ctx, const void *src,
                      size_t len, void *dst, size_t cap);

/* Decompress n bytes of src into a PAGE_SIZE page; NULL on success, else
 * why not (a static string). */
const char *zcomp_decompress(struct zcomp *c, void *ctx, const void *src,
                             size_t n, void *page);

#endif
