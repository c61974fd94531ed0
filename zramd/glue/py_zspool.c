/*
 * py_zspool.c: zramd._fastpath.ZsPool, the pool (csrc/zsmalloc.c) as a
 * Python type.
 *
 * zramd.zsmalloc.Pool subclasses it and adds the stats dataclasses.  The pool takes its own pthread mutexes; a
 * thread that must wait for one lets the GIL go meanwhile (pool_lock_wait),
 * so a compaction holding a class lock for a while stalls no other Python
 * thread.  Calls that may hold locks for long (compact, audit) run without
 * the GIL.  Zram uses the same struct zs_pool directly, without the GIL.
 */

#define PY_SSIZE_T_CLEAN
#include "glue.h"

/* Set while this thread runs pool code with the GIL let go. */
__thread int pool_gil_released;

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

struct zs_pool *
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

/* free(handle) and free_deferred(handle): op through the pool's free. */
static PyObject *
free_call(ZsPool *self, PyObject *arg, const char *op,
          int (*free_fn)(struct zs_pool *, unsigned long))
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
    r = free_fn(zs, handle);
    if (r == -EINVAL)
        return not_allocated(op, arg), NULL;
    if (r < 0) {
        errno = -r;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *
ZsPool_free(ZsPool *self, PyObject *arg)
{
    return free_call(self, arg, "free", zs_free);
}

static PyObject *
ZsPool_free_deferred(ZsPool *self, PyObject *arg)
{
    return free_call(self, arg, "free_deferred", zs_free_deferred);
}

static PyObject *
ZsPool_free_deferred_flush(ZsPool *self, PyObject *unused)
{
    struct zs_pool *zs = zs_of(self);
    int r;
    if (!zs)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    pool_gil_released = 1;
    r = zs_free_deferred_flush(zs);
    pool_gil_released = 0;
    Py_END_ALLOW_THREADS
    if (r == -EINVAL) {
        PyErr_SetString(PyExc_ValueError, "free_deferred_flush: a queued "
                        "handle is not allocated (freed twice); the ones "
                        "after it stay queued");
        return NULL;
    }
    if (r < 0) {
        errno = -r;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *
ZsPool_deferred_pending(ZsPool *self, PyObject *unused)
{
    /* A closed pool drained its queue. */
    return PyLong_FromSize_t(self->zs ? zs_deferred_pending(self->zs) : 0);
}

static PyObject *
ZsPool_start_worker(ZsPool *self, PyObject *unused)
{
    struct zs_pool *zs = zs_of(self);
    if (!zs)
        return NULL;
    if (zs_deferred_start(zs) < 0)
        return PyErr_Format(PyExc_RuntimeError, "pool: cannot start the "
                            "deferred-free worker");
    Py_RETURN_NONE;
}

static PyObject *
ZsPool_set_deferred_capacity(ZsPool *self, PyObject *arg)
{
    struct zs_pool *zs = zs_of(self);
    Py_ssize_t n;
    if (!zs)
        return NULL;
    n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0 || n > DEFERRED_CAPACITY)
        return PyErr_Format(PyExc_ValueError, "deferred capacity: %zd; "
                            "accepted: 0..%d", n, DEFERRED_CAPACITY);
    zs_deferred_capacity(zs, (size_t)n);
    Py_RETURN_NONE;
}

static PyObject *
ZsPool_hold_worker(ZsPool *self, PyObject *unused)
{
    struct zs_pool *zs = zs_of(self);
    if (!zs)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    zs_deferred_hold(zs);
    Py_END_ALLOW_THREADS
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
    {"free_deferred", (PyCFunction)ZsPool_free_deferred, METH_O,
     "free_deferred(handle): queue the object for the drain worker, or"
     " free it now when the queue is busy or full; ValueError if not"
     " allocated.  A queued handle is not reused before it is freed."},
    {"free_deferred_flush", (PyCFunction)ZsPool_free_deferred_flush,
     METH_NOARGS, "free_deferred_flush(): free every queued handle before"
     " returning; ValueError if one was freed meanwhile (the ones after it"
     " stay queued)."},
    {"deferred_pending", (PyCFunction)ZsPool_deferred_pending, METH_NOARGS,
     "deferred_pending() -> handles waiting in the deferred-free queue."},
    {"start_worker", (PyCFunction)ZsPool_start_worker, METH_NOARGS,
     "start_worker(): start the drain worker in this process now (a"
     " server does after forking) rather than at the first queued handle."},
    {"set_deferred_capacity", (PyCFunction)ZsPool_set_deferred_capacity,
     METH_O, "set_deferred_capacity(n): at most n handles wait in the"
     " deferred-free queue (0..DEFERRED_CAPACITY, the default); 0 makes"
     " every deferred free immediate."},
    {"hold_worker", (PyCFunction)ZsPool_hold_worker, METH_NOARGS,
     "hold_worker(): stop the drain worker and start none until"
     " start_worker(): queued handles wait for a flush (tests)."},
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

PyTypeObject ZsPoolType = {
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
