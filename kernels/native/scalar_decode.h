/* scalar_decode.h: portable decoders of one GGUF block to small signed integers and scales.
 *
 * Used by the scalar path and by the NEON path (which only vectorizes the integer dot products).
 * Block layouts are the ones documented in quant/dequant.py. Every weight of a block is
 *   32-value types: d * q (+ m for Q4_1/Q5_1)
 *   256-value types: d * sc[j] * q - dmin * mn[j], j = element / 16 (one scale per 16 values;
 *     types with 32-value sub-blocks repeat theirs twice)
 * with q a small signed integer.
 */
#ifndef LLK_SCALAR_DECODE_H
#define LLK_SCALAR_DECODE_H

#include "llk_internal.h"

/* q[i] = bit i of the little-endian u32 at p, as 0 or 16 */
static inline void llk_qh_bits(const uint8_t *p, int8_t *hb) {
    const uint32_t qh = llk_rd32(p);
    for (int i = 0; i < 32; i++) hb[i] = (int8_t)(((qh >> i) & 1) << 4);
}

static inline void llk_nibbles16(const uint8_t *qs, int8_t *q) {
    for (int i = 0; i < 16; i++) {
        q[i] = (int8_t)(qs[i] & 0x0F);
        q[i + 16] = (int8_t)(qs[i] >> 4);
    }
}

/* 32-value block -> q[32], d, m (m = 0 without a min). */
static inline void llk_decode32(int32_t type, const uint8_t *b, int8_t *q, float *d, float *m) {
    int8_t hb[32];
    *d = llk_fp16_to_fp32(llk_rd16(b));
    *m = 0.0f;
    switch (type) {
    case LLK_Q4_0:
        llk_nibbles16(b + 2, q);
        for (int i = 0; i < 32; i++) q[i] -= 8;
        break;
    case LLK_Q4_1:
        *m = llk_fp16_to_fp32(llk_rd16(b + 2));
        llk_nibbles16(b + 4, q);
        break;
    case LLK_Q5_0:
        llk_nibbles16(b + 6, q);
        llk_qh_bits(b + 2, hb);
        for (int i = 0; i < 32; i++) q[i] = (int8_t)((q[i] | hb[i]) - 16);
        break;
    case LLK_Q5_1:
        *m = llk_fp16_to_fp32(llk_rd16(b + 2));
        llk_nibbles16(b + 8, q);
        llk_qh_bits(b + 4, hb);
        for (int i = 0; i < 32; i++) q[i] |= hb[i];
        break;
    case LLK_Q8_0:
        memcpy(q, b + 2, 32);
        break;
    case LLK_IQ4_NL:
        llk_nibbles16(b + 2, q);
        for (int i = 0; i < 32; i++) q[i] = llk_iq4_values[(int)q[i]];
        break;
    default:
        break;
    }
}

/* Q4_K / Q5_K 12-byte scales -> 8 scales and 8 mins (6 bits each). */
static inline void llk_k_scale_min(const uint8_t *s, int *sc, int *mn) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

/* 256-value super-block -> q[256], sc[16], mn[16] (per 16 values), d, dmin. */
static inline void llk_decode256(int32_t type, const uint8_t *b, int8_t *q, int *sc, int *mn,
                                 float *d, float *dmin) {
    int s8[8], m8[8];
    *d = 0.0f;
    *dmin = 0.0f;
    for (int j = 0; j < 16; j++) mn[j] = 0;
    switch (type) {
    case LLK_Q2_K: /* scales[16] @0 | qs[64] @16 | d @80 | dmin @82 */
        *d = llk_fp16_to_fp32(llk_rd16(b + 80));
        *dmin = llk_fp16_to_fp32(llk_rd16(b + 82));
        for (int j = 0; j < 16; j++) {
            sc[j] = b[j] & 0x0F;
            mn[j] = b[j] >> 4;
        }
        for (int c = 0; c < 8; c++) /* chunk c of 32: bits 2(c%4) of qs[32(c/4) + l] */
            for (int l = 0; l < 32; l++)
                q[32 * c + l] = (int8_t)((b[16 + 32 * (c >> 2) + l] >> (2 * (c & 3))) & 3);
        break;
    case LLK_Q3_K: /* hmask[32] @0 | qs[64] @32 | scales[12] @96 | d @108 */
        *d = llk_fp16_to_fp32(llk_rd16(b + 108));
        for (int j = 0; j < 16; j++) {
            const int lo = j < 8 ? (b[96 + j] & 0x0F) : (b[96 + j - 8] >> 4);
            const int hi = (b[104 + (j & 3)] >> (2 * (j >> 2))) & 3;
            sc[j] = (lo | (hi << 4)) - 32;
        }
        for (int c = 0; c < 8; c++)
            for (int l = 0; l < 32; l++) {
                const int lo = (b[32 + 32 * (c >> 2) + l] >> (2 * (c & 3))) & 3;
                const int hbit = (b[l] >> c) & 1;
                q[32 * c + l] = (int8_t)(lo - (hbit ? 0 : 4));
            }
        break;
    case LLK_Q4_K: /* d @0 | dmin @2 | scales[12] @4 | qs[128] @16 */
    case LLK_Q5_K: /* ... | qh[32] @16 | qs[128] @48 */
        *d = llk_fp16_to_fp32(llk_rd16(b));
        *dmin = llk_fp16_to_fp32(llk_rd16(b + 2));
        llk_k_scale_min(b + 4, s8, m8);
        for (int j = 0; j < 16; j++) {
            sc[j] = s8[j >> 1];
            mn[j] = m8[j >> 1];
        }
        {
            const uint8_t *qs = b + (type == LLK_Q4_K ? 16 : 48);
            for (int c = 0; c < 8; c++)
                for (int l = 0; l < 32; l++) {
                    int v = (qs[32 * (c >> 1) + l] >> (4 * (c & 1))) & 0x0F;
                    if (type == LLK_Q5_K) v |= ((b[16 + l] >> c) & 1) << 4;
                    q[32 * c + l] = (int8_t)v;
                }
        }
        break;
    case LLK_Q6_K: /* ql[128] @0 | qh[64] @128 | scales:i8[16] @192 | d @208 */
        *d = llk_fp16_to_fp32(llk_rd16(b + 208));
        for (int j = 0; j < 16; j++) sc[j] = (int8_t)b[192 + j];
        for (int c = 0; c < 8; c++) {
            const int h = c >> 2, g = c & 3;
            for (int l = 0; l < 32; l++) {
                const int lo = (b[64 * h + 32 * (g & 1) + l] >> (4 * (g >> 1))) & 0x0F;
                const int hi = (b[128 + 32 * h + l] >> (2 * g)) & 3;
                q[32 * c + l] = (int8_t)((lo | (hi << 4)) - 32);
            }
        }
        break;
    case LLK_IQ4_XS: { /* d @0 | scales_h:u16 @2 | scales_l[4] @4 | qs[128] @8 */
        *d = llk_fp16_to_fp32(llk_rd16(b));
        const unsigned sh = llk_rd16(b + 2);
        const uint32_t sl = llk_rd32(b + 4);
        for (int j = 0; j < 8; j++) {
            const int ls = (int)(((sl >> (4 * j)) & 0x0F) | (((sh >> (2 * j)) & 3) << 4)) - 32;
            sc[2 * j] = sc[2 * j + 1] = ls;
            for (int l = 0; l < 16; l++) {
                q[32 * j + l] = llk_iq4_values[b[8 + 16 * j + l] & 0x0F];
                q[32 * j + l + 16] = llk_iq4_values[b[8 + 16 * j + l] >> 4];
            }
        }
        break;
    }
    default:
        break;
    }
}

/* Float weight element i of a row. */
static inline float llk_wfloat(int32_t type, const uint8_t *w, int64_t i) {
    switch (type) {
    case LLK_F32: return llk_bits_f32(llk_rd32(w + 4 * i));
    case LLK_F16: return llk_fp16_to_fp32(llk_rd16(w + 2 * i));
    default: return llk_bits_f32((uint32_t)llk_rd16(w + 2 * i) << 16); /* BF16 */
    }
}

#endif
