/* dot_scalar.c: the portable path (any CPU), also the reference the SIMD paths are tested against.
 *
 * Per output element, in block order: isum = the exact int32 dot product of a block's integers,
 *   32-value types:  acc += (d_w * d_x) * isum   (+ m_w * s_x for Q4_1 / Q5_1)
 *   256-value types: acc += (d_w * d_x) * sum_j sc_j isum_j   (- (dmin_w * d_x) * sum_j mn_j bsum_j)
 *   float types:     8 partial sums (element i into sum i % 8), added pairwise at the end
 * in fp32 without fused multiply-add (built with -ffp-contract=off). Each weight block is decoded
 * once per call and used for all the activation rows of the call.
 */
#include "scalar_decode.h"

#define RMAX LLK_MAX_RM

static void row32(int32_t type, int ts, const uint8_t *w, const llk_act *a, int64_t m0, int rm,
                  float *y, int64_t ldy) {
    const int64_t nb = a->k / 32;
    const int has_min = type == LLK_Q4_1 || type == LLK_Q5_1;
    float acc[RMAX] = {0};
    int8_t q[32];
    for (int64_t b = 0; b < nb; b++) {
        float d, m;
        llk_decode32(type, w + b * ts, q, &d, &m);
        for (int r = 0; r < rm; r++) {
            const int64_t xb = b * a->m + m0 + r; /* block-major */
            const int8_t *x = a->qs + 32 * xb;
            int isum = 0;
            for (int i = 0; i < 32; i++) isum += q[i] * x[i];
            acc[r] += (d * a->d[xb]) * (float)isum;
            if (has_min) acc[r] += m * a->s[xb];
        }
    }
    for (int r = 0; r < rm; r++) y[(m0 + r) * ldy] = acc[r];
}

static void row256(int32_t type, int ts, const uint8_t *w, const llk_act *a, int64_t m0, int rm,
                   float *y, int64_t ldy) {
    const int64_t nsb = a->k / 256;
    const int has_min = type == LLK_Q2_K || type == LLK_Q4_K || type == LLK_Q5_K;
    float acc[RMAX] = {0};
    int8_t q[256];
    int sc[16], mn[16];
    for (int64_t b = 0; b < nsb; b++) {
        float d, dmin;
        llk_decode256(type, w + b * ts, q, sc, mn, &d, &dmin);
        for (int r = 0; r < rm; r++) {
            const int64_t xb = b * a->m + m0 + r; /* block-major */
            const int8_t *x = a->qs + 256 * xb;
            const int16_t *bs = a->bsums + 16 * xb;
            int isum = 0, imin = 0;
            for (int j = 0; j < 16; j++) {
                int s = 0;
                for (int i = 0; i < 16; i++) s += q[16 * j + i] * x[16 * j + i];
                isum += sc[j] * s;
                imin += mn[j] * bs[j];
            }
            const float dx = a->d[xb];
            acc[r] += (d * dx) * (float)isum;
            if (has_min) acc[r] -= (dmin * dx) * (float)imin;
        }
    }
    for (int r = 0; r < rm; r++) y[(m0 + r) * ldy] = acc[r];
}

static void rowf(int32_t type, const uint8_t *w, const llk_act *a, int64_t m0, int rm, float *y,
                 int64_t ldy) {
    const int64_t k = a->k;
    float acc[RMAX][8] = {{0}};
    float wf[8];
    for (int64_t i0 = 0; i0 < k; i0 += 8) {
        const int n = k - i0 < 8 ? (int)(k - i0) : 8;
        for (int l = 0; l < n; l++) wf[l] = llk_wfloat(type, w, i0 + l);
        for (int r = 0; r < rm; r++) {
            const float *x = a->f + (m0 + r) * a->ldf + i0;
            for (int l = 0; l < n; l++) acc[r][l] += wf[l] * x[l];
        }
    }
    for (int r = 0; r < rm; r++) {
        const float *s = acc[r];
        y[(m0 + r) * ldy] = ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
    }
}

/* A group of nr weight rows: each row on its own (the scalar path has no cross-row layout). */
#define GROUP(NAME, CALL)                                                                        \
    static void NAME(const uint8_t *w, int64_t st, int nr, const llk_act *a, int64_t m0, int rm, \
                     float *y, int64_t ldy) {                                                    \
        for (int j = 0; j < nr; j++) CALL;                                                       \
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

const llk_isa_table llk_table_scalar = {
    "scalar",
    RMAX,
    {row_f32, row_f16, row_bf16, row_q4_0, row_q4_1, row_q5_0, row_q5_1, row_q8_0, row_iq4_nl,
     row_q2_k, row_q3_k, row_q4_k, row_q5_k, row_q6_k, row_iq4_xs},
    llk_quant_q8_1_scalar,
    llk_quant_q8_K_scalar,
    llk_round_f16_scalar,
    llk_round_bf16_scalar,
};
