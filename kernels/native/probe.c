/* probe.c: the benchmark's measurements, not used by the kernels. llk_read_probe: a plain
 * parallel read loop, the memory-bandwidth roof the benchmark compares the M = 1 kernels with
 * (torch.sum reaches only ~60% of it on the 2-vCPU EPYC). Portable C with vector adds (an AVX2
 * clone on x86); each thread prefetches its contiguous slice into L2 ahead of use, as the kernels
 * do. llk_matmul_timed: llk_matmul calls timed one by one, from C. */
#define _GNU_SOURCE
#include <time.h>

#include "llk_internal.h"

typedef uint64_t v4u64 __attribute__((vector_size(32))); /* one AVX2 or two SSE2 / NEON regs */

#if defined(__x86_64__) && defined(__GNUC__)
#define PROBE_CLONES __attribute__((target_clones("avx2", "default"))) /* 16-byte loads: -30% */
#else
#define PROBE_CLONES
#endif

typedef struct {
    const uint8_t *p;
    int64_t bytes;
    int nchunks;
    uint64_t sums[256];
} probe_t;

PROBE_CLONES static void probe_chunk(void *arg, int c) {
    probe_t *pr = (probe_t *)arg;
    const int64_t lo = pr->bytes / pr->nchunks * c / 128 * 128; /* the tail < 128 B is skipped */
    const int64_t hi = c + 1 == pr->nchunks ? pr->bytes / 128 * 128
                                            : pr->bytes / pr->nchunks * (c + 1) / 128 * 128;
    v4u64 s[4] = {{0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}};
    for (int64_t i = lo; i < hi; i += 128) {
        __builtin_prefetch(pr->p + i + 2048, 0, 2);
        __builtin_prefetch(pr->p + i + 2048 + 64, 0, 2);
        for (int l = 0; l < 4; l++) {
            v4u64 v;
            memcpy(&v, pr->p + i + 32 * l, 32);
            s[l] += v;
        }
    }
    const v4u64 t = (s[0] + s[1]) + (s[2] + s[3]);
    pr->sums[c] = t[0] + t[1] + t[2] + t[3];
}

uint64_t llk_read_probe(const void *p, int64_t bytes) {
    probe_t pr;
    pr.p = (const uint8_t *)p;
    pr.bytes = bytes;
    pr.nchunks = llk_pool_threads();
    if (pr.nchunks > 256) pr.nchunks = 256;
    llk_run_locked(probe_chunk, &pr, pr.nchunks);
    uint64_t s = 0;
    for (int c = 0; c < pr.nchunks; c++) s += pr.sums[c];
    return s;
}

int llk_matmul_timed(const float *x, int64_t m, int64_t k, const llk_part *parts, int32_t n_parts,
                     int32_t n_sets, float *y, int64_t ldy, int32_t reps, int64_t *ns) {
    if (n_sets < 1 || reps < 0) return LLK_E_SHAPE;
    for (int32_t r = 0; r < reps; r++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        const int rc = llk_matmul(x, m, k, k, parts + (int64_t)(r % n_sets) * n_parts, n_parts, y,
                                  ldy);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if (rc) return rc;
        ns[r] = (int64_t)(t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec);
    }
    return LLK_OK;
}
