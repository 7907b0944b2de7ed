/* selftest.c: a standalone check of every ISA path this CPU supports against the portable one,
 * for machines without the Python test suite (or a cross build under qemu). Not part of the
 * extension. From the repository root:
 *
 *   cd kernels/native && cc -O2 -std=c11 -pthread -ffp-contract=off -o llk_selftest *.c -lm
 *   ./llk_selftest
 * and for the NEON path from an x86 box (Debian: gcc-aarch64-linux-gnu, qemu-user):
 *   aarch64-linux-gnu-gcc -static <same flags and files> && qemu-aarch64 -cpu max ./llk_selftest
 *
 * Per type and path: the result is close to the scalar path's (same quantized activations, other
 * summation order), every row of an M-row call equals the row computed alone, bit for bit, 1 and
 * 3 threads give the same bits, and so do the weights packed into x8 groups (pack.c). Exit
 * status 1 on any failure.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "llk_internal.h"

static uint32_t rng = 12345;
static float frand(void) { /* uniform in [-1, 1) */
    rng = rng * 1664525u + 1013904223u;
    return (float)(rng >> 8) / 8388608.0f - 1.0f;
}

static void put16(uint8_t *p, float f) {
    const uint16_t h = llk_fp32_to_fp16(f);
    memcpy(p, &h, 2);
}

/* Random bytes with sane scale fields: codes may be anything, scales must not be inf/NaN. */
static void make_row(int32_t type, uint8_t *row, int64_t k) {
    const int bs = llk_block_size(type), ts = llk_type_size(type);
    for (int64_t i = 0; i < k / bs * ts; i++) row[i] = (uint8_t)(frand() * 128 + 128);
    for (int64_t b = 0; b < k / bs; b++) {
        uint8_t *p = row + b * ts;
        switch (type) {
        case LLK_F32: { const float f = frand(); memcpy(p, &f, 4); break; }
        case LLK_F16: put16(p, frand()); break;
        case LLK_BF16: { const uint32_t u = llk_f32_bits(frand()) >> 16; memcpy(p, &u, 2); break; }
        case LLK_Q4_1: case LLK_Q5_1: case LLK_Q4_K: case LLK_Q5_K:
            put16(p, 0.01f + 0.01f * frand()); put16(p + 2, 0.01f * frand()); break;
        case LLK_Q2_K: put16(p + 80, 0.01f + 0.01f * frand()); put16(p + 82, 0.01f * frand()); break;
        case LLK_Q3_K: put16(p + 108, 0.01f + 0.01f * frand()); break;
        case LLK_Q6_K: put16(p + 208, 0.01f + 0.01f * frand()); break;
        default: put16(p, 0.01f + 0.01f * frand()); break; /* d at offset 0 */
        }
    }
}

static int check(int32_t type, int64_t n, int64_t k, int64_t m) {
    const int64_t rb = k / llk_block_size(type) * llk_type_size(type);
    uint8_t *w = malloc((size_t)(n * rb));
    float *x = malloc((size_t)(m * k) * 4), *ref = malloc((size_t)(m * n) * 4);
    float *y = malloc((size_t)(m * n) * 4), *one = malloc((size_t)n * 4);
    for (int64_t r = 0; r < n; r++) make_row(type, w + r * rb, k);
    for (int64_t i = 0; i < m * k; i++) x[i] = frand();
    const llk_part part = {w, rb, n, 0, type, 0};
    int fails = 0;
    llk_set_threads(1);
    llk_set_isa(LLK_ISA_SCALAR);
    llk_matmul(x, m, k, k, &part, 1, ref, n);
    float scale = 1e-6f;
    for (int64_t i = 0; i < m * n; i++) scale = fmaxf(scale, fabsf(ref[i]));
    for (int isa = 0; isa < LLK_ISA_COUNT; isa++) {
        if (!llk_isa_supported(isa)) continue;
        llk_set_isa(isa);
        llk_set_threads(1);
        llk_matmul(x, m, k, k, &part, 1, y, n);
        float err = 0;
        for (int64_t i = 0; i < m * n; i++) err = fmaxf(err, fabsf(y[i] - ref[i]));
        int bad = err > 1e-4f * scale;
        for (int64_t r = 0; r < m; r++) { /* row alone == row inside the call */
            llk_matmul(x + r * k, 1, k, k, &part, 1, one, n);
            bad |= memcmp(one, y + r * n, (size_t)n * 4) != 0;
        }
        float *y3 = malloc((size_t)(m * n) * 4); /* 3 threads: the same bits */
        llk_set_threads(3);
        llk_matmul(x, m, k, k, &part, 1, y3, n);
        bad |= memcmp(y3, y, (size_t)(m * n) * 4) != 0;
        if (llk_x8_type(type)) { /* x8 groups (pack.c): the rows' bits, native or unpacked */
            uint8_t *g = malloc((size_t)((n + 7) / 8 * 8 * rb));
            const llk_part x8 = {g, rb, n, 0, type, LLK_LAYOUT_X8};
            bad |= llk_pack_x8(w, rb, n, k, type, g, 0) != LLK_OK;
            llk_matmul(x, m, k, k, &x8, 1, y3, n);
            bad |= memcmp(y3, y, (size_t)(m * n) * 4) != 0;
            free(g);
        }
        free(y3);
        printf("%-12s type %2d %4lldx%-4lld M=%-3lld max err %.2e of %.2e %s\n", llk_isa_name(isa),
               type, (long long)n, (long long)k, (long long)m, err, scale, bad ? "FAIL" : "ok");
        fails += bad;
    }
    free(w), free(x), free(ref), free(y), free(one);
    return fails;
}

int main(void) {
    static const int32_t types[] = {LLK_F32,  LLK_F16,  LLK_BF16, LLK_Q4_0, LLK_Q4_1,
                                    LLK_Q5_0, LLK_Q5_1, LLK_Q8_0, LLK_IQ4_NL, LLK_Q2_K,
                                    LLK_Q3_K, LLK_Q4_K, LLK_Q5_K, LLK_Q6_K, LLK_IQ4_XS};
    int fails = 0;
    printf("best path: %s\n", llk_isa_name(llk_best_isa()));
    for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++) {
        const int bs = llk_block_size(types[t]);
        fails += check(types[t], 37, 512, 19);
        if (bs < 256) fails += check(types[t], 21, bs == 1 ? 77 : 96, 5);
    }
    printf(fails ? "%d FAILED\n" : "all ok\n", fails);
    return fails != 0;
}
