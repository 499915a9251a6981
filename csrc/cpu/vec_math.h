// Vectorised e^x and the logistic sigmoid for the CPU twins' fused elementwise passes (grid_ops.h,
// message_gate.cpp, message_combine.cpp): width-generic code (simd_math.inc) compiled for AVX2+FMA and for AVX-512 with
// the vector policies simd_avx2.inc / simd_avx512.inc, plus the scalar forms the baseline clones and
// float64 use. The kernels pick a width at run time (cpu_isa.h).
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

}  // namespace scn_fast::cpu

#if SCN_HAS_AVX2_CLONE
// The width-generic exp / sigmoid, compiled once per ISA: namespaces avx2 (V: 8 floats) and avx512
// (V: 16 floats), each with V, exp(V::F) and sigmoid(V::F).
SCN_BEGIN_TARGET_AVX2
namespace scn_fast::cpu::avx2 {
#include "simd_avx2.inc"
#include "simd_math.inc"
}  // namespace scn_fast::cpu::avx2
SCN_END_TARGET

SCN_BEGIN_TARGET_AVX512
namespace scn_fast::cpu::avx512 {
#include "simd_avx512.inc"
#include "simd_math.inc"
}  // namespace scn_fast::cpu::avx512
SCN_END_TARGET

namespace scn_fast::cpu {
// The AVX2 sigmoid for the kernels written with AVX2 intrinsics.
SCN_TARGET_AVX2 SCN_ALWAYS_INLINE __m256 sigmoid_avx2(__m256 a) { return avx2::sigmoid(a); }
}  // namespace scn_fast::cpu
#endif  // SCN_HAS_AVX2_CLONE
