/* rowops.c: the small per-row ops of a decoder layer, in native code so that a decode step is a
 * few native calls per layer instead of tens of PyTorch ops (each costs more to dispatch than to
 * compute at decode size).
 *
 *   rms_norm   y = x / sqrt(mean(x^2) + eps) * w (sum of squares in double, as ggml)
 *   rope       in place on [T, H, D] rows: optional per-head RMSNorm first, NORM (adjacent pairs)
 *              or NEOX (halves) rotation of the first n_rot dims from cos/sin tables, then a scale
 *   glu        y = act(gate) * up, act silu or tanh-GELU (ggml's formulas)
 *   kv_store   rows into cache slots, converted to f32 / f16 / bf16 or quantized to q8_0 / q4_0
 *              with ggml's reference quantizers (byte-identical to quant/quantize.py)
 *
 * Every op works row by row with a fixed order of operations: a row's result never depends on
 * the other rows of the call (batch invariance). Bytes per call: the rows read and written; flops
 * a few per element.
 */
#include <math.h>

#include "llk_internal.h"

static void norm_row(const float *x, const float *w, float eps, int64_t n, float *y) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * (double)x[i];
    const float scale = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    if (w)
        for (int64_t i = 0; i < n; i++) y[i] = x[i] * scale * w[i];
    else
        for (int64_t i = 0; i < n; i++) y[i] = x[i] * scale;
}

int llk_rms_norm(const float *x, int64_t m, int64_t n, int64_t ldx, const float *w, float eps,
                      float *y, int64_t ldy) {
    for (int64_t r = 0; r < m; r++) norm_row(x + r * ldx, w, eps, n, y + r * ldy);
    return LLK_OK;
}

int llk_rope(float *x, int64_t T, int64_t H, int64_t D, int64_t ldx, int64_t n_rot,
                  int32_t neox, const float *cos_t, const float *sin_t, const float *norm_w,
                  float eps, float scale) {
    if (n_rot > D || n_rot % 2) return LLK_E_SHAPE;
    const int64_t half = n_rot / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + t * half, *s = sin_t + t * half;
        for (int64_t h = 0; h < H; h++) {
            float *v = x + t * ldx + h * D;
            if (norm_w) norm_row(v, norm_w, eps, D, v);
            if (neox) {
                for (int64_t i = 0; i < half; i++) {
                    const float a = v[i], b = v[i + half];
                    v[i] = a * c[i] - b * s[i];
                    v[i + half] = b * c[i] + a * s[i];
                }
            } else {
                for (int64_t i = 0; i < half; i++) {
                    const float a = v[2 * i], b = v[2 * i + 1];
                    v[2 * i] = a * c[i] - b * s[i];
                    v[2 * i + 1] = a * s[i] + b * c[i];
                }
            }
            if (scale != 1.0f)
                for (int64_t i = 0; i < D; i++) v[i] *= scale;
        }
    }
    return LLK_OK;
}

int llk_glu(const float *gu, int64_t m, int64_t f, int64_t ldg, int32_t act, float *y,
                 int64_t ldy) {
    for (int64_t r = 0; r < m; r++) {
        const float *g = gu + r * ldg, *u = g + f;
        float *o = y + r * ldy;
        if (act == 0) { /* silu */
            for (int64_t i = 0; i < f; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        } else { /* gelu, tanh approximation */
            const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
            for (int64_t i = 0; i < f; i++) {
                const float v = g[i];
                o[i] = 0.5f * v * (1.0f + tanhf(c * v * (1.0f + 0.044715f * v * v))) * u[i];
            }
        }
    }
    return LLK_OK;
}

static void store_q8_0(const float *x, int64_t n, uint8_t *out) {
    for (int64_t b = 0; b < n / 32; b++, x += 32, out += 34) {
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        const uint16_t dh = llk_fp32_to_fp16(d);
        memcpy(out, &dh, 2);
        for (int i = 0; i < 32; i++) out[2 + i] = (uint8_t)(int8_t)llk_roundf_i(x[i] * id);
    }
}

static void store_q4_0(const float *x, int64_t n, uint8_t *out) {
    for (int64_t b = 0; b < n / 32; b++, x += 32, out += 18) {
        float amax = 0.0f, max = 0.0f;
        for (int i = 0; i < 32; i++)
            if (amax < fabsf(x[i])) {
                amax = fabsf(x[i]);
                max = x[i];
            }
        const float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        const uint16_t dh = llk_fp32_to_fp16(d);
        memcpy(out, &dh, 2);
        for (int i = 0; i < 16; i++) {
            int q0 = (int)(x[i] * id + 8.5f), q1 = (int)(x[16 + i] * id + 8.5f);
            q0 = q0 > 15 ? 15 : q0;
            q1 = q1 > 15 ? 15 : q1;
            out[2 + i] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

/* x [T, H, D] (row stride ldx floats, head stride D) -> cache[h * head_stride + slot[t] *
 * slot_stride] (bytes) in `type`. */
int llk_kv_store(const float *x, int64_t T, int64_t H, int64_t D, int64_t ldx,
                      const int64_t *slots, void *cache, int32_t type, int64_t head_stride,
                      int64_t slot_stride) {
    if ((type == LLK_Q8_0 || type == LLK_Q4_0) && D % 32) return LLK_E_SHAPE;
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++) {
            const float *v = x + t * ldx + h * D;
            uint8_t *p = (uint8_t *)cache + h * head_stride + slots[t] * slot_stride;
            switch (type) {
            case LLK_F32: memcpy(p, v, (size_t)D * 4); break;
            case LLK_F16:
                for (int64_t i = 0; i < D; i++) {
                    const uint16_t b = llk_fp32_to_fp16(v[i]);
                    memcpy(p + 2 * i, &b, 2);
                }
                break;
            case LLK_BF16:
                for (int64_t i = 0; i < D; i++) {
                    const uint16_t b = (uint16_t)(llk_f32_bits(llk_round_bf16(v[i])) >> 16);
                    memcpy(p + 2 * i, &b, 2);
                }
                break;
            case LLK_Q8_0: store_q8_0(v, D, p); break;
            case LLK_Q4_0: store_q4_0(v, D, p); break;
            default: return LLK_E_TYPE;
            }
        }
    return LLK_OK;
}
