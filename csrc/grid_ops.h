// Fused elementwise row kernels of the grid MLP and output heads (csrc/grid_ops.cpp), CPU only:
//
//   bias_silu: a = y + bias (per column), pre = a (optional; may alias y), out = silu(a) = a / (1 + e^-a)
//              (out may alias y)
//   dsilu:     d *= silu'(a) = s (1 + a (1 - s)), s = 1 / (1 + e^-a); colsum[c] += d[r, c]
//
// over `rows` rows of `cols` contiguous values. One pass over memory each, where ATen would take two
// or three (add bias, silu; silu_backward, sum). The exponential is the hot part (~1 ns per element
// with ATen's AVX2 kernels, as much as a K=100 GEMM spends per output element), so the float32 path
// has an AVX2+FMA clone with a Cephes-style exp (range reduction by ln 2, degree-5 polynomial,
// ~2 ulp on the clamped range) selected at run time (cpu/cpu_isa.h); inputs are clamped to
// [-87, 87], which changes silu and silu' by less than 1e-35. float64 (and CPUs without AVX2) use
// std::exp.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cpu/cpu_isa.h"
#include "cpu/vec_math.h"

namespace scn_fast::grid::cpu {

#if SCN_HAS_AVX2_CLONE
using scn_fast::cpu::sigmoid_avx2;
#endif

template <typename T>
inline void bias_silu_rows_base(const T* y, const T* bias, T* pre, T* out, int64_t rows,
                                int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* yr = y + r * cols;
    T* pr = pre ? pre + r * cols : nullptr;
    T* orow = out + r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      const T a = yr[c] + bias[c];
      if (pr) pr[c] = a;
      orow[c] = a / (T(1) + std::exp(-a));
    }
  }
}

template <typename T>
inline void dsilu_rows_base(T* d, const T* a, T* colsum, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    T* dr = d + r * cols;
    const T* ar = a + r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      const T s = T(1) / (T(1) + std::exp(-ar[c]));
      const T v = dr[c] * (s * (T(1) + ar[c] * (T(1) - s)));
      dr[c] = v;
      colsum[c] += v;
    }
  }
}

#if SCN_HAS_AVX2_CLONE

SCN_TARGET_AVX2 inline void bias_silu_rows_avx2(const float* y, const float* bias, float* pre,
                                                float* out, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* yr = y + r * cols;
    float* pr = pre ? pre + r * cols : nullptr;
    float* orow = out + r * cols;
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) {
      const __m256 a = _mm256_add_ps(_mm256_loadu_ps(yr + c), _mm256_loadu_ps(bias + c));
      if (pr) _mm256_storeu_ps(pr + c, a);
      _mm256_storeu_ps(orow + c, _mm256_mul_ps(a, sigmoid_avx2(a)));
    }
    for (; c < cols; ++c) {
      const float a = yr[c] + bias[c];
      if (pr) pr[c] = a;
      orow[c] = a / (1.0f + std::exp(-a));
    }
  }
}

SCN_TARGET_AVX2 inline void dsilu_rows_avx2(float* d, const float* a, float* colsum, int64_t rows,
                                            int64_t cols) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t r = 0; r < rows; ++r) {
    float* dr = d + r * cols;
    const float* ar = a + r * cols;
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) {
      const __m256 av = _mm256_loadu_ps(ar + c);
      const __m256 s = sigmoid_avx2(av);
      const __m256 g = _mm256_mul_ps(s, _mm256_fmadd_ps(av, _mm256_sub_ps(one, s), one));
      const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(dr + c), g);
      _mm256_storeu_ps(dr + c, v);
      _mm256_storeu_ps(colsum + c, _mm256_add_ps(_mm256_loadu_ps(colsum + c), v));
    }
    for (; c < cols; ++c) {
      const float s = 1.0f / (1.0f + std::exp(-ar[c]));
      const float v = dr[c] * (s * (1.0f + ar[c] * (1.0f - s)));
      dr[c] = v;
      colsum[c] += v;
    }
  }
}

#endif  // SCN_HAS_AVX2_CLONE

template <typename T>
inline void bias_silu_rows(const T* y, const T* bias, T* pre, T* out, int64_t rows, int64_t cols) {
#if SCN_HAS_AVX2_CLONE
  if constexpr (std::is_same_v<T, float>) {
    if (scn_fast::cpu::cpu_has_avx2_fma()) return bias_silu_rows_avx2(y, bias, pre, out, rows, cols);
  }
#endif
  bias_silu_rows_base(y, bias, pre, out, rows, cols);
}

template <typename T>
inline void dsilu_rows(T* d, const T* a, T* colsum, int64_t rows, int64_t cols) {
#if SCN_HAS_AVX2_CLONE
  if constexpr (std::is_same_v<T, float>) {
    if (scn_fast::cpu::cpu_has_avx2_fma()) return dsilu_rows_avx2(d, a, colsum, rows, cols);
  }
#endif
  dsilu_rows_base(d, a, colsum, rows, cols);
}

}  // namespace scn_fast::grid::cpu
