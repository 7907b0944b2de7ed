/* matmul.c: the entry point: picks the ISA path, quantizes the activations, splits the work.
 *
 * A call: (1) each activation row is converted once to every format its weight types need
 * (llk_internal.h), into a grow-only scratch buffer (large calls share this among the threads
 * as the first chunks of the job); (2) the concatenated output columns of all parts, in groups of
 * 8 rows, are cut into one contiguous range per thread (weighted by weight bytes when M is small,
 * where the call streams memory), which its thread walks front to back and a thread done with
 * its own steals from the back of (llk_ranges: one weight stream per thread, balanced). Each
 * output element is computed by exactly one kernel call whose arithmetic does not depend on the
 * chunk, the thread or the tile, so neither the thread count nor M can change a result. Within
 * a chunk, M > rmax is cut into balanced tiles of at most rmax rows and the weight rows are
 * walked in blocks of ~16 KB, so a block stays in L1 while every tile of activations passes over
 * it. Calls are serialized by a mutex (the scratch and the pool are shared).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "llk_internal.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

#define PAR_MIN_WORK 8192      /* weight bytes x rows below which one thread does the call */
#define PAR_QUANT_MIN 16384    /* M * K from which the threads share the quantization */
#define L1_BLOCK_BYTES 16384   /* weight bytes walked per activation tile in a multi-tile call */

static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER;
static int cur_isa = -1;
static void *scratch;
static size_t scratch_cap;

/* A fork() while another thread holds the call lock would leave the child's copy locked. */
static void after_fork_child(void) { pthread_mutex_init(&call_mu, NULL); }
__attribute__((constructor)) static void llk_init(void) {
    pthread_atfork(NULL, NULL, after_fork_child);
}

/* ---- types ---- */

int llk_block_size(int32_t type) {
    const int i = llk_type_index(type);
    if (i < 0) return 0;
    return i <= 2 ? 1 : i <= 8 ? 32 : 256;
}

int llk_type_size(int32_t type) {
    switch (type) {
    case LLK_F32: return 4;
    case LLK_F16: case LLK_BF16: return 2;
    case LLK_Q4_0: case LLK_IQ4_NL: return 18;
    case LLK_Q4_1: return 20;
    case LLK_Q5_0: return 22;
    case LLK_Q5_1: return 24;
    case LLK_Q8_0: return 34;
    case LLK_Q2_K: return 84;
    case LLK_Q3_K: return 110;
    case LLK_Q4_K: return 144;
    case LLK_Q5_K: return 176;
    case LLK_Q6_K: return 210;
    case LLK_IQ4_XS: return 136;
    default: return 0;
    }
}

/* ---- ISA selection ---- */

static int cpu_has(int isa) {
    switch (isa) {
    case LLK_ISA_SCALAR: return 1;
#if defined(__x86_64__) || defined(_M_X64)
    case LLK_ISA_AVX2:
    case LLK_ISA_AVX512_VNNI: {
        unsigned a, b, c, d;
        __builtin_cpu_init();
        /* F16C: every AVX2 CPU has it, but check (cpuid leaf 1, ecx bit 29) */
        if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 29))) return 0;
        if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
        if (isa == LLK_ISA_AVX2) return 1;
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    }
#endif
#if defined(__aarch64__)
    case LLK_ISA_NEON_DOTPROD:
#if defined(__linux__)
        return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
        return 1; /* every Apple arm64 CPU has dotprod */
#else
        return 0;
#endif
#endif
    default: return 0;
    }
}

static const llk_isa_table *table_of(int isa) {
    switch (isa) {
#if defined(__x86_64__) || defined(_M_X64)
    case LLK_ISA_AVX2: return &llk_table_avx2;
    case LLK_ISA_AVX512_VNNI: return &llk_table_avx512;
#endif
#if defined(__aarch64__)
    case LLK_ISA_NEON_DOTPROD: return &llk_table_neon;
#endif
    default: return &llk_table_scalar;
    }
}

int llk_x8_native(int32_t type) {
    const int i = llk_type_index(type);
    return i >= 0 && llk_x8_type(type) && table_of(llk_get_isa())->row_x8[i] != NULL;
}

int llk_isa_supported(int isa) { return isa >= 0 && isa < LLK_ISA_COUNT && cpu_has(isa); }

int llk_best_isa(void) {
    for (int isa = LLK_ISA_COUNT - 1; isa > 0; isa--)
        if (cpu_has(isa)) return isa;
    return LLK_ISA_SCALAR;
}

const char *llk_isa_name(int isa) {
    static const char *names[LLK_ISA_COUNT] = {"scalar", "avx2", "avx512_vnni", "neon_dotprod"};
    return isa >= 0 && isa < LLK_ISA_COUNT ? names[isa] : "unknown";
}

static int isa_locked(void) {
    if (cur_isa < 0) cur_isa = llk_best_isa();
    return cur_isa;
}

int llk_get_isa(void) {
    pthread_mutex_lock(&call_mu);
    const int isa = isa_locked();
    pthread_mutex_unlock(&call_mu);
    return isa;
}

int llk_set_isa(int isa) {
    if (!llk_isa_supported(isa)) return LLK_E_ISA;
    pthread_mutex_lock(&call_mu);
    cur_isa = isa;
    pthread_mutex_unlock(&call_mu);
    return LLK_OK;
}

int llk_set_threads(int n) {
    pthread_mutex_lock(&call_mu);
    const int r = llk_pool_set_threads(n);
    pthread_mutex_unlock(&call_mu);
    return r;
}

int llk_get_threads(void) {
    pthread_mutex_lock(&call_mu);
    const int r = llk_pool_threads();
    pthread_mutex_unlock(&call_mu);
    return r;
}

void llk_set_spin_us(int us) { llk_pool_set_spin_us(us); }

void llk_run_locked(llk_chunk_fn fn, void *arg, int nchunks) {
    pthread_mutex_lock(&call_mu);
    llk_run_chunks(fn, arg, nchunks);
    pthread_mutex_unlock(&call_mu);
}

/* ---- the call ---- */

typedef struct {
    const float *x;
    int64_t m, k, ldx;
    const llk_part *parts;
    int n_parts;
    float *y;
    int64_t ldy;
    const llk_isa_table *t;
    llk_act act[5]; /* by LLK_ACT_* format */
    int need[5];
    int qchunks, nchunks; /* quantization chunks (first), compute chunks = range slots */
    int quant_done;       /* quantization chunks finished (atomic) */
    int64_t rows, cost;   /* total weight rows, total cost */
    int64_t row_cost[64]; /* cost of one row of each part (n_parts <= 64) */
    int64_t gbase[65];    /* first 8-row group of each part; gbase[n_parts]: all groups */
    int type_idx[64];     /* llk_type_index of each part's type (validated) */
    int64_t mt;           /* activation rows per tile */
    llk_ranges ranges;    /* the groups, a range per compute chunk */
} job_t;

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

static void llk_prefetch_l2(const uint8_t *p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, 2);
}

/* A weight stream's start: the first two groups of part pi's rows [n0, n1) into L2 (the kernels
 * then prefetch the group after the next as they go). */
static void prefetch_start(const job_t *j, int pi, int64_t n0, int64_t n1) {
    const llk_part *p = &j->parts[pi];
    const int64_t nr = n1 - n0 < 2 * LLK_NR ? n1 - n0 : 2 * LLK_NR;
    llk_prefetch_l2((const uint8_t *)p->w + n0 * p->row_stride, nr * p->row_stride);
}

static void quantize_rows(job_t *j, int64_t r0, int64_t r1) {
    const int64_t k = j->k;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = j->x + r * j->ldx;
        if (j->need[LLK_ACT_Q8_1]) {
            const llk_act *a = &j->act[LLK_ACT_Q8_1];
            j->t->quant_q8_1(x, k, (int8_t *)a->qs + 32 * r, (float *)a->d + r, (float *)a->s + r,
                             (int32_t *)a->isum + r, j->m);
        }
        if (j->need[LLK_ACT_Q8_K]) {
            const llk_act *a = &j->act[LLK_ACT_Q8_K];
            j->t->quant_q8_K(x, k, (int8_t *)a->qs + 256 * r, (float *)a->d + r,
                             (int16_t *)a->bsums + 16 * r, j->m);
        }
        for (int f = LLK_ACT_F32; f <= LLK_ACT_BF16; f++) {
            if (!j->need[f]) continue;
            float *o = (float *)j->act[f].f + r * j->act[f].ldf;
            if (f == LLK_ACT_F32) memcpy(o, x, (size_t)k * 4);
            else if (f == LLK_ACT_F16) j->t->round_f16(x, k, o);
            else j->t->round_bf16(x, k, o);
            memset(o + k, 0, (size_t)(j->act[f].ldf - k) * 4);
        }
    }
}

/* Slot bounds in 8-row groups (gbase[p]: part p's first group): nth ranges of equal cost. */
static void split_groups(const job_t *j, int nth, int64_t *bounds) {
    bounds[0] = 0;
    for (int t = 1; t <= nth; t++) {
        const int64_t target = (int64_t)((double)j->cost * t / nth);
        int64_t g = j->gbase[j->n_parts], cum = 0;
        for (int p = 0; p < j->n_parts; p++) {
            const int64_t n = j->parts[p].n, c = j->row_cost[p];
            if (target < cum + n * c) {
                const int64_t r = (target - cum + c - 1) / c; /* rows into the part */
                g = j->gbase[p] + (r + LLK_NR - 1) / LLK_NR;
                break;
            }
            cum += n * c;
        }
        g = g < bounds[t - 1] ? bounds[t - 1] : g;
        bounds[t] = g < j->gbase[j->n_parts] ? g : j->gbase[j->n_parts];
    }
    bounds[nth] = j->gbase[j->n_parts];
}

/* Weight rows of part pi walked per pass of the activation tiles (a multi-tile call): ~16 KB. */
static int64_t l1_block_rows(const job_t *j, int pi) {
    const int32_t type = j->parts[pi].type;
    const int64_t rb = j->k / llk_block_size(type) * llk_type_size(type);
    const int64_t nblk = L1_BLOCK_BYTES / rb / LLK_NR * LLK_NR;
    return nblk < LLK_NR ? LLK_NR : nblk;
}

static void run_part(const job_t *j, int pi, int64_t n0, int64_t n1, int starts) {
    const llk_part *p = &j->parts[pi];
    const llk_row_fn rows = j->t->row[j->type_idx[pi]]; /* x8 groups without a kernel: unpacked */
    const llk_row_fn fn = p->layout == LLK_LAYOUT_X8 ? j->t->row_x8[j->type_idx[pi]] : rows;
    const llk_act *a = &j->act[llk_act_format(p->type)];
    const uint8_t *w = (const uint8_t *)p->w;
    const int64_t st = p->row_stride, m = j->m, mt = j->mt, ldy = j->ldy;
    float *y = j->y + p->col;
    if (starts) prefetch_start(j, pi, n0, n1);
    if (m <= mt) {
        for (int64_t n = n0; n < n1; n += LLK_NR) {
            const int nr = (int)(n1 - n < LLK_NR ? n1 - n : LLK_NR);
            if (fn) fn(w + n * st, st, nr, a, 0, (int)m, y + n, ldy);
            else llk_x8_unpacked(rows, p->type, w + n * st, st, nr, a, 0, (int)m, y + n, ldy);
        }
        return;
    }
    const int64_t nblk = l1_block_rows(j, pi);
    for (int64_t b0 = n0; b0 < n1; b0 += nblk) {
        const int64_t b1 = b0 + nblk < n1 ? b0 + nblk : n1;
        for (int64_t m0 = 0; m0 < m; m0 += mt) {
            const int rm = (int)(m - m0 < mt ? m - m0 : mt);
            for (int64_t n = b0; n < b1; n += LLK_NR) {
                const int nr = (int)(b1 - n < LLK_NR ? b1 - n : LLK_NR);
                if (fn) fn(w + n * st, st, nr, a, m0, rm, y + n, ldy);
                else llk_x8_unpacked(rows, p->type, w + n * st, st, nr, a, m0, rm, y + n, ldy);
            }
        }
    }
}

/* Groups [g0, g1) of the concatenated parts; `starts`: not the continuation of the last piece */
static void run_groups(const job_t *j, int64_t g0, int64_t g1, int starts) {
    for (int p = 0; p < j->n_parts && j->gbase[p] < g1; p++) {
        const int64_t b = j->gbase[p], e = j->gbase[p + 1];
        if (e <= g0) continue;
        const int64_t n0 = (g0 > b ? g0 - b : 0) * LLK_NR;
        const int64_t n1 = (g1 - b) * LLK_NR < j->parts[p].n ? (g1 - b) * LLK_NR : j->parts[p].n;
        run_part(j, p, n0, n1, starts || g0 < b);
    }
}

static void chunk_fn(void *arg, int c) {
    job_t *j = (job_t *)arg;
    if (c < j->qchunks) {
        quantize_rows(j, j->m * c / j->qchunks, j->m * (c + 1) / j->qchunks);
        __atomic_add_fetch(&j->quant_done, 1, __ATOMIC_RELEASE);
        return;
    }
    int64_t g0, g1, end = -1;
    if (j->qchunks) {
        /* while the activations are being quantized: this slot's first weight rows in flight */
        const int64_t first = (int64_t)(uint32_t)__atomic_load_n(&j->ranges.s[c - j->qchunks].w,
                                                                 __ATOMIC_RELAXED);
        for (int p = 0; p < j->n_parts; p++)
            if (first < j->gbase[p + 1]) {
                prefetch_start(j, p, (first - j->gbase[p]) * LLK_NR, j->parts[p].n);
                end = first; /* the first piece needs no start prefetch of its own */
                break;
            }
        llk_wait_counter(&j->quant_done, j->qchunks);
    }
    while (llk_ranges_next(&j->ranges, c - j->qchunks, &g0, &g1)) {
        run_groups(j, g0, g1, g0 != end);
        end = g1;
    }
}

int llk_matmul(const float *x, int64_t m, int64_t k, int64_t ldx, const llk_part *parts,
               int32_t n_parts, float *y, int64_t ldy) {
    if (m < 0 || k <= 0 || ldx < k || n_parts < 0 || n_parts > 64) return LLK_E_SHAPE;
    job_t j;
    memset(&j, 0, offsetof(job_t, ranges)); /* the slots are set by llk_ranges_init */
    int64_t bytes = 0;
    for (int p = 0; p < n_parts; p++) {
        const int32_t type = parts[p].type;
        j.type_idx[p] = llk_type_index(type);
        if (j.type_idx[p] < 0) return LLK_E_TYPE;
        const int bs = llk_block_size(type);
        if (k % bs || parts[p].n < 0 || parts[p].col < 0 || parts[p].col + parts[p].n > ldy)
            return LLK_E_SHAPE;
        const int64_t rb = k / bs * llk_type_size(type);
        if (parts[p].n > 1 && parts[p].row_stride < rb) return LLK_E_SHAPE;
        if (parts[p].layout == LLK_LAYOUT_X8) { /* packed groups: one stride, the row's size */
            if (!llk_x8_type(type)) return LLK_E_TYPE;
            if (parts[p].row_stride != rb) return LLK_E_SHAPE;
        } else if (parts[p].layout != LLK_LAYOUT_ROWS) {
            return LLK_E_SHAPE;
        }
        j.need[llk_act_format(type)] = 1;
        j.row_cost[p] = m <= 16 ? rb : k;
        j.rows += parts[p].n;
        j.gbase[p + 1] = j.gbase[p] + (parts[p].n + LLK_NR - 1) / LLK_NR;
        j.cost += parts[p].n * j.row_cost[p];
        bytes += parts[p].n * rb;
    }
    if (m == 0 || j.rows == 0) return LLK_OK;

    /* scratch layout: every needed format, 64-byte aligned pieces */
    const int64_t ldf = (k + 15) & ~(int64_t)15;
    size_t off[5][4], total = 0;
    for (int f = 0; f < 5; f++) {
        if (!j.need[f]) continue;
        size_t sz[4] = {0, 0, 0, 0};
        if (f == LLK_ACT_Q8_1) {
            sz[0] = (size_t)(m * k);
            sz[1] = sz[2] = sz[3] = (size_t)(m * (k / 32)) * 4;
        } else if (f == LLK_ACT_Q8_K) {
            sz[0] = (size_t)(m * k);
            sz[1] = (size_t)(m * (k / 256)) * 4;
            sz[2] = (size_t)(m * (k / 16)) * 2;
        } else {
            sz[0] = (size_t)(m * ldf) * 4;
        }
        for (int i = 0; i < 4; i++) {
            off[f][i] = total;
            total += align64(sz[i]);
        }
    }

    pthread_mutex_lock(&call_mu);
    if (total > scratch_cap) {
        free(scratch);
        scratch_cap = 0;
        if (posix_memalign(&scratch, 64, total + total / 4)) {
            scratch = NULL;
            pthread_mutex_unlock(&call_mu);
            return LLK_E_NOMEM;
        }
        scratch_cap = total + total / 4;
    }
    char *s = (char *)scratch;
    for (int f = 0; f < 5; f++) {
        if (!j.need[f]) continue;
        llk_act *a = &j.act[f];
        a->k = k;
        a->m = m;
        if (f == LLK_ACT_Q8_1 || f == LLK_ACT_Q8_K) {
            a->qs = (const int8_t *)(s + off[f][0]);
            a->d = (const float *)(s + off[f][1]);
            if (f == LLK_ACT_Q8_1) {
                a->s = (const float *)(s + off[f][2]);
                a->isum = (const int32_t *)(s + off[f][3]);
            } else {
                a->bsums = (const int16_t *)(s + off[f][2]);
            }
        } else {
            a->f = (const float *)(s + off[f][0]);
            a->ldf = ldf;
        }
    }
    j.x = x;
    j.m = m;
    j.k = k;
    j.ldx = ldx;
    j.parts = parts;
    j.n_parts = n_parts;
    j.y = y;
    j.ldy = ldy;
    j.t = table_of(isa_locked());
    const int64_t rmax = j.t->rmax, tiles = (m + rmax - 1) / rmax;
    j.mt = (m + tiles - 1) / tiles;

    const int nth = llk_pool_threads();
    const int parallel = nth > 1 && bytes * m >= PAR_MIN_WORK;
    const int64_t groups = j.gbase[n_parts];
    if (parallel) {
        const int slots = nth < LLK_MAX_SLOTS ? nth : LLK_MAX_SLOTS;
        j.nchunks = (int)(groups < slots ? groups : slots);
        /* the activations are quantized as the job's first chunks: shared by the threads when
         * large, else one chunk while the others start their weight streams */
        j.qchunks = m > 1 && m * k >= PAR_QUANT_MIN ? (int)(m < 2 * nth ? m : 2 * nth) : 1;
    } else {
        j.nchunks = 1;
    }
    /* a multi-tile call (prefill) claims whole L1 blocks: a smaller piece would pass every
     * activation tile over fewer weight rows (pp512 measured the same within the VM's noise) */
    int64_t unit = j.m > j.mt ? INT64_MAX : 1;
    for (int p = 0; p < n_parts && unit > 1; p++) {
        const int64_t u = l1_block_rows(&j, p) / LLK_NR;
        unit = u < unit ? u : unit;
    }
    int64_t bounds[LLK_MAX_SLOTS + 1];
    split_groups(&j, j.nchunks, bounds);
    llk_ranges_init(&j.ranges, bounds, j.nchunks, (uint32_t)unit);
    if (!j.qchunks) quantize_rows(&j, 0, m);
    llk_run_chunks(chunk_fn, &j, j.qchunks + j.nchunks);
    pthread_mutex_unlock(&call_mu);
    return LLK_OK;
}

/* ---- test hooks ---- */

int llk_quantize_q8_1(const float *x, int64_t k, int8_t *qs, float *d, float *s, int32_t *isum) {
    if (k <= 0 || k % 32) return LLK_E_SHAPE;
    pthread_mutex_lock(&call_mu);
    table_of(isa_locked())->quant_q8_1(x, k, qs, d, s, isum, 1);
    pthread_mutex_unlock(&call_mu);
    return LLK_OK;
}

int llk_quantize_q8_K(const float *x, int64_t k, int8_t *qs, float *d, int16_t *bsums) {
    if (k <= 0 || k % 256) return LLK_E_SHAPE;
    pthread_mutex_lock(&call_mu);
    table_of(isa_locked())->quant_q8_K(x, k, qs, d, bsums, 1);
    pthread_mutex_unlock(&call_mu);
    return LLK_OK;
}

#if defined(_WIN32)
/* setuptools exports PyInit_<name> from an extension on Windows; this library is loaded with
 * ctypes and never imported. */
__declspec(dllexport) void *PyInit__llk(void) { return 0; }
#endif
