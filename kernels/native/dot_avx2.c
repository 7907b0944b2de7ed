/* dot_avx2.c: the x86-64 AVX2 + FMA + F16C path (x86_*.inc compiled for that target).
 *
 * Integer block dots use maddubs (u8 x s8 -> int16 pair sums; exact here: the codes are small,
 * or the signed 8-bit types go through |w| x sign(x, w)) and madd: the same int32 values as the
 * VNNI instructions of the AVX-512 path, with the same fp32 operations after them, so both paths
 * give bit-identical results. 16 vector registers: tiles of at most 4 activation rows.
 */
#if defined(__x86_64__) || defined(_M_X64)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c")
#endif

#include "x86_common.inc"

#define RMAX 4     /* activation rows per 32-value kernel call */
#define RMAX_ROW 4 /* ... per K-quant / float kernel call */
#define X_VNNI 0
#define DOTW(acc, p, s) _mm256_add_epi32((acc), _mm256_madd_epi16((p), (s)))

#define QH_OR(c, sel, bm) \
    _mm256_or_si256((c), _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256((sel), (bm)), (bm)), \
                                          _mm256_set1_epi8(0x10)))

#include "x86_dot32.inc"
#include "x86_dotk.inc"
#include "x86_dotk8.inc"
#include "x86_dotf.inc"

#define X_TABLE llk_table_avx2
#define X_NAME "avx2"
#include "x86_table.inc"

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif
