/*
 * crew.c: the helper threads of crew.h.
 *
 * Locking: crew.lock guards the queue of posted batches and each batch's
 * want, active and joined; a batch's items are handed out by an atomic
 * counter, without it.  start_lock makes the first callers in a process
 * start the helpers once.
 */

#include <limits.h>
#include <pthread.h>
#include <unistd.h>

#include "crew.h"

static struct {
    pthread_mutex_t lock;
    pthread_cond_t work;             /* a batch was posted */
    pthread_cond_t done;             /* a helper left a batch */
    struct crew_batch *queue;
    int size;
    pid_t pid;                       /* the process the helpers run in */
} crew = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
          PTHREAD_COND_INITIALIZER, NULL, 0, 0};

static pthread_mutex_t start_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_int crew_limit = CREW_MAX;    /* helpers a batch may use */

static void
batch_run(struct crew_batch *b, int who)
{
    for (;;) {
        size_t start = atomic_fetch_add(&b->next, CREW_CHUNK);
        if (start >= b->count)
            return;
        b->work(b, who, start, b->count - start < CREW_CHUNK
                               ? b->count - start : CREW_CHUNK);
    }
}

static void *
crew_main(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&crew.lock);
    for (;;) {
        struct crew_batch *b;
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
    int size;
    pthread_mutex_lock(&start_lock);
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
        crew.pid = pid;
    }
    size = crew.size;
    pthread_mutex_unlock(&start_lock);
    return size;
}

int
crew_hands(size_t count)
{
    size_t chunks = (count + CREW_CHUNK - 1) / CREW_CHUNK;
    int size, limit = atomic_load(&crew_limit);
    if (chunks < 2 || limit == 0)
        return 0;
    size = crew_ready();
    if (size > limit)
        size = limit;
    return chunks - 1 < (size_t)size ? (int)(chunks - 1) : size;
}

void
crew_run(struct crew_batch *b, int hands)
{
    atomic_store(&b->next, 0);
    b->want = hands;
    b->active = 0;
    b->joined = 0;
    b->qnext = NULL;
    if (hands) {
        struct crew_batch **tail;
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
            struct crew_batch **p;
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

int
crew_set_limit(int limit)
{
    if (limit < 0)
        return atomic_load(&crew_limit);
    return atomic_exchange(&crew_limit, limit);
}
