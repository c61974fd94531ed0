/*
 * zramd._fastpath: the module.  It exports the Python types of the glue
 * (glue/glue.h: the only C files that touch the CPython API):
 *
 *   Codec    a C codec (csrc/zcomp.c: lz4, lz4hc, zstd) as a Python type,
 *            which the compress backends with a C form set as ``native``;
 *            glue/py_codec.c;
 *   ZsPool   the pool (csrc/zsmalloc.c), which zramd.zsmalloc.Pool
 *            subclasses; glue/py_zspool.c;
 *   Zram     a device's slot table and I/O paths (csrc/zram.c), which
 *            zramd.device.Device drives; glue/py_zram.c;
 *
 * and, from here, the constants of csrc/zram_defs.h by name and
 * crew_limit().  The module keeps no state and takes no lock; glue.h
 * states the GIL rule.
 */

#define PY_SSIZE_T_CLEAN
#include "glue/glue.h"

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
    K(SAME_PAGE_FLAGS),
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
    K(DEFERRED_IDLE_DELAY_MS),
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

