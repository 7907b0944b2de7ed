/* dot_neon.c: the aarch64 NEON + dotprod path.
 *
 * Kept simple so that it is correct by construction: weight blocks are decoded with the portable
 * decoders (scalar_decode.h, shared with the scalar path) into small signed integers once per
 * call, and only the dot products are vectorized, with sdot (s8 x s8 -> 4 int32 lanes). The
 * activation quantizers are the portable ones. Per output element the arithmetic is fixed:
 *   32-value types: int32x4 lanes of the block's 32 products, acc = fma(lanes, d_w * d_x, acc)
 *                   (+ m_w * s_x into lane 1), output = vaddvq(acc)
 *   K-types:        S = sum_j sc_j * sdot lanes of 16-value sub-block j, acc = fma(S, d * d_x);
 *                   acc lane 0 -= (dmin * d_x) * sum_j mn_j bsum_j; output = vaddvq(acc)
 *   float types:    4-lane chunks into two alternating fma accumulators.
 * Not run on arm64 hardware yet: checked with selftest.c under qemu-user (-cpu max: this path,
 * close to scalar, batch- and thread-invariant bit for bit; -cpu cortex-a53: falls back to
 * scalar), built by aarch64 GCC 12 and clang 14.
 */
#if defined(__aarch64__)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("dotprod"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("arch=armv8.2-a+dotprod")
#endif

#include <arm_neon.h>

#include "scalar_decode.h"

#if defined(__clang__) && !defined(__ARM_FEATURE_DOTPROD)
/* Older clang's arm_neon.h declares vdotq_s32 only when the whole file targets dotprod. */
static inline int32x4_t llk_sdot(int32x4_t acc, int8x16_t a, int8x16_t b) {
    __asm__("sdot %0.4s, %1.16b, %2.16b" : "+w"(acc) : "w"(a), "w"(b));
    return acc;
}
#else
#define llk_sdot vdotq_s32
#endif

#define RMAX LLK_MAX_RM

static void row32(int32_t type, int ts, const uint8_t *w, const llk_act *a, int64_t m0, int rm,
                  float *y, int64_t ldy) {
    const int64_t nb = a->k / 32;
    const int has_min = type == LLK_Q4_1 || type == LLK_Q5_1;
    float32x4_t acc[RMAX];
    int8_t q[32];
    for (int r = 0; r < rm; r++) acc[r] = vdupq_n_f32(0.0f);
    for (int64_t b = 0; b < nb; b++) {
        float d, m;
        llk_decode32(type, w + b * ts, q, &d, &m);
        const int8x16_t q0 = vld1q_s8(q), q1 = vld1q_s8(q + 16);
        const float32x4_t mv = vsetq_lane_f32(m, vdupq_n_f32(0.0f), 1);
        for (int r = 0; r < rm; r++) {
            const int64_t xb = b * a->m + m0 + r; /* block-major */
            const int8_t *x = a->qs + 32 * xb;
            int32x4_t l = llk_sdot(vdupq_n_s32(0), q0, vld1q_s8(x));
            l = llk_sdot(l, q1, vld1q_s8(x + 16));
            acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(l), vdupq_n_f32(d * a->d[xb]));
            if (has_min) acc[r] = vfmaq_f32(acc[r], mv, vdupq_n_f32(a->s[xb]));
        }
    }
    for (int r = 0; r < rm; r++) y[(m0 + r) * ldy] = vaddvq_f32(acc[r]);
}

static void row256(int32_t type, int ts, const uint8_t *w, const llk_act *a, int64_t m0, int rm,
                   float *y, int64_t ldy) {
    const int64_t nsb = a->k / 256;
    const int has_min = type == LLK_Q2_K || type == LLK_Q4_K || type == LLK_Q5_K;
    float32x4_t acc[RMAX];
    int8_t q[256];
    int sc[16], mn[16];
    for (int r = 0; r < rm; r++) acc[r] = vdupq_n_f32(0.0f);
    for (int64_t b = 0; b < nsb; b++) {
        float d, dmin;
        llk_decode256(type, w + b * ts, q, sc, mn, &d, &dmin);
        for (int r = 0; r < rm; r++) {
            const int64_t xb = b * a->m + m0 + r; /* block-major */
            const int8_t *x = a->qs + 256 * xb;
            const int16_t *bs = a->bsums + 16 * xb;
            int32x4_t s = vdupq_n_s32(0);
            int imin = 0;
            for (int j = 0; j < 16; j++) {
                const int32x4_t l = llk_sdot(vdupq_n_s32(0), vld1q_s8(q + 16 * j), vld1q_s8(x + 16 * j));
                s = vmlaq_n_s32(s, l, sc[j]);
                imin += mn[j] * bs[j];
            }
            const float dx = a->d[xb];
            acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(s), vdupq_n_f32(d * dx));
            if (has_min) {
                const float32x4_t mv = vsetq_lane_f32((float)imin, vdupq_n_f32(0.0f), 0);
                acc[r] = vfmsq_f32(acc[r], mv, vdupq_n_f32(dmin * dx));
            }
        }
    }
    for (int r = 0; r < rm; r++) y[(m0 + r) * ldy] = vaddvq_f32(acc[r]);
}

static inline float32x4_t n_loadw(int32_t type, const uint8_t *p) {
    if (type == LLK_F32) return vld1q_f32((const float *)p);
    const uint16x4_t h = vld1_u16((const uint16_t *)p);
    if (type == LLK_F16) return vcvt_f32_f16(vreinterpret_f16_u16(h));
    return vreinterpretq_f32_u32(vshll_n_u16(h, 16)); /* BF16 */
}

static void rowf(int32_t type, const uint8_t *w, const llk_act *a, int64_t m0, int rm, float *y,
                 int64_t ldy) {
    const int64_t k = a->k, nc = (k + 3) / 4;
    const int es = type == LLK_F32 ? 4 : 2;
    float32x4_t acc[2][RMAX];
    for (int r = 0; r < rm; r++) acc[0][r] = acc[1][r] = vdupq_n_f32(0.0f);
    for (int64_t c = 0; c < nc; c++) {
        float32x4_t wc;
        if (4 * c + 4 <= k) {
            wc = n_loadw(type, w + 4 * c * es);
        } else { /* zero-padded tail; activation rows are padded with zeros */
            uint8_t buf[16] = {0};
            memcpy(buf, w + 4 * c * es, (size_t)((k - 4 * c) * es));
            wc = n_loadw(type, buf);
        }
        for (int r = 0; r < rm; r++)
            acc[c & 1][r] = vfmaq_f32(acc[c & 1][r], wc, vld1q_f32(a->f + (m0 + r) * a->ldf + 4 * c));
    }
    for (int r = 0; r < rm; r++) y[(m0 + r) * ldy] = vaddvq_f32(vaddq_f32(acc[0][r], acc[1][r]));
}

/* A group of nr weight rows: each row on its own. */
#define GROUP(NAME, CALL) \
    static void NAME(const uint8_t *w, int64_t st, int nr, const llk_act *a, int64_t m0, int rm, \
                     float *y, int64_t ldy) { \
        for (int j = 0; j < nr; j++) CALL; \
    }
#define ROW32(NAME, T, TS) GROUP(NAME, row32(T, TS, w + j * st, a, m0, rm, y + j, ldy))
#define ROW256(NAME, T, TS) GROUP(NAME, row256(T, TS, w + j * st, a, m0, rm, y + j, ldy))
#define ROWF(NAME, T) GROUP(NAME, rowf(T, w + j * st, a, m0, rm, y + j, ldy))

ROWF(row_f32, LLK_F32)
ROWF(row_f16, LLK_F16)
ROWF(row_bf16, LLK_BF16)
ROW32(row_q4_0, LLK_Q4_0, 18)
ROW32(row_q4_1, LLK_Q4_1, 20)
ROW32(row_q5_0, LLK_Q5_0, 22)
ROW32(row_q5_1, LLK_Q5_1, 24)
ROW32(row_q8_0, LLK_Q8_0, 34)
ROW32(row_iq4_nl, LLK_IQ4_NL, 18)
ROW256(row_q2_k, LLK_Q2_K, 84)
ROW256(row_q3_k, LLK_Q3_K, 110)
ROW256(row_q4_k, LLK_Q4_K, 144)
ROW256(row_q5_k, LLK_Q5_K, 176)
ROW256(row_q6_k, LLK_Q6_K, 210)
ROW256(row_iq4_xs, LLK_IQ4_XS, 136)

const llk_isa_table llk_table_neon = {
    "neon_dotprod",
    RMAX,
    {row_f32, row_f16, row_bf16, row_q4_0, row_q4_1, row_q5_0, row_q5_1, row_q8_0, row_iq4_nl,
     row_q2_k, row_q3_k, row_q4_k, row_q5_k, row_q6_k, row_iq4_xs},
    llk_quant_q8_1_scalar,
    llk_quant_q8_K_scalar,
    llk_round_f16_scalar,
    llk_round_bf16_scalar,
};

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif
