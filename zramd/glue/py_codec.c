/*
 * py_codec.c: zramd._fastpath.Codec, a C codec of the registry
 * (csrc/zcomp.c) as a Python type, which the compress backends with a C
 * form set as ``native`` and a device's codec table (Zram) holds.  The
 * codec's own mutex guards its context free lists; nothing here is
 * locked by the glue.
 */

#define PY_SSIZE_T_CLEAN
#include "glue.h"

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
     "(compression, decompression) contexts on the free lists (zstd, "
     "deflate).",
     NULL},
    {NULL}
};

PyTypeObject CodecType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "zramd._fastpath.Codec",
    .tp_basicsize = sizeof(Codec),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Codec(algorithm, level=0, dictionary=None): lz4, lz4hc, "
              "zstd or deflate on 4 KiB pages.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Codec_init,
    .tp_dealloc = (destructor)Codec_dealloc,
    .tp_methods = Codec_methods,
    .tp_getset = Codec_getset,
};

