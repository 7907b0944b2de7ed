/* x86_vexp.h: llk_expf_neg (llk_internal.h) on 8 lanes, the same fma steps lane by lane, so the
 * vector and scalar copies of a kernel give the same bits. x <= 0; 0 below -87.33. Compiled for
 * AVX2 + FMA; inlines into any function built for a superset (the AVX-512 copies). */
#ifndef LLK_X86_VEXP_H
#define LLK_X86_VEXP_H
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "llk_internal.h"

__attribute__((target("avx2,fma"), always_inline)) static inline __m256 llk_exp8_neg(__m256 x) {
    const __m256 magic = _mm256_set1_ps(LLK_EXP_MAGIC);
    const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504f), magic);
    const __m256 n = _mm256_sub_ps(t, magic);
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693145751953125f), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(-1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.3888889e-3f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3333338e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1666668e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666667e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_and_ps(y, _mm256_cmp_ps(x, _mm256_set1_ps(-87.33f), _CMP_GE_OQ));
}
#endif
#endif
