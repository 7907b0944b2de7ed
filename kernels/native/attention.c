/* attention.c: attention over the KV cache as stored (llmkit's layout), and the cache write.
 *
 * Cache layout (core/cache/store.py): per layer K [Hkv, slots, Dk] and V [Hkv, slots, Dv] of a
 * float type (f32, f16, bf16) or ggml blocks (q8_0: 34 bytes per 32 values, q4_0: 18), quantized
 * on write with ggml's reference formulas. Slot s holds position kpos[s] (-1 = empty); a sliding
 * ring reuses slots, so visibility comes from positions, never from slot order.
 *
 * out[t, h * Dv : (h + 1) * Dv] = softmax_s(scale * q[t, h] . K[g, s]) V[g, s] over the slots s
 * visible to query t: kpos[s] >= 0, kpos[s] <= qpos[t] and qpos[t] - kpos[s] < window (when
 * window > 0), or, with an explicit mask [T, S] (draft trees), mask[t, s] != 0. g = h / (Hq / Hkv).
 *
 * Rounding as llama.cpp's attention (flash attention off), so that its numbers are ours: the query
 * is rounded to the K cache's dot-product format (f16 or bf16 for those caches, q8_0 blocks for
 * q8_0 / q4_0 K, whose dots are then exact in int32 per block), the softmax sum runs in double,
 * and the probabilities are rounded to the V cache's float type (f16 / bf16) before they weight V.
 *
 * Batch invariance: a query row's result depends only on its own q, the visible slots and their
 * slot order: invisible slots are skipped, not added as zeros, and every sum runs in slot order
 * with fixed 8-lane partial sums. So a row computes the same bits alone or inside a verify batch,
 * with any thread count. The work is split by (query row, kv head): each output by one thread.
 *
 * Per call: bytes = T * Hkv * S_visible * (Dk + Dv) * element size (K and V read in place, a row
 * of K decoded once for the G = Hq / Hkv heads that share it), flops ~ 2 * T * Hq * S * (Dk + Dv).
 */
#include <math.h>
#include <stdlib.h>

#include "llk_internal.h"

#define LANES 8

/* One K or V row, decoded to fp32. */
static void load_row(const uint8_t *p, int32_t type, int64_t n, float *out) {
    switch (type) {
    case LLK_F32:
        memcpy(out, p, (size_t)n * 4);
        return;
    case LLK_F16:
        for (int64_t i = 0; i < n; i++) out[i] = llk_fp16_to_fp32(llk_rd16(p + 2 * i));
        return;
    case LLK_BF16:
        for (int64_t i = 0; i < n; i++) out[i] = llk_bits_f32((uint32_t)llk_rd16(p + 2 * i) << 16);
        return;
    case LLK_Q8_0:
        for (int64_t b = 0; b < n / 32; b++, p += 34) {
            const float d = llk_fp16_to_fp32(llk_rd16(p));
            for (int i = 0; i < 32; i++) out[b * 32 + i] = (float)(int8_t)p[2 + i] * d;
        }
        return;
    case LLK_Q4_0:
        for (int64_t b = 0; b < n / 32; b++, p += 18) {
            const float d = llk_fp16_to_fp32(llk_rd16(p));
            for (int i = 0; i < 16; i++) {
                out[b * 32 + i] = (float)((p[2 + i] & 0xF) - 8) * d;
                out[b * 32 + 16 + i] = (float)((p[2 + i] >> 4) - 8) * d;
            }
        }
        return;
    }
}

/* The query in K's dot format: floats rounded to K's type, or q8_0 blocks (codes + fp16 d). */
typedef struct {
    float f[1024];
    int8_t q[1024];
    float d[32];
} qrow_t;

static inline void prep_query(const float *x, int64_t n, int32_t kt, qrow_t *r) {
    if (kt == LLK_Q8_0 || kt == LLK_Q4_0) {
        for (int64_t b = 0; b < n / 32; b++) {
            float amax = 0.0f;
            for (int i = 0; i < 32; i++) amax = fabsf(x[b * 32 + i]) > amax ? fabsf(x[b * 32 + i]) : amax;
            const float d = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
            r->d[b] = llk_round_f16(d);
            for (int i = 0; i < 32; i++) r->q[b * 32 + i] = (int8_t)llk_rint_i(x[b * 32 + i] * id);
        }
        return;
    }
    for (int64_t i = 0; i < n; i++)
        r->f[i] = kt == LLK_F16 ? llk_round_f16(x[i]) : kt == LLK_BF16 ? llk_round_bf16(x[i]) : x[i];
}

/* q . K row for a quantized K: per 32-block an exact int32 dot, then isum * (d_k * d_q). */
static inline float dot_qk_blocks(const qrow_t *r, const uint8_t *p, int32_t kt, int64_t n) {
    float acc = 0.0f;
    const int bb = kt == LLK_Q8_0 ? 34 : 18;
    for (int64_t b = 0; b < n / 32; b++, p += bb) {
        const float dk = llk_fp16_to_fp32(llk_rd16(p));
        const int8_t *q = r->q + b * 32;
        int32_t isum = 0;
        if (kt == LLK_Q8_0)
            for (int i = 0; i < 32; i++) isum += (int32_t)(int8_t)p[2 + i] * q[i];
        else
            for (int i = 0; i < 16; i++)
                isum += ((p[2 + i] & 0xF) - 8) * q[i] + ((p[2 + i] >> 4) - 8) * q[16 + i];
        acc += (float)isum * (dk * r->d[b]);
    }
    return acc;
}

/* a . b in a fixed order: LANES partial sums over i mod LANES, then a fixed pairwise tree. */
static inline float dot_fixed(const float *a, const float *b, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l];
    for (int l = 0; i < n; i++, l++) acc[l] += a[i] * b[i];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

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

static _Thread_local float *tl_buf;
static _Thread_local size_t tl_cap;

static float *scratch(size_t n) {
    if (n > tl_cap) {
        free(tl_buf);
        tl_buf = malloc(n * sizeof(float));
        tl_cap = tl_buf ? n : 0;
    }
    return tl_buf;
}

/* Compiled once per ISA level: the C code fixes every operation's order (and the build turns FP
 * contraction off), so the clones compute the same bits; only their speed differs. */
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

/* G * S scores, S slot indices, one decoded row, G output accumulators, G prepared queries. */
static size_t scratch_floats(int64_t G, int64_t S, int64_t dk, int64_t dv) {
    return (size_t)(G * S + S + (dk > dv ? dk : dv) + G * dv) + (size_t)G * (sizeof(qrow_t) / 4 + 1);
}

__attribute__((target_clones("default", "avx2", "avx512f"))) static void attn_chunk(void *argp,
                                                                                     int c) {
    const attn_job *J = argp;
    const int64_t t = c / J->hkv, g = c % J->hkv, G = J->hq / J->hkv;
    const int64_t S = J->S, dk = J->dk, dv = J->dv;
    /* scratch: G * S scores, the visible slot list, one decoded K/V row, G accumulators */
    float *buf = scratch(scratch_floats(G, S, dk, dv));
    if (!buf) return; /* the caller checked the allocation on its own thread first */
    float *scores = buf, *row = buf + G * S + S, *acc = row + (dk > dv ? dk : dv);
    int32_t *vidx = (int32_t *)(void *)(buf + G * S); /* S float-sized cells hold slot indices */
    int64_t n = 0;
    const int64_t qp = J->qpos[t];
    for (int64_t s = 0; s < S; s++) {
        int ok;
        if (J->mask) ok = J->mask[t * S + s] != 0;
        else {
            const int64_t kp = J->kpos[s];
            ok = kp >= 0 && kp <= qp && (J->window <= 0 || qp - kp < J->window);
        }
        if (ok) vidx[n++] = (int32_t)(J->slot_idx ? J->slot_idx[s] : s);
    }
    if (J->kpos && !J->slot_idx) position_order(vidx, n, J->kpos);
    const float *qrow = J->q + t * J->ldq + g * G * dk;
    float *orow = J->out + t * J->ldo + g * G * dv;
    if (n == 0) { /* no visible key: zeros (what the Triton kernel writes) */
        memset(orow, 0, (size_t)(G * dv) * sizeof(float));
        return;
    }
    qrow_t *qr = (qrow_t *)(void *)(acc + G * dv); /* G prepared queries */
    for (int64_t h = 0; h < G; h++) prep_query(qrow + h * dk, dk, J->kt, qr + h);
    const int kq = J->kt == LLK_Q8_0 || J->kt == LLK_Q4_0;
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *kp = J->k + g * J->k_hs + vidx[i] * J->k_ss;
        if (kq) {
            for (int64_t h = 0; h < G; h++) scores[h * n + i] = dot_qk_blocks(qr + h, kp, J->kt, dk) * J->scale;
        } else {
            load_row(kp, J->kt, dk, row);
            for (int64_t h = 0; h < G; h++) scores[h * n + i] = dot_fixed(qr[h].f, row, dk) * J->scale;
        }
    }
    for (int64_t h = 0; h < G; h++) {
        float *sc = scores + h * n, m = sc[0];
        double sum = 0.0;
        for (int64_t i = 1; i < n; i++) m = sc[i] > m ? sc[i] : m;
        for (int64_t i = 0; i < n; i++) {
            sc[i] = expf(sc[i] - m);
            sum += sc[i];
        }
        const float inv = (float)(1.0 / sum);
        for (int64_t i = 0; i < n; i++) {
            const float pr = sc[i] * inv;
            sc[i] = J->vt == LLK_F16 ? llk_round_f16(pr) : J->vt == LLK_BF16 ? llk_round_bf16(pr) : pr;
        }
    }
    memset(acc, 0, (size_t)(G * dv) * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        load_row(J->v + g * J->v_hs + vidx[i] * J->v_ss, J->vt, dv, row);
        for (int64_t h = 0; h < G; h++) {
            const float p = scores[h * n + i];
            float *a = acc + h * dv;
            for (int64_t j = 0; j < dv; j++) a[j] += p * row[j];
        }
    }
    memcpy(orow, acc, (size_t)(G * dv) * sizeof(float));
}

static int kv_type_ok(int32_t type, int64_t d) {
    switch (type) {
    case LLK_F32: case LLK_F16: case LLK_BF16: return 1;
    case LLK_Q8_0: case LLK_Q4_0: return d % 32 == 0;
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
    if (dk > 1024 || !scratch(scratch_floats(hq / hkv, S, dk, dv))) return dk > 1024 ? LLK_E_SHAPE : LLK_E_NOMEM;
    attn_job J = {q,  T,  hq, hkv,         dk,           dv,           ldq,           S,
                  window, ldo, k, v, kt, vt, k_head_stride, k_slot_stride, v_head_stride,
                  v_slot_stride, kpos, qpos, slot_idx, mask, scale, out};
    llk_run_locked(attn_chunk, &J, (int)(T * hkv));
    return LLK_OK;
}
