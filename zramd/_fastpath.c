/*
 * zramd._fastpath: the device's whole-sector read and write loops, the
 * pool (csrc/zsmalloc.c) as a Python type, and the lz4, lz4hc and zstd
 * codecs, in C.
 *
 * Why C: a 4 KiB sector cost the Python paths in device.py about 30,000
 * instructions to read and 65,000 to write besides the compressor itself
 * (callgrind, docs/benchmarks.md), and all of it under the GIL; the client
 * sends 64 sectors per 256 KiB request.  Here a request is one call.
 *
 * What it works on: the slot table (the device's three mmap arrays and
 * its counter rows) and the stripe locks stay the Python objects
 * device.py documents; this module reads and writes them in place through
 * the buffer protocol and takes the same threading.Lock objects.  The
 * pool is C with its own memory and mutexes: ZsPool owns a struct zs_pool
 * and the loops call its API (zs_malloc, zs_obj_write, zs_obj_read_begin
 * and _end, zs_free, zs_get_total_pages) and see no size class or frame
 * of their own.  The Python paths
 * remain the reference for everything the loops decline:
 * a sector that is written back, recompressed with a secondary algorithm,
 * compressed with a codec that has no native form, corrupt, or over the
 * memory limit makes the loop stop and return how many sectors it did;
 * device.py does that one sector itself (raising the right error if there
 * is one) and calls again for the rest.
 *
 *     write(request)                       read(request)
 *     1 crew, no GIL: same-filled?         1 GIL, per sector under its
 *       compress every page to scratch       stripe lock: fill SAME/holes,
 *     2 GIL, per sector: zs_malloc,          copy HUGE out, copy objects
 *       zs_obj_write, swap the slot          to scratch (obj_read_begin)
 *       slot (stripe lock), zs_free old    2 crew, no GIL: decompress
 *                                          3 GIL: count and touch the
 *                                            sectors read (stripe lock)
 *
 * The GIL: every step that touches a Python object runs holding it; the
 * crew's steps touch only the caller's buffers and private scratch areas,
 * so compression on one nbdkit thread overlaps Python work on another.
 * The pool never needs the GIL; a thread that must wait for one of its
 * mutexes lets the GIL go meanwhile (pool_lock_wait).  A SlotPaths
 * refuses to close while a call is in progress.
 *
 * Codec is one configured compressor: lz4 (LZ4_compress_fast, the kernel's
 * call, acceleration 1) or zstd at a level, with an optional dictionary,
 * writing magicless frames with no content size, checksum or dictionary id
 * (see compress/backend_zstd.py).  zstd contexts come from a free list on
 * the codec, taken and given back under the GIL.
 *
 * The layouts (slot word, counters, pool handles, frames) are those of
 * csrc/zram_defs.h, which the module exports to Python by name.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>
#include <lz4.h>
#include <lz4hc.h>
#define ZSTD_STATIC_LINKING_ONLY
#include <zstd.h>

#include "csrc/zram_defs.h"
#include "csrc/zsmalloc.h"

/* Names of the Python objects' attributes and methods this module uses
 * (interned at import). */
static PyObject *s_acquire, *s_release, *s_native, *s_primary,
    *s_dict_comps, *s_limit_pages, *s_max_used_pages, *s_note_pages_used,
    *s_t0;

/* ---- codecs ------------------------------------------------------------ */

enum { KIND_LZ4 = 0, KIND_ZSTD = 1, KIND_LZ4HC = 2 };

/* A growable stack of pointers (a free list). */
typedef struct {
    void **items;
    Py_ssize_t n, cap;
} PtrStack;

/* Push; 0, or -1 when it cannot grow (the caller frees the item). */
static int
ptr_push(PtrStack *st, void *item)
{
    if (st->n == st->cap) {
        Py_ssize_t cap = st->cap ? 2 * st->cap : 4;
        void **grown = PyMem_Realloc(st->items, cap * sizeof(*grown));
        if (!grown)
            return -1;
        st->items = grown;
        st->cap = cap;
    }
    st->items[st->n++] = item;
    return 0;
}

typedef struct {
    PyObject_HEAD
    int kind;
    int level;
    unsigned window_log;           /* zstd: what the decoder accepts */
    ZSTD_CDict *cdict;
    ZSTD_DDict *ddict;
    PtrStack cctx, dctx;           /* free contexts, guarded by the GIL */
} Codec;

static PyTypeObject CodecType;

static int
set_zstd_error(const char *what, size_t code)
{
    PyErr_Format(PyExc_ValueError, "zstd %s: %s", what,
                 ZSTD_getErrorName(code));
    return -1;
}

static ZSTD_CCtx *
codec_take_cctx(Codec *c)
{
    ZSTD_CCtx *cctx;
    size_t r;
    if (c->cctx.n)
        return c->cctx.items[--c->cctx.n];
    cctx = ZSTD_createCCtx();
    if (!cctx) {
        PyErr_NoMemory();
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
        set_zstd_error("compressor", r);
        return NULL;
    }
    return cctx;
}

static void
codec_give_cctx(Codec *c, ZSTD_CCtx *cctx)
{
    if (ptr_push(&c->cctx, cctx) < 0)
        ZSTD_freeCCtx(cctx);
}

static ZSTD_DCtx *
codec_take_dctx(Codec *c)
{
    ZSTD_DCtx *dctx;
    size_t r;
    if (c->dctx.n)
        return c->dctx.items[--c->dctx.n];
    dctx = ZSTD_createDCtx();
    if (!dctx) {
        PyErr_NoMemory();
        return NULL;
    }
    r = ZSTD_DCtx_setParameter(dctx, ZSTD_d_format, ZSTD_f_zstd1_magicless);
    if (!ZSTD_isError(r))
        r = ZSTD_DCtx_setParameter(dctx, ZSTD_d_windowLogMax, c->window_log);
    if (!ZSTD_isError(r) && c->ddict)
        r = ZSTD_DCtx_refDDict(dctx, c->ddict);
    if (ZSTD_isError(r)) {
        ZSTD_freeDCtx(dctx);
        set_zstd_error("decompressor", r);
        return NULL;
    }
    return dctx;
}

static void
codec_give_dctx(Codec *c, ZSTD_DCtx *dctx)
{
    if (ptr_push(&c->dctx, dctx) < 0)
        ZSTD_freeDCtx(dctx);
}

/* Compress one page into dst (capacity cap); the size, or 0 when it does
 * not fit (or failed).  Needs no GIL: cctx is the caller's. */
static size_t
codec_compress(Codec *c, ZSTD_CCtx *cctx, const char *src, size_t len,
               char *dst, size_t cap)
{
    if (c->kind == KIND_LZ4) {
        int n = LZ4_compress_fast(src, dst, (int)len, (int)cap, 1);
        return n > 0 ? (size_t)n : 0;
    } else if (c->kind == KIND_LZ4HC) {
        int n = LZ4_compress_HC(src, dst, (int)len, (int)cap, c->level);
        return n > 0 ? (size_t)n : 0;
    } else {
        size_t n = ZSTD_compress2(cctx, dst, cap, src, len);
        return ZSTD_isError(n) ? 0 : n;
    }
}

/* Decompress an object into a 4096-byte page; NULL on success, else why
 * not.  Needs no GIL: dctx is the caller's. */
static const char *
codec_decompress(Codec *c, ZSTD_DCtx *dctx, const char *src, size_t n,
                 char *page)
{
    if (c->kind != KIND_ZSTD) {
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
        size_t got = ZSTD_decompressDCtx(dctx, page, PAGE_SIZE, src, n);
        if (ZSTD_isError(got))
            return ZSTD_getErrorName(got);
        if (got != PAGE_SIZE)
            return "short frame";
        return NULL;
    }
}

static int
Codec_init(Codec *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"algorithm", "level", "dictionary", NULL};
    const char *algorithm;
    int level = 0;
    Py_buffer dict = {NULL};
    if (self->cdict || self->cctx.n || self->dctx.n || self->window_log) {
        PyErr_SetString(PyExc_TypeError, "Codec: already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "s|iz*", kwlist,
                                     &algorithm, &level, &dict))
        return -1;
    self->level = level;
    if (strcmp(algorithm, "lz4") == 0 || strcmp(algorithm, "lz4hc") == 0) {
        /* lz4hc writes the same block format; only compression differs */
        self->kind = algorithm[3] ? KIND_LZ4HC : KIND_LZ4;
        if (dict.buf) {
            PyBuffer_Release(&dict);
            PyErr_SetString(PyExc_ValueError, "lz4 takes no dictionary");
            return -1;
        }
        return 0;
    }
    if (strcmp(algorithm, "zstd") != 0) {
        PyBuffer_Release(&dict);
        PyErr_Format(PyExc_ValueError, "no native codec for %s", algorithm);
        return -1;
    }
    self->kind = KIND_ZSTD;
    {
        /* The parameters zstd picks for a page and this dictionary, as
         * the kernel's zstd_get_params(level, PAGE_SIZE) does. */
        ZSTD_compressionParameters cp = ZSTD_getCParams(
            level, PAGE_SIZE, dict.buf ? (size_t)dict.len : 0);
        self->window_log = cp.windowLog < 12 ? 12 : cp.windowLog;
        if (dict.buf) {
            ZSTD_customMem mem = {NULL, NULL, NULL};
            self->cdict = ZSTD_createCDict_advanced(
                dict.buf, dict.len, ZSTD_dlm_byCopy, ZSTD_dct_auto, cp, mem);
            self->ddict = ZSTD_createDDict(dict.buf, dict.len);
            PyBuffer_Release(&dict);
            if (!self->cdict || !self->ddict) {
                PyErr_SetString(PyExc_ValueError,
                                "not a usable zstd dictionary");
                return -1;
            }
        }
    }
    return 0;
}

static void
Codec_dealloc(Codec *self)
{
    Py_ssize_t i;
    for (i = 0; i < self->cctx.n; i++)
        ZSTD_freeCCtx(self->cctx.items[i]);
    for (i = 0; i < self->dctx.n; i++)
        ZSTD_freeDCtx(self->dctx.items[i]);
    PyMem_Free(self->cctx.items);
    PyMem_Free(self->dctx.items);
    ZSTD_freeCDict(self->cdict);
    ZSTD_freeDDict(self->ddict);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* compress(page) -> bytes: the whole output, however long. */
static PyObject *
Codec_compress(Codec *self, PyObject *arg)
{
    Py_buffer page;
    PyObject *out;
    size_t cap, n;
    ZSTD_CCtx *cctx = NULL;
    if (PyObject_GetBuffer(arg, &page, PyBUF_SIMPLE) < 0)
        return NULL;
    /* Pages are PAGE_SIZE; other lengths are allowed so that tests can
     * make valid streams of the wrong length. */
    if (page.len > 16 * PAGE_SIZE) {
        PyBuffer_Release(&page);
        PyErr_Format(PyExc_ValueError, "compress: %zd bytes; accepted: up"
                     " to %d", page.len, 16 * PAGE_SIZE);
        return NULL;
    }
    cap = self->kind != KIND_ZSTD ? (size_t)LZ4_compressBound(page.len)
                                  : ZSTD_compressBound(page.len);
    out = PyBytes_FromStringAndSize(NULL, cap);
    if (out && self->kind == KIND_ZSTD && !(cctx = codec_take_cctx(self)))
        Py_CLEAR(out);
    if (out) {
        n = codec_compress(self, cctx, page.buf, page.len,
                           PyBytes_AS_STRING(out), cap);
        if (cctx)
            codec_give_cctx(self, cctx);
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
    Py_buffer data;
    PyObject *out;
    const char *why = NULL;
    ZSTD_DCtx *dctx = NULL;
    if (PyObject_GetBuffer(arg, &data, PyBUF_SIMPLE) < 0)
        return NULL;
    out = PyBytes_FromStringAndSize(NULL, PAGE_SIZE);
    if (out && self->kind == KIND_ZSTD && !(dctx = codec_take_dctx(self)))
        Py_CLEAR(out);
    if (out) {
        why = codec_decompress(self, dctx, data.buf, data.len,
                               PyBytes_AS_STRING(out));
        if (dctx)
            codec_give_dctx(self, dctx);
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
    return Py_BuildValue("nn", self->cctx.n, self->dctx.n);
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

/* ---- Python helpers ------------------------------------------------------ */

/* An int attribute into *out: 0, or -1 with an error set. */
static int
attr_long(PyObject *obj, PyObject *name, long *out)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (!v)
        return -1;
    *out = PyLong_AsLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* ---- ZsPool: the pool (csrc/zsmalloc.c) as a Python type ------------------
 *
 * zramd.zsmalloc.Pool subclasses it and adds the deferred-free queue and
 * the stats dataclasses.  The pool takes its own pthread mutexes; a
 * thread that must wait for one lets the GIL go meanwhile (pool_lock_wait),
 * so a compaction holding a class lock for a while stalls no other Python
 * thread.  Calls that may hold locks for long (compact, audit) run without
 * the GIL.  SlotPaths uses the same struct zs_pool directly.
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

/* zs_free's failures as Python errors: 0, or -1 with one set. */
static int
pool_free_or_raise(struct zs_pool *zs, unsigned long handle)
{
    int r = zs_free(zs, handle);
    if (r == -EINVAL) {
        PyErr_Format(PyExc_ValueError, "free: handle %lu is not allocated",
                     handle);
        return -1;
    }
    if (r < 0) {
        errno = -r;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
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

/* ---- the crew: helper threads for one request's pages ---------------------
 *
 * nbdkit serves each connection's requests one at a time (zramd runs it
 * with --threads 1, see docs/operations.md), so a 256 KiB write would
 * compress its 64 pages on one core while the other waits.  A request's
 * compression (or decompression) is a Batch of chunks; the calling thread
 * posts it, works on it itself, and helper threads that are idle join in,
 * each taking the next chunk until none is left.  No Python object is
 * touched: the caller has released the GIL and holds every buffer.  The
 * helpers are started on first use in the process that uses them (a
 * device made before nbdkit forks gets them in the child).
 */

#define CREW_MAX 8
#define CHUNK_PAGES 4

typedef struct Batch {
    void (*work)(struct Batch *, int who, Py_ssize_t start, Py_ssize_t n);
    void *args;
    void *ctx[CREW_MAX + 1];         /* one per participant: zstd contexts */
    Py_ssize_t count;                /* items */
    atomic_long next;                /* next chunk's first item */
    int want;                        /* helpers still welcome (crew lock) */
    int active;                      /* helpers working on it (crew lock) */
    int joined;                      /* helpers that ever joined (crew lock) */
    struct Batch *qnext;
} Batch;

static struct {
    pthread_mutex_t lock;
    pthread_cond_t work;             /* a batch was posted */
    pthread_cond_t done;             /* a helper left a batch */
    Batch *queue;
    int size;
    pid_t pid;                       /* the process the helpers run in */
} crew = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
          PTHREAD_COND_INITIALIZER, NULL, 0, 0};

static void
batch_run(Batch *b, int who)
{
    for (;;) {
        Py_ssize_t start = atomic_fetch_add(&b->next, CHUNK_PAGES);
        if (start >= b->count)
            return;
        b->work(b, who, start, b->count - start < CHUNK_PAGES
                               ? b->count - start : CHUNK_PAGES);
    }
}

static void *
crew_main(void *unused)
{
    pthread_mutex_lock(&crew.lock);
    for (;;) {
        Batch *b;
        int who;
        while (!crew.queue)
            pthread_cond_wait(&crew.work, &crew.lock);
        b = crew.queue;
        who = ++b->joined;
        if (--b->want == 0)
            crew.queue = b->qnext;     /* enough hands: off the queue */
        b->active++;
        pthread_mutex_unlock(&crew.lock);
        batch_run(b, who);
        pthread_mutex_lock(&crew.lock);
        if (--b->active == 0)
            pthread_cond_broadcast(&crew.done);
    }
    return NULL;
}

/* Helpers available in this process (started on first call). */
static int
crew_ready(void)
{
    pid_t pid = getpid();
    if (crew.pid != pid) {
        long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        int i, want = ncpu < 1 ? 1 : ncpu > CREW_MAX ? CREW_MAX : (int)ncpu;
        pthread_attr_t attr;
        /* After fork the parent's helpers are gone and its lock state is
         * meaningless: start afresh. */
        pthread_mutex_init(&crew.lock, NULL);
        pthread_cond_init(&crew.work, NULL);
        pthread_cond_init(&crew.done, NULL);
        crew.queue = NULL;
        crew.size = 0;
        crew.pid = pid;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 256 * 1024);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        for (i = 0; i < want; i++) {
            pthread_t t;
            if (pthread_create(&t, &attr, crew_main, NULL) != 0)
                break;
            crew.size++;
        }
        pthread_attr_destroy(&attr);
    }
    return crew.size;
}

/* How many helpers a batch of ``count`` items can use (call with the GIL
 * held: it may start them). */
static int crew_limit = CREW_MAX;   /* helpers a batch may use */

static int
crew_hands(Py_ssize_t count)
{
    Py_ssize_t chunks = (count + CHUNK_PAGES - 1) / CHUNK_PAGES;
    int size;
    if (chunks < 2 || crew_limit == 0)
        return 0;
    size = crew_ready();
    if (size > crew_limit)
        size = crew_limit;
    return chunks - 1 < size ? (int)(chunks - 1) : size;
}

/* Run a batch with up to ``hands`` helpers (no GIL needed). */
static void
batch_go(Batch *b, int hands)
{
    atomic_store(&b->next, 0);
    b->want = hands;
    b->active = 0;
    b->joined = 0;
    b->qnext = NULL;
    if (hands) {
        Batch **tail;
        pthread_mutex_lock(&crew.lock);
        for (tail = &crew.queue; *tail; tail = &(*tail)->qnext)
            ;
        *tail = b;
        if (hands > 1)
            pthread_cond_broadcast(&crew.work);
        else
            pthread_cond_signal(&crew.work);
        pthread_mutex_unlock(&crew.lock);
    }
    batch_run(b, 0);
    if (hands) {
        pthread_mutex_lock(&crew.lock);
        if (b->want > 0) {             /* still queued: withdraw it */
            Batch **p;
            for (p = &crew.queue; *p; p = &(*p)->qnext)
                if (*p == b) {
                    *p = b->qnext;
                    break;
                }
            b->want = 0;
        }
        while (b->active)
            pthread_cond_wait(&crew.done, &crew.lock);
        pthread_mutex_unlock(&crew.lock);
    }
}

/* ---- slot paths ---------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Py_buffer meta_buf, handle_buf, atime_buf, counters_buf, refs_buf;
    uint32_t *meta;
    uint64_t *handle;
    uint32_t *atime;
    int64_t *counters;
    int64_t *dict_refs;
    Py_ssize_t nr_pages;
    PyObject *lock_acquire[N_STRIPES];   /* bound methods of stripe locks */
    PyObject *lock_release[N_STRIPES];
    PyObject *pool;                      /* a ZsPool: its zs is used */
    int open;
    int busy;                            /* read/write calls in progress */
} SlotPaths;

static PyTypeObject SlotPathsType;

static int
call_lock(PyObject *bound)
{
    PyObject *r = PyObject_CallNoArgs(bound);
    if (!r)
        return -1;
    Py_DECREF(r);
    return 0;
}

static int
take_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize,
            const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_CONTIG | PyBUF_FORMAT) < 0)
        return -1;
    if (view->itemsize != itemsize) {
        PyErr_Format(PyExc_TypeError, "%s: items of %zd bytes, expected %zd",
                     what, view->itemsize, itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static double
now_monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);   /* Python's time.monotonic() */
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void
SlotPaths_release(SlotPaths *self)
{
    int i;
    if (self->open) {
        PyBuffer_Release(&self->meta_buf);
        PyBuffer_Release(&self->handle_buf);
        PyBuffer_Release(&self->atime_buf);
        PyBuffer_Release(&self->counters_buf);
        PyBuffer_Release(&self->refs_buf);
        self->open = 0;
    }
    for (i = 0; i < N_STRIPES; i++) {
        Py_CLEAR(self->lock_acquire[i]);
        Py_CLEAR(self->lock_release[i]);
    }
    Py_CLEAR(self->pool);
}

/* A read or write may let other threads run (waiting for a lock, or
 * while the crew works): those must not close or rebuild what it uses. */
static int
refuse_if_busy(SlotPaths *self, const char *op)
{
    if (self->busy) {
        PyErr_Format(PyExc_BufferError, "SlotPaths.%s: %d read/write calls"
                     " in progress", op, self->busy);
        return -1;
    }
    return 0;
}

static int
SlotPaths_init(SlotPaths *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"meta", "handle", "atime", "counters",
                             "dict_refs", "stripe_locks", "pool", NULL};
    PyObject *meta, *handle, *atime, *counters, *refs, *locks, *pool;
    int i;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOO", kwlist,
                                     &meta, &handle, &atime, &counters, &refs,
                                     &locks, &pool))
        return -1;
    if (refuse_if_busy(self, "__init__") < 0)
        return -1;
    SlotPaths_release(self);
    if (!PySequence_Check(locks) || PySequence_Size(locks) != N_STRIPES) {
        PyErr_Format(PyExc_ValueError, "stripe_locks: %d locks expected",
                     N_STRIPES);
        return -1;
    }
    if (take_buffer(meta, &self->meta_buf, 4, "meta") < 0)
        return -1;
    if (take_buffer(handle, &self->handle_buf, 8, "handle") < 0)
        goto fail_meta;
    if (take_buffer(atime, &self->atime_buf, 4, "atime") < 0)
        goto fail_handle;
    if (take_buffer(counters, &self->counters_buf, 8, "counters") < 0)
        goto fail_atime;
    if (take_buffer(refs, &self->refs_buf, 8, "dict_refs") < 0)
        goto fail_counters;
    self->open = 1;
    self->meta = self->meta_buf.buf;
    self->handle = self->handle_buf.buf;
    self->atime = self->atime_buf.buf;
    self->counters = self->counters_buf.buf;
    self->dict_refs = self->refs_buf.buf;
    self->nr_pages = self->meta_buf.len / 4;
    if (self->handle_buf.len / 8 != self->nr_pages
            || self->atime_buf.len / 4 != self->nr_pages
            || self->counters_buf.len / 8 != N_STRIPES * N_COUNTERS
            || self->refs_buf.len / 8 != N_STRIPES * MAX_DICTS) {
        PyErr_SetString(PyExc_ValueError, "slot table arrays disagree");
        SlotPaths_release(self);
        return -1;
    }
    for (i = 0; i < N_STRIPES; i++) {
        PyObject *lock = PySequence_GetItem(locks, i);
        if (!lock)
            goto fail_all;
        self->lock_acquire[i] = PyObject_GetAttr(lock, s_acquire);
        self->lock_release[i] = PyObject_GetAttr(lock, s_release);
        Py_DECREF(lock);
        if (!self->lock_acquire[i] || !self->lock_release[i])
            goto fail_all;
    }
    if (!PyObject_TypeCheck(pool, &ZsPoolType)) {
        PyErr_SetString(PyExc_TypeError, "pool: not a zramd._fastpath.ZsPool");
        goto fail_all;
    }
    Py_INCREF(pool);
    self->pool = pool;
    return 0;

fail_counters:
    PyBuffer_Release(&self->counters_buf);
fail_atime:
    PyBuffer_Release(&self->atime_buf);
fail_handle:
    PyBuffer_Release(&self->handle_buf);
fail_meta:
    PyBuffer_Release(&self->meta_buf);
    return -1;
fail_all:
    SlotPaths_release(self);
    return -1;
}

static void
SlotPaths_dealloc(SlotPaths *self)
{
    SlotPaths_release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
SlotPaths_close(SlotPaths *self, PyObject *unused)
{
    if (refuse_if_busy(self, "close") < 0)
        return NULL;
    SlotPaths_release(self);
    Py_RETURN_NONE;
}

/* The pool of a SlotPaths, or NULL with an error set (closed). */
static struct zs_pool *
paths_pool(SlotPaths *self)
{
    return zs_of((ZsPool *)self->pool);
}

/* The native codec of a compressor object, or NULL (no error set). */
static Codec *
native_of(PyObject *comp)
{
    PyObject *native = PyObject_GetAttr(comp, s_native);
    if (!native) {
        PyErr_Clear();
        return NULL;
    }
    Py_DECREF(native);         /* comp keeps it alive */
    return PyObject_TypeCheck(native, &CodecType) ? (Codec *)native : NULL;
}

static int
get_out_range(SlotPaths *self, Py_ssize_t first, Py_ssize_t len,
              Py_ssize_t *count)
{
    if (!self->open) {
        PyErr_SetString(PyExc_ValueError, "closed");
        return -1;
    }
    if (len % PAGE_SIZE || first < 0 || first > self->nr_pages
            || len / PAGE_SIZE > self->nr_pages - first) {
        PyErr_SetString(PyExc_ValueError, "not whole sectors inside the disk");
        return -1;
    }
    *count = len / PAGE_SIZE;
    return 0;
}

typedef struct {
    Codec *codec;
    const char *scratch;     /* sector k's object at k << PAGE_SHIFT */
    char *out;
    Py_ssize_t *sector;      /* item -> sector position in the request */
    uint32_t *size;          /* item -> object size */
    atomic_long failed;      /* lowest sector that did not decompress */
} DecompArgs;

static void
decomp_chunk(Batch *b, int who, Py_ssize_t start, Py_ssize_t n)
{
    DecompArgs *a = b->args;
    Py_ssize_t k;
    for (k = start; k < start + n; k++) {
        Py_ssize_t pos = a->sector[k];
        if (codec_decompress(a->codec, b->ctx[who],
                             a->scratch + (pos << PAGE_SHIFT), a->size[k],
                             a->out + (pos << PAGE_SHIFT))) {
            long seen = atomic_load(&a->failed);
            while (pos < seen
                   && !atomic_compare_exchange_weak(&a->failed, &seen, pos))
                ;
        }
    }
}

/* The compressor (a borrowed reference, kept alive by the device's
 * _dict_comps while the slot's stripe lock is held) that made a compressed
 * slot's object, found by its dictionary id, or NULL (no error set unless
 * -1 is stored in *err).  Cheap: the id is a cached small int. */
static PyObject *
comp_for_meta(PyObject *dict_comps, uint32_t meta, int *err)
{
    unsigned dict_id = (meta & DICT_MASK) >> DICT_SHIFT;
    PyObject *key = PyLong_FromUnsignedLong(dict_id), *comp;
    *err = 0;
    if (!key) {
        *err = -1;
        return NULL;
    }
    comp = PyDict_GetItemWithError(dict_comps, key);
    Py_DECREF(key);
    if (!comp && PyErr_Occurred())
        *err = -1;
    return comp;
}

/*
 * read(device, out, first) -> sectors done
 *
 * Fills ``out`` (whole sectors) from sector ``first`` on, as
 * Device._read_sector does with touch=True, until a sector needs the
 * Python path.  Phase one, holding the GIL, takes each slot under its
 * stripe lock: same-filled pages and holes are filled in, huge ones copied
 * out, compressed objects copied to a scratch area (obj_read_begin)
 * and what the slot held noted.  Phase two decompresses, with the crew and
 * without the GIL when there are several.  A sector that does not
 * decompress ends the call there, and the Python path reads it and raises
 * the error.  Phase three counts and touches the sectors read.
 */
static PyObject *
slot_paths_read(SlotPaths *self, PyObject *args)
{
    PyObject *device, *out_o, *dict_comps = NULL, *t0_o;
    Py_ssize_t first, count, i = 0, n_items = 0, done, k;
    Py_buffer out;
    double t0;
    char *scratch = NULL;
    Py_ssize_t *item_sector = NULL;
    uint32_t *item_size = NULL;
    uint32_t *was_meta = NULL;         /* what phase one saw, to touch */
    uint64_t *was_handle = NULL;
    Batch batch = {0};
    DecompArgs dargs = {0};
    int hands = 0, n_dctx = 0, locked = -1, touched = 0;
    PyObject *batch_comp = NULL;       /* dargs.codec's compressor, held */
    struct zs_pool *zs;
    /* A single sector (fio, swap-ins) needs no heap and no crew: read,
     * decompress and touch it in one go under its lock, as the Python
     * path does. */
    char one_scratch[PAGE_SIZE];
    Py_ssize_t one_sector;
    uint32_t one_size, one_meta;
    uint64_t one_handle;

    if (!PyArg_ParseTuple(args, "OOn", &device, &out_o, &first))
        return NULL;
    if (PyObject_GetBuffer(out_o, &out, PyBUF_WRITABLE) < 0)
        return NULL;
    if (get_out_range(self, first, out.len, &count) < 0
            || !(zs = paths_pool(self)))
        goto error;
    if (!(t0_o = PyObject_GetAttr(device, s_t0)))
        goto error;
    t0 = PyFloat_AsDouble(t0_o);
    Py_DECREF(t0_o);
    if (t0 == -1.0 && PyErr_Occurred())
        goto error;
    if (!(dict_comps = PyObject_GetAttr(device, s_dict_comps)))
        goto error;
    if (count == 1) {
        scratch = one_scratch;
        item_sector = &one_sector;
        item_size = &one_size;
        was_meta = &one_meta;
        was_handle = &one_handle;
    } else {
        scratch = PyMem_Malloc(count << PAGE_SHIFT);
        item_sector = PyMem_Malloc(count * sizeof(*item_sector));
        item_size = PyMem_Malloc(count * sizeof(*item_size));
        was_meta = PyMem_Malloc(count * sizeof(*was_meta));
        was_handle = PyMem_Malloc(count * sizeof(*was_handle));
        if (!scratch || !item_sector || !item_size || !was_meta
                || !was_handle) {
            PyErr_NoMemory();
            goto error;
        }
    }

    for (i = 0; i < count; i++) {
        Py_ssize_t index = first + i;
        unsigned stripe = index & STRIPE_MASK;
        char *dst = (char *)out.buf + (i << PAGE_SHIFT);
        char *obj = scratch + (i << PAGE_SHIFT);
        uint32_t meta;
        uint64_t handle;
        int stop = 0;

        if (call_lock(self->lock_acquire[stripe]) < 0)
            goto error;
        locked = stripe;
        meta = self->meta[index];
        handle = self->handle[index];
        if (meta & ZRAM_SAME) {
            int w;
            for (w = 0; w < PAGE_SIZE; w += 8)
                memcpy(dst + w, &handle, 8);
        } else if (!handle) {
            memset(dst, 0, PAGE_SIZE);
        } else if (meta & (ZRAM_WB | COMP_PRIORITY_MASK)) {
            stop = 1;
        } else {
            Codec *codec = NULL;
            PyObject *comp = NULL;
            const char *at;
            size_t size;
            int err;
            if (!(meta & ZRAM_HUGE)) {
                /* The compressor is looked up for every sector, under its
                 * lock: the id alone does not do, as between two sectors
                 * (a contended lock lets other threads run) the id may
                 * be retired and handed to a new dictionary. */
                comp = comp_for_meta(dict_comps, meta, &err);
                if (err)
                    goto error;
                if (comp && comp == batch_comp) {
                    codec = dargs.codec;   /* held: no attribute lookup */
                } else if (comp) {
                    codec = native_of(comp);
                    /* One codec per batch; a page of another dictionary
                     * (rare: just after training) goes to the Python
                     * path.  (A page that does not decompress with the
                     * batch's codec goes there too.) */
                    if (codec && dargs.codec && codec != dargs.codec)
                        codec = NULL;
                }
            }
            if (!(meta & ZRAM_HUGE) && !codec) {
                stop = 1;
            } else if (!(at = zs_obj_read_begin(zs, handle,
                                                meta & ZRAM_HUGE ? dst : obj,
                                                &size))
                       || size != (meta & SIZE_MASK)
                       || ((meta & ZRAM_HUGE) && size != PAGE_SIZE)) {
                if (at)
                    zs_obj_read_end(zs, handle);
                stop = 1;
            } else if (meta & ZRAM_HUGE) {
                if (at != dst)
                    memcpy(dst, at, PAGE_SIZE);
                zs_obj_read_end(zs, handle);
            } else if (count == 1) {
                /* straight from the frame (or the copy when it spans) */
                ZSTD_DCtx *dctx = NULL;
                const char *why;
                if (codec->kind == KIND_ZSTD
                        && !(dctx = codec_take_dctx(codec))) {
                    zs_obj_read_end(zs, handle);
                    goto error;
                }
                why = codec_decompress(codec, dctx, at, size, dst);
                zs_obj_read_end(zs, handle);
                if (dctx)
                    codec_give_dctx(codec, dctx);
                if (why)
                    stop = 1;      /* the Python path raises it */
            } else {
                if (at != obj)
                    memcpy(obj, at, size);
                zs_obj_read_end(zs, handle);
                if (!dargs.codec) {
                    /* Held until phase two is over: without the GIL a
                     * retired dictionary's codec could go meanwhile.
                     * Its compressor too: held, it is never another
                     * at the same address. */
                    Py_INCREF(codec);
                    dargs.codec = codec;
                    Py_INCREF(comp);
                    batch_comp = comp;
                }
                item_sector[n_items] = i;
                item_size[n_items++] = size;
            }
        }
        was_meta[i] = meta;
        was_handle[i] = handle;
        if (count == 1 && !stop) {
            /* touch now: as Device._read_sector(touch=True) */
            if (meta & ZRAM_IDLE)
                self->meta[index] = meta & ~ZRAM_IDLE;
            self->atime[index] = (uint32_t)(int64_t)(now_monotonic() - t0);
            self->counters[stripe * N_COUNTERS + C_NUM_READS] += 1;
            touched = 1;
        }
        locked = -1;
        if (call_lock(self->lock_release[stripe]) < 0)
            goto error;
        if (stop)
            break;
    }
    done = i;

    if (n_items) {
        hands = n_items > 1 ? crew_hands(n_items) : 0;
        if (dargs.codec->kind == KIND_ZSTD) {
            for (n_dctx = 0; n_dctx <= hands; n_dctx++)
                if (!(batch.ctx[n_dctx] = codec_take_dctx(dargs.codec)))
                    goto error;
        }
        dargs.scratch = scratch;
        dargs.out = out.buf;
        dargs.sector = item_sector;
        dargs.size = item_size;
        atomic_store(&dargs.failed, LONG_MAX);
        batch.work = decomp_chunk;
        batch.args = &dargs;
        batch.count = n_items;
        if (n_items > 1) {
            Py_BEGIN_ALLOW_THREADS
            batch_go(&batch, hands);
            Py_END_ALLOW_THREADS
        } else {
            batch_go(&batch, 0);
        }
        if (atomic_load(&dargs.failed) < done)
            done = atomic_load(&dargs.failed);
    }

    /* Phase three: the sectors read are counted and touched (atime, IDLE
     * cleared) as Device._read_sector(touch=True) does; not those from a
     * sector that failed on, which the Python path reads and fails.  A
     * slot rewritten or marked idle since phase one was not what this
     * read saw, and keeps what its writer or mark_idle made it. */
    for (k = touched ? done : 0; k < done; k++) {
        Py_ssize_t index = first + k;
        unsigned stripe = index & STRIPE_MASK;
        if (call_lock(self->lock_acquire[stripe]) < 0)
            goto error;
        self->counters[stripe * N_COUNTERS + C_NUM_READS] += 1;
        if (self->meta[index] == was_meta[k]
                && self->handle[index] == was_handle[k]) {
            if (was_meta[k] & ZRAM_IDLE)
                self->meta[index] = was_meta[k] & ~ZRAM_IDLE;
            self->atime[index] = (uint32_t)(int64_t)(now_monotonic() - t0);
        }
        if (call_lock(self->lock_release[stripe]) < 0)
            goto error;
    }
    for (k = 0; k < n_dctx; k++)
        codec_give_dctx(dargs.codec, batch.ctx[k]);
    Py_XDECREF(dargs.codec);
    Py_XDECREF(batch_comp);
    if (scratch != one_scratch) {
        PyMem_Free(scratch);
        PyMem_Free(item_sector);
        PyMem_Free(item_size);
        PyMem_Free(was_meta);
        PyMem_Free(was_handle);
    }
    Py_DECREF(dict_comps);
    PyBuffer_Release(&out);
    return PyLong_FromSsize_t(done);

error:
    if (locked >= 0) {
        PyObject *exc, *val, *tb;
        PyErr_Fetch(&exc, &val, &tb);
        call_lock(self->lock_release[locked]);
        PyErr_Restore(exc, val, tb);
    }
    for (k = 0; k < n_dctx; k++)
        codec_give_dctx(dargs.codec, batch.ctx[k]);
    Py_XDECREF(dargs.codec);
    Py_XDECREF(batch_comp);
    if (scratch != one_scratch) {
        PyMem_Free(scratch);
        PyMem_Free(item_sector);
        PyMem_Free(item_size);
        PyMem_Free(was_meta);
        PyMem_Free(was_handle);
    }
    Py_XDECREF(dict_comps);
    PyBuffer_Release(&out);
    return NULL;
}

/* What phase one of a write found for a sector. */
typedef struct {
    uint32_t size;          /* compressed size; 0: SAME; PAGE_SIZE: HUGE */
    uint64_t fill;          /* SAME: the repeated 8-byte value */
} SectorPlan;

/* The fill value is the page's first 8 bytes as a little-endian integer
 * (device.py's int.from_bytes(head, "little")): this machine's order. */
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the slot table's fill values are little-endian"
#endif

static int
same_filled(const char *page, uint64_t *fill)
{
    uint64_t v, w;
    int i;
    memcpy(&v, page, 8);               /* the buffer need not be aligned */
    for (i = 8; i < PAGE_SIZE; i += 8) {
        memcpy(&w, page + i, 8);
        if (w != v)
            return 0;
    }
    *fill = v;
    return 1;
}

/* Room for one page's compressed form, however long: the larger of
 * LZ4_COMPRESSBOUND(4096) (4128) and ZSTD_COMPRESSBOUND(4096) (4174). */
#define SCRATCH_STRIDE (PAGE_SIZE + 128)

typedef struct {
    Codec *codec;
    const char *data;
    char *scratch;
    size_t huge_class_size;
    SectorPlan *plan;
} PlanArgs;

/* Phase one, no Python objects touched: classify and compress pages
 * start..start+n-1. */
static void
plan_chunk(Batch *b, int who, Py_ssize_t start, Py_ssize_t n)
{
    PlanArgs *a = b->args;
    Codec *codec = a->codec;
    ZSTD_CCtx *cctx = b->ctx[who];
    SectorPlan *plan = a->plan;
    char *scratch = a->scratch;
    size_t huge_class_size = a->huge_class_size;
    Py_ssize_t i;
    for (i = start; i < start + n; i++) {
        const char *page = a->data + (i << PAGE_SHIFT);
        if (same_filled(page, &plan[i].fill)) {
            plan[i].size = 0;
            continue;
        }
        /* The whole output, then the kernel's test: a page whose
         * compressed form reaches huge_class_size is stored raw.  (A
         * capacity of huge_class_size - 1 would not do: lz4 and zstd
         * give up a few bytes before the end of a limited buffer.) */
        plan[i].size = codec_compress(codec, cctx, page, PAGE_SIZE,
                                      scratch + i * SCRATCH_STRIDE,
                                      SCRATCH_STRIDE);
        if (plan[i].size == 0 || plan[i].size >= huge_class_size)
            plan[i].size = PAGE_SIZE;
    }
}

/*
 * write(device, data, first, huge_class_size) -> sectors done
 *
 * Stores whole sectors from ``data`` as Device._try_write_sector does,
 * until a sector needs the Python path.
 */
static PyObject *
slot_paths_write(SlotPaths *self, PyObject *args)
{
    PyObject *device, *data_o, *primary = NULL, *dict_comps = NULL,
        *comp, *id_o, *t0_o;
    Py_ssize_t first, count, i = 0, huge_class_size;
    long limit_pages;
    Py_buffer data;
    double t0;
    Codec *codec = NULL;
    unsigned dict_id;
    char *scratch = NULL;
    SectorPlan *plan = NULL;
    Batch batch = {0};
    PlanArgs pargs;
    int hands = 0, n_cctx = 0, k;
    struct zs_pool *zs;

    if (!PyArg_ParseTuple(args, "OOnn", &device, &data_o, &first,
                          &huge_class_size))
        return NULL;
    if (PyObject_GetBuffer(data_o, &data, PyBUF_SIMPLE) < 0)
        return NULL;
    if (get_out_range(self, first, data.len, &count) < 0
            || !(zs = paths_pool(self)))
        goto done;
    if (huge_class_size < 2 || huge_class_size > PAGE_SIZE) {
        PyErr_SetString(PyExc_ValueError, "huge_class_size out of range");
        goto done;
    }
    if (!(primary = PyObject_GetAttr(device, s_primary)))
        goto done;
    if (!PyTuple_Check(primary) || PyTuple_GET_SIZE(primary) != 2) {
        PyErr_SetString(PyExc_TypeError, "_primary: (id, compressor)");
        goto done;
    }
    id_o = PyTuple_GET_ITEM(primary, 0);
    comp = PyTuple_GET_ITEM(primary, 1);
    dict_id = PyLong_AsUnsignedLong(id_o);
    if (PyErr_Occurred())
        goto done;
    if (!(codec = native_of(comp)) || dict_id >= MAX_DICTS)
        goto done;                      /* 0 done: all of it in Python */
    Py_INCREF(codec);                   /* used without the GIL */
    if (attr_long(device, s_limit_pages, &limit_pages) < 0)
        goto done;
    if (!(t0_o = PyObject_GetAttr(device, s_t0)))
        goto done;
    t0 = PyFloat_AsDouble(t0_o);
    Py_DECREF(t0_o);
    if (t0 == -1.0 && PyErr_Occurred())
        goto done;
    if (!(dict_comps = PyObject_GetAttr(device, s_dict_comps)))
        goto done;
    hands = count > 1 ? crew_hands(count) : 0;
    if (codec->kind == KIND_ZSTD) {
        for (n_cctx = 0; n_cctx <= hands; n_cctx++)
            if (!(batch.ctx[n_cctx] = codec_take_cctx(codec)))
                goto done;
    }
    scratch = PyMem_Malloc(count * SCRATCH_STRIDE);
    plan = PyMem_Malloc(count * sizeof(*plan));
    if (!scratch || !plan) {
        PyErr_NoMemory();
        goto done;
    }

    /* Phase one: classify and compress, several pages at a time with the
     * crew.  One page compresses in less time than a GIL hand-off takes,
     * so a single sector keeps the GIL. */
    pargs.codec = codec;
    pargs.data = data.buf;
    pargs.scratch = scratch;
    pargs.huge_class_size = huge_class_size;
    pargs.plan = plan;
    batch.work = plan_chunk;
    batch.args = &pargs;
    batch.count = count;
    if (count > 1) {
        Py_BEGIN_ALLOW_THREADS
        batch_go(&batch, hands);
        Py_END_ALLOW_THREADS
    } else {
        batch_go(&batch, 0);
    }

    /* Phase two: the pool and the slots, holding the GIL. */
    for (i = 0; i < count; i++) {
        Py_ssize_t index = first + i;
        unsigned stripe = index & STRIPE_MASK;
        uint32_t size = plan[i].size, meta, old_meta;
        uint64_t handle = 0, old;
        int64_t *row = self->counters + stripe * N_COUNTERS;
        int have_new = 0;          /* handle is ours to free on failure */

        if (size == 0) {
            meta = ZRAM_SAME;
        } else {
            const char *src = size == PAGE_SIZE ? (const char *)data.buf
                + (i << PAGE_SHIFT) : scratch + i * SCRATCH_STRIDE;
            long pages, max_used;
            meta = size == PAGE_SIZE ? ZRAM_HUGE
                                     : (uint32_t)dict_id << DICT_SHIFT;
            if (!(handle = zs_malloc(zs, size))) {
                PyErr_NoMemory();
                goto done;
            }
            have_new = 1;
            /* update_used_max(), and the limit as zram_can_store_page() */
            pages = zs_get_total_pages(zs);
            if (attr_long(device, s_max_used_pages, &max_used) < 0)
                goto done_free_new;
            if (pages > max_used) {
                PyObject *pages_o = PyLong_FromLong(pages), *r = NULL;
                if (pages_o)
                    r = PyObject_CallMethodOneArg(device, s_note_pages_used,
                                                  pages_o);
                Py_XDECREF(pages_o);
                if (!r)
                    goto done_free_new;
                Py_DECREF(r);
            }
            if (limit_pages && pages > limit_pages)
                goto undo;                 /* Python raises NoSpaceError */
            if (zs_obj_write(zs, handle, src, size) < 0) {
                PyErr_SetString(PyExc_RuntimeError, "pool: a new object"
                                " refused its bytes");
                goto done_free_new;
            }
            meta |= size;
        }

        if (call_lock(self->lock_acquire[stripe]) < 0)
            goto done_free_new;
        old_meta = self->meta[index];
        old = self->handle[index];
        if (old_meta & ZRAM_WB) {
            if (call_lock(self->lock_release[stripe]) < 0)
                goto done_free_new;
            goto undo;                     /* the backing device's job */
        }
        if (meta & DICT_MASK) {
            /* The id must still name the dictionary we compressed with:
             * retired meanwhile, it may name a newer one. */
            PyObject *key = PyLong_FromUnsignedLong(dict_id), *now = NULL;
            int known = -1;
            if (key) {
                now = PyDict_GetItemWithError(dict_comps, key);
                known = now == comp ? 1 : PyErr_Occurred() ? -1 : 0;
            }
            Py_XDECREF(key);
            if (known <= 0) {
                /* The Python path compresses it again. */
                if (call_lock(self->lock_release[stripe]) < 0 || known < 0)
                    goto done_free_new;
                goto undo;
            }
            self->dict_refs[stripe * MAX_DICTS + dict_id] += 1;
        }
        /* _slot_clear_locked(), WB excepted (above) */
        if (old_meta & ZRAM_SAME) {
            row[C_SAME_PAGES] -= 1;
            row[C_PAGES_STORED] -= 1;
            old = 0;
        } else if (old) {
            if (old_meta & DICT_MASK)
                self->dict_refs[stripe * MAX_DICTS
                                + ((old_meta & DICT_MASK) >> DICT_SHIFT)] -= 1;
            if (old_meta & ZRAM_HUGE)
                row[C_HUGE_PAGES] -= 1;
            if (old_meta & COMP_PRIORITY_MASK)
                row[C_PRIO_PAGES - 1 + ((old_meta & COMP_PRIORITY_MASK)
                                        >> COMP_PRIORITY_SHIFT)] -= 1;
            row[C_COMPR_SIZE] -= old_meta & SIZE_MASK;
            row[C_PAGES_STORED] -= 1;
        }
        self->meta[index] = meta;
        self->handle[index] = handle ? handle : plan[i].fill;
        self->atime[index] = (uint32_t)(int64_t)(now_monotonic() - t0);
        row[C_PAGES_STORED] += 1;
        row[C_NUM_WRITES] += 1;
        if (meta & ZRAM_SAME) {
            row[C_SAME_PAGES] += 1;
        } else {
            row[C_COMPR_SIZE] += size;
            if (meta & ZRAM_HUGE) {
                row[C_HUGE_PAGES] += 1;
                row[C_HUGE_SINCE] += 1;
            }
        }
        if (call_lock(self->lock_release[stripe]) < 0)
            goto done;
        if (old && pool_free_or_raise(zs, old) < 0)
            goto done;
        continue;

    undo:
        /* This sector goes to the Python path: give the object back. */
        if (have_new && pool_free_or_raise(zs, handle) < 0)
            goto done;
        break;

    done_free_new:
        if (have_new)
            zs_free(zs, handle);       /* ours: it cannot fail */
        goto done;
    }

done:
    for (k = 0; k < n_cctx; k++)
        codec_give_cctx(codec, batch.ctx[k]);
    Py_XDECREF(codec);
    PyMem_Free(scratch);
    PyMem_Free(plan);
    Py_XDECREF(primary);
    Py_XDECREF(dict_comps);
    PyBuffer_Release(&data);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromSsize_t(i);
}

static PyObject *
SlotPaths_read(SlotPaths *self, PyObject *args)
{
    PyObject *r;
    self->busy++;
    r = slot_paths_read(self, args);
    self->busy--;
    return r;
}

static PyObject *
SlotPaths_write(SlotPaths *self, PyObject *args)
{
    PyObject *r;
    self->busy++;
    r = slot_paths_write(self, args);
    self->busy--;
    return r;
}

static PyMethodDef SlotPaths_methods[] = {
    {"read", (PyCFunction)SlotPaths_read, METH_VARARGS,
     "read(device, out, first) -> sectors read into out from sector first;"
     " stops at a sector the Python path must do."},
    {"write", (PyCFunction)SlotPaths_write, METH_VARARGS,
     "write(device, data, first, huge_class_size) -> sectors stored from"
     " data at sector first; stops at a sector the Python path must do."},
    {"close", (PyCFunction)SlotPaths_close, METH_NOARGS,
     "Release the slot table's buffers (before its mmaps close)."},
    {NULL}
};

static PyMemberDef SlotPaths_members[] = {
    {"busy", T_INT, offsetof(SlotPaths, busy), READONLY,
     "read/write calls in progress"},
    {NULL}
};

static PyTypeObject SlotPathsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "zramd._fastpath.SlotPaths",
    .tp_basicsize = sizeof(SlotPaths),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "SlotPaths(meta, handle, atime, counters, dict_refs, "
              "stripe_locks, pool): a device's whole-sector read and write "
              "loops.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)SlotPaths_init,
    .tp_dealloc = (destructor)SlotPaths_dealloc,
    .tp_methods = SlotPaths_methods,
    .tp_members = SlotPaths_members,
};

/* ---- module ----------------------------------------------------------- */

static PyObject *
fp_crew_limit(PyObject *module, PyObject *args)
{
    int limit = INT_MIN, old = crew_limit;
    if (!PyArg_ParseTuple(args, "|i", &limit))
        return NULL;
    if (limit != INT_MIN && (limit < 0 || limit > CREW_MAX)) {
        PyErr_Format(PyExc_ValueError, "crew_limit: %d; accepted: 0..%d",
                     limit, CREW_MAX);
        return NULL;
    }
    if (limit != INT_MIN)
        crew_limit = limit;
    return PyLong_FromLong(old);
}

static PyMethodDef module_methods[] = {
    {"crew_limit", fp_crew_limit, METH_VARARGS,
     "crew_limit([n]) -> the previous limit: how many helper threads one"
     " request may use (0: none, the calling thread does it all)."},
    {NULL}
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT, "zramd._fastpath",
    "The device's whole-sector loops, the pool's malloc and free, and the"
    " lz4/zstd codecs in C.", -1, module_methods,
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

#define INTERN(var, text) \
    if (!(var = PyUnicode_InternFromString(text))) return NULL

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    PyObject *m;
    INTERN(s_acquire, "acquire");
    INTERN(s_release, "release");
    INTERN(s_native, "native");
    INTERN(s_primary, "_primary");
    INTERN(s_dict_comps, "_dict_comps");
    INTERN(s_limit_pages, "_limit_pages");
    INTERN(s_max_used_pages, "_max_used_pages");
    INTERN(s_note_pages_used, "_note_pages_used");
    INTERN(s_t0, "_t0");
    if (PyType_Ready(&CodecType) < 0 || PyType_Ready(&SlotPathsType) < 0
            || PyType_Ready(&ZsPoolType) < 0)
        return NULL;
    if ((size_t)LZ4_compressBound(PAGE_SIZE) > SCRATCH_STRIDE
            || ZSTD_compressBound(PAGE_SIZE) > SCRATCH_STRIDE) {
        PyErr_SetString(PyExc_ImportError, "SCRATCH_STRIDE is too small");
        return NULL;
    }
    if (!(m = PyModule_Create(&fastpath_module)))
        return NULL;
    Py_INCREF(&CodecType);
    Py_INCREF(&SlotPathsType);
    Py_INCREF(&ZsPoolType);
    if (PyModule_AddObject(m, "Codec", (PyObject *)&CodecType) < 0
            || PyModule_AddObject(m, "SlotPaths", (PyObject *)&SlotPathsType) < 0
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
