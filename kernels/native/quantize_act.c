/* quantize_act.c: the portable activation quantizers (the reference the SIMD ones must equal).
 *
 * Formats are described in llk_internal.h. They follow ggml's reference quantizers for the dot
 * product activation types, so a row quantized here holds the numbers llama.cpp multiplies:
 *   q8_0/q8_1: d = amax / 127, id = 1 / d (0 if d == 0), q = roundf(x * id); d and s = d * sum(q)
 *              rounded to fp16; isum = sum(q).
 *   q8_K:      max = first value of largest |x|, iscale = -127 / max, q = min(127, rint(iscale*x)),
 *              d = 1 / iscale (fp32), bsums[j] = sum of q[16j .. 16j + 15]; all zero if amax == 0.
 * Every step is a single IEEE operation, so a SIMD version computing the same steps lane-wise is
 * bit-identical.
 */
#include "llk_internal.h"

void llk_quant_q8_1_scalar(const float *x, int64_t k, int8_t *qs, float *d, float *s,
                           int32_t *isum, int64_t bstride) {
    for (int64_t b = 0; b < k / 32; b++) {
        const int64_t o = b * bstride;
        const float *xb = x + 32 * b;
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) {
            const float a = xb[i] < 0 ? -xb[i] : xb[i];
            amax = a > amax ? a : amax;
        }
        const float db = amax / 127.0f;
        const float id = db != 0.0f ? 1.0f / db : 0.0f;
        int sum = 0;
        for (int i = 0; i < 32; i++) {
            const int q = llk_roundf_i(xb[i] * id);
            qs[32 * o + i] = (int8_t)q;
            sum += q;
        }
        d[o] = llk_round_f16(db);
        s[o] = llk_round_f16((float)sum * db);
        isum[o] = sum;
    }
}

void llk_quant_q8_K_scalar(const float *x, int64_t k, int8_t *qs, float *d, int16_t *bsums,
                           int64_t bstride) {
    for (int64_t b = 0; b < k / 256; b++) {
        const int64_t o = b * bstride;
        const float *xb = x + 256 * b;
        int8_t *q = qs + 256 * o;
        float amax = 0.0f, max = 0.0f;
        for (int i = 0; i < 256; i++) {
            const float a = xb[i] < 0 ? -xb[i] : xb[i];
            if (a > amax) {
                amax = a;
                max = xb[i];
            }
        }
        if (amax == 0.0f) {
            d[o] = 0.0f;
            memset(q, 0, 256);
            memset(bsums + 16 * o, 0, 32);
            continue;
        }
        const float iscale = -127.0f / max;
        for (int i = 0; i < 256; i++) {
            const int v = llk_rint_i(iscale * xb[i]);
            q[i] = (int8_t)(v < 127 ? v : 127);
        }
        for (int j = 0; j < 16; j++) {
            int sum = 0;
            for (int i = 0; i < 16; i++) sum += q[16 * j + i];
            bsums[16 * o + j] = (int16_t)sum;
        }
        d[o] = 1.0f / iscale;
    }
}

void llk_round_f16_scalar(const float *x, int64_t k, float *out) {
    for (int64_t i = 0; i < k; i++) out[i] = llk_round_f16(x[i]);
}

void llk_round_bf16_scalar(const float *x, int64_t k, float *out) {
    for (int64_t i = 0; i < k; i++) out[i] = llk_round_bf16(x[i]);
}
