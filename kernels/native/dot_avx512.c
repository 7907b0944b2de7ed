/* dot_avx512.c: the x86-64 AVX-512 (F, BW, VL) + VNNI path (x86_*.inc compiled for that target).
 *
 * The AVX2 path's 256-bit lane layout (so the same results, bit for bit) with VNNI's vpdpbusd /
 * vpdpwssd fusing each integer multiply-add chain step into one instruction, AVX-512BW byte
 * masks for Q5_0/Q5_1's fifth bits, and 32 vector registers for tiles of up to 16 activation
 * rows (8 for the K-quants and float types). 512-bit vectors would not help on Zen 4, which runs
 * them at the same throughput per element (measured: vpdpbusd ymm 2/cycle, zmm 1/cycle).
 * vdpbf16ps is not used for BF16: it flushes denormals and rounds after each of its two
 * products, unlike the fused multiply-add of the other paths.
 */
#if defined(__x86_64__) || defined(_M_X64)

#if defined(__clang__)
#pragma clang attribute push( \
    __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"))), \
    apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#endif

#include "x86_common.inc"

#define RMAX 16    /* activation rows per 32-value kernel call */
#define RMAX_ROW 8 /* ... per K-quant / float kernel call */
#define X_VNNI 1
/* acc += u8 codes c . the 4 bytes at p broadcast to every lane: an embedded-broadcast memory
 * operand (GCC emits a separate vpbroadcastd for the intrinsic) */
#define X_DPBUSD_BCAST(acc, c, p) \
    __asm__("vpdpbusd %2%{1to8%}, %1, %0" : "+v"(acc) : "v"(c), "m"(*(const int32_t *)(p)))
#define DOTW(acc, p, s) _mm256_dpwssd_epi32((acc), (p), (s))
#define QH_OR(c, sel, bm) _mm256_mask_add_epi8((c), _mm256_test_epi8_mask((sel), (bm)), (c), _mm256_set1_epi8(0x10))

#include "x86_dot32.inc"
#include "x86_dotk.inc"
#include "x86_dotk8.inc"
#include "x86_dotf.inc"

#define X_TABLE llk_table_avx512
#define X_NAME "avx512_vnni"
#include "x86_table.inc"

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif
