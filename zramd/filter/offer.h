/*
 * offer.h: how a device's core (zramd._fastpath) and zramd's nbdkit
 * filter (filter/nbdkit_filter.c) find each other inside one nbdkit.
 *
 * nbdkit loads its filters RTLD_GLOBAL; Python loads _fastpath
 * RTLD_LOCAL.  So the core looks the filter up, not the other way:
 * after the fork, plugin.py's Device asks dlsym(RTLD_DEFAULT,
 * ZRAMD_FILTER_SYMBOL) for the filter's face and offers it a struct
 * zramd_core: the device's struct zram and the two calls of the core
 * that serve whole sectors.  The filter copies it and, from then on,
 * serves reads and writes of whole sectors with them, without the GIL
 * or a Python frame; the rest (and whatever the core hands back) goes
 * on to the python plugin as before.  Before closing the device, the
 * core withdraws (withdraw(z) returns once no request uses z).
 *
 * Both sides are built from this header in one build; abi guards a
 * filter and a module built from different trees.
 */
#ifndef ZRAMD_FILTER_OFFER_H
#define ZRAMD_FILTER_OFFER_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifndef ZRAMD_FILTER_ABI           /* tests build a filter of another */
#define ZRAMD_FILTER_ABI 1
#endif
#define ZRAMD_FILTER_SYMBOL "zramd_filter_face"

/* What the core offers: read/write count whole sectors from sector
 * first (first + count <= nr_pages), returning the sectors done (0 or
 * fewer than count: the caller's from there), or a negative errno. */
struct zramd_core {
    int abi;
    void *z;
    size_t nr_pages;
    ssize_t (*read)(void *z, void *out, size_t first, size_t count);
    ssize_t (*write)(void *z, const void *data, size_t first, size_t count);
};

/* Requests the filter saw: served by the core whole, and passed on to
 * the plugin (in part or whole: not whole sectors, before an offer, or
 * a sector the core handed back). */
struct zramd_filter_counts {
    uint64_t served_reads, served_writes;
    uint64_t passed_reads, passed_writes;
};

/* The filter's face: the symbol ZRAMD_FILTER_SYMBOL. */
struct zramd_filter_face {
    int abi;
    /* 0, or -1 when core->abi is not abi (nothing taken). */
    int (*offer)(const struct zramd_core *core);
    /* Stop using z, if it is the core in use; returns when no request
     * uses it any more. */
    void (*withdraw)(void *z);
    void (*counts)(struct zramd_filter_counts *out);
};

#endif
