/*
 * crew.h: helper threads that share one request's pages.
 *
 * nbdkit serves a connection's requests on few worker threads (zramd
 * runs it with one on nbdkit 1.32 and four later: zramd/attach.py), so a
 * 256 KiB write would compress its 64 pages on one core while the others
 * wait.  A request's
 * compression (or decompression) is a batch of chunks of CREW_CHUNK
 * items; the calling thread posts it, works on it itself, and helpers
 * that are idle join in, each taking the next chunk until none is left.
 * Helpers are started on first use in the process that uses them (after
 * nbdkit forks, the child starts its own).  No Python is touched.
 */
#ifndef ZRAMD_CREW_H
#define ZRAMD_CREW_H

#include <stdatomic.h>
#include <stddef.h>

#define CREW_MAX 8
#define CREW_CHUNK 4

struct crew_batch {
    /* Items start..start+n-1, by participant who (0: the caller). */
    void (*work)(struct crew_batch *, int who, size_t start, size_t n);
    void *args;
    void *ctx[CREW_MAX + 1];         /* one per participant: zstd contexts */
    size_t count;                    /* items */
    atomic_size_t next;              /* next chunk's first item */
    int want;                        /* helpers still welcome (crew lock) */
    int active;                      /* helpers working on it (crew lock) */
    int joined;                      /* helpers that ever joined (crew lock) */
    struct crew_batch *qnext;
};

/* How many helpers a batch of count items can use (starts them the first
 * time in this process). */
int crew_hands(size_t count);

/* Run b with up to hands helpers; returns when every item is done. */
void crew_run(struct crew_batch *b, int hands);

/* The most helpers one batch may use (0..CREW_MAX); the previous limit.
 * A negative limit only reads it. */
int crew_set_limit(int limit);

#endif
