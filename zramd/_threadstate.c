/*
 * zramd._threadstate: keep one Python thread state per foreign (nbdkit)
 * thread between callbacks, and free it on that thread when it exits.
 *
 * nbdkit wraps each callback in PyGILState_Ensure()/PyGILState_Release().
 * pin() adds one Ensure that is never released, so Release only detaches
 * the state and the next callback on the thread resumes it (see
 * zramd/threadstate.py).  Such a state must be freed on its own thread:
 * since CPython 3.12, deleting a PyGILState-made state from another thread
 * clears the deleting thread's PyGILState slot.  So pin() also stores a
 * record under a pthread key whose destructor runs on the thread as it
 * exits and ends the state the documented way for a thread's kept state
 * (the C API docs, "Reusing a thread state across repeated calls"):
 *
 *     PyEval_RestoreThread(tstate);
 *     PyThreadState_Clear(tstate);
 *     PyThreadState_DeleteCurrent();
 *
 * The record holds the state and whether the state is already gone.
 * Someone else may clear the state first: Python itself for a thread it
 * started, Py_FinalizeEx for any thread left.  A sentinel object in the
 * state's dict (cleared by PyThreadState_Clear, whoever calls it) marks
 * the record then, and the destructor only frees the record.
 *
 * Interpreter shutdown: stop() (atexit, while the interpreter is whole)
 * waits for destructors under way and makes later ones leave their state
 * to Py_FinalizeEx; a thread must not take the GIL once finalising began.
 *
 * Locking: `lock` guards every field below and each record's `gone`.  It
 * is never held while waiting for the GIL.  The GIL is held in pin(),
 * count() and the sentinel's dealloc.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdlib.h>

struct pin_record {
    PyThreadState *tstate;
    int gone;                   /* tstate was cleared: do not touch it */
};

static pthread_key_t pin_key;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t idle = PTHREAD_COND_INITIALIZER;
static long live;               /* pinned states not yet cleared */
static int exiting;             /* destructors running now */
static int stopping;            /* stop() was called */

static const char SENTINEL_KEY[] = "zramd._threadstate";

/* The sentinel: a state's dict owns the only reference. */
typedef struct {
    PyObject_HEAD
    struct pin_record *record;
} Sentinel;

static void
sentinel_dealloc(Sentinel *self)
{
    pthread_mutex_lock(&lock);
    self->record->gone = 1;
    live--;
    pthread_mutex_unlock(&lock);
    PyObject_Free(self);
}

static PyTypeObject SentinelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "zramd._threadstate.Sentinel",
    .tp_basicsize = sizeof(Sentinel),
    .tp_dealloc = (destructor)sentinel_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
};

/* pthread key destructor: runs on the exiting thread, without the GIL. */
static void
release_on_exit(void *value)
{
    struct pin_record *record = value;
    PyThreadState *tstate = record->tstate;

    pthread_mutex_lock(&lock);
    if (record->gone) {
        pthread_mutex_unlock(&lock);
        free(record);
        return;
    }
    if (stopping) {
        /* Py_FinalizeEx clears the state, and the sentinel then writes
           to the record: leave both. */
        pthread_mutex_unlock(&lock);
        return;
    }
    exiting++;
    pthread_mutex_unlock(&lock);

    PyEval_RestoreThread(tstate);
    PyThreadState_Clear(tstate);        /* the sentinel marks the record */
    PyThreadState_DeleteCurrent();      /* and releases the GIL */
    free(record);

    pthread_mutex_lock(&lock);
    exiting--;
    pthread_cond_broadcast(&idle);
    pthread_mutex_unlock(&lock);
}

static PyObject *
pin(PyObject *module, PyObject *unused)
{
    PyThreadState *tstate = PyThreadState_Get();
    struct pin_record *record;
    Sentinel *sentinel;
    PyObject *dict;
    int err;

    if (pthread_getspecific(pin_key) != NULL)
        Py_RETURN_FALSE;
    /* Only a state PyGILState knows for this thread can be kept by it. */
    if (PyGILState_GetThisThreadState() != tstate)
        Py_RETURN_FALSE;
    dict = PyThreadState_GetDict();
    if (dict == NULL)
        return PyErr_Format(PyExc_RuntimeError, "threadstate pin: no thread dict");
    record = calloc(1, sizeof(*record));
    if (record == NULL)
        return PyErr_NoMemory();
    record->tstate = tstate;
    sentinel = PyObject_New(Sentinel, &SentinelType);
    if (sentinel == NULL) {
        free(record);
        return NULL;
    }
    sentinel->record = record;
    pthread_mutex_lock(&lock);
    live++;                     /* the sentinel's dealloc takes it back */
    pthread_mutex_unlock(&lock);
    err = PyDict_SetItemString(dict, SENTINEL_KEY, (PyObject *)sentinel);
    Py_DECREF(sentinel);
    if (err < 0) {
        free(record);           /* the sentinel is gone and marked it */
        return NULL;
    }
    if (pthread_setspecific(pin_key, record) != 0) {
        /* Unlink the sentinel: it marks the record, which we then free. */
        PyDict_DelItemString(dict, SENTINEL_KEY);
        free(record);
        return PyErr_NoMemory();
    }
    /* The unmatched Ensure: the state's counter never reaches 0 again. */
    PyGILState_Ensure();
    Py_RETURN_TRUE;
}

static PyObject *
count(PyObject *module, PyObject *unused)
{
    long n;

    pthread_mutex_lock(&lock);
    n = live;
    pthread_mutex_unlock(&lock);
    return PyLong_FromLong(n);
}

static PyObject *
stop(PyObject *module, PyObject *unused)
{
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&lock);
    stopping = 1;
    while (exiting > 0)
        pthread_cond_wait(&idle, &lock);
    pthread_mutex_unlock(&lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"pin", pin, METH_NOARGS,
     "pin() -> bool\n\nKeep the calling thread's state after this callback"
     " and free it when the thread exits; True if newly pinned."},
    {"count", count, METH_NOARGS,
     "count() -> int\n\nPinned thread states not yet freed."},
    {"stop", stop, METH_NOARGS,
     "stop()\n\nAt interpreter exit: wait for states being freed, and leave"
     " the rest to the interpreter's finalisation."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "zramd._threadstate",
    "Python thread states kept per foreign thread, freed on it at exit.",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__threadstate(void)
{
    static int key_made;

    if (PyType_Ready(&SentinelType) < 0)
        return NULL;
    /* One key for the process: the module may be initialised again (a new
       interpreter), and the key's destructor is this file's. */
    if (!key_made) {
        if (pthread_key_create(&pin_key, release_on_exit) != 0)
            return PyErr_NoMemory();
        key_made = 1;
    }
    return PyModule_Create(&module_def);
}
