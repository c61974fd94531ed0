/*
 * py_zram.c: zramd._fastpath.Zram, a device's slot table and I/O paths
 * (csrc/zram.c) as a Python type.
 *
 * Device (zramd/device.py) drives it: requests in C (whole sectors, and
 * bytes of one sector), and the slot primitives its own paths use for
 * the sectors C hands back and for post-processing (see zram.h for what
 * each needs held).  Indices are checked here; the core trusts them.
 *
 * Locks: the stripes, lock_all and the codec lock are the core's mutexes
 * (zram.c states their order).  A Zram only counts what Python holds of
 * them (held: stripes taken by lock(); all_held, all_owner: lock_all())
 * and the requests running without the GIL (busy), so that close()
 * refuses while any is, and a thread waits for a stripe with the GIL let
 * go (Zram.lock, .lock_all).
 *
 * zramd's nbdkit filter (filter/offer.h) serves requests on nbdkit's
 * threads, outside Python, once offer_to_filter() gave it the core; they
 * are not in busy.  Closing withdraws the core from the filter, which
 * waits for those requests to end, before the table is freed.
 */

#define PY_SSIZE_T_CLEAN
#include "glue.h"
#include <dlfcn.h>

#include "../filter/offer.h"

typedef struct {
    PyObject_HEAD
    struct zram *z;                  /* NULL once closed */
    ZsPool *pool;
    PyObject *codecs[MAX_DICTS];     /* the Codecs of the codec table */
    int all_held;                    /* lock_all() held (by Python) */
    pthread_t all_owner;             /* ... by this thread */
    atomic_int busy;                 /* calls without the GIL in progress */
    atomic_int held;                 /* stripes taken by lock() */
    PyObject *nbd_pin;               /* nbd_fallbacks(): see nbd_request */
    PyObject *nbd_rest[2];           /* ... for pread, pwrite */
    const struct zramd_filter_face *filter;  /* offer_to_filter() took */
} Zram;



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
    struct zram *z = self->z;
    const struct zramd_filter_face *filter = self->filter;
    int i;
    /* Closed for Python first, while the GIL is held: no Python thread
     * reaches z after this. */
    self->z = NULL;
    self->filter = NULL;
    if (filter && z) {
        /* A filter request may wait for a pool lock that a thread
         * waiting for the GIL holds; with self->z cleared, no thread
         * that takes the GIL meanwhile can reach z. */
        Py_BEGIN_ALLOW_THREADS
        filter->withdraw(z);
        Py_END_ALLOW_THREADS
    }
    zram_destroy(z);
    for (i = 0; i < MAX_DICTS; i++)
        Py_CLEAR(self->codecs[i]);
    Py_CLEAR(self->nbd_pin);
    Py_CLEAR(self->nbd_rest[0]);
    Py_CLEAR(self->nbd_rest[1]);
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
 * do.  With lo, read(out, index, lo) and write(data, index, lo): bytes
 * lo.. of sector index, as many as the buffer holds (1..PAGE_SIZE - lo);
 * 1 done, or 0: the caller's, nothing changed. */
static PyObject *
zram_request(Zram *self, PyObject *args, int write)
{
    struct zram *z = zram_of(self);
    Py_buffer buf;
    Py_ssize_t first, lo = -1;
    ssize_t r;
    if (!z || !PyArg_ParseTuple(args, write ? "y*n|n" : "w*n|n", &buf,
                                &first, &lo))
        return NULL;
    if (lo >= 0 ? (buf.len < 1 || lo >= PAGE_SIZE
                   || buf.len > PAGE_SIZE - lo || range_arg(self, first, 1))
                : (buf.len % PAGE_SIZE
                   || range_arg(self, first, buf.len / PAGE_SIZE))) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, lo >= 0
                            ? "not bytes inside one sector"
                            : "not whole sectors");
        PyBuffer_Release(&buf);
        return NULL;
    }
    CORE_BEGIN
    if (lo >= 0)
        r = write ? zram_patch(z, first, lo, buf.buf, buf.len)
                  : zram_read_part(z, buf.buf, first, lo, lo + buf.len);
    else
        r = write ? zram_write(z, buf.buf, first, buf.len / PAGE_SIZE)
                  : zram_read(z, buf.buf, first, buf.len / PAGE_SIZE);
    CORE_END
    PyBuffer_Release(&buf);
    return r < 0 ? core_error(r) : PyLong_FromSsize_t(r);
}

/* nbd_pread(h, buf, offset, flags) and nbd_pwrite(h, buf, offset, flags):
 * nbdkit's python-plugin callbacks (API 2) themselves, which the plugin
 * sets as its pread and pwrite, so that a request of whole sectors inside
 * the disk runs without a Python frame.  First pin(), as every Python
 * callback does (zramd.threadstate).  What the core does not finish (a
 * partial sector or a range outside the disk: all of it; a sector the
 * core hands back, or its error: from there on) goes on in
 * rest(h, buf, offset, flags, done), done being the bytes served. */
static PyObject *
nbd_request(Zram *self, PyObject *const *args, Py_ssize_t nargs, int write)
{
    struct zram *z = self->z;
    PyObject *rest = self->nbd_rest[write], *r;
    Py_buffer buf;
    unsigned long long offset;
    size_t first, count = 0, done = 0;
    ssize_t n = 0;
    if (nargs != 4 || !rest)
        return PyErr_Format(PyExc_TypeError, "nbd_p%s: takes (h, buf, "
                            "offset, flags), after nbd_fallbacks()",
                            write ? "write" : "read");
    if (!(r = PyObject_CallNoArgs(self->nbd_pin)))
        return NULL;
    Py_DECREF(r);
    offset = PyLong_AsUnsignedLongLong(args[2]);
    if (offset == (unsigned long long)-1 && PyErr_Occurred())
        PyErr_Clear();
    else if (z && PyObject_GetBuffer(args[1], &buf, write ? PyBUF_SIMPLE
                                     : PyBUF_WRITABLE) == 0) {
        first = offset >> PAGE_SHIFT;
        if (!((offset | (size_t)buf.len) & PAGE_MASK) && buf.len
                && (size_t)buf.len >> PAGE_SHIFT <= zram_nr_pages(z)
                && first <= zram_nr_pages(z) - (buf.len >> PAGE_SHIFT)) {
            count = buf.len >> PAGE_SHIFT;
            CORE_BEGIN
            while (done < count) {
                char *at = (char *)buf.buf + (done << PAGE_SHIFT);
                n = write ? zram_write(z, at, first + done, count - done)
                          : zram_read(z, at, first + done, count - done);
                if (n <= 0)
                    break;
                done += n;
            }
            CORE_END
        }
        PyBuffer_Release(&buf);
        if (count && done == count)
            Py_RETURN_NONE;
    } else {
        PyErr_Clear();
    }
    return PyObject_CallFunction(rest, "OOOOn", args[0], args[1], args[2],
                                 args[3], (Py_ssize_t)(done << PAGE_SHIFT));
}

static PyObject *
Zram_nbd_pread(Zram *self, PyObject *const *args, Py_ssize_t nargs)
{
    return nbd_request(self, args, nargs, 0);
}

static PyObject *
Zram_nbd_pwrite(Zram *self, PyObject *const *args, Py_ssize_t nargs)
{
    return nbd_request(self, args, nargs, 1);
}

/* The core's two calls the nbdkit filter serves whole sectors with, on
 * nbdkit's threads, which hold no GIL (offer.h). */
static ssize_t
filter_read(void *z, void *out, size_t first, size_t count)
{
    ssize_t r;
    pool_gil_released = 1;
    r = zram_read(z, out, first, count);
    pool_gil_released = 0;
    return r;
}

static ssize_t
filter_write(void *z, const void *data, size_t first, size_t count)
{
    ssize_t r;
    pool_gil_released = 1;
    r = zram_write(z, data, first, count);
    pool_gil_released = 0;
    return r;
}

/* offer_to_filter(): hand this device's core to zramd's nbdkit filter
 * when this process (nbdkit) has loaded it; True if it took it. */
static PyObject *
Zram_offer_to_filter(Zram *self, PyObject *unused)
{
    struct zram *z = zram_of(self);
    const struct zramd_filter_face *face;
    struct zramd_core core;
    if (!z)
        return NULL;
    face = dlsym(RTLD_DEFAULT, ZRAMD_FILTER_SYMBOL);
    if (!face)
        Py_RETURN_FALSE;
    core = (struct zramd_core){ZRAMD_FILTER_ABI, z, zram_nr_pages(z),
                               filter_read, filter_write};
    if (face->abi != ZRAMD_FILTER_ABI || face->offer(&core) != 0)
        return PyErr_Format(PyExc_RuntimeError, "zramd's nbdkit filter "
                            "speaks ABI %d, this module %d: rebuild them "
                            "together (pip install -e)", face->abi,
                            ZRAMD_FILTER_ABI);
    self->filter = face;
    Py_RETURN_TRUE;
}

/* filter_counts(): (served_reads, served_writes, passed_reads,
 * passed_writes) of the filter this device was offered to, or None. */
static PyObject *
Zram_filter_counts(Zram *self, PyObject *unused)
{
    struct zramd_filter_counts c;
    if (!self->filter)
        Py_RETURN_NONE;
    self->filter->counts(&c);
    return Py_BuildValue("KKKK", (unsigned long long)c.served_reads,
                         (unsigned long long)c.served_writes,
                         (unsigned long long)c.passed_reads,
                         (unsigned long long)c.passed_writes);
}

static PyObject *
Zram_nbd_fallbacks(Zram *self, PyObject *args)
{
    PyObject *pin, *pread_rest, *pwrite_rest;
    if (!PyArg_ParseTuple(args, "OOO", &pin, &pread_rest, &pwrite_rest))
        return NULL;
    if (!PyCallable_Check(pin) || !PyCallable_Check(pread_rest)
            || !PyCallable_Check(pwrite_rest))
        return PyErr_Format(PyExc_TypeError, "nbd_fallbacks: three "
                            "callables");
    Py_INCREF(pin);
    Py_INCREF(pread_rest);
    Py_INCREF(pwrite_rest);
    Py_XSETREF(self->nbd_pin, pin);
    Py_XSETREF(self->nbd_rest[0], pread_rest);
    Py_XSETREF(self->nbd_rest[1], pwrite_rest);
    Py_RETURN_NONE;
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

/* discard(first, count) -> sectors freed */
static PyObject *
Zram_discard(Zram *self, PyObject *args)
{
    struct zram *z = zram_of(self);
    Py_ssize_t first, count;
    size_t done;
    if (!z || !PyArg_ParseTuple(args, "nn", &first, &count)
            || range_arg(self, first, count) < 0)
        return NULL;
    CORE_BEGIN
    done = zram_discard(z, first, count);
    CORE_END
    return PyLong_FromSize_t(done);
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

/* set_backing_fd(fd): the backing device's descriptor (-1: none), which
 * the caller keeps open until it replaces it; lock_all() held. */
static PyObject *
Zram_set_backing_fd(Zram *self, PyObject *arg)
{
    struct zram *z = zram_of(self);
    long fd;
    if (!z || need_all(self, "set_backing_fd") < 0)
        return NULL;
    fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < -1 || fd > INT_MAX)
        return PyErr_Format(PyExc_ValueError, "fd %ld; accepted: >= 0, or"
                            " -1 (none)", fd);
    zram_set_backing_fd(z, (int)fd);
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
    struct zram_version v;
    size_t index;
    if (!z || index_arg(self, arg, &index) < 0)
        return NULL;
    zram_slot_version(z, index, &v);
    return Py_BuildValue("kKL", (unsigned long)v.meta,
                         (unsigned long long)v.handle, (long long)v.writes);
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
Zram_get_bd_reads(Zram *self, void *closure)
{
    struct zram *z = zram_of(self);
    return z ? PyLong_FromLongLong(zram_bd_reads(z)) : NULL;
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
    {"nbd_pread", (PyCFunction)(void (*)(void))Zram_nbd_pread,
     METH_FASTCALL, "nbd_pread(h, buf, offset, flags): nbdkit's pread"
     " callback; whole sectors in C, the rest through the fallback."},
    {"nbd_pwrite", (PyCFunction)(void (*)(void))Zram_nbd_pwrite,
     METH_FASTCALL, "nbd_pwrite(h, buf, offset, flags): nbdkit's pwrite"
     " callback; whole sectors in C, the rest through the fallback."},
    {"offer_to_filter", (PyCFunction)Zram_offer_to_filter, METH_NOARGS,
     "offer_to_filter() -> whether zramd's nbdkit filter, loaded in this"
     " process, now serves whole sectors from this device's core."},
    {"filter_counts", (PyCFunction)Zram_filter_counts, METH_NOARGS,
     "filter_counts() -> (served_reads, served_writes, passed_reads,"
     " passed_writes) of the filter offer_to_filter() reached, or None."},
    {"nbd_fallbacks", (PyCFunction)Zram_nbd_fallbacks, METH_VARARGS,
     "nbd_fallbacks(pin, pread_rest, pwrite_rest): what nbd_pread and"
     " nbd_pwrite call first (pin()) and what finishes a request they do"
     " not (rest(h, buf, offset, flags, done))."},
    {"read", (PyCFunction)Zram_read, METH_VARARGS,
     "read(out, first) -> sectors read into out (whole sectors) from"
     " sector first; stops at a sector the caller must do.  read(out,"
     " index, lo) -> 1: out filled with bytes lo.. of sector index, or 0:"
     " the caller's."},
    {"write", (PyCFunction)Zram_write, METH_VARARGS,
     "write(data, first) -> sectors stored from data (whole sectors) at"
     " sector first; stops at a sector the caller must do.  write(data,"
     " index, lo) -> 1: bytes lo.. of sector index replaced with data"
     " (read-modify-write), or 0: the caller's, nothing changed."},
    {"discard", (PyCFunction)Zram_discard, METH_VARARGS,
     "discard(first, count) -> sectors freed, their objects given to the"
     " pool's deferred free;"
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
    {"set_backing_fd", (PyCFunction)Zram_set_backing_fd, METH_O,
     "set_backing_fd(fd): read WB slots from fd (-1: none), bd_reads"
     " restarted; the caller keeps it open; lock_all() held."},
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
    {"bd_reads", (getter)Zram_get_bd_reads, NULL,
     "pages read from the backing device since set_backing_fd", NULL},
    {"busy", (getter)Zram_get_busy, NULL, "requests in progress", NULL},
    {"closed", (getter)Zram_get_closed, NULL, "close() was called", NULL},
    {NULL}
};

PyTypeObject ZramType = {
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
