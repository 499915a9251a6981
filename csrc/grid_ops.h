// Fused elementwise row kernels of the grid MLP and output heads (csrc/grid_ops.cpp), CPU only:
//
//   bias_silu:  a = y + bias (per column), pre = a (optional; may alias y), out = silu(a) = a / (1 + e^-a)
//               (out may alias y)
//   dsilu:      d *= silu'(a) = s (1 + a (1 - s)), s = 1 / (1 + e^-a); colsum[c] += d[r, c]
//   silu_grad:  h = silu(a), g = silu'(a) (one exponential for both: a backward that needs the
//               activation for a weight gradient and its derivative later)
//   mul_colsum: d *= g; colsum[c] += d[r, c]
//
// over `rows` rows of `cols` contiguous values. One pass over memory each, where ATen would take two
// or three (add bias, silu; silu_backward, sum). The exponential is the hot part, so the float32 path
// is written once for the vector policies (grid_rows.inc) and compiled for AVX-512 and for AVX2+FMA,
// with a Cephes-style exp (cpu/simd_math.inc: range reduction by ln 2, degree-5 polynomial, ~2 ulp on
// the clamped range), the width picked at run time (cpu/cpu_isa.h); inputs are clamped to [-87, 87],
// which changes silu and silu' by less than 1e-35. float64 (and CPUs without AVX2) use std::exp.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cpu/cpu_isa.h"
#include "cpu/vec_math.h"

namespace scn_fast::grid::cpu {

// The scalar forms, from column c0 of one row (the vector kernels' tails) ...
template <typename T>
inline void bias_silu_tail(const T* y, const T* bias, T* pre, T* out, int64_t cols, int64_t c0) {
  for (int64_t c = c0; c < cols; ++c) {
    const T a = y[c] + bias[c];
    if (pre) pre[c] = a;
    out[c] = a / (T(1) + std::exp(-a));
  }
}

template <typename T>
inline void dsilu_tail(T* d, const T* a, T* colsum, int64_t cols, int64_t c0) {
  for (int64_t c = c0; c < cols; ++c) {
    const T s = T(1) / (T(1) + std::exp(-a[c]));
    const T v = d[c] * (s * (T(1) + a[c] * (T(1) - s)));
    d[c] = v;
    colsum[c] += v;
  }
}

template <typename T>
inline void silu_grad_tail(const T* a, T* h, T* g, int64_t cols, int64_t c0) {
  for (int64_t c = c0; c < cols; ++c) {
    const T s = T(1) / (T(1) + std::exp(-a[c]));
    h[c] = a[c] * s;
    g[c] = s * (T(1) + a[c] * (T(1) - s));
  }
}

template <typename T>
inline void mul_colsum_tail(T* d, const T* g, T* colsum, int64_t cols, int64_t c0) {
  for (int64_t c = c0; c < cols; ++c) {
    d[c] *= g[c];
    colsum[c] += d[c];
  }
}

}  // namespace scn_fast::grid::cpu

#if SCN_HAS_AVX2_CLONE
// The vector row kernels, one text compiled for AVX2 (8 lanes) and for AVX-512 (16 lanes).
SCN_BEGIN_TARGET_AVX2
namespace scn_fast::grid::cpu::avx2 {
using scn_fast::cpu::avx2::sigmoid;
using scn_fast::cpu::avx2::V;
#include "grid_rows.inc"
}  // namespace scn_fast::grid::cpu::avx2
SCN_END_TARGET

SCN_BEGIN_TARGET_AVX512
namespace scn_fast::grid::cpu::avx512 {
using scn_fast::cpu::avx512::sigmoid;
using scn_fast::cpu::avx512::V;
#include "grid_rows.inc"
}  // namespace scn_fast::grid::cpu::avx512
SCN_END_TARGET
#endif

namespace scn_fast::grid::cpu {

// Each kernel: the widest vector clone the CPU runs for float32, else the scalar form per row.
#if SCN_HAS_AVX2_CLONE
#define SCN_GRID_ROWS_DISPATCH(name, ...)                                          \
  if constexpr (std::is_same_v<T, float>) {                                        \
    if (scn_fast::cpu::cpu_has_avx512()) return avx512::name##_rows(__VA_ARGS__);  \
    if (scn_fast::cpu::cpu_has_avx2_fma()) return avx2::name##_rows(__VA_ARGS__);  \
  }
#else
#define SCN_GRID_ROWS_DISPATCH(name, ...)
#endif

template <typename T>
inline void bias_silu_rows(const T* y, const T* bias, T* pre, T* out, int64_t rows, int64_t cols) {
  SCN_GRID_ROWS_DISPATCH(bias_silu, y, bias, pre, out, rows, cols)
  for (int64_t r = 0; r < rows; ++r)
    bias_silu_tail(y + r * cols, bias, pre ? pre + r * cols : nullptr, out + r * cols, cols,
                   int64_t{0});
}

template <typename T>
inline void dsilu_rows(T* d, const T* a, T* colsum, int64_t rows, int64_t cols) {
  SCN_GRID_ROWS_DISPATCH(dsilu, d, a, colsum, rows, cols)
  for (int64_t r = 0; r < rows; ++r) dsilu_tail(d + r * cols, a + r * cols, colsum, cols, int64_t{0});
}

template <typename T>
inline void silu_grad_rows(const T* a, T* h, T* g, int64_t rows, int64_t cols) {
  SCN_GRID_ROWS_DISPATCH(silu_grad, a, h, g, rows, cols)
  for (int64_t r = 0; r < rows; ++r)
    silu_grad_tail(a + r * cols, h + r * cols, g + r * cols, cols, int64_t{0});
}

template <typename T>
inline void mul_colsum_rows(T* d, const T* g, T* colsum, int64_t rows, int64_t cols) {
  SCN_GRID_ROWS_DISPATCH(mul_colsum, d, g, colsum, rows, cols)
  for (int64_t r = 0; r < rows; ++r)
    mul_colsum_tail(d + r * cols, g + r * cols, colsum, cols, int64_t{0});
}

#undef SCN_GRID_ROWS_DISPATCH

}  // namespace scn_fast::grid::cpu
