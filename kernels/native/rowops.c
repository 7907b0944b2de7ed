/* rowops.c: the small per-row ops of a decoder layer, in native code so that a decode step is a
 * few native calls per layer instead of tens of PyTorch ops (each costs more to dispatch than to
 * compute at decode size).
 *
 *   rms_norm   y = x / sqrt(mean(x^2) + eps) * w (sum of squares in double, as ggml)
 *   rope       in place on [T, H, D] rows: optional per-head RMSNorm first, NORM (adjacent pairs)
 *              or NEOX (halves) rotation of the first n_rot dims from cos/sin tables, then a scale
 *   glu        y = act(gate) * up, act silu or tanh-GELU (exact, or llama.cpp's fp16 table)
 *   kv_store   rows into cache slots, converted to f32 / f16 / bf16 or quantized to q8_0 / q4_0
 *              with ggml's reference quantizers (byte-identical to quant/quantize.py)
 *
 * Every op works row by row with a fixed order of operations: a row's result never depends on
 * the other rows of the call (batch invariance). Bytes per call: the rows read and written; flops
 * a few per element.
 */
#include <math.h>
#include <pthread.h>

#include "llk_internal.h"
#include "scalar_decode.h"
#if defined(__x86_64__) || defined(_M_X64)
#include "x86_vexp.h"
#endif

static void norm_row(const float *x, const float *w, float eps, int64_t n, float *y) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * (double)x[i];
    const float scale = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    if (w)
        for (int64_t i = 0; i < n; i++) y[i] = x[i] * scale * w[i];
    else
        for (int64_t i = 0; i < n; i++) y[i] = x[i] * scale;
}

/* Rows [r0, r1) of a row op, run by the pool when a call holds enough elements (prefill):
 * every row is computed by one thread in its fixed order, so the split never changes a bit. */
typedef struct {
    void (*row)(const void *job, int64_t r);
    const void *job;
    int64_t m, parts;
} rows_job;

static void rows_chunk(void *argp, int c) {
    const rows_job *rj = argp;
    const int64_t r0 = rj->m * c / rj->parts, r1 = rj->m * (c + 1) / rj->parts;
    for (int64_t r = r0; r < r1; r++) rj->row(rj->job, r);
}

#define ROWS_PARALLEL_MIN 32768 /* elements per call from which the rows are shared */

static void for_rows(void (*row)(const void *, int64_t), const void *job, int64_t m, int64_t n) {
    const int64_t nth = llk_pool_threads();
    if (m < 2 || nth < 2 || m * n < ROWS_PARALLEL_MIN) {
        for (int64_t r = 0; r < m; r++) row(job, r);
        return;
    }
    rows_job rj = {row, job, m, m < 2 * nth ? m : 2 * nth};
    llk_run_locked(rows_chunk, &rj, (int)rj.parts);
}

typedef struct {
    const float *x, *w;
    float *y;
    int64_t n, ldx, ldy;
    float eps;
} norm_job;

static void norm_one(const void *jp, int64_t r) {
    const norm_job *j = jp;
    norm_row(j->x + r * j->ldx, j->w, j->eps, j->n, j->y + r * j->ldy);
}

int llk_rms_norm(const float *x, int64_t m, int64_t n, int64_t ldx, const float *w, float eps,
                      float *y, int64_t ldy) {
    const norm_job j = {x, w, y, n, ldx, ldy, eps};
    for_rows(norm_one, &j, m, n);
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

/* ---- GLU ----
 * act 0, silu(g) = g / (1 + e^-g), computed as num / (1 + e) with e = e^-|g| (llk_expf_neg:
 * never overflows) and num = g (g >= 0) or g * e (g < 0).
 * act 1, tanh-GELU: 0.5 g (1 + tanh(sqrt(2/pi) g (1 + 0.044715 g^2))) with libm's tanhf.
 * act 2, tanh-GELU as llama.cpp's CPU backend computes it: the input rounded to fp16 indexes a
 * table of act 1's value rounded to fp16, for every fp16 input; inputs <= -10 give 0, >= 10 give
 * the input. The AVX2 copy runs acts 0 and 2 8 lanes at a time with the same operations (same
 * bits); act 1 stays scalar. */
static uint16_t gelu_table[1 << 16];
static pthread_once_t gelu_once = PTHREAD_ONCE_INIT;

static inline float gelu_tanh(float v) {
    const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
    return 0.5f * v * (1.0f + tanhf(c * v * (1.0f + 0.044715f * v * v)));
}

static void gelu_init(void) {
    for (int i = 0; i < 1 << 16; i++) gelu_table[i] = llk_fp32_to_fp16(gelu_tanh(llk_fp16_to_fp32((uint16_t)i)));
}

static inline float gelu_fp16(float v) {
    if (v <= -10.0f) return 0.0f;
    if (v >= 10.0f) return v;
    return llk_fp16_to_fp32(gelu_table[llk_fp32_to_fp16(v)]);
}

static inline float silu_one(float g) {
    const float e = llk_expf_neg(-fabsf(g));
    return (g < 0.0f ? g * e : g) / (1.0f + e);
}

typedef struct {
    const float *gu;
    float *y;
    int64_t f, ldg, ldy;
    int32_t act, isa; /* the ISA read before the rows run (llk_get_isa takes the call lock) */
} glu_job;

static void glu_row_scalar(const glu_job *j, const float *g, const float *u, float *o, int64_t i0) {
    for (int64_t i = i0; i < j->f; i++) {
        const float a = j->act == 0 ? silu_one(g[i]) : j->act == 1 ? gelu_tanh(g[i]) : gelu_fp16(g[i]);
        o[i] = a * u[i];
    }
}

#if defined(__x86_64__) || defined(_M_X64)
__attribute__((target("avx2,fma,f16c"))) static void glu_row_avx2(const glu_job *j, const float *g,
                                                                  const float *u, float *o) {
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (; i + 8 <= j->f; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        __m256 a;
        if (j->act == 0) {
            const __m256 e = llk_exp8_neg(_mm256_or_ps(x, sign)); /* e^-|x| */
            const __m256 num = _mm256_blendv_ps(x, _mm256_mul_ps(x, e), _mm256_cmp_ps(x, zero, _CMP_LT_OQ));
            a = _mm256_div_ps(num, _mm256_add_ps(one, e));
        } else {
            uint16_t h[8];
            _mm_storeu_si128((__m128i *)(void *)h, _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            for (int k = 0; k < 8; k++) h[k] = gelu_table[h[k]];
            a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)h));
            a = _mm256_blendv_ps(a, zero, _mm256_cmp_ps(x, _mm256_set1_ps(-10.0f), _CMP_LE_OQ));
            a = _mm256_blendv_ps(a, x, _mm256_cmp_ps(x, _mm256_set1_ps(10.0f), _CMP_GE_OQ));
        }
        _mm256_storeu_ps(o + i, _mm256_mul_ps(a, _mm256_loadu_ps(u + i)));
    }
    glu_row_scalar(j, g, u, o, i);
}
#endif

static void glu_one(const void *jp, int64_t r) {
    const glu_job *j = jp;
    const float *g = j->gu + r * j->ldg, *u = g + j->f;
    float *o = j->y + r * j->ldy;
#if defined(__x86_64__) || defined(_M_X64)
    if (j->isa != LLK_ISA_SCALAR && j->act != 1) {
        glu_row_avx2(j, g, u, o);
        return;
    }
#endif
    glu_row_scalar(j, g, u, o, 0);
}

int llk_glu(const float *gu, int64_t m, int64_t f, int64_t ldg, int32_t act, float *y,
                 int64_t ldy) {
    if (act < 0 || act > 2) return LLK_E_SHAPE;
    if (act == 2) pthread_once(&gelu_once, gelu_init);
    const glu_job j = {gu, y, f, ldg, ldy, act, llk_get_isa()};
    for_rows(glu_one, &j, m, f);
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

/* ---- argmax: greedy sampling over a vocabulary row ----
 * The index of the first maximum (torch.argmax's choice), or of the first NaN when there is one
 * (torch ranks NaN above every number). Lanes keep their own first maximum (strict >), then the
 * smallest index among the lanes holding the overall maximum. Bytes: 4 n read once. */
static int64_t first_nan(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (x[i] != x[i]) return i;
    return -1;
}

static int64_t argmax_scalar(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

#if defined(__x86_64__) || defined(_M_X64)
__attribute__((target("avx512f"))) static int64_t argmax_avx512(const float *x, int64_t n, int *nan) {
    __m512 m = _mm512_loadu_ps(x);
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    __m512i cur = idx;
    __mmask16 unord = _mm512_cmp_ps_mask(m, m, _CMP_UNORD_Q);
    int64_t i = 16;
    for (; i + 16 <= n; i += 16) {
        cur = _mm512_add_epi32(cur, step);
        const __m512 v = _mm512_loadu_ps(x + i);
        unord |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        const __mmask16 gt = _mm512_cmp_ps_mask(v, m, _CMP_GT_OQ);
        m = _mm512_mask_mov_ps(m, gt, v);
        idx = _mm512_mask_mov_epi32(idx, gt, cur);
    }
    float mv[16];
    int32_t iv[16];
    _mm512_storeu_ps(mv, m);
    _mm512_storeu_si512(iv, idx);
    int64_t best = iv[0];
    for (int l = 1; l < 16; l++)
        if (mv[l] > x[best] || (mv[l] == x[best] && iv[l] < best)) best = iv[l];
    for (; i < n; i++) {
        if (x[i] != x[i]) unord = 1;
        if (x[i] > x[best]) best = i;
    }
    *nan = unord != 0;
    return best;
}
#endif

int64_t llk_argmax(const float *x, int64_t n) {
    if (n <= 0) return -1;
#if defined(__x86_64__) || defined(_M_X64)
    if (n >= 16 && n < ((int64_t)1 << 31) && llk_get_isa() == LLK_ISA_AVX512_VNNI) {
        int nan = 0;
        const int64_t best = argmax_avx512(x, n, &nan);
        return nan ? first_nan(x, n) : best;
    }
#endif
    const int64_t nan_at = first_nan(x, n);
    return nan_at >= 0 ? nan_at : argmax_scalar(x, n);
}

/* ---- argmax_prob: a greedy draft's token and its softmax probability ----
 * p = 1 / sum_i exp(x_i - x_best), the exponentials summed into 8 lanes by index mod 8 and the
 * lanes added in order, on every path (llk_exp8_neg is llk_expf_neg lane by lane): the same bits.
 * Bytes: 4 n read twice; ~20 flops per element. */
#if defined(__x86_64__) || defined(_M_X64)
__attribute__((target("avx2,fma"))) static void expsum_avx2(const float *x, int64_t n8, float mx,
                                                           float *lanes) {
    __m256 acc = _mm256_setzero_ps();
    const __m256 m = _mm256_set1_ps(mx);
    for (int64_t i = 0; i < n8; i += 8)
        acc = _mm256_add_ps(acc, llk_exp8_neg(_mm256_sub_ps(_mm256_loadu_ps(x + i), m)));
    _mm256_storeu_ps(lanes, acc);
}
#endif

int64_t llk_argmax_prob(const float *x, int64_t n, float *prob) {
    const int64_t best = llk_argmax(x, n);
    *prob = 0.0f;
    if (best < 0 || !(x[best] - x[best] == 0.0f)) return best; /* empty, or a NaN / inf maximum */
    const float mx = x[best];
    float lanes[8] = {0};
    int64_t i = 0;
#if defined(__x86_64__) || defined(_M_X64)
    if (llk_get_isa() == LLK_ISA_AVX2 || llk_get_isa() == LLK_ISA_AVX512_VNNI) {
        i = n / 8 * 8;
        expsum_avx2(x, i, mx, lanes);
    }
#endif
    for (; i < n; i++) lanes[i % 8] += llk_expf_neg(x[i] - mx);
    float sum = lanes[0];
    for (int l = 1; l < 8; l++) sum += lanes[l];
    *prob = 1.0f / sum;
    return best;
}

/* ---- all_finite: the logits check before sampling (1: no NaN or infinity in x[0, n)) ---- */
#if defined(__x86_64__) || defined(_M_X64)
__attribute__((target("avx512f"))) static int all_finite_avx512(const float *x, int64_t n) {
    const __m512 zero = _mm512_setzero_ps();
    __mmask16 bad = 0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) { /* v - v is 0 for a finite v, NaN for an infinity or NaN */
        const __m512 v = _mm512_loadu_ps(x + i);
        bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), zero, _CMP_NEQ_UQ);
    }
    for (; i < n; i++) bad |= !(x[i] - x[i] == 0.0f);
    return bad == 0;
}
#endif

int llk_all_finite(const float *x, int64_t n) {
#if defined(__x86_64__) || defined(_M_X64)
    if (llk_get_isa() == LLK_ISA_AVX512_VNNI) return all_finite_avx512(x, n);
#endif
    int bad = 0;
    for (int64_t i = 0; i < n; i++) bad |= !(x[i] - x[i] == 0.0f);
    return !bad;
}

/* ---- embed_rows: the embedding lookup, decoded straight from the GGUF rows ----
 * out[t] = row ids[t] of w (n_rows rows of k values, row_bytes apart), each value computed as
 * quant/dequant.py does it (32-value types: q * d (+ m); 256-value types: q * (d * sc) - dmin *
 * mn; float types: the value), then times `scale` when it is not 0 (Gemma's sqrt(n_embd)): the
 * same fp32 operations in the same order, so the result equals the torch reference bit for bit.
 * One call instead of a dozen torch ops per lookup (cold after each streamed weight matrix). */
static void embed_row(int32_t type, const uint8_t *w, int64_t k, float scale, float *y) {
    const int bs = llk_block_size(type), ts = llk_type_size(type);
    if (bs == 1) {
        for (int64_t i = 0; i < k; i++) y[i] = llk_wfloat(type, w, i);
    } else if (bs == 32) {
        int8_t q[32];
        float d, m;
        for (int64_t b = 0; b < k / 32; b++, w += ts, y += 32) {
            llk_decode32(type, w, q, &d, &m);
            const int has_min = type == LLK_Q4_1 || type == LLK_Q5_1;
            for (int i = 0; i < 32; i++) y[i] = has_min ? (float)q[i] * d + m : (float)q[i] * d;
        }
        y -= k;
    } else {
        int8_t q[256];
        int sc[16], mn[16];
        float d, dmin;
        const int has_min = type == LLK_Q2_K || type == LLK_Q4_K || type == LLK_Q5_K;
        for (int64_t b = 0; b < k / 256; b++, w += ts, y += 256) {
            llk_decode256(type, w, q, sc, mn, &d, &dmin);
            for (int j = 0; j < 16; j++) {
                const float dl = d * (float)sc[j], ml = dmin * (float)mn[j];
                for (int i = 16 * j; i < 16 * j + 16; i++)
                    y[i] = has_min ? (float)q[i] * dl - ml : (float)q[i] * dl;
            }
        }
        y -= k;
    }
    if (scale != 0.0f)
        for (int64_t i = 0; i < k; i++) y[i] *= scale;
}

int llk_embed_rows(int32_t type, const void *w, int64_t n_rows, int64_t row_bytes, int64_t k,
                   const int64_t *ids, int64_t t, float scale, float *y) {
    const int bs = llk_block_size(type);
    if (llk_type_index(type) < 0 || bs <= 0) return LLK_E_TYPE;
    if (k <= 0 || k % bs || row_bytes < k / bs * llk_type_size(type) || t < 0) return LLK_E_SHAPE;
    for (int64_t i = 0; i < t; i++)
        if (ids[i] < 0 || ids[i] >= n_rows) return LLK_E_SHAPE;
    for (int64_t i = 0; i < t; i++)
        embed_row(type, (const uint8_t *)w + ids[i] * row_bytes, k, scale, y + i * k);
    return LLK_OK;
}
