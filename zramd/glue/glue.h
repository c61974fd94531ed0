/*
 * glue.h: what the files of the module glue share (zramd/_fastpath.c,
 * the module; glue/py_codec.c, glue/py_zspool.c, glue/py_zram.c, one per
 * Python type).  These, and only these, touch the CPython API; the core
 * in csrc/ never includes Python.h, never calls back and never needs the
 * GIL.
 *
 * The GIL: a request (Zram.read, .write, .discard, .mark_idle) runs
 * without it from start to end.  A thread holding the GIL that must wait
 * for a mutex of the core (a stripe lock taken for the Python paths, a
 * pool class lock) lets the GIL go meanwhile (pool_lock_wait, Zram.lock
 * and .lock_all), so whoever holds that mutex can always finish.
 * Objects the core uses without the GIL (the pool, the codecs in the
 * device's codec table, the caller's buffers) are kept alive by
 * references the glue holds; a Zram refuses to close while a request is
 * in progress.  Requests zramd's nbdkit filter serves (filter/offer.h)
 * never hold the GIL either; a Zram's close waits for them.
 */
#ifndef ZRAMD_GLUE_H
#define ZRAMD_GLUE_H

#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>
#include <pthread.h>
#include <stdatomic.h>

#include "../csrc/zram_defs.h"
#include "../csrc/crew.h"
#include "../csrc/zcomp.h"
#include "../csrc/zram.h"
#include "../csrc/zsmalloc.h"

/* A C codec (csrc/zcomp.c) as a Python type: py_codec.c. */
typedef struct {
    PyObject_HEAD
    struct zcomp *c;               /* NULL until initialised */
} Codec;

/* The pool (csrc/zsmalloc.c) as a Python type: py_zspool.c. */
typedef struct {
    PyObject_HEAD
    struct zs_pool *zs;           /* NULL once closed */
} ZsPool;

extern PyTypeObject CodecType, ZsPoolType, ZramType;

/* The pool of self, or NULL with ValueError once it is closed. */
struct zs_pool *zs_of(ZsPool *self);

/* Set while this thread runs pool code with the GIL let go (a Zram
 * request): a pool lock is then waited for without touching the GIL.
 * Hidden, so that it binds locally and costs what a static one did
 * (local-dynamic TLS, not a __tls_get_addr call per access). */
extern __thread int pool_gil_released __attribute__((visibility("hidden")));

#endif
