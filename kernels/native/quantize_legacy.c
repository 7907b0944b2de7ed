/* quantize_legacy.c: the 32-value weight quantizers Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 without an
 * importance matrix: ggml's quantize_row_*_ref (and llmkit.quant.quantize's torch reference)
 * written as scalar C, one block at a time; llk_quantize (quantize_k.c) splits the blocks over the
 * thread pool.
 *
 * The fp32 operations are the reference's, in its order (the library is built with
 * -ffp-contract=off, no -ffast-math): the scale is a correctly rounded division of the block's
 * extreme by the level count, id = d ? 1 / d : 0, codes are x * id (or (x - min) * id) plus the
 * reference's offset truncated toward zero and clamped with MIN, Q8_0 codes are roundf (half away
 * from zero). d (and the minimum, for Q4_1 / Q5_1) are stored as fp16, rounded to nearest even.
 * Q5's fifth bits go to a little-endian u32: bit j of it is bit 4 of code j.
 */
#include <float.h>

#include "llk_internal.h"

#define QK 32

static inline void put16(uint8_t *p, float f) {
    const uint16_t h = llk_fp32_to_fp16(f);
    memcpy(p, &h, 2);
}

static inline void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

/* the value of largest magnitude, first occurrence (ggml: amax = max = 0, `amax < |v|`) */
static inline float signed_absmax(const float *x) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < QK; j++) {
        const float v = x[j];
        if (amax < fabsf(v)) {
            amax = fabsf(v);
            max = v;
        }
    }
    return max;
}

static inline void min_max(const float *x, float *mn, float *mx) {
    float min = FLT_MAX, max = -FLT_MAX;
    for (int j = 0; j < QK; j++) {
        const float v = x[j];
        if (v < min) min = v;
        if (v > max) max = v;
    }
    *mn = min;
    *mx = max;
}

/* MIN(hi, (int8_t)(v)), v already offset: trunc toward zero, then the upper clamp */
static inline int code(float v, int hi) {
    const int q = (int8_t)(int)v;
    return q < hi ? q : hi;
}

void llk_qblock_q8_0(const float *x, const float *qw, uint8_t *y) {
    (void)qw;
    float amax = 0.0f;
    for (int j = 0; j < QK; j++) {
        const float v = fabsf(x[j]);
        amax = amax > v ? amax : v;
    }
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    put16(y, d);
    for (int j = 0; j < QK; j++) y[2 + j] = (uint8_t)(int8_t)llk_roundf_i(x[j] * id);
}

void llk_qblock_q4_0(const float *x, const float *qw, uint8_t *y) {
    (void)qw;
    const float d = signed_absmax(x) / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    put16(y, d);
    for (int j = 0; j < QK / 2; j++) {
        const int q0 = code(x[j] * id + 8.5f, 15), q1 = code(x[QK / 2 + j] * id + 8.5f, 15);
        y[2 + j] = (uint8_t)(q0 | (q1 << 4));
    }
}

void llk_qblock_q4_1(const float *x, const float *qw, uint8_t *y) {
    (void)qw;
    float min, max;
    min_max(x, &min, &max);
    const float d = (max - min) / 15.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    put16(y, d);
    put16(y + 2, min);
    for (int j = 0; j < QK / 2; j++) {
        const int q0 = code((x[j] - min) * id + 0.5f, 15);
        const int q1 = code((x[QK / 2 + j] - min) * id + 0.5f, 15);
        y[4 + j] = (uint8_t)(q0 | (q1 << 4));
    }
}

/* codes 0..31 -> qh (u32 at qh_at) and the low nibbles at qh_at + 4 */
static inline void pack5(const int *q, uint8_t *y) {
    uint32_t qh = 0;
    for (int j = 0; j < QK / 2; j++) {
        y[4 + j] = (uint8_t)((q[j] & 0xF) | ((q[QK / 2 + j] & 0xF) << 4));
        qh |= (uint32_t)((q[j] & 0x10) >> 4) << j;
        qh |= (uint32_t)((q[QK / 2 + j] & 0x10) >> 4) << (j + QK / 2);
    }
    put32(y, qh);
}

void llk_qblock_q5_0(const float *x, const float *qw, uint8_t *y) {
    (void)qw;
    const float d = signed_absmax(x) / -16.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    int q[QK];
    put16(y, d);
    for (int j = 0; j < QK; j++) q[j] = code(x[j] * id + 16.5f, 31);
    pack5(q, y + 2);
}

void llk_qblock_q5_1(const float *x, const float *qw, uint8_t *y) {
    (void)qw;
    float min, max;
    min_max(x, &min, &max);
    const float d = (max - min) / 31.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    int q[QK];
    put16(y, d);
    put16(y + 2, min);
    /* ggml: (uint8_t)(v + 0.5f), no clamp (v <= 31 by construction) */
    for (int j = 0; j < QK; j++) q[j] = (uint8_t)(int)((x[j] - min) * id + 0.5f);
    pack5(q, y + 4);
}
