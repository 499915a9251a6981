// Runtime ISA selection for the CPU twin's hot loops.
//
// The extension is built without -march flags (its build cache may be shared by machines of different
// CPUs), so each hot function is compiled twice: once for the baseline ISA and once with
// SCN_TARGET_AVX2 (AVX2 + FMA, so gcc vectorises the channel loops 8 floats wide and fuses the
// multiply-adds). cpu_has_avx2_fma() picks the clone at run time. The bodies the clones share must be
// SCN_ALWAYS_INLINE so that they are compiled inside each clone's target.
#pragma once

#include <atomic>
#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SCN_HAS_AVX2_CLONE 1
#define SCN_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define SCN_HAS_AVX2_CLONE 0
#define SCN_TARGET_AVX2
#endif

// Regions of code compiled for one ISA (the width-generic kernels, cpu/vec_math.h): every function
// defined between SCN_BEGIN_TARGET_* and SCN_END_TARGET gets that target, template instantiations
// included, so one kernel text (an .inc file) is compiled once per ISA in separate namespaces.
#if SCN_HAS_AVX2_CLONE && defined(__clang__)
#define SCN_BEGIN_TARGET_AVX2 \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma\"))), apply_to = function)")
#define SCN_BEGIN_TARGET_AVX512                                                                 \
  _Pragma(                                                                                      \
      "clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512dq,avx512vl,avx2,fma\"))), apply_to = function)")
#define SCN_END_TARGET _Pragma("clang attribute pop")
#elif SCN_HAS_AVX2_CLONE
#define SCN_BEGIN_TARGET_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define SCN_BEGIN_TARGET_AVX512 \
  _Pragma("GCC push_options")   \
      _Pragma("GCC target(\"avx512f,avx512bw,avx512dq,avx512vl,avx2,fma\")")
#define SCN_END_TARGET _Pragma("GCC pop_options")
#endif

#if defined(__GNUC__) || defined(__clang__)
#define SCN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define SCN_ALWAYS_INLINE inline
#endif

namespace scn_fast::cpu {

// Hint the cache to fetch [p, p + bytes) for reading (one prefetch per 64-byte line). rotate_scatter
// uses it one edge ahead: a node's edges come in perm order, so their m blocks are scattered in memory.
SCN_ALWAYS_INLINE void prefetch_bytes(const void* p, int64_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
#else
  (void)p;
  (void)bytes;
#endif
}

// The widest ISA the clones may use: 2 = AVX-512, 1 = AVX2, 0 = baseline. Lowered only by tests
// (scn_fast_ext::_set_isa_cap) so that every clone runs on a machine that has the wider ones.
inline std::atomic<int> isa_cap{2};

// True when the running CPU has AVX2 and FMA (and the avx2 clones exist in this build).
inline bool cpu_has_avx2_fma() {
#if SCN_HAS_AVX2_CLONE
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has && isa_cap.load(std::memory_order_relaxed) >= 1;
#else
  return false;
#endif
}

// True when the running CPU has AVX-512 F, BW, DQ and VL besides AVX2 and FMA.
inline bool cpu_has_avx512() {
#if SCN_HAS_AVX2_CLONE
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return has && cpu_has_avx2_fma() && isa_cap.load(std::memory_order_relaxed) >= 2;
#else
  return false;
#endif
}

}  // namespace scn_fast::cpu
