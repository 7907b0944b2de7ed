/* attention.c: attention over the KV cache as stored (llmkit's layout).
 *
 * Cache layout (core/cache/store.py): per layer K [Hkv, slots, Dk] and V [Hkv, slots, Dv] of a
 * float type (f32, f16, bf16) or ggml blocks (q8_0: 34 bytes per 32 values, q4_0: 18), quantized
 * on write with ggml's reference formulas. Slot s holds position kpos[s] (-1 = empty); a sliding
 * ring reuses slots, so visibility comes from positions, never from slot order.
 *
 * out[t, h * Dv : (h + 1) * Dv] = softmax_s(scale * q[t, h] . K[g, s]) V[g, s] over the slots s
 * visible to query t: kpos[s] >= 0, kpos[s] <= qpos[t] and qpos[t] - kpos[s] < window (when
 * window > 0), or, with an explicit mask [T, S] (draft trees, paged pools), mask[t, s] != 0.
 * g = h / (Hq / Hkv).
 *
 * Rounding as llama.cpp's attention (flash attention off), so that its numbers are ours: the query
 * is rounded to the K cache's dot-product format (f16 or bf16 for those caches, q8_0 blocks for
 * q8_0 / q4_0 K, whose dots are then exact in int32 per block), the softmax sum runs in double,
 * and the probabilities are rounded to the V cache's float type (f16 / bf16) before they weight V.
 *
 * Batch invariance: every query vector ("lane": a row and a head) is computed by a fixed sequence
 * of operations: its dot with each slot fma after fma over d, its softmax over the slots its row
 * sees in position order, its output fma after fma over those slots (probability 0 for the slots
 * of the tile its row does not see: fma(0, v, acc) == acc). So a row computes the same bits alone
 * or inside a verify batch, with any thread count, on any instruction set (vector fmas are fmaf
 * lane by lane). Work is split only between independent outputs.
 *
 * Two schedules, the same arithmetic: prefill cuts the rows into tiles of TILE and runs each
 * (tile, kv head) unit in one chunk; decode (few units) runs three parallel phases over the units
 * (dots split by slots, softmax by lanes, the weighted sum by output columns).
 *
 * Per call: bytes = Hkv * S_visible * (Dk + Dv) * element size per tile (K and V read in place,
 * each row decoded once for the tile's lanes), flops ~ 2 * T * Hq * S_visible * (Dk + Dv).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "llk_internal.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "x86_vexp.h"
#endif

#define TILE 8 /* query rows that share each decoded K/V row */
#define KB 8   /* K rows whose dots run side by side: independent fma chains */
#define SB 32  /* K rows of a slot-vectorized block (few lanes, AVX-512): two vectors of 16 */
/* floats of the thread's K-row area: KB decoded rows, or SB rows and their transpose */
#define K_AREA(dk) (2 * SB * (dk))
#define VB 64  /* V rows decoded at a time for the probability-weighted sum */
/* slots x (Dk + Dv) from which decode splits a unit's work. Zen 4, 2 threads, bench_kv_attention:
 * Gemma 3's one KV head at 256 slots 0.033 ms per step split, 0.049 on one thread; SmolLM2's
 * three heads at 600-2048 slots the same within noise; below, three hand-offs cost more. */
#define PHASE_MIN_WORK (1 << 16)

/* The query in K's dot format: floats rounded to K's type, or q8_0 blocks (codes + fp16 d). */
typedef struct {
    float f[1024];
    int8_t q[1024];
    float d[32];
} qrow_t;

typedef struct {
    const float *q;
    int64_t T, hq, hkv, dk, dv, ldq, S, window, ldo;
    const uint8_t *k, *v;
    int32_t kt, vt;
    int64_t k_hs, k_ss, v_hs, v_ss; /* head / slot strides in bytes */
    const int64_t *kpos, *qpos, *slot_idx;
    const uint8_t *mask;
    float scale;
    float *out;
} attn_job;

/* One (tile of rows, kv head) unit and its buffers: scores / probabilities [n][L16] (slot-major),
 * the visible-slot list, which row sees which slot [TILE][S], the prepared queries [L], their
 * transpose [dk][L16], the outputs [L8][dv16]. */
typedef struct {
    const attn_job *J;
    int64_t t0, R, g, L, W, L16, L8, dv16, n;
    float *scores, *qt, *acc;
    int32_t *list;
    uint8_t *vis;
    qrow_t *qr;
} unit_t;

static size_t unit_bytes(int64_t G, int64_t S, int64_t dk, int64_t dv) {
    const int64_t L16 = (TILE * G + 15) / 16 * 16, dv16 = (dv + 15) / 16 * 16;
    return (size_t)(S * L16 + dk * L16 + L16 * dv16) * 4 + (size_t)S * 4 + (size_t)(TILE * S) +
           (size_t)(TILE * G) * sizeof(qrow_t) + 8 * 64;
}

static void unit_carve(unit_t *u, char *p, int64_t G, int64_t S, int64_t dk, int64_t dv) {
    const int64_t L16 = (TILE * G + 15) / 16 * 16, dv16 = (dv + 15) / 16 * 16;
#define CARVE(field, type, count)                                                                \
    u->field = (type *)(void *)p;                                                                \
    p += ((size_t)(count) * sizeof(type) + 63) / 64 * 64;
    CARVE(scores, float, S * L16)
    CARVE(qt, float, dk * L16)
    CARVE(acc, float, L16 * dv16)
    CARVE(list, int32_t, S)
    CARVE(vis, uint8_t, TILE * S)
    CARVE(qr, qrow_t, TILE * G)
#undef CARVE
}

/* Thread-local buffers: a unit's (prefill chunks) and decoded K / V rows (every phase). */
static _Thread_local char *tl_unit, *tl_rows;
static _Thread_local size_t tl_unit_cap, tl_rows_cap;

static void *grow(char **buf, size_t *cap, size_t n) {
    if (n > *cap) {
        free(*buf);
        *buf = malloc(n);
        *cap = *buf ? n : 0;
    }
    return *buf;
}

/* decoded K rows (K_AREA floats), then V rows [VB][dv16] (or the softmax's lane bits [S]) */
static size_t rows_bytes(int64_t dk, int64_t dv, int64_t S) {
    const size_t v = (size_t)(VB * ((dv + 15) / 16 * 16)) * 4;
    return (size_t)K_AREA(dk) * 4 + (v > (size_t)S ? v : (size_t)S);
}

static inline int visible(const attn_job *J, int64_t t, int64_t i) {
    if (J->mask) return J->mask[t * J->S + i] != 0;
    const int64_t kp = J->kpos[i], qp = J->qpos[t];
    return kp >= 0 && kp <= qp && (J->window <= 0 || qp - kp < J->window);
}

/* Visit the visible slots in position order, whatever slot holds which position: a sliding ring
 * stores positions rotated (slot = pos mod capacity), so its slots, read in slot order, are an
 * increasing run rotated once; rotate it back (any other order is sorted). Then a row's sums run
 * in the same order as in a cache laid out by position (the paged pool's logical order). */
static void position_order(int32_t *v, int64_t n, const int64_t *kpos) {
    int64_t lo = 0;
    for (int64_t i = 1; i < n; i++)
        if (kpos[v[i]] < kpos[v[lo]]) lo = i;
    if (lo) { /* rotate left by lo: three reversals */
        for (int64_t a = 0, b = lo - 1; a < b; a++, b--) { int32_t t = v[a]; v[a] = v[b]; v[b] = t; }
        for (int64_t a = lo, b = n - 1; a < b; a++, b--) { int32_t t = v[a]; v[a] = v[b]; v[b] = t; }
        for (int64_t a = 0, b = n - 1; a < b; a++, b--) { int32_t t = v[a]; v[a] = v[b]; v[b] = t; }
    }
    for (int64_t i = 1; i < n; i++) { /* insertion sort: a no-op on the rotated run */
        const int32_t x = v[i];
        int64_t j = i;
        for (; j > 0 && kpos[v[j - 1]] > kpos[x]; j--) v[j] = v[j - 1];
        v[j] = x;
    }
}

/* The unit of chunk c: rows [t0, t0 + R), kv head g, all G heads (L = R * G lanes). */
static void unit_init(unit_t *u, const attn_job *J, int64_t c) {
    const int64_t G = J->hq / J->hkv, tile = c / J->hkv;
    u->J = J;
    u->g = c % J->hkv;
    u->t0 = tile * TILE;
    u->R = J->T - u->t0 < TILE ? J->T - u->t0 : TILE;
    u->L = u->R * G;
    u->W = u->L > 8 ? 16 : 8;
    u->L16 = (u->L + u->W - 1) / u->W * u->W;
    u->L8 = (u->L + 7) / 8 * 8;
    u->dv16 = (J->dv + 15) / 16 * 16;
}

/* The visible-slot list of the unit, in position order, and which row sees which slot. A list
 * already in position order (a cache that has not wrapped) skips the reordering, and a one-row
 * unit sees every listed slot: the same list and flags, without the passes that would find so. */
static void unit_slots(unit_t *u) {
    const attn_job *J = u->J;
    int64_t n = 0, prev = INT64_MIN;
    int ordered = 1;
    for (int64_t i = 0; i < J->S; i++)
        for (int64_t r = 0; r < u->R; r++)
            if (visible(J, u->t0 + r, i)) {
                u->list[n++] = (int32_t)i;
                if (J->kpos) {
                    ordered &= J->kpos[i] >= prev;
                    prev = J->kpos[i];
                }
                break;
            }
    if (J->kpos && !ordered) position_order(u->list, n, J->kpos);
    if (u->R == 1)
        memset(u->vis, 1, (size_t)n);
    else
        for (int64_t r = 0; r < u->R; r++)
            for (int64_t j = 0; j < n; j++) u->vis[r * J->S + j] = (uint8_t)visible(J, u->t0 + r, u->list[j]);
    u->n = n;
}

#define ATTN(name) name##_scalar
#define ATTN_ISA 0
#include "attention_body.inc"
#undef ATTN
#undef ATTN_ISA

#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define ATTN(name) name##_avx2
#define ATTN_ISA 1
#include "attention_body.inc"
#undef ATTN
#undef ATTN_ISA
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
#endif
#define ATTN(name) name##_avx512
#define ATTN_ISA 2
#include "attention_body.inc"
#undef ATTN
#undef ATTN_ISA
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

typedef struct {
    void (*qk)(unit_t *, int64_t, int64_t);
    void (*softmax)(unit_t *, int64_t, int64_t);
    void (*pv)(unit_t *, int64_t, int64_t);
} kernels_t;

/* The copies for the library's ISA path (llk_get_isa): the same bits, at that path's speed. */
static kernels_t kernels_for_isa(void) {
#if defined(__x86_64__) || defined(_M_X64)
    switch (llk_get_isa()) {
    case LLK_ISA_AVX512_VNNI: return (kernels_t){qk_avx512, softmax_avx512, pv_avx512};
    case LLK_ISA_AVX2: return (kernels_t){qk_avx2, softmax_avx2, pv_avx2};
    default: break;
    }
#endif
    return (kernels_t){qk_scalar, softmax_scalar, pv_scalar};
}

static void unit_prepare(unit_t *u, void (*prep)(unit_t *)) {
    unit_slots(u);
    prep(u);
}

static void unit_store(const unit_t *u) {
    const attn_job *J = u->J;
    const int64_t G = J->hq / J->hkv;
    for (int64_t l = 0; l < u->L; l++) /* no visible key: zeros (what the Triton kernel writes) */
        memcpy(J->out + (u->t0 + l / G) * J->ldo + (u->g * G + l % G) * J->dv,
               u->acc + l * u->dv16, (size_t)J->dv * sizeof(float));
}

/* ---- prefill schedule: one chunk per unit ---- */

typedef struct {
    const attn_job *J;
    kernels_t K;
    void (*prep)(unit_t *);
} tile_job;

static void tile_chunk(void *argp, int c) {
    const tile_job *tj = argp;
    const attn_job *J = tj->J;
    const int64_t G = J->hq / J->hkv;
    unit_t u;
    unit_init(&u, J, c);
    char *p = grow(&tl_unit, &tl_unit_cap, unit_bytes(G, J->S, J->dk, J->dv));
    if (!p || !grow(&tl_rows, &tl_rows_cap, rows_bytes(J->dk, J->dv, J->S))) return; /* checked */
    unit_carve(&u, p, G, J->S, J->dk, J->dv);
    unit_prepare(&u, tj->prep);
    tj->K.qk(&u, 0, u.n);
    tj->K.softmax(&u, 0, u.L8);
    tj->K.pv(&u, 0, u.dv16);
    unit_store(&u);
}

/* ---- decode schedule: three parallel phases over a few units ---- */

typedef struct {
    unit_t *units;
    int64_t n_units, parts; /* chunks per unit in this phase */
    int phase;              /* 0 dots, 1 softmax, 2 weighted sum */
    kernels_t K;
    const attn_job *J;
} phase_job;

static void range_of(int64_t total, int64_t parts, int64_t i, int64_t align, int64_t *a, int64_t *b) {
    const int64_t blocks = (total + align - 1) / align;
    *a = blocks * i / parts * align;
    *b = blocks * (i + 1) / parts * align;
    if (*a > total) *a = total;
    if (*b > total) *b = total;
}

static void phase_chunk(void *argp, int c) {
    const phase_job *pj = argp;
    unit_t *u = &pj->units[c / pj->parts];
    const int64_t i = c % pj->parts;
    if (!grow(&tl_rows, &tl_rows_cap, rows_bytes(pj->J->dk, pj->J->dv, pj->J->S))) return; /* checked */
    int64_t a, b;
    if (pj->phase == 0) {
        range_of(u->n, pj->parts, i, KB, &a, &b);
        pj->K.qk(u, a, b);
    } else if (pj->phase == 1) {
        range_of(u->L8, pj->parts, i, 8, &a, &b);
        pj->K.softmax(u, a, b);
    } else {
        range_of(u->dv16, pj->parts, i, pj->J->vt == LLK_Q8_0 || pj->J->vt == LLK_Q4_0 ? 32 : 16,
                 &a, &b);
        pj->K.pv(u, a, b);
    }
}

static int run_phases(const attn_job *J, kernels_t K, void (*prep)(unit_t *), int64_t n_units) {
    const int64_t G = J->hq / J->hkv, ub = unit_bytes(G, J->S, J->dk, J->dv);
    char *mem = malloc((size_t)n_units * ub);
    unit_t *units = malloc((size_t)n_units * sizeof(unit_t));
    if (!mem || !units || !grow(&tl_rows, &tl_rows_cap, rows_bytes(J->dk, J->dv, J->S))) {
        free(mem);
        free(units);
        return LLK_E_NOMEM;
    }
    for (int64_t c = 0; c < n_units; c++) {
        unit_t *u = &units[c];
        unit_init(u, J, c);
        unit_carve(u, mem + c * ub, G, J->S, J->dk, J->dv);
        if (u->g == 0) {
            unit_slots(u);
        } else { /* the other kv heads of a tile see the same slots: copy, not rescan */
            const unit_t *first = &units[c - u->g];
            u->n = first->n;
            memcpy(u->list, first->list, (size_t)u->n * sizeof(int32_t));
            for (int64_t r = 0; r < u->R; r++)
                memcpy(u->vis + r * J->S, first->vis + r * J->S, (size_t)u->n);
        }
        prep(u);
    }
    const int64_t nth = llk_pool_threads();
    phase_job pj = {units, n_units, 1, 0, K, J};
    for (int phase = 0; phase < 3; phase++) {
        pj.phase = phase;
        pj.parts = (nth + n_units - 1) / n_units;
        if (phase == 1) pj.parts = 1; /* a few lanes: not worth a split */
        llk_run_locked(phase_chunk, &pj, (int)(n_units * pj.parts));
    }
    for (int64_t c = 0; c < n_units; c++) unit_store(&units[c]);
    free(mem);
    free(units);
    return LLK_OK;
}

static void (*prep_for_isa(void))(unit_t *) {
#if defined(__x86_64__) || defined(_M_X64)
    switch (llk_get_isa()) {
    case LLK_ISA_AVX512_VNNI: return prep_avx512;
    case LLK_ISA_AVX2: return prep_avx2;
    default: break;
    }
#endif
    return prep_scalar;
}

static int kv_type_ok(int32_t type, int64_t d) {
    switch (type) {
    case LLK_F32: case LLK_F16: case LLK_BF16: return d <= 1024;
    case LLK_Q8_0: case LLK_Q4_0: return d % 32 == 0 && d <= 1024;
    default: return 0;
    }
}

int llk_attention(const float *q, int64_t T, int64_t hq, int64_t dk, int64_t ldq, const void *k,
                  int32_t kt, int64_t k_head_stride, int64_t k_slot_stride, const void *v,
                  int32_t vt, int64_t v_head_stride, int64_t v_slot_stride, int64_t dv,
                  int64_t hkv, int64_t S, const int64_t *slot_idx, const int64_t *kpos,
                  const int64_t *qpos, int64_t window, const uint8_t *mask, float scale,
                  float *out, int64_t ldo) {
    if (T <= 0 || hkv <= 0 || hq % hkv || S < 0 || !kv_type_ok(kt, dk) || !kv_type_ok(vt, dv))
        return LLK_E_SHAPE;
    const attn_job J = {q,      T,   hq, hkv, dk, dv, ldq, S, window, ldo, k, v, kt, vt,
                        k_head_stride, k_slot_stride, v_head_stride, v_slot_stride, kpos, qpos,
                        slot_idx, mask, scale, out};
    const int64_t units = (T + TILE - 1) / TILE * hkv;
    const kernels_t K = kernels_for_isa();
    /* phases cost three hand-offs: worth it only when a few units hold much work */
    if (units < 2 * llk_pool_threads() && S * (dk + dv) >= PHASE_MIN_WORK)
        return run_phases(&J, K, prep_for_isa(), units);
    const int64_t G = hq / hkv;
    if (!grow(&tl_unit, &tl_unit_cap, unit_bytes(G, S, dk, dv)) ||
        !grow(&tl_rows, &tl_rows_cap, rows_bytes(dk, dv, S)))
        return LLK_E_NOMEM;
    tile_job tj = {&J, K, prep_for_isa()};
    llk_run_locked(tile_chunk, &tj, (int)units);
    return LLK_OK;
}

int llk_attend(const float *q, int64_t T, int64_t hq, int64_t dk, int64_t ldq, const float *k_new,
               int64_t ldk, const float *v_new, int64_t ldv, const int64_t *slots, void *k,
               int32_t kt, int64_t k_head_stride, int64_t k_slot_stride, void *v, int32_t vt,
               int64_t v_head_stride, int64_t v_slot_stride, int64_t dv, int64_t hkv, int64_t S,
               const int64_t *kpos, const int64_t *qpos, int64_t window, const uint8_t *mask,
               float scale, float *out) {
    if (ldq < hq * dk || ldk < hkv * dk || ldv < hkv * dv) return LLK_E_SHAPE;
    int rc = llk_kv_store(k_new, T, hkv, dk, ldk, slots, k, kt, k_head_stride, k_slot_stride);
    if (!rc) rc = llk_kv_store(v_new, T, hkv, dv, ldv, slots, v, vt, v_head_stride, v_slot_stride);
    if (!rc)
        rc = llk_attention(q, T, hq, dk, ldq, k, kt, k_head_stride, k_slot_stride, v, vt,
                           v_head_stride, v_slot_stride, dv, hkv, S, NULL, kpos, qpos, window, mask,
                           scale, out, hq * dv);
    return rc;
}
