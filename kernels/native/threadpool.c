/* threadpool.c: a persistent pthread pool for back-to-back matmul calls.
 *
 * A decode step makes hundreds of short calls (tens of microseconds each), so waking a sleeping
 * thread per call would cost as much as the work. Workers therefore spin (with a pause
 * instruction) for spin_us after each job, waiting for the next one, and only then sleep on a
 * condition variable; an idle process stops burning CPU after that.
 *
 * A job is a number of chunks (contiguous slices of the output), claimed one at a time by the
 * caller and the workers. The caller never waits for a worker that has not claimed a chunk: on a
 * busy machine (another process, or torch's own threads spinning between ops) a worker may not
 * run for milliseconds, and the caller then simply does every chunk itself. It waits only for
 * chunks already claimed. Which thread runs a chunk never changes its result.
 *
 * The claim word packs generation (24 bits) | chunk count (20) | next chunk (20). A claim is a
 * compare-and-swap on that word, so a late worker holding a stale generation can never claim a
 * chunk of a newer job; the job's fields are read only after a successful claim, while the
 * caller is still waiting for that chunk, so they cannot change under the worker.
 *
 * Sleep/wake handshake: a worker increments `sleepers` and then re-reads the word; the caller
 * publishes the word and then reads `sleepers` (all sequentially consistent), so either the
 * worker sees the new job or the caller sees the sleeper and broadcasts under the mutex.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#include "llk_internal.h"

#define MAX_THREADS 256

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield" ::: "memory")
#else
#define CPU_RELAX() ((void)0)
#endif

#define GEN_SHIFT 40
#define COUNT_SHIFT 20
#define FIELD_MASK ((1ull << 20) - 1)

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t tid[MAX_THREADS];
    int threads; /* requested, caller included; 0 = default */
    int started; /* workers running */
    int64_t spin_ns;
    /* shared with the workers */
    uint64_t word; /* generation | chunk count | next chunk */
    int sleepers;
    int quit;
    int done; /* chunks finished, current job */
    llk_chunk_fn fn;
    void *arg;
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, {0}, 0, 0, 100000, 0, 0, 0, 0, 0, 0};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int default_threads(void) {
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
#endif
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

static uint64_t gen_of(uint64_t w) { return w >> GEN_SHIFT; }

/* Claims and runs chunks of the job in `w`'s generation until none is left. */
static void run_chunks(uint64_t w) {
    for (;;) {
        const uint64_t count = (w >> COUNT_SHIFT) & FIELD_MASK, next = w & FIELD_MASK;
        if (next >= count) return;
        if (__atomic_compare_exchange_n(&P.word, &w, w + 1, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE)) {
            P.fn(P.arg, (int)next); /* the job stays valid until this chunk is counted done */
            __atomic_add_fetch(&P.done, 1, __ATOMIC_RELEASE);
            w = __atomic_load_n(&P.word, __ATOMIC_ACQUIRE);
        }
        /* on failure `w` holds the current word: another claim, or a newer job */
    }
}

/* Returns the claim word once its generation differs from `seen`. */
static uint64_t wait_job(uint64_t seen) {
    const int64_t spin = __atomic_load_n(&P.spin_ns, __ATOMIC_RELAXED);
    int64_t t0 = 0;
    for (unsigned i = 0;; i++) {
        const uint64_t w = __atomic_load_n(&P.word, __ATOMIC_ACQUIRE);
        if (gen_of(w) != seen) return w;
        CPU_RELAX();
        if ((i & 255) == 0) { /* read the clock rarely: it costs more than a pause */
            const int64_t t = now_ns();
            if (i == 0) t0 = t;
            else if (t - t0 > spin) break;
        }
    }
    pthread_mutex_lock(&P.mu);
    __atomic_add_fetch(&P.sleepers, 1, __ATOMIC_SEQ_CST);
    uint64_t w;
    while (gen_of(w = __atomic_load_n(&P.word, __ATOMIC_SEQ_CST)) == seen)
        pthread_cond_wait(&P.cv, &P.mu);
    __atomic_sub_fetch(&P.sleepers, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&P.mu);
    return w;
}

static void *worker(void *argp) {
    uint64_t seen = (uint64_t)(uintptr_t)argp; /* the generation current at creation */
    for (;;) {
        const uint64_t w = wait_job(seen);
        seen = gen_of(w);
        if (__atomic_load_n(&P.quit, __ATOMIC_SEQ_CST)) return NULL;
        run_chunks(w);
    }
}

static void wake_all(void) {
    if (__atomic_load_n(&P.sleepers, __ATOMIC_SEQ_CST) > 0) {
        pthread_mutex_lock(&P.mu);
        pthread_cond_broadcast(&P.cv);
        pthread_mutex_unlock(&P.mu);
    }
}

/* Publishes a new generation with `count` chunks (0: a wake-up only). */
static uint64_t publish(uint64_t count) {
    const uint64_t g = (gen_of(__atomic_load_n(&P.word, __ATOMIC_RELAXED)) + 1) & 0xFFFFFF;
    const uint64_t w = g << GEN_SHIFT | count << COUNT_SHIFT;
    __atomic_store_n(&P.word, w, __ATOMIC_SEQ_CST);
    wake_all();
    return w;
}

static void stop_workers(void) {
    if (!P.started) return;
    __atomic_store_n(&P.quit, 1, __ATOMIC_SEQ_CST);
    publish(0);
    pthread_mutex_lock(&P.mu);
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.mu);
    for (int i = 1; i <= P.started; i++) pthread_join(P.tid[i], NULL);
    P.started = 0;
    __atomic_store_n(&P.quit, 0, __ATOMIC_SEQ_CST);
}

static void start_workers(void) {
    const int want = (P.threads > 0 ? P.threads : default_threads()) - 1;
    const uint64_t g = gen_of(__atomic_load_n(&P.word, __ATOMIC_SEQ_CST));
    for (int i = 1; i <= want && i < MAX_THREADS; i++) {
        if (pthread_create(&P.tid[i], NULL, worker, (void *)(uintptr_t)g) != 0) break;
        P.started = i;
    }
}

/* After fork() only the forking thread exists in the child: forget the workers. */
static void after_fork_child(void) {
    pthread_mutex_init(&P.mu, NULL);
    pthread_cond_init(&P.cv, NULL);
    P.started = 0;
    P.sleepers = 0;
    P.quit = 0;
}

static pthread_once_t once = PTHREAD_ONCE_INIT;
static void init_once(void) { pthread_atfork(NULL, NULL, after_fork_child); }

int llk_pool_set_threads(int n) {
    pthread_once(&once, init_once);
    if (n < 1) n = default_threads();
    if (n > MAX_THREADS) n = MAX_THREADS;
    if (n != P.threads) stop_workers();
    P.threads = n;
    return n;
}

int llk_pool_threads(void) { return P.threads > 0 ? P.threads : default_threads(); }

void llk_pool_set_spin_us(int us) {
    __atomic_store_n(&P.spin_ns, (int64_t)(us < 0 ? 0 : us) * 1000, __ATOMIC_RELAXED);
}

void llk_run_chunks(llk_chunk_fn fn, void *arg, int nchunks) {
    pthread_once(&once, init_once);
    if (nchunks <= 0) return;
    if (P.threads <= 0) P.threads = default_threads();
    if (P.threads > 1 && P.started == 0) start_workers();
    if (P.started == 0 || nchunks == 1) {
        for (int c = 0; c < nchunks; c++) fn(arg, c);
        return;
    }
    if (nchunks > (int)FIELD_MASK) nchunks = (int)FIELD_MASK; /* callers stay far below */
    P.fn = fn;
    P.arg = arg;
    __atomic_store_n(&P.done, 0, __ATOMIC_RELAXED);
    run_chunks(publish((uint64_t)nchunks));
    /* Wait for chunks other threads claimed; yield now and then so that a worker that was
     * descheduled mid-chunk gets a CPU on a busy machine. */
    for (unsigned i = 1; __atomic_load_n(&P.done, __ATOMIC_ACQUIRE) < nchunks; i++) {
        CPU_RELAX();
        if ((i & 1023) == 0) sched_yield();
    }
}

void llk_wait_counter(const int *counter, int target) {
    for (unsigned i = 1; __atomic_load_n(counter, __ATOMIC_ACQUIRE) < target; i++) {
        CPU_RELAX();
        if ((i & 1023) == 0) sched_yield();
    }
}

/* ---- work ranges with stealing (llk_internal.h) ---- */

void llk_ranges_init(llk_ranges *r, const int64_t *bounds, int n, uint32_t unit) {
    r->n = n;
    r->unit = unit ? unit : 1;
    for (int i = 0; i < n; i++)
        __atomic_store_n(&r->s[i].w, (uint64_t)bounds[i + 1] << 32 | (uint64_t)bounds[i],
                         __ATOMIC_RELAXED);
}

int llk_ranges_next(llk_ranges *r, int home, int64_t *lo, int64_t *hi) {
    llk_slot *own = &r->s[home];
    for (;;) {
        uint64_t w = __atomic_load_n(&own->w, __ATOMIC_ACQUIRE);
        uint32_t a = (uint32_t)w, b = (uint32_t)(w >> 32);
        while (a < b) { /* a quarter of what is left, so that the end can still be shared */
            uint32_t u = (b - a + 3) / 4;
            u = u < r->unit ? r->unit : u;
            u = u < b - a ? u : b - a;
            if (__atomic_compare_exchange_n(&own->w, &w, (uint64_t)b << 32 | (a + u), 0,
                                            __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                *lo = a;
                *hi = a + u;
                return 1;
            }
            a = (uint32_t)w;
            b = (uint32_t)(w >> 32);
        }
        /* own slot empty: steal the back half of the fullest slot */
        int v = -1;
        uint32_t most = 0;
        for (int i = 0; i < r->n; i++) {
            const uint64_t x = __atomic_load_n(&r->s[i].w, __ATOMIC_RELAXED);
            const uint32_t xa = (uint32_t)x, xb = (uint32_t)(x >> 32);
            if (xb > xa && xb - xa > most) {
                most = xb - xa;
                v = i;
            }
        }
        if (v < 0) return 0;
        uint64_t x = __atomic_load_n(&r->s[v].w, __ATOMIC_ACQUIRE);
        const uint32_t xa = (uint32_t)x, xb = (uint32_t)(x >> 32);
        if (xa >= xb) continue; /* claimed meanwhile: look again */
        uint32_t take = (xb - xa + 1) / 2;
        take = take < r->unit ? r->unit : take;
        take = take < xb - xa ? take : xb - xa;
        if (__atomic_compare_exchange_n(&r->s[v].w, &x, (uint64_t)(xb - take) << 32 | xa, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            __atomic_store_n(&own->w, (uint64_t)xb << 32 | (xb - take), __ATOMIC_RELEASE);
    }
}
