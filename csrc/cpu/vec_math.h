// Vectorised e^x and the logistic sigmoid for the CPU twins' fused elementwise passes (grid_ops.h,
// message_ops.cpp): AVX2+FMA code compiled into the SCN_TARGET_AVX2 clones (cpu_isa.h), plus the
// scalar forms the baseline clones and float64 use.
//
// exp_avx2: Cephes-style range reduction x = n ln2 + f (ln2 split in two for accuracy), e^f by a
// degree-5 polynomial, 2^n by building the exponent bits; ~2 ulp for x in [-87, 87] (callers clamp).
// Clamping the sigmoid's argument to [-87, 87] changes silu and silu' by less than 1e-35.
#pragma once

#include <cmath>

#include "cpu_isa.h"

#if SCN_HAS_AVX2_CLONE
#include <immintrin.h>
#endif

namespace scn_fast::cpu {

template <typename T>
inline T sigmoid_scalar(T a) {
  return T(1) / (T(1) + std::exp(-a));
}

#if SCN_HAS_AVX2_CLONE

SCN_TARGET_AVX2 SCN_ALWAYS_INLINE __m256 exp_avx2(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 fx = _mm256_floor_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, z, x), one);
  const __m256i n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(0x7f)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(n));
}

// s = 1 / (1 + e^-a), a clamped to [-87, 87].
SCN_TARGET_AVX2 SCN_ALWAYS_INLINE __m256 sigmoid_avx2(__m256 a) {
  const __m256 lim = _mm256_set1_ps(87.0f);
  const __m256 x = _mm256_min_ps(_mm256_max_ps(a, _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim);
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

#endif  // SCN_HAS_AVX2_CLONE

}  // namespace scn_fast::cpu
