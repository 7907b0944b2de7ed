/* llk_internal.h: what the translation units of the library share (not part of the ABI).
 *
 * Activation formats, one scratch view per call:
 *   q8_0/q8_1 (for Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 IQ4_NL), stored block-major (block b of every row,
 *     then block b + 1: a tile of rows reads one contiguous run): per 32 values, d = amax / 127 and
 *     q = roundf(x / d) (ties away from zero); d and s = d * sum(q) are kept as their fp16
 *     roundings (ggml stores them as fp16), converted back to fp32 here so kernels need no
 *     conversion; isum = sum(q) exactly (kernels correct weight codes stored with an offset).
 *   q8_K (K-quants, IQ4_XS), block-major too: per 256 values, max = the first value of largest
 *     magnitude,
 *     q = min(127, rint(x * -127 / max)) (ties to even), d = max / -127 in fp32, and bsums = the
 *     sums of each 16 consecutive q.
 *   f (F32, F16, BF16): x rounded to the weight's float type (RNE), as fp32, rows padded with
 *     zeros to a multiple of 16 (ldf).
 */
#ifndef LLK_INTERNAL_H
#define LLK_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "llk.h"

#define LLK_ALWAYS_INLINE inline __attribute__((always_inline))
#define LLK_MAX_RM 16 /* most activation rows one kernel call takes (any table's rmax) */

typedef struct {
    int64_t k;
    int64_t m;            /* rows (the block-major stride) */
    const int8_t *qs;     /* q8_1: [k/32][M][32]; q8_K: [k/256][M][256] */
    const float *d;       /* q8_1: [k/32][M]; q8_K: [k/256][M] */
    const float *s;       /* q8_1 sums [k/32][M] */
    const int32_t *isum;  /* q8_1 exact sums of q [k/32][M] */
    const int16_t *bsums; /* q8_K [k/256][M][16] */
    const float *f;       /* rounded floats [M][ldf] */
    int64_t ldf;
} llk_act;

/* Weight rows 0 .. nr - 1 (nr <= LLK_NR; row j at w + j * stride) against activation rows
 * m0 .. m0 + rm - 1 (rm <= the table's rmax): writes y[(m0 + i) * ldy + j]. */
#define LLK_NR 8
typedef void (*llk_row_fn)(const uint8_t *w, int64_t stride, int nr, const llk_act *a, int64_t m0,
                           int rm, float *y, int64_t ldy);

typedef struct {
    const char *name;
    int rmax;
    /* indexed by llk_type_index() */
    llk_row_fn row[15];
    /* one row each; formats above */
    /* block b goes to qs + block size * b * bstride, d + b * bstride, ... */
    void (*quant_q8_1)(const float *x, int64_t k, int8_t *qs, float *d, float *s, int32_t *isum,
                       int64_t bstride);
    void (*quant_q8_K)(const float *x, int64_t k, int8_t *qs, float *d, int16_t *bsums,
                       int64_t bstride);
    void (*round_f16)(const float *x, int64_t k, float *out);
    void (*round_bf16)(const float *x, int64_t k, float *out);
    /* the same kernels on x8 groups (llk_pack_x8; w = the group's start), NULL where none */
    llk_row_fn row_x8[15];
} llk_isa_table;

extern const llk_isa_table llk_table_scalar;
#if defined(__x86_64__) || defined(_M_X64)
extern const llk_isa_table llk_table_avx2;
extern const llk_isa_table llk_table_avx512;
#endif
#if defined(__aarch64__)
extern const llk_isa_table llk_table_neon;
#endif

/* Dense index 0..14 of a supported type, -1 otherwise. */
static inline int llk_type_index(int32_t type) {
    switch (type) {
    case LLK_F32: return 0;
    case LLK_F16: return 1;
    case LLK_BF16: return 2;
    case LLK_Q4_0: return 3;
    case LLK_Q4_1: return 4;
    case LLK_Q5_0: return 5;
    case LLK_Q5_1: return 6;
    case LLK_Q8_0: return 7;
    case LLK_IQ4_NL: return 8;
    case LLK_Q2_K: return 9;
    case LLK_Q3_K: return 10;
    case LLK_Q4_K: return 11;
    case LLK_Q5_K: return 12;
    case LLK_Q6_K: return 13;
    case LLK_IQ4_XS: return 14;
    default: return -1;
    }
}

/* x8 groups (pack.c): whether `type` has them, and group g's 8 rows back in the GGUF layout
 * (rows[j * row_bytes ..], nb blocks each) from its packed bytes at `grp`. */
int llk_x8_type(int32_t type);
void llk_x8_unpack_group(const uint8_t *grp, int32_t type, int64_t nb, uint8_t *rows);
/* An x8 group on a path without its kernel: unpacked to 8 rows of rb bytes, then fn on them. */
void llk_x8_unpacked(llk_row_fn fn, int32_t type, const uint8_t *grp, int64_t rb, int nr,
                     const llk_act *a, int64_t m0, int rm, float *y, int64_t ldy);

/* Which activation format a type's kernel reads. */
enum { LLK_ACT_Q8_1, LLK_ACT_Q8_K, LLK_ACT_F32, LLK_ACT_F16, LLK_ACT_BF16 };

static inline int llk_act_format(int32_t type) {
    switch (type) {
    case LLK_F32: return LLK_ACT_F32;
    case LLK_F16: return LLK_ACT_F16;
    case LLK_BF16: return LLK_ACT_BF16;
    case LLK_Q4_0: case LLK_Q4_1: case LLK_Q5_0: case LLK_Q5_1: case LLK_Q8_0: case LLK_IQ4_NL:
        return LLK_ACT_Q8_1;
    default: return LLK_ACT_Q8_K;
    }
}

/* IQ4_NL / IQ4_XS code book. */
static const int8_t llk_iq4_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                          1,    13,   25,  38,  53,  69,  89,  113};

/* ---- portable scalar conversions (the x86 paths use F16C, which rounds identically) ---- */

static inline uint32_t llk_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float llk_bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t llk_rd16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static inline uint32_t llk_rd32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline float llk_fp16_to_fp32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    const uint32_t e = (h >> 10) & 0x1F, man = h & 0x3FF;
    if (e == 0x1F) return llk_bits_f32(sign | 0x7F800000u | (man << 13));
    if (e) return llk_bits_f32(sign | ((e + 112) << 23) | (man << 13));
    const float f = (float)man * 5.9604644775390625e-8f; /* subnormal: man * 2^-24, exact */
    return sign ? -f : f;
}

/* Round to nearest even, overflow to inf, subnormals kept (what F16C's vcvtps2ph does). */
static inline uint16_t llk_fp32_to_fp16(float f) {
    uint32_t x = llk_f32_bits(f);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    x &= 0x7FFFFFFFu;
    if (x > 0x7F800000u) return sign | 0x7E00 | (uint16_t)((x >> 13) & 0x3FF);
    if (x >= 0x477FF000u) return sign | 0x7C00; /* >= 65520 rounds to inf */
    if (x >= 0x38800000u) {                     /* normal: >= 2^-14 */
        uint32_t r = x - 0x38000000u;           /* rebias the exponent 127 -> 15 */
        r += 0xFFF + ((r >> 13) & 1);
        return sign | (uint16_t)(r >> 13);
    }
    /* subnormal: units of 2^-24; adding 2^23 rounds to an integer, ties to even */
    const float m = llk_bits_f32(x) * 16777216.0f;
    return sign | (uint16_t)(llk_f32_bits(m + 8388608.0f) - 0x4B000000u);
}

static inline float llk_round_f16(float f) { return llk_fp16_to_fp32(llk_fp32_to_fp16(f)); }

/* bf16 round to nearest even (NaN kept quiet), returned as fp32. */
static inline float llk_round_bf16(float f) {
    const uint32_t u = llk_f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return llk_bits_f32((u & 0xFFFF0000u) | 0x00400000u);
    return llk_bits_f32((u + 0x7FFFu + ((u >> 16) & 1)) & 0xFFFF0000u);
}

/* C roundf (ties away from zero) for |v| < 2^31, exactly, without a libm call. */
static inline int llk_roundf_i(float v) {
    int i = (int)v; /* truncation */
    const float f = v - (float)i; /* exact */
    if (f >= 0.5f) i++;
    else if (f <= -0.5f) i--;
    return i;
}

/* rint (ties to even) for |v| < 2^22, the 1.5 * 2^23 trick ggml's nearest_int uses. */
static inline int llk_rint_i(float v) {
    const float t = v + 12582912.0f;
    return (int)(llk_f32_bits(t) & 0x007FFFFFu) - 0x00400000;
}

/* e^x for x <= 0 (0 below -87.33, where e^x leaves the normal floats): n = rint(x / ln 2),
 * r = x - n ln 2 (two fma steps), a degree-6 Taylor polynomial of e^r (Horner, fma), times 2^n;
 * within 2 ulp of expf. Written as a fixed sequence of fmaf steps, so the vector copies in
 * attention_body.inc, which run the same steps lane by lane, give the same bits. */
#define LLK_EXP_MAGIC 12582912.0f /* 1.5 * 2^23: adding it rounds to an integer (ties to even) */
static inline float llk_expf_neg(float x) {
    if (x < -87.33f) return 0.0f;
    const float t = fmaf(x, 1.44269504f, LLK_EXP_MAGIC), n = t - LLK_EXP_MAGIC;
    float r = fmaf(n, -0.693145751953125f, x); /* ln 2, high part: exact products with n */
    r = fmaf(n, -1.428606765330187e-06f, r);   /* ln 2, low part */
    float p = 1.3888889e-3f;
    p = fmaf(p, r, 8.3333338e-3f);
    p = fmaf(p, r, 4.1666668e-2f);
    p = fmaf(p, r, 1.6666667e-1f);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    return p * llk_bits_f32((uint32_t)((int32_t)n + 127) << 23);
}

/* ---- portable activation quantizers (quantize_act.c) ---- */

void llk_quant_q8_1_scalar(const float *x, int64_t k, int8_t *qs, float *d, float *s,
                           int32_t *isum, int64_t bstride);
void llk_quant_q8_K_scalar(const float *x, int64_t k, int8_t *qs, float *d, int16_t *bsums,
                           int64_t bstride);
void llk_round_f16_scalar(const float *x, int64_t k, float *out);
void llk_round_bf16_scalar(const float *x, int64_t k, float *out);

/* ---- legacy 32-value weight quantizers (quantize_legacy.c), one block each; qw unused ---- */

void llk_qblock_q4_0(const float *x, const float *qw, uint8_t *y);
void llk_qblock_q4_1(const float *x, const float *qw, uint8_t *y);
void llk_qblock_q5_0(const float *x, const float *qw, uint8_t *y);
void llk_qblock_q5_1(const float *x, const float *qw, uint8_t *y);
void llk_qblock_q8_0(const float *x, const float *qw, uint8_t *y);

/* ---- thread pool (threadpool.c) ---- */

typedef void (*llk_chunk_fn)(void *arg, int chunk);

/* Runs fn(arg, c) for c = 0 .. nchunks - 1, chunks claimed in order by the caller and the pool's
 * workers; returns when all are done. Called with the library's call lock held. */
void llk_run_chunks(llk_chunk_fn fn, void *arg, int nchunks);
/* Spins (pause, then yields) until *counter >= target (acquire). */
void llk_wait_counter(const int *counter, int target);
int llk_pool_threads(void);
/* llk_run_chunks under the library's call lock (matmul.c) */
void llk_run_locked(llk_chunk_fn fn, void *arg, int nchunks);
int llk_pool_set_threads(int n); /* with the call lock held; n < 1: all CPUs of the affinity */
void llk_pool_set_spin_us(int us);

/* Work ranges with stealing: slot s holds the unclaimed part [lo, hi) of its range of items. Its
 * home thread claims from the front (contiguous pieces: the weight stream goes on without a
 * restart); a thread whose own slot is empty steals the back half of the fullest other slot into
 * it. Balanced to about an item, whichever thread is slow or never runs, with few stream starts
 * (each costs a DRAM latency or more: 8 even chunks per thread instead of 1 made small M = 1
 * calls up to 1.7x slower). */
#define LLK_MAX_SLOTS 256
typedef struct {
    _Alignas(64) uint64_t w; /* hi << 32 | lo */
} llk_slot;
typedef struct {
    int n;
    uint32_t unit; /* the fewest items a claim or a steal takes (unless fewer are left) */
    llk_slot s[LLK_MAX_SLOTS];
} llk_ranges;
/* n slots (n <= LLK_MAX_SLOTS), slot i = [bounds[i], bounds[i + 1]) (bounds < 2^31). */
void llk_ranges_init(llk_ranges *r, const int64_t *bounds, int n, uint32_t unit);
/* The next piece [*lo, *hi) for the thread whose slot is `home`; 0 when every item is claimed. */
int llk_ranges_next(llk_ranges *r, int home, int64_t *lo, int64_t *hi);

#endif
