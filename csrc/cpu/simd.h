// A 32-byte SIMD vector of accumulators (8 floats or 4 doubles) with loads/stores from the storage
// types, written with GCC/Clang vector extensions: compiled inside an SCN_TARGET_AVX2 function it is one
// ymm register, in the baseline clone two xmm registers.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu_isa.h"

namespace scn_fast::cpu {

template <typename Acc>
struct Simd;

template <>
struct Simd<float> {
  typedef float type __attribute__((vector_size(32)));
};

template <>
struct Simd<double> {
  typedef double type __attribute__((vector_size(32)));
};

template <typename Acc>
using vec_t = typename Simd<Acc>::type;

// Lanes of one vector: 8 floats, 4 doubles.
template <typename Acc>
inline constexpr int64_t kLanes = 32 / static_cast<int64_t>(sizeof(Acc));

// v = p[0 .. kLanes) converted to Acc (unaligned). Vectors travel by reference, not by value: the
// baseline clone has no 32-byte registers to pass them in (gcc's -Wpsabi).
template <typename Acc, typename T>
SCN_ALWAYS_INLINE void load_vec(const T* p, vec_t<Acc>& v) {
  using V = vec_t<Acc>;
  if constexpr (std::is_same_v<T, Acc>) {
    std::memcpy(&v, p, sizeof(V));
  } else if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<Acc, float>) {
    // bfloat16 is the top half of a float32: widen the 8 bit patterns and shift them up.
    typedef uint16_t u16x8 __attribute__((vector_size(16)));
    typedef uint32_t u32x8 __attribute__((vector_size(32)));
    u16x8 h;
    std::memcpy(&h, p, sizeof(h));
    const u32x8 bits = __builtin_convertvector(h, u32x8) << 16;
    std::memcpy(&v, &bits, sizeof(V));
  } else {
    for (int64_t i = 0; i < kLanes<Acc>; ++i) v[i] = static_cast<Acc>(p[i]);
  }
}

// p[0 .. kLanes) = v converted to T (round to nearest even for the half types, as c10 does).
template <typename Acc, typename T>
SCN_ALWAYS_INLINE void store_vec(T* p, const vec_t<Acc>& v) {
  if constexpr (std::is_same_v<T, Acc>) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    for (int64_t i = 0; i < kLanes<Acc>; ++i) p[i] = static_cast<T>(v[i]);
  }
}

}  // namespace scn_fast::cpu
