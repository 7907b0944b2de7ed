/* quantize_k.c: the K-quant (Q2_K .. Q6_K) and IQ4_NL / IQ4_XS weight quantizers, with and without
 * importance weights: llmkit.quant's torch reference (quant/kquants.py, quant/iquants.py) written
 * as scalar C, one super-block at a time, the blocks split over the thread pool. llk_quantize also
 * runs the legacy Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 blocks of quantize_legacy.c.
 *
 * Byte identity with the reference rests on doing the same fp32 operations in the same order:
 * every expression keeps the reference's association (no fused multiply-add: the library is
 * built with -ffp-contract=off and without -ffast-math), every sum runs element by element
 * starting from element 0 (the reference's `_seq`), C's division and sqrtf are correctly rounded
 * (the reference goes out of its way to get the same), and `rnd` is rint: round half to even,
 * keeping the sign of a zero, like torch.round. A value clamped after rounding maps NaN to the low
 * end, as the reference's `_nearest` does. Which thread runs a block never changes its bytes.
 */
#include <float.h>
#include <pthread.h>

#include "llk_internal.h"

#define QK 256
#define EPS 1e-15f /* GROUP_MAX_EPS */

/* rint(v): ties to even, sign of zero kept; values >= 2^23 are integers already. */
static inline float rnd(float v) {
    float a = fabsf(v);
    if (a < 8388608.0f) a = (a + 8388608.0f) - 8388608.0f;
    return copysignf(a, v);
}

/* clamp to [lo, hi], NaN -> lo */
static inline float clampn(float v, float lo, float hi) {
    return v != v ? lo : v < lo ? lo : v > hi ? hi : v;
}

/* the largest |x[i]| and the signed value where it first occurs */
static inline float first_absmax(int n, const float *x, float *amax) {
    float a = fabsf(x[0]), m = x[0];
    for (int i = 1; i < n; i++) {
        if (fabsf(x[i]) > a) {
            a = fabsf(x[i]);
            m = x[i];
        }
    }
    *amax = a;
    return m;
}

static inline float seq_sum(int n, const float *v) {
    float s = v[0];
    for (int i = 1; i < n; i++) s += v[i];
    return s;
}

static inline float pos_max(int n, const float *v) {
    float m = 0.0f;
    for (int i = 0; i < n; i++)
        if (v[i] > m) m = v[i];
    return m;
}

static inline void put16(uint8_t *p, float f) {
    const uint16_t h = llk_fp32_to_fp16(f);
    memcpy(p, &h, 2);
}

static inline int32_t to_i32(float v) { return (int32_t)v; }

#include "quantize_search.inc"

/* ---- super-blocks ---- */

static float sumx2_256(const float *x) {
    float s = x[0] * x[0];
    for (int i = 1; i < QK; i++) s += x[i] * x[i];
    return s;
}

/* qw[i] * sqrtf(sigma2 + x[i]^2) */
static void imatrix_weights(int n, const float *x, const float *qw, float sigma2, float *we) {
    for (int i = 0; i < n; i++) we[i] = qw[i] * sqrtf(sigma2 + x[i] * x[i]);
}

/* L [256] in 0..3 -> 64 bytes: byte 32 h + j holds L[128 h + j + 32 k] at bits 2 k */
static void pack_2bit(const float *L, uint8_t *q) {
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < 32; j++) {
            const float *l = L + 128 * h + j;
            q[32 * h + j] = (uint8_t)((int)l[0] | ((int)l[32] << 2) | ((int)l[64] << 4) |
                                      ((int)l[96] << 6));
        }
}

static void block_q2_k(const float *x, const float *qw, uint8_t *y) {
    float L[QK], sc[16], mn[16], w[QK];
    uint8_t *scales = y;
    if (!qw) {
        for (int i = 0; i < QK; i++) w[i] = fabsf(x[i]);
        make_qkx(16, 16, x, w, 3, -0.5f, 0.1f, 15, 1, 0, L, sc, mn);
        const float max_scale = pos_max(16, sc), max_min = pos_max(16, mn);
        const float is = max_scale > 0.0f ? 15.0f / max_scale : 0.0f;
        const float im = max_min > 0.0f ? 15.0f / max_min : 0.0f;
        for (int j = 0; j < 16; j++) {
            const int32_t ls = max_scale > 0.0f ? to_i32(rnd(is * sc[j])) & 255 : 0;
            const int32_t lm = max_min > 0.0f ? to_i32(rnd(im * mn[j])) & 255 : 0;
            scales[j] = (uint8_t)(ls | (lm << 4));
        }
        put16(y + 80, max_scale > 0.0f ? max_scale / 15.0f : 0.0f);
        put16(y + 82, max_min > 0.0f ? max_min / 15.0f : 0.0f);
    } else {
        float sw[16], Ls[16], Lm[16];
        imatrix_weights(QK, x, qw, sumx2_256(x) / 256.0f, w);
        for (int j = 0; j < 16; j++) sw[j] = seq_sum(16, w + 16 * j);
        make_qkx(16, 16, x, w, 3, -0.9f, 0.05f, 36, 0, 1, L, sc, mn);
        const float dm = make_qp(16, 15, sc, sw, Ls), mm = make_qp(16, 15, mn, sw, Lm);
        for (int j = 0; j < 16; j++) scales[j] = (uint8_t)(to_i32(Ls[j]) | (to_i32(Lm[j]) << 4));
        put16(y + 80, dm);
        put16(y + 82, mm);
    }
    const float d = llk_fp16_to_fp32(llk_rd16(y + 80)), dmin = llk_fp16_to_fp32(llk_rd16(y + 82));
    for (int j = 0; j < 16; j++) {
        const float dl = d * (float)(scales[j] & 0xF), ml = dmin * (float)(scales[j] >> 4);
        if (dl == 0.0f) continue;
        for (int i = 0; i < 16; i++) L[16 * j + i] = clampn(rnd((x[16 * j + i] + ml) / dl), 0, 3);
    }
    pack_2bit(L, y + 16);
}

static void block_q3_k(const float *x, const float *qw, uint8_t *y) {
    float L[QK], sc[16], l6[16], d;
    if (!qw) {
        for (int j = 0; j < 16; j++) sc[j] = make_q3(16, 4, x + 16 * j, L + 16 * j);
        float amax;
        const float max_scale = first_absmax(16, sc, &amax);
        if (max_scale != 0.0f) {
            const float is = -32.0f / max_scale;
            for (int j = 0; j < 16; j++) l6[j] = clampn(rnd(is * sc[j]), -32, 31) + 32.0f;
            d = 1.0f / is;
        } else {
            for (int j = 0; j < 16; j++) l6[j] = 0.0f;
            d = 0.0f;
        }
    } else {
        float w[QK], sw[16];
        imatrix_weights(QK, x, qw, 2.0f * sumx2_256(x) / 256.0f, w);
        for (int j = 0; j < 16; j++) {
            sw[j] = seq_sum(16, w + 16 * j);
            sc[j] = make_qx(16, 4, x + 16 * j, w + 16 * j, L + 16 * j);
        }
        d = make_qx(16, 32, sc, sw, l6);
    }
    uint8_t *hmask = y, *qs = y + 32, *scales = y + 96;
    int ls[16];
    for (int j = 0; j < 16; j++) ls[j] = (int)l6[j];
    for (int j = 0; j < 8; j++) scales[j] = (uint8_t)((ls[j] & 0xF) | ((ls[j + 8] & 0xF) << 4));
    for (int b = 0; b < 4; b++)
        scales[8 + b] = (uint8_t)((ls[b] >> 4) | ((ls[4 + b] >> 4) << 2) |
                                  ((ls[8 + b] >> 4) << 4) | ((ls[12 + b] >> 4) << 6));
    put16(y + 108, d);
    const float df = llk_fp16_to_fp32(llk_rd16(y + 108));
    for (int j = 0; j < 16; j++) {
        const float dl = df * (float)(ls[j] - 32);
        if (dl == 0.0f) continue;
        for (int i = 0; i < 16; i++) L[16 * j + i] = clampn(rnd(x[16 * j + i] / dl), -4, 3) + 4.0f;
    }
    memset(hmask, 0, 32);
    for (int i = 0; i < QK; i++) {
        const int l = (int)L[i];
        if (l > 3) hmask[i % 32] |= (uint8_t)(1 << (i / 32));
        L[i] = (float)(l & 3);
    }
    pack_2bit(L, qs);
}

/* Q4_K / Q5_K: d @0, dmin @2, scales[12] @4; L [256] in 0..nmax */
static void q45_k(const float *x, const float *qw, int nmax, uint8_t *y, float *L) {
    float sc[8], mn[8], w[QK];
    int ls[8], lm[8];
    if (!qw) {
        for (int j = 0; j < 8; j++) {
            const float *xs = x + 32 * j;
            float s = xs[0] * xs[0];
            for (int i = 1; i < 32; i++) s += xs[i] * xs[i];
            const float av_x = sqrtf(s / 32.0f);
            for (int i = 0; i < 32; i++) w[32 * j + i] = av_x + fabsf(xs[i]);
        }
        if (nmax == 15)
            make_qkx(8, 32, x, w, 15, -1.0f, 0.1f, 20, 0, 0, L, sc, mn);
        else
            make_qkx(8, 32, x, w, 31, -0.5f, 0.1f, 15, 0, 0, L, sc, mn);
        const float max_scale = pos_max(8, sc), max_min = pos_max(8, mn);
        const float inv_s = max_scale > 0.0f ? 63.0f / max_scale : 0.0f;
        const float inv_m = max_min > 0.0f ? 63.0f / max_min : 0.0f;
        for (int j = 0; j < 8; j++) {
            ls[j] = to_i32(rnd(inv_s * sc[j])) & 255;
            lm[j] = to_i32(rnd(inv_m * mn[j])) & 255;
        }
        put16(y, max_scale / 63.0f);
        put16(y + 2, max_min / 63.0f);
    } else {
        float sw[8], Ls[8], Lm[8];
        imatrix_weights(QK, x, qw, 2.0f * sumx2_256(x) / 256.0f, w);
        for (int j = 0; j < 8; j++) sw[j] = seq_sum(32, w + 32 * j);
        make_qkx(8, 32, x, w, nmax, -0.9f, 0.05f, 36, 0, 1, L, sc, mn);
        put16(y, make_qp(8, 63, sc, sw, Ls));
        put16(y + 2, make_qp(8, 63, mn, sw, Lm));
        for (int j = 0; j < 8; j++) {
            ls[j] = to_i32(Ls[j]) & 255;
            lm[j] = to_i32(Lm[j]) & 255;
        }
    }
    uint8_t *s = y + 4;
    for (int j = 0; j < 8; j++) {
        if (ls[j] > 63) ls[j] = 63;
        if (lm[j] > 63) lm[j] = 63;
    }
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)(ls[j] | ((ls[4 + j] >> 4) << 6));
        s[4 + j] = (uint8_t)(lm[j] | ((lm[4 + j] >> 4) << 6));
        s[8 + j] = (uint8_t)((ls[4 + j] & 0xF) | ((lm[4 + j] & 0xF) << 4));
    }
    const float d = llk_fp16_to_fp32(llk_rd16(y)), dmin = llk_fp16_to_fp32(llk_rd16(y + 2));
    for (int j = 0; j < 8; j++) {
        const float dl = d * (float)ls[j], ml = dmin * (float)lm[j];
        if (dl == 0.0f) continue;
        for (int i = 0; i < 32; i++)
            L[32 * j + i] = clampn(rnd((x[32 * j + i] + ml) / dl), 0, (float)nmax);
    }
}

static void block_q4_k(const float *x, const float *qw, uint8_t *y) {
    float L[QK];
    q45_k(x, qw, 15, y, L);
    for (int c = 0; c < 4; c++)
        for (int j = 0; j < 32; j++)
            y[16 + 32 * c + j] = (uint8_t)((int)L[64 * c + j] | ((int)L[64 * c + 32 + j] << 4));
}

static void block_q5_k(const float *x, const float *qw, uint8_t *y) {
    float L[QK];
    q45_k(x, qw, 31, y, L);
    uint8_t *qh = y + 16, *qs = y + 48;
    memset(qh, 0, 32);
    for (int c = 0; c < 4; c++)
        for (int j = 0; j < 32; j++) {
            const int a = (int)L[64 * c + j], b = (int)L[64 * c + 32 + j];
            qs[32 * c + j] = (uint8_t)((a & 0xF) | ((b & 0xF) << 4));
            qh[j] |= (uint8_t)(((a >> 4) << (2 * c)) | ((b >> 4) << (2 * c + 1)));
        }
}

static void block_q6_k(const float *x, const float *qw, uint8_t *y) {
    float L[QK], sc[16], amax;
    for (int j = 0; j < 16; j++)
        sc[j] = make_qx(16, 32, x + 16 * j, qw ? qw + 16 * j : NULL, L + 16 * j);
    const float max_scale = first_absmax(16, sc, &amax);
    if (amax < EPS) {
        memset(y, 0, 210); /* an all-zero super-block is stored as zeros */
        return;
    }
    const float is = -128.0f / max_scale;
    int8_t *s8 = (int8_t *)(y + 192);
    for (int j = 0; j < 16; j++) {
        float l = rnd(is * sc[j]);
        if (l > 127.0f) l = 127.0f;
        s8[j] = (int8_t)to_i32(l);
    }
    put16(y + 208, 1.0f / is);
    const float d = llk_fp16_to_fp32(llk_rd16(y + 208));
    for (int j = 0; j < 16; j++) {
        const float dl = d * (float)s8[j];
        if (dl == 0.0f) continue;
        for (int i = 0; i < 16; i++)
            L[16 * j + i] = clampn(rnd(x[16 * j + i] / dl), -32, 31) + 32.0f;
    }
    uint8_t *ql = y, *qh = y + 128;
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l++) {
            int q[4];
            for (int k = 0; k < 4; k++) q[k] = (int)L[128 * h + 32 * k + l];
            ql[64 * h + l] = (uint8_t)((q[0] & 0xF) | ((q[2] & 0xF) << 4));
            ql[64 * h + 32 + l] = (uint8_t)((q[1] & 0xF) | ((q[3] & 0xF) << 4));
            qh[32 * h + l] = (uint8_t)((q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) |
                                       ((q[3] >> 4) << 6));
        }
}

/* ---- IQ4_NL / IQ4_XS ---- */

/* level index as a function of floor(2v) over the code book's midpoints' range */
#define IQ_LO (-232)
#define IQ_HI 202
static uint8_t iq_idx[IQ_HI - IQ_LO + 1];
static pthread_once_t iq_once = PTHREAD_ONCE_INIT;

static void iq_init(void) {
    for (int f = IQ_LO; f <= IQ_HI; f++) {
        int c = 0;
        for (int i = 1; i < 16; i++) c += llk_iq4_values[i - 1] + llk_iq4_values[i] <= f;
        iq_idx[f - IQ_LO] = (uint8_t)c;
    }
}

/* best_index_int8(16, values, v): the nearest level, exact midpoints going up; NaN -> 15 */
static inline int iq_index(float v) {
    const float f = v + v;
    if (!(f >= (float)IQ_LO)) return f != f ? 15 : 0;
    if (f >= (float)IQ_HI) return 15;
    int i = (int)f;
    if ((float)i > f) i--;
    return iq_idx[i - IQ_LO];
}

/* one 32-value block's scale (ntry = 7): x, w [32] -> d */
static float iq4_scale(const float *x, const float *w) {
    float amax;
    const float mx = first_absmax(32, x, &amax);
    if (amax < EPS) return 0.0f;
    float d = -mx / (float)llk_iq4_values[0], best = 0.0f;
    for (int k = 0; k < 16; k++) {
        const float idv = k == 0 ? 1.0f / d : (float)(k - 8 + llk_iq4_values[0]) / mx;
        float sqx = 0.0f, sq2 = 0.0f;
        for (int i = 0; i < 32; i++) {
            const float q = (float)llk_iq4_values[iq_index(idv * x[i])], wq = w[i] * q;
            const float a = wq * x[i], b = wq * q;
            sqx = i ? sqx + a : a;
            sq2 = i ? sq2 + b : b;
        }
        if (k == 0) {
            d = sqx / sq2;
            best = d * sqx;
        } else if (sq2 > 0.0f && sqx * sqx > best * sq2) {
            d = sqx / sq2;
            best = d * sqx;
        }
    }
    return d;
}

/* weights: x^2, or qw * sqrtf(sigma2 + x^2) with sigma2 = sum(x^2) * 2 / n */
static void iq4_weights(int n, const float *x, const float *qw, float *w) {
    if (!qw) {
        for (int i = 0; i < n; i++) w[i] = x[i] * x[i];
        return;
    }
    float s = x[0] * x[0];
    for (int i = 1; i < n; i++) s += x[i] * x[i];
    imatrix_weights(n, x, qw, s * (2.0f / (float)n), w);
}

static void pack_nibbles32(const float *x, float idv, uint8_t *q) {
    for (int j = 0; j < 16; j++)
        q[j] = (uint8_t)(iq_index(idv * x[j]) | (iq_index(idv * x[16 + j]) << 4));
}

static void block_iq4_nl(const float *x, const float *qw, uint8_t *y) {
    float w[32];
    iq4_weights(32, x, qw, w);
    const float d = iq4_scale(x, w);
    put16(y, d);
    pack_nibbles32(x, d != 0.0f ? 1.0f / d : 0.0f, y + 2);
}

static void block_iq4_xs(const float *x, const float *qw, uint8_t *y) {
    float w[QK], sc[8], amax;
    iq4_weights(QK, x, qw, w);
    for (int b = 0; b < 8; b++) sc[b] = iq4_scale(x + 32 * b, w + 32 * b);
    const float picked = first_absmax(8, sc, &amax);
    const float max_scale = amax > 0.0f ? picked : 0.0f;
    const float d = -max_scale / 32.0f, idv = d != 0.0f ? 1.0f / d : 0.0f;
    int sh = 0;
    put16(y, d);
    memset(y + 4, 0, 4);
    for (int b = 0; b < 8; b++) {
        const float lv = clampn(rnd(idv * sc[b]), -32, 31), dl = d * lv;
        const int ls = (int)lv + 32;
        y[4 + b / 2] |= (uint8_t)((ls & 0xF) << (4 * (b % 2)));
        sh |= (ls >> 4) << (2 * b);
        pack_nibbles32(x + 32 * b, dl != 0.0f ? 1.0f / dl : 0.0f, y + 8 + 16 * b);
    }
    y[2] = (uint8_t)(sh & 0xFF);
    y[3] = (uint8_t)(sh >> 8);
}

/* ---- the entry point ---- */

typedef void (*block_fn)(const float *x, const float *qw, uint8_t *y);

typedef struct {
    block_fn fn;
    const float *x, *qw;
    uint8_t *out;
    int64_t bs, ts, n_per_row, nblocks, per_chunk;
} qjob;

static void run_chunk(void *arg, int c) {
    const qjob *j = arg;
    const int64_t b0 = (int64_t)c * j->per_chunk;
    const int64_t b1 = b0 + j->per_chunk < j->nblocks ? b0 + j->per_chunk : j->nblocks;
    for (int64_t b = b0; b < b1; b++) {
        const float *qw = j->qw ? j->qw + (b * j->bs) % j->n_per_row : NULL;
        j->fn(j->x + b * j->bs, qw, j->out + b * j->ts);
    }
}

int llk_quantize(int32_t type, const float *x, int64_t nrows, int64_t n_per_row, const float *qw,
                 void *out) {
    block_fn fn;
    switch (type) {
    case LLK_Q2_K: fn = block_q2_k; break;
    case LLK_Q3_K: fn = block_q3_k; break;
    case LLK_Q4_K: fn = block_q4_k; break;
    case LLK_Q5_K: fn = block_q5_k; break;
    case LLK_Q6_K: fn = block_q6_k; break;
    case LLK_IQ4_NL: fn = block_iq4_nl; break;
    case LLK_IQ4_XS: fn = block_iq4_xs; break;
    /* quantize_legacy.c; Q8_0 ignores importance weights (as llama.cpp), the others have no
     * native weighted search (llmkit.quant runs those in torch) */
    case LLK_Q4_0: fn = llk_qblock_q4_0; break;
    case LLK_Q4_1: fn = llk_qblock_q4_1; break;
    case LLK_Q5_0: fn = llk_qblock_q5_0; break;
    case LLK_Q5_1: fn = llk_qblock_q5_1; break;
    case LLK_Q8_0: fn = llk_qblock_q8_0; qw = NULL; break;
    default: return LLK_E_TYPE;
    }
    if (qw && (type == LLK_Q4_0 || type == LLK_Q4_1 || type == LLK_Q5_0 || type == LLK_Q5_1))
        return LLK_E_TYPE;
    const int64_t bs = llk_block_size(type);
    if (nrows < 0 || n_per_row <= 0 || n_per_row % bs) return LLK_E_SHAPE;
    pthread_once(&iq_once, iq_init);
    qjob j = {fn, x, qw, out, bs, llk_type_size(type), n_per_row, nrows * (n_per_row / bs), 0};
    if (j.nblocks == 0) return LLK_OK;
    /* ~8 chunks per thread for balance on a busy machine, at least 4096 values each */
    const int64_t want = (int64_t)llk_pool_threads() * 8;
    j.per_chunk = (j.nblocks + want - 1) / want;
    if (j.per_chunk < 4096 / bs) j.per_chunk = 4096 / bs;
    const int64_t nchunks = (j.nblocks + j.per_chunk - 1) / j.per_chunk;
    llk_run_locked(run_chunk, &j, (int)nchunks);
    return LLK_OK;
}
