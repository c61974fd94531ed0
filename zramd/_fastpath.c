/*
 * zramd._fastpath: the module glue, the only C file that touches the
 * CPython API.  It exports:
 *
 *   Codec    a C codec (csrc/zcomp.c: lz4, lz4hc, zstd) as a Python type,
 *            which the compress backends with a C form set as ``native``;
 *   ZsPool   the pool (csrc/zsmalloc.c), which zramd.zsmalloc.Pool
 *            subclasses;
 *   Zram     a device's slot table and I/O paths (csrc/zram.c), which
 *            zramd.device.Device drives;
 *   the constants of csrc/zram_defs.h by name, and crew_limit().
 *
 * The GIL: a request (Zram.read, .write, .discard, .mark_idle) runs
 * without it from start to end; the C core never needs it and never
 * calls back.  A thread holding the GIL that must wait for a mutex of the
 * core (a stripe lock taken for the Python paths, a pool class lock) lets
 * the GIL go meanwhile (pool_lock_wait, zram_lock_gil), so whoever holds
 * that mutex can always finish.  Objects the core uses without the GIL
 * (the pool, the codecs in the device's codec table, the caller's
 * buffers) are kept alive by references this module holds; a Zram
 * refuses to close while a request is in progress.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>
#include <pthread.h>
#include <stdatomic.h>

#include "csrc/zram_defs.h"
#include "csrc/crew.h"
#include "csrc/zcomp.h"
#include "csrc/zram.h"
#include "csrc/zsmalloc.h"

/* ---- Codec: a C codec (csrc/zcomp.c) as a Python type --------------------- */

typedef struct {
    PyObject_HEAD
    struct zcomp *c;               /* NULL until initialised */
} Codec;

static PyTypeObject CodecType;

static int
Codec_init(Codec *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"algorithm", "level", "dictionary", NULL};
    const char *algorithm, *why = NULL;
    int level = 0;
    Py_buffer dict = {NULL};
    if (self->c) {
        PyErr_SetString(PyExc_TypeError, "Codec: already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "s|iz*", kwlist,
                                     &algorithm, &level, &dict))
        return -1;
    self->c = zcomp_create(algorithm, level, dict.buf,
                           dict.buf ? (size_t)dict.len : 0, &why);
    if (dict.buf)
        PyBuffer_Release(&dict);
    if (!self->c) {
        if (strcmp(why, "no native codec") == 0)
            PyErr_Format(PyExc_ValueError, "no native codec for %s",
                         algorithm);
        else if (strcmp(why, "takes no dictionary") == 0)
            PyErr_Format(PyExc_ValueError, "%s takes no dictionary",
                         algorithm);
        else
            PyErr_SetString(PyExc_ValueError, why);
        return -1;
    }
    return 0;
}

static void
Codec_dealloc(Codec *self)
{
    zcomp_destroy(self->c);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static struct zcomp *
codec_of(Codec *self)
{
    if (!self->c)
        PyErr_SetString(PyExc_ValueError, "Codec: not initialised");
    return self->c;
}

/* compress(page) -> bytes: the whole output, however long. */
static PyObject *
Codec_compress(Codec *self, PyObject *arg)
{
    struct zcomp *c = codec_of(self);
    Py_buffer page;
    PyObject *out;
    size_t cap, n;
    void *cctx;
    const char *why;
    if (!c || PyObject_GetBuffer(arg, &page, PyBUF_SIMPLE) < 0)
        return NULL;
    /* Pages are PAGE_SIZE; other lengths are allowed so that tests can
     * make valid streams of the wrong length. */
    if (page.len > 16 * PAGE_SIZE) {
        PyBuffer_Release(&page);
        PyErr_Format(PyExc_ValueError, "compress: %zd bytes; accepted: up"
                     " to %d", page.len, 16 * PAGE_SIZE);
        return NULL;
    }
    cap = zcomp_bound(c, page.len);
    out = PyBytes_FromStringAndSize(NULL, cap);
    if (out && zcomp_ctx_take(c, ZCOMP_COMPRESS, &cctx, &why) < 0) {
        PyErr_Format(PyExc_ValueError, "%s compressor: %s", zcomp_name(c),
                     why);
        Py_CLEAR(out);
    }
    if (out) {
        n = zcomp_compress(c, cctx, page.buf, page.len,
                           PyBytes_AS_STRING(out), cap);
        zcomp_ctx_give(c, ZCOMP_COMPRESS, cctx);
        if (n == 0 && page.len) {
            PyErr_SetString(PyExc_ValueError, "compress failed");
            Py_CLEAR(out);
        } else {
            _PyBytes_Resize(&out, n);
        }
    }
    PyBuffer_Release(&page);
    return out;
}

/* decompress(data) -> bytes of one page; ValueError(reason) if corrupt. */
static PyObject *
Codec_decompress(Codec *self, PyObject *arg)
{
    struct zcomp *c = codec_of(self);
    Py_buffer data;
    PyObject *out;
    const char *why = NULL;
    void *dctx;
    if (!c || PyObject_GetBuffer(arg, &data, PyBUF_SIMPLE) < 0)
        return NULL;
    out = PyBytes_FromStringAndSize(NULL, PAGE_SIZE);
    if (out && zcomp_ctx_take(c, ZCOMP_DECOMPRESS, &dctx, &why) < 0) {
        PyErr_Format(PyExc_ValueError, "%s decompressor: %s", zcomp_name(c),
                     why);
        Py_CLEAR(out);
    }
    if (out) {
        why = zcomp_decompress(c, dctx, data.buf, data.len,
                               PyBytes_AS_STRING(out));
        zcomp_ctx_give(c, ZCOMP_DECOMPRESS, dctx);
        if (why) {
            PyErr_SetString(PyExc_ValueError, why);
            Py_CLEAR(out);
        }
    }
    PyBuffer_Release(&data);
    return out;
}

static PyMethodDef Codec_methods[] = {
    {"compress", (PyCFunction)Codec_compress, METH_O,
     "compress(page) -> bytes: one 4096-byte page, compressed."},
    {"decompress", (PyCFunction)Codec_decompress, METH_O,
     "decompress(data) -> bytes: the 4096-byte page; ValueError if corrupt."},
    {NULL}
};

static PyObject *
Codec_free_contexts(Codec *self, void *closure)
{
    size_t cctx = 0, dctx = 0;
    if (self->c)
        zcomp_free_contexts(self->c, &cctx, &dctx);
    return Py_BuildValue("nn", (Py_ssize_t)cctx, (Py_ssize_t)dctx);
}

static PyGetSetDef Codec_getset[] = {
    {"free_contexts", (getter)Codec_free_contexts, NULL,
     "(compression, decompression) contexts on the free lists (zstd).",
     NULL},
    {NULL}
};

static PyTypeObject CodecType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "zramd._fastpath.Codec",
    .tp_basicsize = sizeof(Codec),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Codec(algorithm, level=0, dictionary=None): lz4, lz4hc or "
              "zstd on 4 KiB pages.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Codec_init,
    .tp_dealloc = (destructor)Codec_dealloc,
    .tp_methods = Codec_methods,
    .tp_getset = Codec_getset,
};

/* ---- ZsPool: the pool (csrc/zsmalloc.c) as a Python type ------------------
 *
 * zramd.zsmalloc.Pool subclasses it and adds the deferred-free queue and
 * the stats dataclasses.  The pool takes its own pthread mutexes; a
 * thread that must wait for one lets the GIL go meanwhile (pool_lock_wait),
 * so a compaction holding a class lock for a while stalls no other Python
 * thread.  Calls that may hold locks for long (compact, audit) run without
 * the GIL.  Zram uses the same struct zs_pool directly, without the GIL.
 */

/* Set while this thread runs pool code with the GIL let go. */
static __thread int pool_gil_released;

static void
pool_lock_wait(pthread_mutex_t *lock)
{
    if (pool_gil_released) {
        pthread_mutex_lock(lock);
    } else {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(lock);
        Py_END_ALLOW_THREADS
    }
}

typedef struct {
    PyObject_HEAD
    struct zs_pool *zs;           /* NULL once closed */
} ZsPool;

static PyTypeObject ZsPoolType;

static struct zs_pool *
zs_of(ZsPool *self)
{
    if (!self->zs)
        PyErr_SetString(PyExc_ValueError, "pool: closed");
    return self->zs;
}

/* A handle argument: 0 (never a handle) for an int out of range; -1 with
 * TypeError for another type. */
static int
handle_arg(PyObject *arg, unsigned long *handle)
{
    int overflow;
    long long v;
    if (!PyLong_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "handle: %R is not an int", arg);
        return -1;
    }
    v = PyLong_AsLongLongAndOverflow(arg, &overflow);
    if (overflow > 0) {
        unsigned long long u = PyLong_AsUnsignedLongLong(arg);
        if (u == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            u = 0;
        }
        *handle = u;
        return 0;
    }
    if (v == -1 && PyErr_Occurred())
        return -1;
    *handle = v > 0 ? (unsigned long)v : 0;
    return 0;
}

static int
not_allocated(const char *op, PyObject *handle)
{
    PyErr_Format(PyExc_ValueError, "%s: handle %R is not allocated", op,
                 handle);
    return -1;
}

static int
ZsPool_init(ZsPool *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"chain_size", NULL};
    PyObject *chain = NULL;
    long n = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O", kwlist, &chain))
        return -1;
    if (self->zs) {
        PyErr_SetString(PyExc_TypeError, "ZsPool: already initialised");
        return -1;
    }
    if (!chain)
        n = CHAIN_SIZE_DEFAULT;
    else if (PyLong_CheckExact(chain))
        n = PyLong_AsLong(chain);
    if (n < CHAIN_SIZE_MIN || n > CHAIN_SIZE_MAX) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "chain_size: %R; accepted: %d..%d",
                     chain, CHAIN_SIZE_MIN, CHAIN_SIZE_MAX);
        return -1;
    }
    if (!(self->zs = zs_create_pool((int)n))) {
        PyErr_NoMemory();
        return -1;
    }
    zs_set_lock_wait(self->zs, pool_lock_wait);
    return 0;
}

static void
ZsPool_dealloc(ZsPool *self)
{
    /* A pool with a read open (a caller's bug) is left mapped: its
     * reader may still look. */
    if (self->zs && zs_destroy_pool(self->zs) == 0)
        self->zs = NULL;
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
ZsPool_malloc(ZsPool *self, PyObject *arg)
{
    struct zs_pool *zs = zs_of(self);
    long size;
    unsigned long handle;
    if (!zs)
        return NULL;
    size = PyLong_CheckExact(arg) ? PyLong_AsLong(arg) : 0;
    if (size <= 0 || size > ZS_MAX_ALLOC_SIZE) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "malloc: size %R; accepted: 1..%d",
                     arg, ZS_MAX_ALLOC_SIZE);
        return NULL;
    }
    if (!(handle = zs_malloc(zs, size)))
        return PyErr_NoMemory();
    return PyLong_FromUnsignedLong(handle);
}

static PyObject *
ZsPool_free(ZsPool *self, PyObject *arg)
{
    struct zs_pool *zs = zs_of(self);
    unsigned long handle;
    int r;
    if (!zs)
        return NULL;
    if (handle_arg(arg, &handle) < 0) {
        PyErr_Clear();
        handle = 0;
    }
    r = zs_free(zs, handle);
    if (r == -EINVAL)
        return not_allocated("free", arg), NULL;
    if (r < 0) {
        errno = -r;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *
ZsPool_obj_size(ZsPool *self, PyObject *arg)
{
    struct zs_pool *zs = zs_of(self);
    unsigned long handle;
    if (!zs || handle_arg(arg, &handle) < 0)
        return NULL;
    return PyLong_FromSize_t(zs_obj_size(zs, handle));
}

static PyObject *
ZsPool_obj_write(ZsPool *self, PyObject *args)
{
    struct zs_pool *zs = zs_of(self);
    PyObject *h;
    Py_buffer data;
    unsigned long handle;
    int r;
    if (!zs || !PyArg_ParseTuple(args, "Oy*", &h, &data))
        return NULL;
    if (handle_arg(h, &handle) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    r = zs_obj_write(zs, handle, data.buf, data.len);
    if (r < 0) {
        size_t size = zs_obj_size(zs, handle);
        if (!size)
            not_allocated("obj_write", h);
        else
            PyErr_Format(PyExc_ValueError, "obj_write: %zd bytes into a"
                         " %zu-byte object", data.len, size);
    }
    PyBuffer_Release(&data);
    if (r < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
ZsPool_obj_read_begin(ZsPool *self, PyObject *args)
{
    struct zs_pool *zs = zs_of(self);
    PyObject *h, *local, *view = NULL;
    Py_buffer copy;
    unsigned long handle;
    const void *at;
    size_t size;
    if (!zs || !PyArg_ParseTuple(args, "OO", &h, &local))
        return NULL;
    if (handle_arg(h, &handle) < 0)
        return NULL;
    if (PyObject_GetBuffer(local, &copy, PyBUF_WRITABLE) < 0)
        return NULL;
    if (copy.len < PAGE_SIZE) {
        PyBuffer_Release(&copy);
        PyErr_Format(PyExc_ValueError, "obj_read_begin: local_copy of %zd"
                     " bytes; needs %d", copy.len, PAGE_SIZE);
        return NULL;
    }
    at = zs_obj_read_begin(zs, handle, copy.buf, &size);
    PyBuffer_Release(&copy);
    if (!at)
        return not_allocated("obj_read_begin", h), NULL;
    if (at != copy.buf) {
        /* zero-copy: the frame itself, valid until obj_read_end */
        view = PyMemoryView_FromMemory((char *)at, size, PyBUF_READ);
    } else {
        /* spans two frames: a read-only view of the caller's copy */
        PyObject *whole = PyMemoryView_FromObject(local), *part = NULL;
        if (whole)
            part = PySequence_GetSlice(whole, 0, size);
        if (part)
            view = PyObject_CallMethod(part, "toreadonly", NULL);
        Py_XDECREF(part);
        Py_XDECREF(whole);
    }
    if (!view)
        zs_obj_read_end(zs, handle);
    return view;
}

static PyObject *
ZsPool_obj_read_end(ZsPool *self, PyObject *args)
{
    struct zs_pool *zs = zs_of(self);
    PyObject *h, *view, *r;
    unsigned long handle;
    if (!zs || !PyArg_ParseTuple(args, "OO", &h, &view))
        return NULL;
    if (handle_arg(h, &handle) < 0)
        return NULL;
    if (!(r = PyObject_CallMethod(view, "release", NULL)))
        return NULL;
    Py_DECREF(r);
    zs_obj_read_end(zs, handle);
    Py_RETURN_NONE;
}

static PyObject *
ZsPool_compact(ZsPool *self, PyObject *unused)
{
    struct zs_pool *zs = zs_of(self);
    unsigned long freed;
    if (!zs)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    pool_gil_released = 1;
    freed = zs_compact(zs);
    pool_gil_released = 0;
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLong(freed);
}

static PyObject *
ZsPool_total_pages(ZsPool *self, PyObject *unused)
{
    struct zs_pool *zs = zs_of(self);
    return zs ? PyLong_FromUnsignedLong(zs_get_total_pages(zs)) : NULL;
}

static PyObject *
ZsPool_lookup_class_index(ZsPool *self, PyObject *arg)
{
    struct zs_pool *zs = zs_of(self);
    long size;
    if (!zs)
        return NULL;
    size = PyLong_AsLong(arg);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    if (size <= 0 || size > ZS_MAX_ALLOC_SIZE) {
        PyErr_Format(PyExc_ValueError, "lookup_class_index: size %ld;"
                     " accepted: 1..%d", size, ZS_MAX_ALLOC_SIZE);
        return NULL;
    }
    return PyLong_FromLong(zs_lookup_class_index(zs, size));
}

/* class_stats() -> [(index, size, fullness, obj_allocated, obj_used,
 * pages_used, pages_per_zspage, objs_per_zspage, freeable)], a row per
 * unmerged class, each taken under its lock. */
static PyObject *
ZsPool_class_stats(ZsPool *self, PyObject *unused)
{
    struct zs_pool *zs = zs_of(self);
    PyObject *rows;
    int i, n;
    if (!zs)
        return NULL;
    n = zs_class_count(zs);
    if (!(rows = PyList_New(n)))
        return NULL;
    for (i = 0; i < n; i++) {
        struct zs_class_stat st;
        PyObject *fullness, *row;
        int g;
        zs_class_stats(zs, i, &st);
        if (!(fullness = PyTuple_New(NR_FULLNESS_GROUPS - 1)))
            goto fail;
        for (g = 0; g < NR_FULLNESS_GROUPS - 1; g++) {
            PyObject *v = PyLong_FromUnsignedLong(st.fullness[g]);
            if (!v) {
                Py_DECREF(fullness);
                goto fail;
            }
            PyTuple_SET_ITEM(fullness, g, v);
        }
        row = Py_BuildValue("iiNkkkiik", st.index, st.size, fullness,
                            st.obj_allocated, st.obj_used, st.pages_used,
                            st.pages_per_zspage, st.objs_per_zspage,
                            st.freeable);
        if (!row)
            goto fail;
        PyList_SET_ITEM(rows, i, row);
    }
    return rows;
fail:
    Py_DECREF(rows);
    return NULL;
}

static PyObject *
ZsPool_audit(ZsPool *self, PyObject *unused)
{
    struct zs_pool *zs = zs_of(self);
    char why[256];
    int r;
    if (!zs)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    pool_gil_released = 1;
    r = zs_audit(zs, why, sizeof(why));
    pool_gil_released = 0;
    Py_END_ALLOW_THREADS
    if (r < 0) {
        PyErr_SetString(PyExc_AssertionError, why);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
ZsPool_plant_fault(ZsPool *self, PyObject *args)
{
    struct zs_pool *zs = zs_of(self);
    long size;
    const char *what;
    if (!zs || !PyArg_ParseTuple(args, "ls", &size, &what))
        return NULL;
    if (size <= 0 || zs_plant_fault(zs, size, what) < 0) {
        PyErr_Format(PyExc_ValueError, "_plant_fault: nothing to break for"
                     " %s in the class of %ld bytes", what, size);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
ZsPool_close(ZsPool *self, PyObject *unused)
{
    int r;
    if (!self->zs)
        Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS
    pool_gil_released = 1;
    r = zs_destroy_pool(self->zs);
    pool_gil_released = 0;
    Py_END_ALLOW_THREADS
    if (r < 0) {
        PyErr_SetString(PyExc_BufferError, "pool: close with a read open"
                        " (obj_read_begin without obj_read_end)");
        return NULL;
    }
    self->zs = NULL;
    Py_RETURN_NONE;
}

static PyObject *
ZsPool_get_huge_class_size(ZsPool *self, void *closure)
{
    struct zs_pool *zs = zs_of(self);
    return zs ? PyLong_FromSize_t(zs_huge_class_size(zs)) : NULL;
}

static PyObject *
ZsPool_get_pages_compacted(ZsPool *self, void *closure)
{
    struct zs_pool *zs = zs_of(self);
    return zs ? PyLong_FromUnsignedLong(zs_pages_compacted(zs)) : NULL;
}

static PyObject *
ZsPool_get_closed(ZsPool *self, void *closure)
{
    return PyBool_FromLong(!self->zs);
}

static PyMethodDef ZsPool_methods[] = {
    {"malloc", (PyCFunction)ZsPool_malloc, METH_O,
     "malloc(size) -> handle: a new object of size bytes (1..4096);"
     " ValueError for other sizes, MemoryError when out of memory."},
    {"free", (PyCFunction)ZsPool_free, METH_O,
     "free(handle): free the object now; ValueError if not allocated."},
    {"obj_size", (PyCFunction)ZsPool_obj_size, METH_O,
     "obj_size(handle) -> the size it was allocated with, 0 if not."},
    {"obj_write", (PyCFunction)ZsPool_obj_write, METH_VARARGS,
     "obj_write(handle, data): copy data (at most obj_size bytes) into"
     " the object."},
    {"obj_read_begin", (PyCFunction)ZsPool_obj_read_begin, METH_VARARGS,
     "obj_read_begin(handle, local_copy) -> read-only memoryview of the"
     " object: its frame, or local_copy (>= 4096 bytes) when it spans two."
     "  Compaction leaves it in place until obj_read_end."},
    {"obj_read_end", (PyCFunction)ZsPool_obj_read_end, METH_VARARGS,
     "obj_read_end(handle, view): release a view from obj_read_begin."},
    {"compact", (PyCFunction)ZsPool_compact, METH_NOARGS,
     "compact() -> frames freed (zs_compact)."},
    {"total_pages", (PyCFunction)ZsPool_total_pages, METH_NOARGS,
     "total_pages() -> frames held by zspages (zs_get_total_pages)."},
    {"lookup_class_index", (PyCFunction)ZsPool_lookup_class_index, METH_O,
     "lookup_class_index(size) -> index of the class size bytes land in."},
    {"class_stats", (PyCFunction)ZsPool_class_stats, METH_NOARGS,
     "class_stats() -> a tuple per unmerged class (the classes file)."},
    {"_audit", (PyCFunction)ZsPool_audit, METH_NOARGS,
     "_audit(): AssertionError naming the first broken invariant."},
    {"_plant_fault", (PyCFunction)ZsPool_plant_fault, METH_VARARGS,
     "_plant_fault(size, what): tests only: break an invariant."},
    {"close", (PyCFunction)ZsPool_close, METH_NOARGS,
     "close(): give every frame back; BufferError while a read is open."},
    {NULL}
};

static PyGetSetDef ZsPool_getset[] = {
    {"huge_class_size", (getter)ZsPool_get_huge_class_size, NULL,
     "the first object size stored in a huge class", NULL},
    {"pages_compacted", (getter)ZsPool_get_pages_compacted, NULL,
     "frames freed by compaction so far", NULL},
    {"closed", (getter)ZsPool_get_closed, NULL, "close() was called", NULL},
    {NULL}
};

static PyTypeObject ZsPoolType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "zramd._fastpath.ZsPool",
    .tp_basicsize = sizeof(ZsPool),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "ZsPool(chain_size=8): the zsmalloc pool (csrc/zsmalloc.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ZsPool_init,
    .tp_dealloc = (destructor)ZsPool_dealloc,
    .tp_methods = ZsPool_methods,
    .tp_getset = ZsPool_getset,
};

/* ---- Zram: a device's slot table and I/O paths (csrc/zram.c) --------------
 *
 * Device (zramd/device.py) drives it: whole-sector requests in C, and the
 * slot primitives its own paths use for the sectors C hands back, for
 * partial sectors and for post-processing (see zram.h for what each
 * needs held).  Indices are checked here; the core trusts them.
 */

/* Flags that change while the page stays the same (an access, the
 * bookkeeping of post-processing): ignored when a read-modify-write checks
 * that the slot still holds what it read. */
#define SAME_PAGE_FLAGS (ZRAM_IDLE | ZRAM_PP_SLOT | ZRAM_INCOMPRESSIBLE)

typedef struct {
    PyObject_HEAD
    struct zram *z;                  /* NULL once closed */
    ZsPool *pool;
    PyObject *codecs[MAX_DICTS];     /* the Codecs of the codec table */
    int all_held;                    /* lock_all() held (by Python) */
    pthread_t all_owner;             /* ... by this thread */
    atomic_int busy;                 /* calls without the GIL in progress */
    atomic_int held;                 /* stripes taken by lock() */
} Zram;

static PyTypeObject ZramType;

static struct zram *
zram_of(Zram *self)
{
    if (!self->z)
        PyErr_SetString(PyExc_ValueError, "Zram: closed");
    else if (!self->pool->zs) {
        PyErr_SetString(PyExc_ValueError, "Zram: its pool is closed");
        return NULL;
    }
    return self->z;
}

/* A slot index argument: 0, or -1 with IndexError. */
static int
index_arg(Zram *self, PyObject *arg, size_t *index)
{
    Py_ssize_t i = PyNumber_AsSsize_t(arg, PyExc_IndexError);
    if (i == -1 && PyErr_Occurred())
        return -1;
    if (i < 0 || (size_t)i >= zram_nr_pages(self->z)) {
        PyErr_Format(PyExc_IndexError, "slot %zd: outside 0..%zu", i,
                     zram_nr_pages(self->z) - 1);
        return -1;
    }
    *index = i;
    return 0;
}

/* Whole sectors first..first+count-1 inside the disk: 0, or -1. */
static int
range_arg(Zram *self, Py_ssize_t first, Py_ssize_t count)
{
    size_t n = zram_nr_pages(self->z);
    if (first < 0 || count < 0 || (size_t)first > n
            || (size_t)count > n - first) {
        PyErr_SetString(PyExc_ValueError, "not whole sectors inside the disk");
        return -1;
    }
    return 0;
}

/* A negative errno from the core as a Python error. */
static PyObject *
core_error(ssize_t r)
{
    if (r == -ENOMEM)
        return PyErr_NoMemory();
    errno = (int)-r;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static int
Zram_init(Zram *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"nr_pages", "pool", NULL};
    Py_ssize_t nr_pages;
    PyObject *pool;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "nO!", kwlist, &nr_pages,
                                     &ZsPoolType, &pool))
        return -1;
    if (self->z || self->pool) {
        PyErr_SetString(PyExc_TypeError, "Zram: already initialised");
        return -1;
    }
    if (nr_pages <= 0) {
        PyErr_Format(PyExc_ValueError, "nr_pages: %zd; accepted: > 0",
                     nr_pages);
        return -1;
    }
    if (!zs_of((ZsPool *)pool))
        return -1;
    if (!(self->z = zram_create(nr_pages, ((ZsPool *)pool)->zs))) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    Py_INCREF(pool);
    self->pool = (ZsPool *)pool;
    return 0;
}

static void
Zram_release(Zram *self)
{
    int i;
    zram_destroy(self->z);
    self->z = NULL;
    for (i = 0; i < MAX_DICTS; i++)
        Py_CLEAR(self->codecs[i]);
}

static void
Zram_dealloc(Zram *self)
{
    if (self->all_held && self->z)
        zram_unlock_all(self->z);
    Zram_release(self);
    Py_CLEAR(self->pool);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Zram_close(Zram *self, PyObject *unused)
{
    if (atomic_load(&self->busy)) {
        PyErr_Format(PyExc_BufferError, "Zram.close: %d requests in"
                     " progress", atomic_load(&self->busy));
        return NULL;
    }
    if (self->all_held || atomic_load(&self->held)) {
        PyErr_SetString(PyExc_BufferError, "Zram.close: a lock is held");
        return NULL;
    }
    Zram_release(self);
    Py_RETURN_NONE;
}

/* ---- requests: the GIL let go for all of each -------------------------- */

#define CORE_BEGIN \
    atomic_fetch_add(&self->busy, 1); \
    Py_BEGIN_ALLOW_THREADS \
    pool_gil_released = 1;
#define CORE_END \
    pool_gil_released = 0; \
    Py_END_ALLOW_THREADS \
    atomic_fetch_sub(&self->busy, 1);

/* read(out, first) and write(data, first): whole sectors of the buffer
 * from sector first; the sectors done, stopping at one the caller must
 * do. */
static PyObject *
zram_request(Zram *self, PyObject *args, int write)
{
    struct zram *z = zram_of(self);
    Py_buffer buf;
    Py_ssize_t first;
    ssize_t r;
    if (!z || !PyArg_ParseTuple(args, write ? "y*n" : "w*n", &buf, &first))
        return NULL;
    if (buf.len % PAGE_SIZE || range_arg(self, first, buf.len / PAGE_SIZE)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "not whole sectors");
        PyBuffer_Release(&buf);
        return NULL;
    }
    CORE_BEGIN
    r = write ? zram_write(z, buf.buf, first, buf.len / PAGE_SIZE)
              : zram_read(z, buf.buf, first, buf.len / PAGE_SIZE);
    CORE_END
    PyBuffer_Release(&buf);
    return r < 0 ? core_error(r) : PyLong_FromSsize_t(r);
}

static PyObject *
Zram_read(Zram *self, PyObject *args)
{
    return zram_request(self, args, 0);
}

static PyObject *
Zram_write(Zram *self, PyObject *args)
{
    return zram_request(self, args, 1);
}

/* discard(first, count) -> (sectors freed, [pool handles to free]) */
static PyObject *
Zram_discard(Zram *self, PyObject *args)
{
    struct zram *z = zram_of(self);
    Py_ssize_t first, count;
    uint64_t *handles;
    size_t done, n = 0, k;
    PyObject *list;
    if (!z || !PyArg_ParseTuple(args, "nn", &first, &count)
            || range_arg(self, first, count) < 0)
        return NULL;
    if (!(handles = PyMem_Malloc((count ? count : 1) * sizeof(*handles))))
        return PyErr_NoMemory();
    CORE_BEGIN
    done = zram_discard(z, first, count, handles, &n);
    CORE_END
    if ((list = PyList_New(n))) {
        for (k = 0; k < n; k++) {
            PyObject *h = PyLong_FromUnsignedLongLong(handles[k]);
            if (!h) {
                Py_CLEAR(list);
                break;
            }
            PyList_SET_ITEM(list, k, h);
        }
    }
    PyMem_Free(handles);
    return list ? Py_BuildValue("nN", (Py_ssize_t)done, list) : NULL;
}

/* extents(first, count, max_runs) -> [(sectors, kind)], kind 0 hole,
 * 1 zero, 2 data; at most max_runs runs (negative: no bound).  The scan
 * goes EXTENT_BATCH runs at a time, so a whole large disk needs no buffer
 * of its size. */
#define EXTENT_BATCH 1024

static int
append_run(PyObject *list, size_t sectors, int kind)
{
    PyObject *t = Py_BuildValue("ni", (Py_ssize_t)sectors, kind);
    int r = t ? PyList_Append(list, t) : -1;
    Py_XDECREF(t);
    return r;
}

static PyObject *
Zram_extents(Zram *self, PyObject *args)
{
    struct zram *z = zram_of(self);
    Py_ssize_t first, count, max_runs, pos = 0;
    struct zram_run runs[EXTENT_BATCH];
    size_t cur = 0;                  /* sectors of the run being merged */
    int cur_kind = -1, done = 0;
    PyObject *list;
    if (!z || !PyArg_ParseTuple(args, "nnn", &first, &count, &max_runs)
            || range_arg(self, first, count) < 0)
        return NULL;
    if (max_runs < 0 || max_runs > count)
        max_runs = count;
    if (!(list = PyList_New(0)))
        return NULL;
    while (pos < count && !done) {
        /* one more than is left: the first may merge with cur */
        Py_ssize_t left = max_runs - PyList_GET_SIZE(list)
                          - (cur_kind >= 0), want = left + 1;
        size_t n, k;
        if (want > EXTENT_BATCH)
            want = EXTENT_BATCH;
        CORE_BEGIN
        n = zram_extents(z, first + pos, count - pos, runs, want);
        CORE_END
        for (k = 0; k < n; k++) {
            if ((int)runs[k].kind != cur_kind) {
                if (cur_kind >= 0 && append_run(list, cur, cur_kind) < 0)
                    goto fail;
                if (PyList_GET_SIZE(list) == max_runs) {
                    cur_kind = -1;
                    done = 1;
                    break;
                }
                cur_kind = runs[k].kind;
                cur = 0;
            }
            cur += runs[k].sectors;
            pos += runs[k].sectors;
        }
    }
    if (cur_kind >= 0 && append_run(list, cur, cur_kind) < 0)
        goto fail;
    return list;
fail:
    Py_DECREF(list);
    return NULL;
}

/* mark_idle(cutoff) -> newly marked; cutoff None: all */
static PyObject *
Zram_mark_idle(Zram *self, PyObject *arg)
{
    struct zram *z = zram_of(self);
    long cutoff = 0;
    int all = arg == Py_None;
    size_t n;
    if (!z)
        return NULL;
    if (!all && (cutoff = PyLong_AsLong(arg)) == -1 && PyErr_Occurred())
        return NULL;
    CORE_BEGIN
    n = zram_mark_idle(z, all, cutoff);
    CORE_END
    return PyLong_FromSize_t(n);
}

/* ---- locks ---------------------------------------------------------------- */

/* A stripe number argument: 0, or -1 with IndexError. */
static int
stripe_arg(PyObject *arg, size_t *stripe)
{
    long s = PyLong_AsLong(arg);
    if (s == -1 && PyErr_Occurred())
        return -1;
    if (s < 0 || s >= N_STRIPES) {
        PyErr_Format(PyExc_IndexError, "stripe %ld: outside 0..%d", s,
                     N_STRIPES - 1);
        return -1;
    }
    *stripe = s;
    return 0;
}

/* Take a stripe from Python: try, else wait with the GIL let go. */
static PyObject *
Zram_lock(Zram *self, PyObject *arg)
{
    struct zram *z = zram_of(self);
    size_t stripe;
    if (!z || stripe_arg(arg, &stripe) < 0)
        return NULL;
    if (zram_slot_trylock(z, stripe) != 0) {
        CORE_BEGIN
        zram_slot_lock(z, stripe);
        CORE_END
    }
    atomic_fetch_add(&self->held, 1);
    Py_RETURN_NONE;
}

static PyObject *
Zram_trylock(Zram *self, PyObject *arg)
{
    struct zram *z = zram_of(self);
    size_t stripe;
    if (!z || stripe_arg(arg, &stripe) < 0)
        return NULL;
    if (zram_slot_trylock(z, stripe) != 0)
        Py_RETURN_FALSE;
    atomic_fetch_add(&self->held, 1);
    Py_RETURN_TRUE;
}

static PyObject *
Zram_unlock(Zram *self, PyObject *arg)
{
    struct zram *z = zram_of(self);
    size_t stripe;
    if (!z || stripe_arg(arg, &stripe) < 0)
        return NULL;
    if (atomic_load(&self->held) <= 0) {
        PyErr_SetString(PyExc_RuntimeError, "unlock: no stripe held");
        return NULL;
    }
    atomic_fetch_sub(&self->held, 1);
    zram_slot_unlock(z, stripe);
    Py_RETURN_NONE;
}

static PyObject *
Zram_lock_all(Zram *self, PyObject *unused)
{
    struct zram *z = zram_of(self);
    if (!z)
        return NULL;
    if (zram_trylock_all(z) != 0) {
        CORE_BEGIN
        zram_lock_all(z);
        CORE_END
    }
    self->all_held = 1;
    self->all_owner = pthread_self();
    Py_RETURN_NONE;
}

static PyObject *
Zram_unlock_all(Zram *self, PyObject *unused)
{
    struct zram *z = zram_of(self);
    if (!z)
        return NULL;
    if (!self->all_held) {
        PyErr_SetString(PyExc_RuntimeError, "unlock_all: not held");
        return NULL;
    }
    self->all_held = 0;
    zram_unlock_all(z);
    Py_RETURN_NONE;
}

static int
need_all(Zram *self, const char *op)
{
    if (!self->all_held || !pthread_equal(self->all_owner, pthread_self())) {
        PyErr_Format(PyExc_RuntimeError, "%s: needs lock_all()", op);
        return -1;
    }
    return 0;
}

/* ---- codec table (lock_all held) ---------------------------------------- */

/* A dictionary id argument: 0, or -1 with an error (ValueError when out
 * of 0..MAX_DICTS - 1). */
static int
dict_id_arg(PyObject *arg, unsigned *id)
{
    long v = PyLong_AsLong(arg);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0 || v >= MAX_DICTS) {
        PyErr_Format(PyExc_ValueError, "dictionary id %ld; accepted: 0..%d",
                     v, MAX_DICTS - 1);
        return -1;
    }
    *id = (unsigned)v;
    return 0;
}

static PyObject *
Zram_set_dict_codec(Zram *self, PyObject *args)
{
    struct zram *z = zram_of(self);
    unsigned id;
    PyObject *id_o, *codec, *old;
    if (!z || !PyArg_ParseTuple(args, "OO", &id_o, &codec)
            || need_all(self, "set_dict_codec") < 0
            || dict_id_arg(id_o, &id) < 0)
        return NULL;
    if (codec != Py_None && (!PyObject_TypeCheck(codec, &CodecType)
                             || !((Codec *)codec)->c)) {
        PyErr_SetString(PyExc_TypeError, "codec: a Codec or None");
        return NULL;
    }
    zram_set_dict_codec(z, id, codec == Py_None ? NULL : ((Codec *)codec)->c);
    old = self->codecs[id];
    if (codec == Py_None) {
        self->codecs[id] = NULL;
    } else {
        Py_INCREF(codec);
        self->codecs[id] = codec;
    }
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

static PyObject *
Zram_set_primary(Zram *self, PyObject *arg)
{
    struct zram *z = zram_of(self);
    unsigned id;
    if (!z || need_all(self, "set_primary") < 0 || dict_id_arg(arg, &id) < 0)
        return NULL;
    zram_set_primary(z, id);
    Py_RETURN_NONE;
}

static PyObject *
Zram_dict_refs(Zram *self, PyObject *arg)
{
    struct zram *z = zram_of(self);
    unsigned id;
    if (!z || need_all(self, "dict_refs") < 0 || dict_id_arg(arg, &id) < 0)
        return NULL;
    return PyLong_FromLongLong(zram_dict_refs(z, id));
}

/* ---- slot primitives -------------------------------------------------------- */

/* get(index) -> (meta, handle): a snapshot, or exact under the lock. */
static PyObject *
Zram_get(Zram *self, PyObject *arg)
{
    struct zram *z = zram_of(self);
    size_t index;
    if (!z || index_arg(self, arg, &index) < 0)
        return NULL;
    return Py_BuildValue("kK", (unsigned long)zram_slot_meta(z, index),
                         (unsigned long long)zram_slot_handle(z, index));
}

/* version(index) -> what a read-modify-write checks before it stores: the
 * word but for SAME_PAGE_FLAGS, the handle, and the stripe's count of
 * writes, which tells a handle freed and handed out again (to this slot,
 * by two writes) from the one read.  The lock held. */
static PyObject *
Zram_version(Zram *self, PyObject *arg)
{
    struct zram *z = zram_of(self);
    size_t index;
    if (!z || index_arg(self, arg, &index) < 0)
        return NULL;
    return Py_BuildValue(
        "kKL", (unsigned long)(zram_slot_meta(z, index) & ~SAME_PAGE_FLAGS),
        (unsigned long long)zram_slot_handle(z, index),
        (long long)zram_slot_writes(z, index));
}

static PyObject *
Zram_touch(Zram *self, PyObject *arg)
{
    struct zram *z = zram_of(self);
    size_t index;
    if (!z || index_arg(self, arg, &index) < 0)
        return NULL;
    zram_slot_touch(z, index);
    Py_RETURN_NONE;
}

static PyObject *
Zram_flags(Zram *self, PyObject *args)
{
    struct zram *z = zram_of(self);
    PyObject *i;
    unsigned set, clear;
    size_t index;
    if (!z || !PyArg_ParseTuple(args, "OII", &i, &set, &clear)
            || index_arg(self, i, &index) < 0)
        return NULL;
    zram_slot_flags(z, index, set, clear);
    Py_RETURN_NONE;
}

static PyObject *
Zram_clear(Zram *self, PyObject *arg)
{
    struct zram *z = zram_of(self);
    size_t index;
    uint64_t handle;
    uint32_t meta;
    if (!z || index_arg(self, arg, &index) < 0)
        return NULL;
    meta = zram_slot_clear(z, index, &handle);
    return Py_BuildValue("kK", (unsigned long)meta,
                         (unsigned long long)handle);
}

static PyObject *
Zram_set(Zram *self, PyObject *args)
{
    struct zram *z = zram_of(self);
    PyObject *i;
    unsigned meta;
    unsigned long long handle;
    int write;
    size_t index;
    if (!z || !PyArg_ParseTuple(args, "OIKp", &i, &meta, &handle, &write)
            || index_arg(self, i, &index) < 0)
        return NULL;
    if (zram_slot_meta(z, index) || zram_slot_handle(z, index)) {
        PyErr_Format(PyExc_ValueError, "set: slot %zu is not empty", index);
        return NULL;
    }
    zram_slot_set(z, index, meta, handle, write);
    Py_RETURN_NONE;
}

/* ---- stats, limits, clock ------------------------------------------------- */

static PyObject *
Zram_counters(Zram *self, PyObject *unused)
{
    struct zram *z = zram_of(self);
    int64_t sums[N_COUNTERS];
    PyObject *t;
    int c;
    if (!z)
        return NULL;
    if (self->all_held && pthread_equal(self->all_owner, pthread_self())) {
        zram_counters_locked(z, sums);      /* ours already */
    } else if (zram_counters_try(z, sums) != 0) {
        /* a stripe is busy: wait for it without the GIL */
        CORE_BEGIN
        zram_counters(z, sums);
        CORE_END
    }
    if (!(t = PyTuple_New(N_COUNTERS)))
        return NULL;
    for (c = 0; c < N_COUNTERS; c++) {
        PyObject *v = PyLong_FromLongLong(sums[c]);
        if (!v) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, c, v);
    }
    return t;
}

static PyObject *
Zram_note_used(Zram *self, PyObject *arg)
{
    struct zram *z = zram_of(self);
    unsigned long pages;
    if (!z)
        return NULL;
    pages = PyLong_AsUnsignedLong(arg);
    if (pages == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    zram_note_used(z, pages);
    Py_RETURN_NONE;
}

static PyObject *
Zram_now(Zram *self, PyObject *unused)
{
    struct zram *z = zram_of(self);
    return z ? PyLong_FromUnsignedLong(zram_now(z)) : NULL;
}

static PyObject *
Zram_get_pages(Zram *self, void *which)
{
    struct zram *z = zram_of(self);
    if (!z)
        return NULL;
    return PyLong_FromUnsignedLong(which ? zram_limit(z) : zram_max_used(z));
}

static int
Zram_set_pages(Zram *self, PyObject *v, void *which)
{
    struct zram *z = zram_of(self);
    unsigned long pages;
    if (!z)
        return -1;
    if (!v) {
        PyErr_SetString(PyExc_TypeError, "cannot delete");
        return -1;
    }
    pages = PyLong_AsUnsignedLong(v);
    if (pages == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    if (which)
        zram_set_limit(z, pages);
    else
        zram_set_max_used(z, pages);
    return 0;
}

static PyObject *
Zram_get_t0(Zram *self, void *closure)
{
    struct zram *z = zram_of(self);
    return z ? PyFloat_FromDouble(zram_t0(z) * 1e-9) : NULL;
}

static int
Zram_set_t0(Zram *self, PyObject *v, void *closure)
{
    struct zram *z = zram_of(self);
    double t0;
    if (!z)
        return -1;
    if (!v) {
        PyErr_SetString(PyExc_TypeError, "cannot delete");
        return -1;
    }
    t0 = PyFloat_AsDouble(v);
    if (t0 == -1.0 && PyErr_Occurred())
        return -1;
    zram_set_t0(z, (int64_t)(t0 * 1e9));
    return 0;
}

static PyObject *
Zram_get_busy(Zram *self, void *closure)
{
    return PyLong_FromLong(atomic_load(&self->busy));
}

static PyObject *
Zram_get_closed(Zram *self, void *closure)
{
    return PyBool_FromLong(!self->z);
}

static PyMethodDef Zram_methods[] = {
    {"read", (PyCFunction)Zram_read, METH_VARARGS,
     "read(out, first) -> sectors read into out (whole sectors) from"
     " sector first; stops at a sector the caller must do."},
    {"write", (PyCFunction)Zram_write, METH_VARARGS,
     "write(data, first) -> sectors stored from data (whole sectors) at"
     " sector first; stops at a sector the caller must do."},
    {"discard", (PyCFunction)Zram_discard, METH_VARARGS,
     "discard(first, count) -> (sectors freed, [pool handles to free]);"
     " stops at a written-back slot."},
    {"extents", (PyCFunction)Zram_extents, METH_VARARGS,
     "extents(first, count, max_runs) -> [(sectors, kind)], kind 0 hole,"
     " 1 zero, 2 data; at most max_runs runs (negative: no bound)."},
    {"mark_idle", (PyCFunction)Zram_mark_idle, METH_O,
     "mark_idle(cutoff) -> newly marked: IDLE on slots holding a pool"
     " object last accessed at or before cutoff (None: all), cleared on"
     " those accessed since."},
    {"lock", (PyCFunction)Zram_lock, METH_O,
     "lock(stripe): take the lock of stripe (slot index % N_STRIPES)."},
    {"trylock", (PyCFunction)Zram_trylock, METH_O,
     "trylock(stripe) -> whether it took the stripe's lock."},
    {"unlock", (PyCFunction)Zram_unlock, METH_O,
     "unlock(stripe): let the stripe's lock go."},
    {"lock_all", (PyCFunction)Zram_lock_all, METH_NOARGS,
     "lock_all(): the codec table's lock, then every stripe's."},
    {"unlock_all", (PyCFunction)Zram_unlock_all, METH_NOARGS,
     "unlock_all(): undo lock_all()."},
    {"set_dict_codec", (PyCFunction)Zram_set_dict_codec, METH_VARARGS,
     "set_dict_codec(id, codec): the Codec of pages of dictionary id, or"
     " None (they are the caller's); lock_all() held."},
    {"set_primary", (PyCFunction)Zram_set_primary, METH_O,
     "set_primary(id): new pages use dictionary id; lock_all() held."},
    {"dict_refs", (PyCFunction)Zram_dict_refs, METH_O,
     "dict_refs(id) -> stored pages of dictionary id; lock_all() held."},
    {"get", (PyCFunction)Zram_get, METH_O,
     "get(index) -> (meta, handle): exact under the slot's lock, else a"
     " snapshot."},
    {"version", (PyCFunction)Zram_version, METH_O,
     "version(index) -> (meta but IDLE/PP_SLOT/INCOMPRESSIBLE, handle,"
     " stripe writes); the lock held."},
    {"touch", (PyCFunction)Zram_touch, METH_O,
     "touch(index): count a read (IDLE cleared, atime, num_reads); the"
     " lock held."},
    {"flags", (PyCFunction)Zram_flags, METH_VARARGS,
     "flags(index, set, clear): meta = meta & ~clear | set; the lock held."},
    {"clear", (PyCFunction)Zram_clear, METH_O,
     "clear(index) -> (old meta, old handle): unlink the slot, counters"
     " updated; what to free is the caller's; the lock held."},
    {"set", (PyCFunction)Zram_set, METH_VARARGS,
     "set(index, meta, handle, write): link new contents into the empty"
     " slot, counted (write: also num_writes, atime, huge_pages_since);"
     " the lock held."},
    {"counters", (PyCFunction)Zram_counters, METH_NOARGS,
     "counters() -> the per-stripe counters summed, by column."},
    {"note_used", (PyCFunction)Zram_note_used, METH_O,
     "note_used(pages): keep the peak of pool pages (update_used_max)."},
    {"now", (PyCFunction)Zram_now, METH_NOARGS,
     "now() -> seconds of the device's clock."},
    {"close", (PyCFunction)Zram_close, METH_NOARGS,
     "close(): unmap the table; BufferError while a request runs."},
    {NULL}
};

static PyGetSetDef Zram_getset[] = {
    {"max_used_pages", (getter)Zram_get_pages, (setter)Zram_set_pages,
     "the peak of pool pages (mem_used_max)", NULL},
    {"limit_pages", (getter)Zram_get_pages, (setter)Zram_set_pages,
     "mem_limit in pages (0: none)", (void *)1},
    {"t0", (getter)Zram_get_t0, (setter)Zram_set_t0,
     "the device clock's zero, in time.monotonic() seconds", NULL},
    {"busy", (getter)Zram_get_busy, NULL, "requests in progress", NULL},
    {"closed", (getter)Zram_get_closed, NULL, "close() was called", NULL},
    {NULL}
};

static PyTypeObject ZramType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "zramd._fastpath.Zram",
    .tp_basicsize = sizeof(Zram),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Zram(nr_pages, pool): a device's slot table and I/O paths "
              "(csrc/zram.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Zram_init,
    .tp_dealloc = (destructor)Zram_dealloc,
    .tp_methods = Zram_methods,
    .tp_getset = Zram_getset,
};

/* ---- module ----------------------------------------------------------- */

static PyObject *
fp_crew_limit(PyObject *module, PyObject *args)
{
    int limit = INT_MIN;
    if (!PyArg_ParseTuple(args, "|i", &limit))
        return NULL;
    if (limit != INT_MIN && (limit < 0 || limit > CREW_MAX)) {
        PyErr_Format(PyExc_ValueError, "crew_limit: %d; accepted: 0..%d",
                     limit, CREW_MAX);
        return NULL;
    }
    return PyLong_FromLong(crew_set_limit(limit == INT_MIN ? -1 : limit));
}

static PyMethodDef module_methods[] = {
    {"crew_limit", fp_crew_limit, METH_VARARGS,
     "crew_limit([n]) -> the previous limit: how many helper threads one"
     " request may use (0: none, the calling thread does it all)."},
    {NULL}
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT, "zramd._fastpath",
    "zramd's C core: the device's slot table and I/O paths (Zram), the"
    " pool (ZsPool) and the lz4/lz4hc/zstd codecs (Codec).", -1,
    module_methods,
};

/* Every constant of csrc/zram_defs.h, by the name Python knows it by:
 * zramd's Python modules import them from here and define none. */
struct named_constant {
    const char *name;
    long value;
};

#define K(name) {#name, name}
static const struct named_constant constants[] = {
    K(PAGE_SHIFT), K(PAGE_SIZE), K(PAGE_MASK),
    K(ZRAM_FLAG_SHIFT), K(SIZE_MASK),
    {"SAME", ZRAM_SAME}, {"WB", ZRAM_WB}, {"PP_SLOT", ZRAM_PP_SLOT},
    {"HUGE", ZRAM_HUGE}, {"IDLE", ZRAM_IDLE},
    {"INCOMPRESSIBLE", ZRAM_INCOMPRESSIBLE},
    K(COMP_PRIORITY_SHIFT), K(COMP_PRIORITY_MASK), K(MAX_PRIORITIES),
    K(DICT_SHIFT), K(MAX_DICTS), K(DICT_MASK),
    K(N_STRIPES), K(STRIPE_MASK),
    K(C_PAGES_STORED), K(C_COMPR_SIZE), K(C_SAME_PAGES), K(C_HUGE_PAGES),
    K(C_HUGE_SINCE), K(C_NOTIFY_FREE), K(C_NUM_READS), K(C_NUM_WRITES),
    K(C_PRIO_PAGES), K(N_COUNTERS),
    K(ZS_MIN_ALLOC_SIZE), K(ZS_MAX_ALLOC_SIZE), K(ZS_HANDLE_SIZE),
    K(CLASS_BITS), K(ZS_SIZE_CLASS_DELTA), K(ZS_SIZE_CLASSES),
    K(CHAIN_SIZE_MIN), K(CHAIN_SIZE_MAX), K(CHAIN_SIZE_DEFAULT),
    K(ZS_INUSE_RATIO_0), K(ZS_INUSE_RATIO_10), K(ZS_INUSE_RATIO_99),
    K(ZS_INUSE_RATIO_100), K(NR_FULLNESS_GROUPS), K(ZS_ISOLATED), K(ZS_FREE),
    K(OBJ_INDEX_BITS), K(OBJ_INDEX_MASK), K(OBJ_ALLOCATED_TAG),
    K(HANDLE_CLASS_BITS), K(HANDLE_CLASS_MASK),
    K(CHUNK_SHIFT), K(CHUNK_FRAMES), K(CHUNK_MASK), K(TRIM_FRAMES),
    K(DEFERRED_CAPACITY),
    {NULL, 0}
};
#undef K

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    PyObject *m;
    if (PyType_Ready(&CodecType) < 0 || PyType_Ready(&ZramType) < 0
            || PyType_Ready(&ZsPoolType) < 0)
        return NULL;
    if (zcomp_max_bound(PAGE_SIZE) > PAGE_SIZE + 128) {
        PyErr_SetString(PyExc_ImportError, "zram.c's SCRATCH_STRIDE is too"
                        " small");
        return NULL;
    }
    if (!(m = PyModule_Create(&fastpath_module)))
        return NULL;
    Py_INCREF(&CodecType);
    Py_INCREF(&ZramType);
    Py_INCREF(&ZsPoolType);
    if (PyModule_AddObject(m, "Codec", (PyObject *)&CodecType) < 0
            || PyModule_AddObject(m, "Zram", (PyObject *)&ZramType) < 0
            || PyModule_AddObject(m, "ZsPool", (PyObject *)&ZsPoolType) < 0)
        return NULL;
    {
        const struct named_constant *k;
        for (k = constants; k->name; k++)
            if (PyModule_AddIntConstant(m, k->name, k->value) < 0)
                return NULL;
    }
    return m;
}
